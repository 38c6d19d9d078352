"""Relay Diffusion benchmarks (a script, not a test). Two parts:

  step   seconds per optimizer step, img/s and peak memory of a stage-two (--precond=blur) step against a plain EDM
         step of the same network at the same resolution, through relay_diffusion.py's own training loop on
         built-in demo data. Default: the CelebA-HQ-256 ADM network with --cbase scaled down (the full 553M-parameter
         network needs ~11 GB for weights, gradients and Adam alone); --cbase=256 is the real config.
  toy    two-stage (8 px EDM + 32 px relay, the demo8/demo32 presets) against single-stage EDM at 32 px trained
         for the same total time, compared by held-out denoising losses at the stage-two noise levels and by
         sample grids. Train the three runs first (README), then pass their snapshots.

  python tests/benchmark_relay_diffusion.py step --batch=2 --steps=3 --cbase=32
  python tests/benchmark_relay_diffusion.py toy --first=demo/stage1/network-snapshot-000006.pt \\
      --second=demo/stage2/network-snapshot-000003.pt --single=demo/single/network-snapshot-*.pt --outdir=demo
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import relay_diffusion as rd  # noqa: E402
from common import DemoDataset, PerSeedRNG, edm_sampler, parse_command_line, save_image_grid  # noqa: E402


def train(argv):
    args = parse_command_line(rd.build_parser, argv)
    rd.train(args)


def ticks(outdir):
    return [json.loads(line) for line in open(Path(outdir) / 'stats.jsonl')]


def bench_step(a):
    rows = {}
    for precond in ('edm', 'blur') if a.precond == 'both' else (a.precond,):
        with tempfile.TemporaryDirectory() as outdir:
            train(['train', '--preset=celebahq256', '--data=demo-256', f'--precond={precond}', f'--cbase={a.cbase}',
                   f'--batch={a.batch}', '--fp16=0', '--augment=0.2', f'--duration={a.steps * a.batch / 1e6}',
                   f'--tick={a.batch / 1000}', '--snap=0', '--dump=0', '--grid=0', f'--outdir={outdir}', '--nosubdir',
                   '--workers=0'])
            t = ticks(outdir)[1:]  # tick 0 includes warm-up
            sec = sum(x['sec/tick'] for x in t) / len(t)
            rows[precond] = (sec, a.batch / sec, max(x['cpumem'] for x in t), max(x['gpumem'] for x in t))
    print(f'\nCelebA-HQ-256 ADM config, cbase={a.cbase}, batch {a.batch}, fp32, augment 0.2, {a.steps - 1} timed steps')
    print(f'{"step":>6} {"sec/step":>9} {"img/s":>7} {"peak cpu GiB":>12} {"peak gpu GiB":>12}')
    for k, (sec, ips, cpu, gpu) in rows.items():
        print(f'{k:>6} {sec:>9.3f} {ips:>7.2f} {cpu:>12.2f} {gpu:>12.2f}')
    if len(rows) == 2:  # peak memory is the process's maximum RSS: run one --precond per process to compare it
        print(f'blur step / EDM step time: {rows["blur"][0] / rows["edm"][0]:.3f}x')
    # The loss's own work without the network (identity denoiser), at the official per-GPU batch of 8 at 256 px.
    images, identity = torch.rand(8, 3, 256, 256) * 2 - 1, lambda x, sigma, labels, augment_labels=None: x
    for name, loss_fn in (('EDMLoss', rd.EDMLoss()), ('BlurLoss', rd.BlurLoss(prob_length=0.89, blur_sigma_max=2.0))):
        loss_fn(identity, images)
        t0 = time.time()
        for _ in range(5):
            loss_fn(identity, images)
        print(f'{name} without the network, 8 x 3 x 256 x 256: {(time.time() - t0) / 5 * 1000:.0f} ms')


def held_out_loss(net, loss_fn, images, seed):
    """Mean loss on fixed held-out images with fixed noise and sigma draws (the same for every model)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        return loss_fn(net, images).sum(dim=(1, 2, 3)).mean().item()


