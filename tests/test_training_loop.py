"""The training-loop helpers of common.py (run directory, resume, checkpoints, divergence stop, CLI entry) and the
failures a user meets, each through the real patch_diffusion.py command line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import ROOT, write_images

import common
import patch_diffusion as pd
from common import ImageFolderDataset, UserError, load_checkpoint, save_checkpoint

TRAIN = ['--data=demo-8', '--cbase=16', '--cres=1,2', '--batch=8', '--lr=1e-3', '--ema=0.0001', '--dropout=0',
         '--workers=0', '--tick=0.001', '--snap=1', '--dump=1', '--grid=0']

def train(outdir, *extra):
    pd.train(pd.parse_args(TRAIN + [f'--outdir={outdir}', *extra]))

def only_run_dir(outdir):
    run_dir, = [d for d in Path(outdir).iterdir() if d.is_dir()]
    return run_dir

#------------------------------------------------------------------------------
# CLI entry: `train` is the default command, presets are defaults under the flags.

def test_default_command_and_preset_under_flags():
    args = pd.parse_args(['--preset=demo', '--batch=8', '--lr=3e-4'])
    assert args.command == 'train' and args.batch == 8 and args.lr == 3e-4       # flags win
    assert args.data == 'demo-8' and args.cbase == 32 and args.duration == 0.19   # the rest from the preset
    assert pd.parse_args(['train', '--data=demo']).batch == 512                   # no preset: EDM's default
    with pytest.raises(SystemExit):
        pd.parse_args(['train', '--batch=8'])                                      # --data is required

def test_help_shows_each_default_once(monkeypatch, capsys):
    monkeypatch.setenv('COLUMNS', '80')  # the width of `python patch_diffusion.py train --help` piped to a file
    for command in ('train', 'generate'):
        monkeypatch.setattr(sys, 'argv', ['patch_diffusion.py', command, '--help'])  # the command line, in-process
        with pytest.raises(SystemExit) as e:
            pd.main()
        text = pd.build_parser().format_help() + capsys.readouterr().out
        assert e.value.code == 0 and text.count('(default:') > 10
        assert not [line for line in text.splitlines() if line.count('default') > 1]

#------------------------------------------------------------------------------
# Run directory: made only after setup, so a failing setup leaves nothing behind.

def test_failing_setup_leaves_no_run_dir(tmp_path):
    out = tmp_path / 'runs'
    with pytest.raises(UserError, match='no such dataset'):
        pd.train(pd.parse_args(TRAIN + [f'--outdir={out}', f'--data={tmp_path / "missing.zip"}']))
    with pytest.raises(UserError, match='not a multiple'):
        pd.train(pd.parse_args(TRAIN + [f'--outdir={out}', '--cres=1,2,2']))
    with pytest.raises(SystemExit):  # a bad flag: found while parsing
        pd.parse_args(TRAIN + [f'--outdir={out}', f'--resume={tmp_path / "nope.pt"}'])
    assert not out.exists() or not list(out.iterdir())
    train(out, '--duration=0.00001')
    run_dir = only_run_dir(out)
    assert run_dir.name.startswith('00000-demo8-uncond-ddpmpp-pedm-gpus1-batch8-fp32')
    assert json.loads((run_dir / 'training_options.json').read_text())['num_params'] > 0
    assert 'done' in (run_dir / 'log.txt').read_text()

#------------------------------------------------------------------------------
# Checkpoints: names never collide and sort in training order; temp files are hidden and cleaned up.

def test_checkpoint_names_unique_and_ordered_with_short_ticks(tmp_path):
    train(tmp_path, '--duration=0.00006', '--nosubdir')  # 4 ticks of 15 patches, all within kimg 0
    states = sorted(tmp_path.glob('training-state-*.pt'))
    snaps = sorted(tmp_path.glob('network-snapshot-*.pt'))
    assert len(states) == len(snaps) == 3  # every tick from tick 1 on (EDM: nothing at tick 0) and the end
    assert [load_checkpoint(str(p))['step'] for p in states] == [2, 3, 4]
    assert [load_checkpoint(str(p))['cur_nimg'] for p in snaps] == [30, 45, 60]
    assert not list(tmp_path.glob('.*tmp*'))

def test_temp_files_hidden_and_stale_ones_removed(tmp_path):
    save_checkpoint({'a': torch.ones(2)}, str(tmp_path / 'training-state-000001.pt'))
    assert [p.name for p in tmp_path.iterdir()] == ['training-state-000001.pt']
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    (tmp_path / f'.training-state-000002.pt.tmp{dead.pid}').write_bytes(b'partial')
    (tmp_path / f'.training-state-000003.pt.tmp{os.getpid()}').write_bytes(b'in progress')  # a live writer
    common.remove_stale_temp_files(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f'.training-state-000003.pt.tmp{os.getpid()}',
                                                           'training-state-000001.pt']

def test_no_snapshot_or_grid_at_initialization(tmp_path):
    train(tmp_path, '--duration=0.00003', '--nosubdir', '--grid=2', '--dump=0')
    # tick 1 (the end), not tick 0; named after its 30 images, never 000000 (which reads as untrained)
    assert sorted(p.name for p in tmp_path.glob('*.png')) == ['samples-000000_030.png']
    assert sorted(p.name for p in tmp_path.glob('network-snapshot-*.pt')) == ['network-snapshot-000000_030.pt']

#------------------------------------------------------------------------------
# Resume: one-line errors naming the file, what it is and what was expected.

def test_resume_errors(tmp_path, capsys):
    train(tmp_path / 'a', '--duration=0.00003', '--nosubdir')
    snapshot, = sorted((tmp_path / 'a').glob('network-snapshot-*.pt'))[-1:]
    state = sorted((tmp_path / 'a').glob('training-state-*.pt'))[-1]
    junk = tmp_path / 'junk.pt'
    junk.write_text('not a checkpoint')
    torch.save({'net': torch.nn.Linear(2, 2)}, tmp_path / 'module.pt')  # a pickled module: never unpickled
    other = tmp_path / 'other.pt'
    torch.save(dict(load_checkpoint(str(state)), method='gdd'), other)
    for path, message in [(snapshot, 'a patch_diffusion.py network snapshot, not a training state'),
                          (other, 'a gdd.py training state; patch_diffusion.py continues only its own')]:
        with pytest.raises(SystemExit) as e:  # what the file is, before any option comparison or any write
            pd.parse_args(TRAIN + [f'--outdir={tmp_path / "b"}', '--duration=0.00006', f'--resume={path}'])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and str(path) in err and err.count('\n') == 1, err
    for path, message in [(junk, 'not a checkpoint of this project'), (tmp_path / 'module.pt', 'Python objects other')]:
        with pytest.raises(SystemExit) as e:  # the flag's one-line usage error, before anything is written
            pd.parse_args(TRAIN + [f'--outdir={tmp_path / "b"}', f'--resume={path}'])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and str(path) in err and 'weights_only=False' not in err
        assert err.count('\n') == 1
    with pytest.raises(SystemExit):  # another architecture than the state's: the flag that differs, both values
        pd.parse_args(TRAIN + [f'--outdir={tmp_path / "b"}', f'--resume={state}', '--cbase=32'])
    assert '--cbase=32 given, 16 in the training state' in capsys.readouterr().err
    assert not (tmp_path / 'b').exists()

def test_resume_error_through_cli_is_one_line(tmp_path):
    (tmp_path / 'junk.pt').write_text('x')
    result = subprocess.run([sys.executable, str(ROOT / 'patch_diffusion.py'), *TRAIN, f'--outdir={tmp_path / "o"}',
                             f'--resume={tmp_path / "junk.pt"}'], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count('\n') == 1 and 'Traceback' not in result.stderr
    assert result.stderr.endswith(f'error: argument --resume: {tmp_path / "junk.pt"}: not a checkpoint of this project '
                                  '(not a torch.save file, or truncated)\n')

#------------------------------------------------------------------------------
# Divergence: a non-finite loss stops the run at the tick boundary, nothing non-finite is saved.

def test_divergence_stops_with_error_and_keeps_good_checkpoints(tmp_path):
    cmd = [sys.executable, str(ROOT / 'patch_diffusion.py'), *TRAIN, f'--outdir={tmp_path}', '--nosubdir',
           '--lr=1e6', '--lr-rampup=0.024', '--duration=0.001', '--real_p=1']  # lr 0, then 1e6/3: nan at step 3
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert result.returncode == 1, result.stdout[-2000:]
    message = result.stderr.strip()
    assert message.startswith('error: training diverged: mean loss is nan in tick ') and '\n' not in message
    stats = [json.loads(line) for line in open(tmp_path / 'stats.jsonl')]
    assert not np.isfinite(stats[-1]['loss']) and 'done' not in result.stdout
    assert f'tick {stats[-1]["tick"]} ' in message
    for path in tmp_path.glob('*.pt'):  # everything that was written is finite
        ckpt = load_checkpoint(str(path))
        assert all(torch.isfinite(t).all() for t in ckpt['ema'].values())
    states = sorted(tmp_path.glob('training-state-*.pt'))
    assert states and message.endswith(f'Last good training state: {states[-1]}')
    assert 'error: training diverged' in (tmp_path / 'log.txt').read_text()

#------------------------------------------------------------------------------
# Data: bad files are found when the dataset opens, not when first sampled.

def test_bad_images_found_up_front(tmp_path):
    folder = tmp_path / 'data'
    write_images(folder, n=8, labels=False)
    png = (folder / 'img005.png').read_bytes()
    (folder / 'img005.png').write_bytes(png[:len(png) // 2])                  # truncated PNG
    with pytest.raises(UserError, match=r'img005\.png: (truncated PNG|cannot read image)'):
        ImageFolderDataset(str(folder))
    (folder / 'img005.png').write_bytes(png)
    PIL.Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(folder / 'img006.png')  # odd size
    with pytest.raises(UserError, match=r'img006\.png: image is 10x10 RGB, the first is 8x8 RGB'):
        ImageFolderDataset(str(folder))
    PIL.Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / 'img006.png')       # grey among RGB
    with pytest.raises(UserError, match=r'img006\.png: image is 8x8 L, the first is 8x8 RGB'):
        ImageFolderDataset(str(folder))
    assert len(ImageFolderDataset(str(folder), check=False)) == 8  # check=False defers to the read

def test_bad_image_in_zip_found_up_front(tmp_path):
    import zipfile
    write_images(tmp_path / 'data', n=4, labels=False)
    with zipfile.ZipFile(tmp_path / 'd.zip', 'w') as z:
        for p in sorted((tmp_path / 'data').iterdir()):
            z.writestr(p.name, p.read_bytes()[:-20] if p.name == 'img002.png' else p.read_bytes())
    with pytest.raises(UserError, match=r'd\.zip/img002\.png: truncated PNG'):
        ImageFolderDataset(str(tmp_path / 'd.zip'))

#------------------------------------------------------------------------------
# --augment: EDM's pipe on the crops, its 9 labels into the network (augment_dim 9).

def test_augment_labels_reach_the_network(tmp_path):
    train(tmp_path, '--duration=0.00005', '--nosubdir', '--augment=0.5', '--real_p=0.5', '--lr-rampup=0')
    first, last = (load_checkpoint(str(p)) for p in sorted(tmp_path.glob('training-state-*.pt'))[-2:])
    assert last['net_kwargs']['augment_dim'] == 9
    # map_augment gets a gradient only from non-zero augment labels: Adam moved it at every step
    assert not torch.equal(first['net']['model.map_augment.weight'], last['net']['model.map_augment.weight'])
    images = pd.load_network(str(sorted(tmp_path.glob('network-snapshot-*.pt'))[-1]))
    assert images.model.map_augment.weight.shape[1] == 9
