"""Refactors change no behaviour: tiny runs of every method file, through the real train/generate commands, give the
same bits as recorded before a refactor (final net, EMA and optimizer tensors; generated PNG bytes).
`python tests/test_behaviour_hashes.py --record` rewrites the record of this machine: only when a change is meant to
alter results, or on a new machine before a refactor; say so in the commit. Hashes depend on the torch build and on
the CPU's float kernels, so the record holds one entry per (torch version, CPU); the comparison runs against this
machine's entry, and is skipped where there is none."""
import hashlib
import json
import platform
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

RECORD = ROOT / 'tests' / 'data' / 'behaviour_hashes.json'

U = ['--cbase=16', '--cres=1,2', '--dropout=0', '--workers=0', '--grid=0', '--nosubdir', '--tick=0.004']
RUNS = {  # name: (module, train argv, generate argv); {out} is the run's folder, {teacher} patch-p1's snapshot
    'patch-p05': ('patch_diffusion', ['--data=demo-8', '--batch=8', '--lr=1e-3', '--ema=0.0001', '--duration=0.00004',
                                      '--snap=1', '--dump=1', *U], ['--seeds=0-2', '--steps=3', '--batch=2']),
    'patch-p1': ('patch_diffusion', ['--data=demo-8', '--real_p=1', '--batch=4', '--lr=1e-3', '--ema=0.0001',
                                     '--duration=0.000016', '--snap=1', '--dump=1', *U], ['--seeds=0-2', '--steps=3']),
    'masked-pre': ('masked_dm', ['--data=demo-8', '--arch=T', '--patch_size=2', '--embed_dim=32', '--depth=3', '--heads=1',
                                 '--mask_type=block', '--mask_ratio=0.5', '--block_size=2', '--batch=4', '--lr=1e-3',
                                 '--grid=0', '--workers=0', '--train_steps=3', '--nosubdir', '--tick=0.004', '--snap=1',
                                 '--dump=1'],
                   ['--seeds=0-2', '--steps=4', '--batch=2']),
    'relay-one': ('relay_diffusion', ['--data=demo-4', '--cond=1', '--batch=4', '--duration=0.000012', '--arch=ddpmpp',
                                      '--blocks=1', '--lr-rampup=0', '--snap=1', '--dump=1', *U], None),
    'relay-two': ('relay_diffusion', ['--data=demo-8', '--cond=1', '--precond=blur', '--up-scale=2', '--batch=4',
                                      '--label-dropout=0.5', '--duration=0.000012', '--arch=ddpmpp', '--blocks=1',
                                      '--lr-rampup=0', '--snap=1', '--dump=1', *U],
                  ['--seeds=0-2', '--batch=2', '--network_first={relay-one}', '--up_scale_second=2',
                   '--num_steps_first=3', '--num_steps_second=6', '--cfg_scale_second=2']),
    'gdd': ('gdd', ['--data=demo-8', '--batch=4', '--transfer={patch-p1}', '--backbone=tf_efficientnet_lite0',
                    '--feature-weights=random', '--feature-res=32', '--freeze=1', '--r1-interval=2', '--lr=1e-3',
                    '--dlr=1e-3', '--workers=0', '--tick=0.004', '--snap=1', '--dump=1', '--grid=0', '--nosubdir',
                    '--duration=0.000012'],
            ['--seeds=0-2', '--batch=2']),
}

def digest(obj, h=None):
    """sha256 over a nested structure of tensors, numbers and strings, in key order."""
    h = h or hashlib.sha256()
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            digest(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            digest(v, h)
    elif torch.is_tensor(obj):
        h.update(str(obj.dtype).encode() + str(list(obj.shape)).encode())
        h.update(obj.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if obj.numel() else b'')
    else:
        h.update(repr(obj).encode())
    return h.hexdigest()

def run_command(module, argv):
    mod = __import__(module)
    args = common.parse_command_line(mod.build_parser, argv)
    getattr(mod, args.command)(args)

def last(folder, kind):
    paths = sorted(Path(folder).glob(f'{kind}-*.pt'), key=lambda p: common.load_checkpoint(str(p))['cur_nimg'])
    return str(paths[-1])

GROUPS = [['patch-p05'], ['masked-pre'], ['relay-one', 'relay-two'], ['patch-p1', 'gdd']]  # later runs use earlier ones

def run_all(tmp, names=tuple(RUNS)):
    """Train and generate the named entries of RUNS; returns {name: {part: hash}} and the final checkpoints."""
    hashes, snapshots, states = {}, {}, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in names:
            module, train, gen = RUNS[name]
            out = Path(tmp) / name
            fill = lambda s: s.replace('{teacher}', snapshots.get('patch-p1', '')).format(**snapshots)  # noqa: E731
            run_command(module, ['train', f'--outdir={out}'] + [fill(a) for a in train])
            snapshots[name], states[name] = last(out, 'network-snapshot'), last(out, 'training-state')
            state = common.load_checkpoint(states[name])
            opt = {k: v for k, v in state.items() if k.startswith('optimizer')}
            hashes[name] = dict(net=digest(state['net']), ema=digest(state['ema']), optimizer=digest(opt),
                                cur_nimg=state['cur_nimg'])
            if gen is not None:
                net_flag = [] if module == 'relay_diffusion' else [f'--network={snapshots[name]}']
                if module == 'relay_diffusion':
                    net_flag = [f'--network_second={snapshots[name]}']
                run_command(module, ['generate', f'--outdir={out}/gen'] + net_flag + [fill(a) for a in gen])
                pngs = sorted(Path(out, 'gen').rglob('*.png'))
                hashes[name]['images'] = hashlib.sha256(b''.join(p.read_bytes() for p in pngs)).hexdigest()
                hashes[name]['num_images'] = len(pngs)
    finally:
        torch.set_num_threads(threads)
    return hashes, snapshots, states

def machine():
    """What the bits depend on besides our code: the torch build and the CPU (its vector unit and feature flags)."""
    try:
        flags = next(line for line in open('/proc/cpuinfo') if line.startswith('flags')).split(':')[1].split()
    except (OSError, StopIteration):
        flags = []
    key = hashlib.sha256(' '.join(sorted(flags)).encode()).hexdigest()[:12]
    return f'torch {torch.__version__}, {platform.machine()} {torch.backends.cpu.get_cpu_capability()}, flags {key}'

def records():
    return json.loads(RECORD.read_text())['records'] if RECORD.exists() else []

@pytest.mark.parametrize('names', GROUPS, ids=[g[-1] for g in GROUPS])
def test_refactor_keeps_bits(tmp_path, names):
    mine = [r for r in records() if r['machine'] == machine()]
    if not mine:
        pytest.skip(f'no record for this machine ({machine()}): `python tests/test_behaviour_hashes.py --record` '
                    'before a refactor adds one')
    hashes, _, _ = run_all(tmp_path, names)
    for name in names:
        assert hashes[name] == mine[0]['runs'][name], name

if __name__ == '__main__' and sys.argv[1] == '--record':  # --record [DIR]: also copy the final checkpoints to DIR
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        hashes, snapshots, states = run_all(tmp)
        for name in (RUNS if len(sys.argv) > 2 else []):
            shutil.copy(snapshots[name], Path(sys.argv[2]) / f'{name}-snapshot.pt')
            shutil.copy(states[name], Path(sys.argv[2]) / f'{name}-state.pt')
    others = [r for r in records() if r['machine'] != machine()]
    RECORD.write_text(json.dumps(dict(records=others + [dict(machine=machine(), runs=hashes)]), indent=1) + '\n')
    print(json.dumps(hashes, indent=1))