def bench_toy(a):
    """Held-out losses and grids of finished runs: the two-stage pipeline (--first, --second) and the single-stage
    baseline (--single, an EDM run at the high resolution that trained for as long as both stages together)."""
    os.makedirs(a.outdir, exist_ok=True)
    first, second, single = (rd.load_network(p, flag, stage).eval() for p, flag, stage in
                             ((a.first, '--first', 'edm'), (a.second, '--second', 'blur'),
                              (a.single, '--single', 'edm')))
    R, s = single.img_resolution, second.img_resolution // first.img_resolution
    held = DemoDataset(R, size=8192)  # indices past the 4096 training images: held out
    images = torch.stack([torch.from_numpy(held[4096 + i][0]) for i in range(256)]).float() / 127.5 - 1
    relay_task = rd.BlurLoss(up_scale=s, prob_length=0.93, blur_sigma_max=3.0, block_scale=0.15)
    plain_task = rd.BlurLoss(up_scale=s, prob_length=0.93, blur_sigma_max=0.0, block_scale=0.0)  # same sigmas, no blur
    print(f'held-out loss per image (256 held-out {R} px images, sigma from the truncated stage-two distribution, '
          'L = 0.93)')
    print(f'  single-stage EDM, plain denoising (x = y + n):      {held_out_loss(single, plain_task, images, 0):8.2f}')
    print(f'  single-stage EDM, relay task (x = A y + n):         {held_out_loss(single, relay_task, images, 0):8.2f}')
    print(f'  stage-two relay model, relay task (x = A y + n):    {held_out_loss(second, relay_task, images, 0):8.2f}')
    rng = PerSeedRNG(range(16), 'cpu')
    single_images = edm_sampler(single, rng.randn([3, R, R]), None, rng.randn_like, num_steps=32)
    rng = PerSeedRNG(range(16), 'cpu')
    low = edm_sampler(first, rng.randn([3, first.img_resolution, first.img_resolution]), None, rng.randn_like,
                      num_steps=32)
    x_up = torch.nn.functional.interpolate(low, scale_factor=s, mode='nearest')
    relayed = rd.blur_sampler(second, x_up, None, rng.randn_like, num_steps=64, up_scale=s)
    save_image_grid(single_images, os.path.join(a.outdir, 'grid-single-stage.png'), cols=8)
    save_image_grid(torch.cat([x_up[:8], relayed[:8], x_up[8:], relayed[8:]]),
                    os.path.join(a.outdir, 'grid-two-stage.png'), cols=8)
    stats = lambda x: f'mean {x.mean().item():+.3f} std {x.std().item():.3f}'
    print(f'pixel statistics: data {stats(images)}; single-stage {stats(single_images)}; relayed {stats(relayed)}')
    print(f'grids: {a.outdir}/grid-single-stage.png, {a.outdir}/grid-two-stage.png '
          '(rows: stage one upsampled, relayed)')


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='what', required=True)
    s = sub.add_parser('step')
    s.add_argument('--batch', type=int, default=2, metavar='INT', help='images per step')
    s.add_argument('--steps', type=int, default=4, metavar='INT', help='steps per setting (the first is not timed)')
    s.add_argument('--cbase', type=int, default=32, metavar='INT', help='base channels (the real config: 256)')
    s.add_argument('--precond', choices=['edm', 'blur', 'both'], default='both', help='which step(s) to time')
    t = sub.add_parser('toy')
    t.add_argument('--first', required=True, metavar='PT', help='stage-one snapshot (low resolution EDM)')
    t.add_argument('--second', required=True, metavar='PT', help='stage-two snapshot (blur)')
    t.add_argument('--single', required=True, metavar='PT', help='single-stage EDM snapshot at the high resolution')
    t.add_argument('--outdir', default='toy-out', metavar='DIR', help='where to write the grids')
    a = p.parse_args()
    bench_step(a) if a.what == 'step' else bench_toy(a)


if __name__ == '__main__':
    main()
