"""Patch Diffusion vs EDM at equal compute: what the faster steps buy. Not a test (pytest does not collect it).

Trains `--real_p=1` (plain EDM: EDMPrecond, 3-channel DDPM++) and `--real_p=0.5` (Patch Diffusion) side by side
for the same CPU time and compares the held-out denoising loss of the full-size network at several points of
training, plus one sample grid per run. The paper claims about 2x faster training at equal or better FID.

Design:
- Data: the built-in demo shapes at 16 px (common.DemoDataset), a fixed training set of its first --train_images
  (2048) images, kept in memory, so that data loading costs neither run anything. Held-out set: 256 images of
  DemoDataset(size=10**6) at indices 500000.. (other seeds, never seen in training). Both runs read the same
  seeded data order (common.data_stream); the patch run consumes it faster (batch multipliers).
- Training: the `demo` preset through patch_diffusion's own parser (DDPM++ cbase 32, cres 1,2,2, 2.7M parameters,
  batch 32, lr 1e-3 with a 1 kimg ramp-up, EMA half-life 2 kimg with EDM's ramp-up, no dropout, seed 0), and the
  step of patch_diffusion.train: reseed per step, patch_schedule's sizes / probabilities / batch multipliers,
  patch_loss (EDM's loss on patches), reduce_loss, optimizer_step, update_ema, the patch counter. Before measuring, a few
  steps of each config are checked bitwise against patch_diffusion.train itself (weights, EMA, counter).
- Compute: the machine is shared, so wall time says little. The budget is process CPU time
  (time.process_time(), torch.set_num_threads(1)) spent in training steps, the same --budget for both runs; the
  runs alternate in --chunk CPU-second slices so that load changes hit both alike. Recorded per run: CPU
  seconds, optimizer steps, images fetched, patch-counter kimg.
- Evaluation at --fractions of the budget (not counted in it): EDM-weighted (EDM Eq. 2, lambda = (s^2 + sd^2) /
  (s sd)^2) mean squared error of the EMA network on the held-out images at 8 log-spaced sigmas 0.02..20, with
  noise drawn once (seed 0), at full 16x16 size with the full coordinate grid for the patch model; per sigma and
  the mean over sigmas. The raw (non-EMA) network is evaluated at the end.
- Grids: seeds 0-63, 18 Heun steps (patch_diffusion.save_sample_grid: edm_sampler via guided_denoiser and
  coordinate_canvas), one per run, and compare.png: held-out images | EDM | Patch Diffusion, 4x enlarged.
  Everything goes to --outdir, with results.json.

  python tests/benchmark_patch_quality.py --budget=300 --outdir=/tmp/patch_quality
"""

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from glob import glob
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import patch_diffusion as pd  # noqa: E402
from common import (DemoDataset, data_stream, ema_beta, learning_rate, load_checkpoint, optimizer_step,  # noqa: E402
                    reseed, save_image_grid, split_batch, update_ema)

RESOLUTION = 16
NAMES = {1.0: 'EDM (real_p=1)', 0.5: 'Patch (real_p=0.5)'}


