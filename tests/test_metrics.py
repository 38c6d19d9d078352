"""train --metrics, checked once on tiny Patch Diffusion runs (the machinery is common.TrainingRun and
fid.TrainingMetrics; every method file feeds it its own sample_images): the FID equals generate + fid.py calc, two
gloo processes give the numbers of one, a resumed run keeps the metric lines and the best, generate --pick takes the
best snapshot, and the training time leaves the metrics out."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import ROOT, run_main, save_stand_in_detector

import common
import fid
import patch_diffusion as pd

# 8x8 demo shapes, a 22k-parameter one-level DDPM++ (500 samples of 18 Heun steps in about 4 CPU seconds), a snapshot
# at every tick of one step (15 patches).
TRAIN = ['train', '--data=demo-8', '--cbase=8', '--cres=1', '--batch=8', '--lr=1e-3', '--ema=0.0001', '--dropout=0',
         '--workers=0', '--tick=0.001', '--snap=1', '--dump=1', '--grid=0', '--nosubdir']

def train(outdir, *extra):
    pd.train(pd.parse_args(TRAIN + [f'--outdir={outdir}', *extra]))

def metric_lines(run, name='toy_fd'):
    return [json.loads(line) for line in open(run / f'metric-{name}.jsonl')]

def read_pngs(folder):
    return {p.name: np.array(PIL.Image.open(p)) for p in sorted(folder.rglob('*.png'))}

#------------------------------------------------------------------------------
# (1) Inception FID during training = generate, then fid.py calc.

def test_fid_during_training_equals_generate_then_fid_calc(tmp_path, monkeypatch, capsys):
    """--metrics=fid10k_full with a stand-in detector equals `generate --seeds=0-(N-1)` of the snapshot, then
    `fid.py calc --num=N` against the same reference. N = 32, not 10,000: TRAINING_METRICS is monkeypatched, since
    10,000 samples and detector passes take minutes on a CPU; the code path is the same for any N. The Frechet
    distance's 2048x2048 matrix square root (about 20 CPU s each; tests/test_fid.py checks it) is swapped, in both
    paths, for |mu1 - mu2|^2 + |sigma1 - sigma2|_F^2 + |sigma1|_F^2, which differs whenever the statistics differ."""
    monkeypatch.setitem(common.TRAINING_METRICS, 'fid10k_full', 32)
    monkeypatch.setattr(fid, 'frechet_distance', lambda mu1, sigma1, mu2, sigma2: float(
        np.square(mu1 - mu2).sum() + np.square(sigma1 - sigma2).sum() + np.square(sigma1).sum()))
    detector, ref = tmp_path / 'detector.pt', tmp_path / 'ref.npz'
    save_stand_in_detector(detector)  # NVIDIA's TorchScript interface around a tiny random net (tests/conftest.py)
    fid.main(['ref', '--data=demo-8', '--num=32', f'--dest={ref}', f'--detector={detector}', '--workers=0'])
    run = tmp_path / 'run'
    train(run, '--duration=0.000015', '--metrics=fid10k_full', f'--metrics-ref={ref}', f'--metrics-detector={detector}')
    line, = metric_lines(run, 'fid10k_full')
    assert line['metric'] == 'fid10k_full' and line['snapshot_pkl'] == 'network-snapshot-000000_015.pt'
    pd.generate(pd.parse_args(['generate', f'--network={run / line["snapshot_pkl"]}', f'--outdir={tmp_path / "gen"}',
                               '--seeds=0-31']))
    capsys.readouterr()
    fid.main(['calc', f'--images={tmp_path / "gen"}', f'--ref={ref}', '--num=32', f'--detector={detector}',
              '--workers=0'])
    printed = dict(line.split()[:2] for line in capsys.readouterr().out.splitlines() if line.startswith('fid '))
    assert line['results']['fid10k_full'] == pytest.approx(float(printed['fid']), rel=1e-6)
    assert line['results']['fid10k_full'] > 0

#------------------------------------------------------------------------------
# (2) Two gloo processes give the numbers of one.

# patch_diffusion.py's command line with toy_fd on 100 samples (TRAINING_METRICS set as the tests here monkeypatch it)
TOY_FD_100 = """
import sys
sys.path.insert(0, sys.argv[1])
import common
common.TRAINING_METRICS['toy_fd'] = 100
import patch_diffusion
sys.argv = ['patch_diffusion.py'] + sys.argv[2:]
patch_diffusion.main()
"""

def test_two_processes_give_the_numbers_of_one(tmp_path, monkeypatch, toy_cache):
    """A 2-process torchrun run (gloo) splits the seeds between its ranks; its metric line equals what one process
    computes from the same snapshot. toy_fd on 100 samples, not 500, in both (for time; the split is the same code).
    (The two runs' weights are not compared with a 1-process run's: each rank draws its own noise, so the training
    differs, as in every DDP test here.)"""
    monkeypatch.setitem(common.TRAINING_METRICS, 'toy_fd', 100)
    (tmp_path / 'toy_fd_100.py').write_text(TOY_FD_100)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           str(tmp_path / 'toy_fd_100.py'), str(ROOT), *TRAIN, f'--outdir={tmp_path / "run"}', '--duration=0.000015',
           '--metrics=toy_fd', f'--metrics-cache={toy_cache}']
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert result.returncode == 0, result.stderr[-3000:]
    line, = metric_lines(tmp_path / 'run')
    assert line['num_gpus'] == 2 and f'toy_fd {line["results"]["toy_fd"]:.4g}' in result.stdout
    common.init_distributed()
    device = torch.device('cpu')
    net = pd.load_network(str(tmp_path / 'run' / line['snapshot_pkl'])).eval()
    metrics = fid.TrainingMetrics(['toy_fd'], 'demo-8', 8, 3, device, cache=str(toy_cache))
    one = metrics(lambda seeds: pd.sample_images(net, seeds, device))
    assert one['toy_fd'] == pytest.approx(line['results']['toy_fd'], rel=1e-9)

#------------------------------------------------------------------------------
# (3) A resumed run keeps the metric lines and the best.

def test_resume_keeps_metric_lines_and_the_best(tmp_path, monkeypatch, toy_cache):
    """Trained to kimg 0.03, then resumed from its run directory to kimg 0.06: the same metric lines (snapshot,
    kimg, value) as the uninterrupted run, and log.txt's last 'best so far' names the best snapshot. toy_fd on 64
    samples (TRAINING_METRICS monkeypatched: 6 evaluations of 500 would take half a CPU minute)."""
    monkeypatch.setitem(common.TRAINING_METRICS, 'toy_fd', 64)
    metrics = ['--metrics=toy_fd', f'--metrics-cache={toy_cache}']
    train(tmp_path / 'full', '--duration=0.00006', *metrics)
    train(tmp_path / 'resumed', '--duration=0.00003', *metrics)
    pd.train(pd.parse_args(['train', f'--resume={tmp_path / "resumed"}', '--duration=0.00006']))
    key = lambda line: (line['snapshot_pkl'], line['kimg'], line['results'])  # noqa: E731
    full, resumed = metric_lines(tmp_path / 'full'), metric_lines(tmp_path / 'resumed')
    assert [key(line) for line in resumed] == [key(line) for line in full] and len(full) == 3
    best = min(full, key=lambda line: line['results']['toy_fd'])
    log = (tmp_path / 'resumed' / 'log.txt').read_text()
    assert 'resumed from' in log
    last_best = [line for line in log.splitlines() if 'best so far' in line][-1]
    assert last_best.endswith(f'best so far {best["results"]["toy_fd"]:.4g} at {best["snapshot_pkl"]}')

#------------------------------------------------------------------------------
# (4) generate --pick=best:NAME.

@pytest.fixture(scope='module')
def three_snapshots(tmp_path_factory):
    run = tmp_path_factory.mktemp('pick')
    train(run, '--duration=0.00006')  # 4 steps: snapshots at ticks 1, 2, 3
    return run, sorted(p.name for p in run.glob('network-snapshot-*.pt'))

def write_metric(run, name, snapshots, values):
    with open(run / f'metric-{name}.jsonl', 'w') as f:
        for i, (snapshot, value) in enumerate(zip(snapshots, values)):
            f.write(json.dumps(dict(results={name: value}, metric=name, total_time=1.0, total_time_str='1s', num_gpus=1,
                                    snapshot_pkl=snapshot, kimg=0.015 * (i + 1), timestamp=0.0)) + '\n')

def test_generate_pick_best_takes_the_lowest_value(three_snapshots, tmp_path, monkeypatch, capsys):
    """--pick=best:toy_fd takes the snapshot of the lowest toy_fd in a hand-written metric file (the middle one), the
    same images as naming that snapshot; --pick=best with two metrics there is one line, exit 2, nothing written."""
    run, snapshots = three_snapshots
    assert len(snapshots) == 3
    write_metric(run, 'toy_fd', snapshots, [3.0, 1.5, 2.0])
    gen = ['generate', '--seeds=0-1', '--steps=2']
    args = pd.parse_args(gen + [f'--network={run}', '--pick=best:toy_fd', f'--outdir={tmp_path / "best"}'])
    assert args.network == str(run / snapshots[1])
    assert f'--pick=best:toy_fd: {snapshots[1]} (toy_fd 1.5 at kimg 0.03)' in capsys.readouterr().out
    code, _ = run_main(pd, monkeypatch, capsys, gen + [f'--network={run}', '--pick=best:toy_fd',
                                                       f'--outdir={tmp_path / "best"}'])
    pd.generate(pd.parse_args(gen + [f'--network={run / snapshots[1]}', f'--outdir={tmp_path / "middle"}']))
    best, middle = read_pngs(tmp_path / 'best'), read_pngs(tmp_path / 'middle')
    assert code == 0 and len(best) == 2 and all(np.array_equal(best[k], middle[k]) for k in middle)
    write_metric(run, 'fid10k_full', snapshots, [9.0, 8.0, 7.0])
    before = sorted(tmp_path.rglob('*'))
    capsys.readouterr()
    code, err = run_main(pd, monkeypatch, capsys, gen + [f'--network={run}', '--pick=best',
                                                         f'--outdir={tmp_path / "two"}'])
    assert code == 2 and err.count('\n') == 1 and 'best:NAME' in err and 'Traceback' not in err, err
    assert sorted(tmp_path.rglob('*')) == before

#------------------------------------------------------------------------------
# (5) The training time leaves the metrics out.

def test_training_time_excludes_the_metrics(tmp_path, monkeypatch, toy_cache):
    """With an evaluation made 1 s slower (the sampler sleeps), stats.jsonl's `time` leaves it out: it shows as the
    next tick's `maintenance`, and the wall clock runs ahead of `time` by at least the evaluations. toy_fd on 64
    samples (TRAINING_METRICS monkeypatched: one sampler call per evaluation)."""
    monkeypatch.setitem(common.TRAINING_METRICS, 'toy_fd', 64)
    sample_images = pd.sample_images

    def slow(*args, **kwargs):
        time.sleep(1.0)
        return sample_images(*args, **kwargs)
    monkeypatch.setattr(pd, 'sample_images', slow)
    start = time.time()
    train(tmp_path, '--duration=0.000045', '--metrics=toy_fd', f'--metrics-cache={toy_cache}')
    wall = time.time() - start
    ticks = [json.loads(line) for line in open(tmp_path / 'stats.jsonl')]
    lines = metric_lines(tmp_path)
    assert [t['tick'] for t in ticks] == [0, 1, 2] and len(lines) == 2
    assert all(line['total_time'] >= 1.0 for line in lines)
    t1, t2 = ticks[1], ticks[2]
    assert t2['maintenance'] >= 1.0                                                   # tick 1's evaluation
    assert t2['time'] - t1['time'] <= t2['sec/tick'] + t2['maintenance'] - 1.0 + 1e-3  # ... is not training time
    assert t2['time'] <= wall - 2.0
