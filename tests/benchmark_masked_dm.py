"""MaskDM benchmarks (not a test; pytest does not collect it).

  throughput  seconds per training step of masked pre-training (block-4, 90%: 33 of 257 tokens) against the full
              fine-tuning step, same network (MaskDM-S at 64x64, 44.3M parameters) and batch; peak memory of both.
  claim       the paper's claim at toy scale: masked pre-training + fine-tuning against training from scratch for the
              same wall time on the built-in 32x32 shapes, compared by the denoising loss on a fixed held-out set of
              (image, t, noise) triples and by sample grids.

  python tests/benchmark_masked_dm.py throughput --batch=4 --steps=4        # CPU
  python tests/benchmark_masked_dm.py throughput --batch=256 --steps=20     # GPU
  python tests/benchmark_masked_dm.py claim --minutes=6 --outdir=bench      # CPU, 2 x 6 minutes
"""

import argparse
import copy
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import masked_dm as md  # noqa: E402
from common import DemoDataset, save_image_grid  # noqa: E402


def peak_memory(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS: only grows


def train_step(net, opt, x0, rng, mask_type, ratio, block_size, clip=1.0):
    """One AdamW step of masked_dm's loss (the loop of masked_dm.train without its plumbing)."""
    t = torch.randint(0, 1000, [len(x0)], device=x0.device)
    keep = md.draw_keep(net, len(x0), rng, mask_type, ratio, block_size, device=x0.device)
    loss = md.mdsm_loss(net, x0, t, torch.randn_like(x0), keep).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
    opt.step()
    return loss


def throughput(args):
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    torch.manual_seed(0)
    net = md.GaussianDiffusion(img_size=64, **md.ARCHS['S']).to(device)
    net.amp_dtype = torch.bfloat16 if args.bf16 else None
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.99, 0.99), weight_decay=0.03)
    x0 = torch.rand(args.batch, 3, 64, 64, device=device) * 2 - 1
    rng = np.random.default_rng(0)
    rows = {}
    # Interleaved, so that both settings see the same machine load: masked, full, masked, full, ...
    times = {'block': [], 'none': []}
    mems = {}
    for i in range(args.steps + 1):
        for kind in ('block', 'none'):
            if device.type == 'cuda':
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            train_step(net, opt, x0, rng, kind, 0.9, 4).item()
            if device.type == 'cuda':
                torch.cuda.synchronize()
            if i > 0:  # the first round is warm-up
                times[kind].append(time.perf_counter() - start)
            mems[kind] = peak_memory(device)
    for kind, name in (('block', 'masked pre-training (block-4 90%, 33 tokens)'),
                       ('none', 'full fine-tuning (257 tokens)')):
        sec = float(np.median(times[kind]))
        rows[kind] = dict(setting=name, sec_per_step=sec, img_per_s=args.batch / sec,
                          peak_mem_gib=mems[kind])
    print(f'\nMaskDM-S 64x64, batch {args.batch}, {device}, {"bf16" if args.bf16 else "fp32"}, '
          f'median of {args.steps} interleaved steps')
    print(f'{"setting":<46} {"sec/step":>9} {"img/s":>8} {"peak mem GiB":>13}')
    for r in rows.values():
        print(f'{r["setting"]:<46} {r["sec_per_step"]:>9.3f} {r["img_per_s"]:>8.1f} {r["peak_mem_gib"]:>13.2f}')
    print(f'full / masked time per step: {rows["none"]["sec_per_step"] / rows["block"]["sec_per_step"]:.2f}x')
    if device.type == 'cpu':
        print('(CPU: peak memory is the process peak RSS, which only grows, so the full-step figure includes the '
              'masked one)')


def held_out(n, device):
    """Fixed (image, t, noise) triples from demo images the training stream never visits (indices >= 4096)."""
    data = DemoDataset(resolution=32, size=1 << 20)
    images = torch.stack([torch.from_numpy(data[100000 + i][0]) for i in range(n)]).to(device)
    g = torch.Generator().manual_seed(123)
    t = torch.randint(0, 1000, [n], generator=g).to(device)
    noise = torch.randn(n, 3, 32, 32, generator=g).to(device)
    return md.to_model_space(images, False), t, noise


