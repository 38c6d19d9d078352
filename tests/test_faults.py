"""Bad input and faults through the real patch_diffusion.py command line (the other method files have their own rows
in their test files): one line on stderr naming the flag, exit 2 for usage errors and 1 for run-time failures,
nothing left behind; a full disk, a read-only folder, an unreadable image mid-run and Ctrl-C keep the last good
state on disk and say where it is."""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import ROOT, run_main

import common
import patch_diffusion as pd
from common import load_checkpoint

TRAIN = ['train', '--data=demo-8', '--cbase=16', '--cres=1,2', '--batch=8', '--lr=1e-3', '--ema=0.0001',
         '--dropout=0', '--workers=0', '--tick=0.001', '--snap=1', '--dump=1', '--grid=0']

def run_cli(monkeypatch, capsys, argv):
    return run_main(pd, monkeypatch, capsys, argv)

@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A tiny run's last training state and snapshot."""
    out = tmp_path_factory.mktemp('trained')
    pd.train(pd.parse_args(TRAIN + [f'--outdir={out}', '--nosubdir', '--duration=0.000015']))
    return str(sorted(out.glob('training-state-*.pt'))[-1]), str(sorted(out.glob('network-snapshot-*.pt'))[-1])

CASES = [  # (argv after the command, exit code, words the one line must contain)
    (['--batch=-4'], 2, ['--batch', '-4', '>= 1']),
    (['--batch=8', '--batch-gpu=3'], 2, ['--batch=8', 'multiple']),
    (['--preset=bogus'], 2, ['--preset', 'bogus', 'celeba64']),
    (['--real_p=1.5'], 2, ['--real_p', '1.5', '<= 1']),
    (['--lr=-1'], 2, ['--lr', '-1', '> 0']),
    (['--duration=0'], 2, ['--duration', '> 0']),
    (['--tick=abc'], 2, ['--tick', 'abc']),
    (['--fp16=maybe'], 2, ['--fp16', 'maybe']),
    (['--cres=1,2,2'], 2, ['patch size 2', 'multiple of 4']),
    (['--data=missing.zip'], 2, ['missing.zip', 'no such dataset']),
    (['--resume=missing.pt'], 2, ['--resume', 'missing.pt']),
    (['--resume={junk}'], 2, ['--resume', 'junk.pt', 'not a torch.save file']),
    (['--resume={state}', '--cbase=32', '--real_p=1'], 2, ['--cbase=32 given, 16 in the training state',
                                                           '--real_p=1.0 given, 0.5']),
    (['--resume={snapshot}'], 2, ['network snapshot, not a training state']),
    (['--resume={other_state}', '--batch=4'], 2, ['masked_dm.py training state', 'patch_diffusion.py continues']),
    (['--lr=inf'], 2, ['--lr', 'not a finite number']),
    (['--lr=1e400'], 2, ['--lr', 'not a finite number']),
    (['--duration=inf'], 2, ['--duration', 'not a finite number']),
    (['--duration=1e9'], 2, ['--duration', '<= 100000']),
    (['--ls=nan'], 2, ['--ls', 'not a finite number']),
    (['--seed=-1'], 2, ['--seed', '>= 0']),
    (['--seed=99999999999999999999999'], 2, ['--seed', '<= 4294967295']),
    (['--batch=1e20'], 2, ['--batch', 'expected an integer']),
    (['--batch=99999999999'], 2, ['--batch', '<= 16777216']),
    (['--data=demo-0'], 2, ['--data=demo-0', '4 to 1024']),
    (['--data=demo-100000'], 2, ['--data=demo-100000', '4 to 1024']),
    (['--outdir={file}'], 2, ['--outdir', 'not a folder']),
    (['--outdir={file}/sub'], 2, ['--outdir', 'not a writable folder']),
]

@pytest.mark.parametrize('argv, code, words', CASES, ids=[' '.join(c[0]).replace('/', '_') for c in CASES])
def test_train_errors_are_one_line_and_leave_nothing(tmp_path, monkeypatch, capsys, trained, argv, code, words):
    (tmp_path / 'junk.pt').write_text('not a checkpoint')
    (tmp_path / 'file').write_text('a file, not a folder')
    other = dict(load_checkpoint(trained[0]), method='masked_dm')
    torch.save(dict(other, args=dict(other['args'], batch=4)), tmp_path / 'other.pt')
    fill = dict(junk=tmp_path / 'junk.pt', state=trained[0], snapshot=trained[1], file=tmp_path / 'file',
                other_state=tmp_path / 'other.pt')
    argv = [a.format(**fill) for a in argv]
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob('*'))
    out = [] if any(a.startswith('--outdir') for a in argv) else [f'--outdir={tmp_path / "runs"}']
    got, err = run_cli(monkeypatch, capsys, TRAIN + out + argv)
    assert got == code and err.count('\n') == 1 and 'Traceback' not in err, err
    assert all(w in err for w in words), err
    assert sorted(p.name for p in tmp_path.rglob('*')) == before  # no run directory, no temp file