class MemoryDataset(torch.utils.data.Dataset):
    """Items `indices` of a dataset, decoded once."""
    def __init__(self, dataset, indices):
        self.items = [dataset[int(i)] for i in indices]
        self.resolution, self.num_channels, self.label_dim = dataset.resolution, dataset.num_channels, 0

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class Run:
    """One training run of patch_diffusion.train's loop (one process, CPU), advanced one optimizer step at a time."""
    def __init__(self, real_p, dataset, flags=()):
        self.args = args = pd.parse_args(['train', '--preset=demo', f'--real_p={real_p}', '--outdir=unused', *flags])
        self.dataset = dataset
        self.batch_gpu, self.rounds = split_batch(args.batch, args.batch_gpu, 1)
        self.sizes, self.pmf, self.batch_mul = pd.patch_schedule(dataset.resolution, args.real_p)
        self.mul_avg = float(np.dot(self.pmf, self.batch_mul))
        self.precond, net_kwargs = pd.precond_class(args.real_p), pd.network_kwargs(args, dataset.resolution, dataset.num_channels, 0)
        torch.manual_seed(args.seed)
        self.net = pd.build_network(self.precond, net_kwargs).train().requires_grad_(True)
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
        self.scaler = torch.amp.GradScaler('cpu', enabled=False)
        self.stream = data_stream(dataset, self.batch_gpu, 0, 1, args.seed, 0, 0)
        self.coords = self.precond == 'PatchPrecond'
        self.cur_nimg = self.step = self.data_pos = 0
        self.cpu = 0.0      # process CPU seconds spent in train_step
        self.losses = []    # training loss (mean per element) of each step

    def train_step(self):
        start = time.process_time()
        args = self.args
        rng = reseed(args.seed, 0, self.cur_nimg)
        self.optimizer.zero_grad(set_to_none=True)
        for r in range(self.rounds):
            k = int(rng.choice(len(self.sizes), p=self.pmf))
            fetched = [next(self.stream) for _ in range(self.batch_mul[k])]
            self.data_pos += self.batch_mul[k] * self.batch_gpu
            images = torch.cat([f[0] for f in fetched]).to(torch.float32) / 127.5 - 1
            loss = pd.patch_loss(self.net, images, None, self.sizes[k], self.coords)
            (pd.reduce_loss(loss, self.batch_gpu * self.rounds, self.batch_mul[k]) * args.ls).backward()
            self.losses.append(loss.mean().item())
        nimg_step = args.batch * self.mul_avg
        optimizer_step(self.optimizer, self.scaler, learning_rate(args.lr, self.cur_nimg, args.lr_rampup))
        update_ema(self.ema, self.net, ema_beta(self.cur_nimg, nimg_step, args.ema * 1000))
        self.cur_nimg += int(nimg_step)
        self.step += 1
        self.cpu += time.process_time() - start


def check_against_cli(real_p, steps=3):
    """Run patch_diffusion.train for `steps` steps on demo-16 and Run for as many: weights must be bitwise equal."""
    with tempfile.TemporaryDirectory() as outdir:
        nimg = int(32 * (1.9 if real_p < 1 else 1))
        flags = ['--data=demo-16', f'--duration={(steps - 0.5) * nimg / 1e6}', '--tick=1000', '--snap=0', '--dump=0',
                 '--grid=0', '--nosubdir', '--workers=0']
        pd.train(pd.parse_args(['train', '--preset=demo', f'--real_p={real_p}', f'--outdir={outdir}', *flags]))
        state = load_checkpoint(sorted(glob(os.path.join(outdir, 'training-state-*.pt')))[-1])
    run = Run(real_p, DemoDataset(resolution=RESOLUTION), flags)
    for _ in range(state['step']):
        run.train_step()
    same = state['cur_nimg'] == run.cur_nimg and all(
        torch.equal(state[key][name], value) for key, module in (('net', run.net), ('ema', run.ema))
        for name, value in module.state_dict().items())
    if not same:
        raise SystemExit(f'real_p={real_p}: this benchmark\'s training step no longer matches patch_diffusion.train')
    print(f'real_p={real_p}: {state["step"]} steps equal patch_diffusion.train bitwise (net, EMA, counter)')


def heldout_images(num):
    """Demo images the training set never contains: DemoDataset(size=10**6) items 500000.., as floats in [-1, 1]."""
    dataset = DemoDataset(resolution=RESOLUTION, size=10**6)
    return torch.stack([torch.from_numpy(dataset[500000 + i][0]) for i in range(num)]).to(torch.float32) / 127.5 - 1


@torch.no_grad()
def heldout_loss(net, images, sigmas, noise, sigma_data=0.5):
    """EDM-weighted denoising error per sigma (EDM Eq. 2 with lambda of Table 1), mean over images and pixels, of
    the full-size network (patch model: the full coordinate grid)."""
    denoise = pd.guided_denoiser(net, pd.coordinate_canvas(RESOLUTION, RESOLUTION))
    losses = []
    for sigma, n in zip(sigmas, noise):
        weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
        sigma_batch = torch.full([images.shape[0]], sigma)
        losses.append(weight * (denoise(images + sigma * n, sigma_batch, None) - images).square().mean().item())
    return losses