@torch.no_grad()
def held_out_loss(net, triples):
    x0, t, noise = triples
    return float(torch.cat([md.mdsm_loss(net, x0[i:i + 64], t[i:i + 64], noise[i:i + 64], None)
                            for i in range(0, len(x0), 64)]).mean())


def run_stage(net, ema, data, budget, mask_type, lr, batch, rng_seed):
    """Train for `budget` seconds (wall clock) with masked_dm's loss, AdamW (0.99, 0.99), wd 0.03, clip 1, EMA."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.99, 0.99), weight_decay=0.03)
    rng, order = np.random.default_rng(rng_seed), np.random.default_rng(rng_seed + 1)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < budget:
        images = torch.stack([torch.from_numpy(data[int(i)][0]) for i in order.integers(0, len(data), batch)])
        for group in opt.param_groups:
            group['lr'] = lr * min(n / 20, 1)  # 20 warm-up steps
        train_step(net, opt, md.to_model_space(images, False), rng, mask_type, 0.9, 2)
        n += 1
        beta = md.ema_decay(n, 0.999)
        if beta is not None:
            md.update_ema(ema, net, beta)
    return n


def claim(args):
    torch.set_num_threads(args.threads)
    device = torch.device('cpu')
    data = DemoDataset(resolution=32, size=4096)
    triples = held_out(args.held_out, device)
    budget = args.minutes * 60
    results = {}
    pre = [('block', args.pre_fraction, 1e-3), ('none', 1 - args.pre_fraction, 5e-4)]
    for name, stages in (('pretrain+finetune', pre),
                         ('from scratch', [('none', 1.0, 5e-4)])):
        torch.manual_seed(0)
        net = md.GaussianDiffusion(img_size=32, **md.ARCHS['T'])
        ema = copy.deepcopy(net).requires_grad_(False)
        steps = []
        for kind, fraction, lr in stages:
            if kind == 'none' and steps:  # fine-tuning: the pre-trained online weights, a fresh optimizer and EMA
                ema = copy.deepcopy(net).requires_grad_(False)
            steps.append(run_stage(net, ema, data, fraction * budget, kind, lr, args.batch, 1))
        results[name] = dict(steps=steps, loss_online=held_out_loss(net, triples), loss_ema=held_out_loss(ema, triples))
        grid = md.sample_images(ema.eval(), range(36), device, num_steps=50)
        save_image_grid(grid, str(Path(args.outdir) / f'grid-{name.replace("+", "-").replace(" ", "-")}.png'))
        print(name, json.dumps(results[name]), flush=True)
    print(f'\nheld-out denoising loss ({args.held_out} fixed (image, t, noise) triples, all tokens), '
          f'{args.minutes:g} min each, '
          f'{args.threads} thread(s), shared machine')
    print(f'{"run":<20} {"steps (per stage)":>20} {"loss online":>12} {"loss EMA":>10}')
    for name, r in results.items():
        print(f'{name:<20} {"+".join(map(str, r["steps"])):>20} {r["loss_online"]:>12.4f} {r["loss_ema"]:>10.4f}')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    t = sub.add_parser('throughput')
    t.add_argument('--batch', type=int, default=4, metavar='INT', help='images per step')
    t.add_argument('--steps', type=int, default=4, metavar='INT', help='timed steps per setting (after one warm-up)')
    t.add_argument('--bf16', action='store_true', help='autocast bf16')
    c = sub.add_parser('claim')
    c.add_argument('--minutes', type=float, default=6, metavar='FLOAT', help='wall-clock budget of each run')
    c.add_argument('--pre_fraction', type=float, default=0.5, metavar='FLOAT',
                   help='share of the budget spent pre-training')
    c.add_argument('--batch', type=int, default=32, metavar='INT', help='images per step')
    c.add_argument('--held_out', type=int, default=512, metavar='INT', help='held-out triples')
    c.add_argument('--threads', type=int, default=1, metavar='INT', help='torch threads')
    c.add_argument('--outdir', default='.', metavar='DIR', help='where to write the sample grids')
    args = parser.parse_args()
    Path(getattr(args, 'outdir', '.')).mkdir(parents=True, exist_ok=True)
    throughput(args) if args.command == 'throughput' else claim(args)


if __name__ == '__main__':
    main()