GENERATE_CASES = [
    (['--seeds=5-1'], 2, ['--seeds', 'empty range']),
    (['--steps=0'], 2, ['--steps', '>= 1']),
    (['--batch=0'], 2, ['--batch', '>= 1']),
    (['--class=5'], 2, ['--class=5', '0 classes']),
    (['--cfg=2'], 2, ['--cfg', 'class-conditional']),
    (['--image_size=9'], 2, ['--image_size=9', 'multiple of 2']),
    (['--outdir={file}'], 2, ['--outdir', 'not a folder']),
    (['--network=missing.pt'], 2, ['missing.pt', 'no such']),
    (['--network={state_of_other}'], 2, ['--network', 'gdd.py checkpoint']),
    (['--network={nan}'], 2, ['--network', 'nan.pt', 'NaN or inf']),
    (['--sigma_max=inf'], 2, ['--sigma_max', 'not a finite number']),
    (['--rho=inf'], 2, ['--rho', 'not a finite number']),
    (['--sigma_min=10', '--sigma_max=1'], 2, ['--sigma_min=10 must be below --sigma_max=1']),
    (['--seeds=0-99999999999'], 2, ['--seeds', 'more than 10,000,000']),
]

@pytest.mark.parametrize('argv, code, words', GENERATE_CASES, ids=[' '.join(c[0]) for c in GENERATE_CASES])
def test_generate_errors_are_one_line_and_leave_nothing(tmp_path, monkeypatch, capsys, trained, argv, code, words):
    (tmp_path / 'file').write_text('a file, not a folder')
    torch.save(dict(load_checkpoint(trained[1]), method='gdd'), tmp_path / 'other.pt')
    snapshot = load_checkpoint(trained[1])
    torch.save(dict(snapshot, ema={k: v * float('nan') for k, v in snapshot['ema'].items()}), tmp_path / 'nan.pt')
    fill = dict(file=tmp_path / 'file', state_of_other=tmp_path / 'other.pt', nan=tmp_path / 'nan.pt')
    argv = [a.format(**fill) for a in argv]
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob('*'))
    base = ['generate', f'--network={trained[1]}', f'--outdir={tmp_path / "gen"}', '--steps=2']
    got, err = run_cli(monkeypatch, capsys, base + argv)
    assert got == code and err.count('\n') == 1 and 'Traceback' not in err, err
    assert all(w in err for w in words), err
    assert sorted(p.name for p in tmp_path.rglob('*')) == before

#------------------------------------------------------------------------------
# Faults of the operating system: a small tmpfs (root, as in CI) fills up, or is mounted read-only.

@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / 'disk'
    mount.mkdir()
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=3m', 'tmpfs', str(mount)], capture_output=True).returncode:
        pytest.skip('cannot mount a tmpfs here (needs root)')
    yield mount
    subprocess.run(['umount', '-l', str(mount)], capture_output=True)

def test_full_disk_names_file_free_space_and_last_good_state(small_disk, monkeypatch, capsys):
    # 1.6 MB snapshots, 6.5 MB training states: the first snapshot fits, the first training state does not.
    got, err = run_cli(monkeypatch, capsys, TRAIN + [f'--outdir={small_disk}', '--nosubdir', '--duration=0.00003'])
    assert got == 1 and err.count('\n') == 1 and 'Traceback' not in err, err
    assert f'cannot write {small_disk}/training-state-000000_030.pt (no space left on device;' in err
    assert 'MiB free there). Last good training state: none' in err
    assert not [p for p in os.listdir(small_disk) if '.tmp' in p]  # the partial file is gone

def test_read_only_folder_is_refused_before_anything(small_disk, monkeypatch, capsys):
    subprocess.run(['mount', '-o', 'remount,ro', str(small_disk)], check=True)
    got, err = run_cli(monkeypatch, capsys, TRAIN + [f'--outdir={small_disk}/runs'])
    assert got == 2 and 'not a writable folder' in err and err.count('\n') == 1

#------------------------------------------------------------------------------
# Faults during a run: nothing is lost.

def garble(path):
    """Flip bytes in the middle of a PNG's compressed pixel data: the header and IEND stay valid."""
    data = bytearray(path.read_bytes())
    start = data.index(b'IDAT') + 8
    for i in range(start + 4, start + 24):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))

def test_unreadable_image_mid_run_writes_a_state_first(tmp_path, monkeypatch, capsys):
    folder = tmp_path / 'images'
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(48):
        PIL.Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f'{i:03d}.png')
    garble(folder / '040.png')
    got, err = run_cli(monkeypatch, capsys, TRAIN + [f'--data={folder}', f'--outdir={tmp_path / "run"}', '--nosubdir',
                                                     '--duration=1'])
    assert got == 1 and err.count('\n') == 1 and '040.png' in err and 'Traceback' not in err, err
    assert err.strip().endswith(f'to continue: python patch_diffusion.py train --resume={tmp_path / "run"}')
    state = common.latest_checkpoint(str(tmp_path / 'run'), 'training-state', '--resume')
    stats = [json.loads(line) for line in open(tmp_path / 'run' / 'stats.jsonl')]
    saved = load_checkpoint(state)
    assert saved['step'] >= stats[-1]['step'] and saved['cur_nimg'] == saved['step'] * 15  # every finished step