def save_comparison(real, paths, out):
    """One PNG: held-out images | each run's grid, 4x enlarged (nearest), with a caption above each panel."""
    panels = [(name, PIL.Image.open(p).convert('RGB')) for name, p in [('held-out data', real)] + paths]
    panels = [(name, image.resize((image.width * 4, image.height * 4), PIL.Image.NEAREST)) for name, image in panels]
    gap, top = 16, 20
    canvas = PIL.Image.new('RGB', (sum(i.width for _, i in panels) + gap * (len(panels) + 1), panels[0][1].height + top + gap), 'white')
    x = gap
    for name, image in panels:
        canvas.paste(image, (x, top))
        PIL.ImageDraw.Draw(canvas).text((x, 4), name, fill='black')
        x += image.width + gap
    canvas.save(out)


def crossing(rows):
    """Where (patch loss - EDM loss) changes sign between consecutive evaluations, as text."""
    d = [r[0.5]['ema_mean'] - r[1.0]['ema_mean'] for r in rows]
    found = []
    for a, b, ra, rb in zip(d, d[1:], rows, rows[1:]):
        if a * b < 0:
            t = ra['fraction'] + (rb['fraction'] - ra['fraction']) * a / (a - b)
            found.append(f'between fractions {ra["fraction"]:g} and {rb["fraction"]:g} (linearly ~{t:.2f} of the '
                         f'budget; the patch run is {"ahead before, behind after" if a < 0 else "behind before, ahead after"})')
    if found:
        return 'the curves cross ' + '; '.join(found)
    return f'no crossing: the patch run is {"ahead" if d[0] < 0 else "behind"} at every evaluation'


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--budget', type=float, default=300, metavar='SEC', help='process CPU seconds of training per run')
    parser.add_argument('--chunk', type=float, default=10, metavar='SEC', help='CPU seconds per turn when alternating the runs')
    parser.add_argument('--fractions', default='0.125,0.25,0.5,0.75,1', metavar='LIST', help='budget fractions to evaluate at')
    parser.add_argument('--train_images', type=int, default=2048, metavar='INT', help='training set: the first N demo images')
    parser.add_argument('--heldout', type=int, default=256, metavar='INT', help='held-out images')
    parser.add_argument('--sigmas', type=int, default=8, metavar='INT', help='log-spaced evaluation noise levels in [0.02, 20]')
    parser.add_argument('--check', type=int, default=1, metavar='0|1', help='first check the step against patch_diffusion.train')
    parser.add_argument('--outdir', default='/tmp/patch_quality', metavar='DIR', help='grids, comparison PNG, results.json')
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.outdir, exist_ok=True)
    fractions = [float(f) for f in args.fractions.split(',')]
    wall_start = time.time()
    if args.check:
        for real_p in NAMES:
            check_against_cli(real_p)

    train_set = MemoryDataset(DemoDataset(resolution=RESOLUTION), range(args.train_images))
    images = heldout_images(args.heldout)
    sigmas = np.exp(np.linspace(np.log(0.02), np.log(20), args.sigmas)).tolist()
    noise = torch.randn([args.sigmas, *images.shape], generator=torch.Generator().manual_seed(0))
    runs = {real_p: Run(real_p, train_set) for real_p in NAMES}
    evals = {real_p: [] for real_p in NAMES}

    def evaluate(real_p, run, fraction):
        ema = heldout_loss(run.ema, images, sigmas, noise)
        row = dict(fraction=fraction, cpu=run.cpu, steps=run.step, images=run.data_pos, kimg=run.cur_nimg / 1000,
                   ema=ema, ema_mean=float(np.mean(ema)), train_loss=float(np.mean(run.losses[-20:])))
        if fraction == fractions[-1]:
            row['raw'] = heldout_loss(run.net, images, sigmas, noise)
            row['raw_mean'] = float(np.mean(row['raw']))
        evals[real_p].append(row)
        print(f'{NAMES[real_p]:>18}: fraction {fraction:<5g} cpu {run.cpu:7.1f} s  steps {run.step:5}  kimg {run.cur_nimg / 1000:6.2f}  '
              f'held-out loss {row["ema_mean"]:.4f}  (wall {time.time() - wall_start:.0f} s)', flush=True)

    while any(len(evals[p]) < len(fractions) for p in runs):  # alternate: each run gets --chunk CPU seconds per turn
        for real_p, run in runs.items():
            end = min(run.cpu + args.chunk, args.budget)
            while len(evals[real_p]) < len(fractions):
                if run.cpu >= fractions[len(evals[real_p])] * args.budget:
                    evaluate(real_p, run, fractions[len(evals[real_p])])
                elif run.cpu >= end:
                    break
                else:
                    run.train_step()

    grids = []
    for real_p, run in runs.items():
        path = os.path.join(args.outdir, f'samples-real_p{real_p:g}.png')
        pd.save_sample_grid(run.ema, path, 64, torch.device('cpu'))
        grids.append((NAMES[real_p], path))
    real_path = os.path.join(args.outdir, 'heldout.png')
    save_image_grid(heldout_images(64), real_path)
    save_comparison(real_path, grids, os.path.join(args.outdir, 'compare.png'))

    rows = [{p: evals[p][i] for p in runs} | dict(fraction=f) for i, f in enumerate(fractions)]
    e, q = runs[1.0], runs[0.5]
    print(f'\nCPU budget {args.budget:g} s per run (process time, 1 thread; shared machine); wall {time.time() - wall_start:.0f} s')
    print(f'CPU s/step: EDM {e.cpu / e.step:.3f}, Patch {q.cpu / q.step:.3f} (ratio EDM/Patch {(e.cpu / e.step) / (q.cpu / q.step):.2f}); '
          f'CPU s per counter kimg: EDM {e.cpu / (e.cur_nimg / 1000):.2f}, Patch {q.cpu / (q.cur_nimg / 1000):.2f}')
    print('\n| budget | CPU s EDM / Patch | steps EDM / Patch | kimg EDM / Patch | held-out loss EDM | held-out loss Patch | Patch / EDM |')
    print('|---|---|---|---|---|---|---|')
    for r in rows:
        a, b = r[1.0], r[0.5]
        print(f'| {r["fraction"]:g} | {a["cpu"]:.0f} / {b["cpu"]:.0f} | {a["steps"]} / {b["steps"]} | {a["kimg"]:.1f} / {b["kimg"]:.1f} '
              f'| {a["ema_mean"]:.4f} | {b["ema_mean"]:.4f} | {b["ema_mean"] / a["ema_mean"]:.3f} |')
    a, b = rows[-1][1.0], rows[-1][0.5]
    print('\nPer sigma at the end (EMA; raw network in brackets):\n')
    print('| sigma | ' + ' | '.join(f'{s:.3g}' for s in sigmas) + ' | mean |')
    print('|---|' + '---|' * (len(sigmas) + 1))
    for name, r in ((NAMES[1.0], a), (NAMES[0.5], b)):
        print(f'| {name} | ' + ' | '.join(f'{x:.4f} ({y:.4f})' for x, y in zip(r['ema'], r['raw']))
              + f' | {r["ema_mean"]:.4f} ({r["raw_mean"]:.4f}) |')
    print('| Patch / EDM | ' + ' | '.join(f'{y / x:.3f}' for x, y in zip(a['ema'], b['ema'])) + f' | {b["ema_mean"] / a["ema_mean"]:.3f} |')
    print(f'\n{crossing(rows)}')
    print(f'grids: {grids[0][1]}, {grids[1][1]}; side by side: {os.path.join(args.outdir, "compare.png")}')
    with open(os.path.join(args.outdir, 'results.json'), 'w') as f:
        json.dump(dict(args=vars(args), sigmas=sigmas, evals={str(p): v for p, v in evals.items()},
                       cpu_per_step={str(p): r.cpu / r.step for p, r in runs.items()}, wall=time.time() - wall_start), f, indent=1)


if __name__ == '__main__':
    main()