def test_ctrl_c_writes_a_state_and_resume_equals_the_uninterrupted_run(tmp_path):
    flags = TRAIN + ['--nosubdir', '--duration=0.0003', '--tick=0.015']  # 20 steps of 15 patches
    pd.train(pd.parse_args(flags + [f'--outdir={tmp_path / "full"}']))
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    proc = subprocess.Popen([sys.executable, str(ROOT / 'patch_diffusion.py'), *flags, '--duration=1',
                             f'--outdir={tmp_path / "cut"}'], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    for line in proc.stdout:  # interrupt after the second status line
        if line.startswith('tick 1'):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == 'interrupted' and 'Traceback' not in err, err
    command = out.split('to continue: ')[1].splitlines()[0]
    assert command == f'python patch_diffusion.py train --resume={tmp_path / "cut"}'
    state = common.latest_checkpoint(str(tmp_path / 'cut'), 'training-state', '--resume')
    assert load_checkpoint(state)['cur_nimg'] < 300
    # The printed command, with the shorter duration: flags left out are the state's; it continues in that folder.
    pd.train(pd.parse_args(['train', f'--resume={tmp_path / "cut"}', '--duration=0.0003']))
    full, resumed = (load_checkpoint(str(sorted((tmp_path / d).glob('training-state-000000_300.pt'))[-1]))
                     for d in ('full', 'cut'))
    assert full['step'] == resumed['step'] == 20
    assert all(torch.equal(full['net'][k], resumed['net'][k]) and torch.equal(full['ema'][k], resumed['ema'][k])
               for k in full['net'])
    log = (tmp_path / 'cut' / 'log.txt').read_text()
    assert f'resumed from {state}' in log and any('resumed_from' in line for line in open(tmp_path / 'cut' / 'stats.jsonl'))
    ticks = lambda d: sorted({json.loads(l)['kimg'] for l in open(tmp_path / d / 'stats.jsonl') if '"tick"' in l})  # noqa
    assert ticks('full') == ticks('cut')  # the resumed run stays on the uninterrupted run's tick grid
    names = lambda d, kind: sorted(p.name for p in (tmp_path / d).glob(f'{kind}-*.pt'))  # noqa: E731
    assert names('full', 'network-snapshot') == names('cut', 'network-snapshot')
    assert set(names('full', 'training-state')) <= set(names('cut', 'training-state'))  # plus the Ctrl-C one

def test_a_copied_run_resumes_into_the_copy(tmp_path):
    flags = TRAIN + ['--nosubdir', '--tick=0.015', '--snap=1', '--dump=1']
    pd.train(pd.parse_args(flags + ['--duration=0.00003', f'--outdir={tmp_path / "a"}']))
    shutil.copytree(tmp_path / 'a', tmp_path / 'b')
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / 'a').iterdir()}
    pd.train(pd.parse_args(['train', f'--resume={tmp_path / "b"}', '--duration=0.00006']))
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / 'a').iterdir()} == before  # the original untouched
    assert load_checkpoint(common.latest_checkpoint(str(tmp_path / 'b'), 'training-state', '-'))['cur_nimg'] == 60
    # Resuming an older state where later ones exist would overwrite them: refused, or branched with --outdir.
    older = sorted((tmp_path / 'b').glob('training-state-*.pt'))[0]
    with pytest.raises(SystemExit) as e:
        pd.parse_args(['train', f'--resume={older}'])
    assert e.value.code == 2
    args = pd.parse_args(['train', f'--resume={older}', f'--outdir={tmp_path / "c"}'])
    assert args.outdir == str(tmp_path / 'c') and not args.nosubdir

def test_a_folder_stands_for_its_newest_checkpoint(tmp_path, monkeypatch):
    """`--network=training-runs` and `--resume=<run dir>` need no run number: the newest file is taken."""
    for duration in ('0.000015', '0.00003'):
        pd.train(pd.parse_args(TRAIN + [f'--outdir={tmp_path / "runs"}', f'--duration={duration}']))
    newest = max((tmp_path / 'runs').glob('*/network-snapshot-*.pt'), key=os.path.getmtime)
    assert newest.parent.name.startswith('00001-')
    for network, out in ((tmp_path / 'runs', 'a'), (newest, 'b')):
        pd.generate(pd.parse_args(['generate', f'--network={network}', f'--outdir={tmp_path / out}', '--seeds=0-1',
                                   '--steps=2']))
    assert [p.read_bytes() for p in sorted((tmp_path / 'a').glob('*.png'))] == \
           [p.read_bytes() for p in sorted((tmp_path / 'b').glob('*.png'))]
    args = pd.parse_args(['train', f'--resume={newest.parent}'])
    assert args.resume == str(max(newest.parent.glob('training-state-*.pt'), key=os.path.getmtime))

@pytest.mark.skipif(torch.cuda.is_available(), reason='CPU runs only')
def test_cpu_threads_follow_the_idle_cores(monkeypatch):
    import common
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    monkeypatch.setattr(os, 'getloadavg', lambda: (os.cpu_count() + 0.7, 0, 0))  # every core busy
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count())
    try:
        common.init_distributed()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
