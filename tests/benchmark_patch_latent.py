"""Latent Patch Diffusion: seconds per optimizer step and peak memory at the ImageNet-256 latent config (ADM
192x[1,2,3,4] on 4x32x32 SD-VAE latents, class-conditional, real_p 0.5), with the VAE encoder run on every batch
(official training loop) against latents pre-encoded once by `patch_diffusion.py encode`. Not a test.

Random weights everywhere (a freshly initialized full-size SD VAE, written to a temporary file), 256x256 images
drawn from the built-in demo shapes; no download. Each setting runs in its own process (peak memory is per
process), with the same seed, so both draw the same patch sizes step by step.

  python tests/benchmark_patch_latent.py --batch=2 --steps=4             # CPU
  python tests/benchmark_patch_latent.py --batch=64 --steps=10 --bf16    # one GPU (plain python: a world of one)
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import patch_diffusion as pd  # noqa: E402
from common import DemoDataset  # noqa: E402


def prepare(workdir, num_images):
    """A small 256x256 image folder with labels, a random full-size SD VAE and the folder's pre-encoded moments."""
    demo = DemoDataset(resolution=256, use_labels=True)
    (workdir / 'images').mkdir()
    labels = []
    for i in range(num_images):
        image, label = demo[i]
        PIL.Image.fromarray(image.transpose(1, 2, 0)).save(workdir / 'images' / f'{i:05d}.png')
        labels.append([f'{i:05d}.png', int(label.argmax())])
    (workdir / 'images' / 'dataset.json').write_text(json.dumps({'labels': labels}))
    torch.manual_seed(0)
    torch.save(pd.AutoencoderKL().state_dict(), workdir / 'vae.bin')
    start = time.time()
    pd.encode(pd.parse_args(['encode', f'--data={workdir / "images"}', f'--dest={workdir / "latents"}',
                             f'--vae={workdir / "vae.bin"}', '--batch=4', '--workers=0']))
    return (time.time() - start) / num_images


def run_one(args):
    """One setting, in this process: train `steps` + 1 steps, print sec/step (first step not timed) and peak memory."""
    data = args.workdir / ('latents' if args.one == 'pre-encoded' else 'images')
    with tempfile.TemporaryDirectory() as outdir:
        flags = ['train', f'--data={data}', '--cond=1', '--arch=adm', '--train_on_latents=1', f'--vae={args.workdir / "vae.bin"}',
                 '--lr=1e-4', '--ema=50', '--dropout=0.10', '--ls=100', '--augment=0', '--real_p=0.5', f'--batch={args.batch}',
                 f'--duration={(args.steps + 1) * int(args.batch * 1.5) / 1e6}', '--tick=0.000001', '--snap=0', '--dump=0',
                 '--grid=0', f'--outdir={outdir}', '--nosubdir', f'--bf16={int(args.bf16)}', '--workers=1']
        flags += [f'--batch-gpu={args.batch_gpu}'] if args.batch_gpu else []
        pd.train(pd.parse_args(flags))
        ticks = [json.loads(line) for line in open(Path(outdir) / 'stats.jsonl')]
    timed = ticks[1:]  # tick 0 includes the warm-up
    print(json.dumps(dict(sec_step=float(np.mean([t['sec/tick'] for t in timed])), sec_steps=[t['sec/tick'] for t in timed],
                          gpumem=max(t['gpumem'] for t in ticks), cpumem=max(t['cpumem'] for t in ticks))))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch', type=int, default=2, metavar='INT', help='global batch (images per step before batch_mul)')
    parser.add_argument('--batch-gpu', type=int, default=None, metavar='INT', help='micro-batch per GPU')
    parser.add_argument('--steps', type=int, default=4, metavar='INT', help='timed optimizer steps per setting')
    parser.add_argument('--images', type=int, default=8, metavar='INT', help='images in the stand-in dataset')
    parser.add_argument('--bf16', action='store_true', help='autocast bf16 around the network (the VAE stays float32)')
    parser.add_argument('--one', choices=['per-step', 'pre-encoded'], default=None, help=argparse.SUPPRESS)
    parser.add_argument('--workdir', type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return run_one(args)
    with tempfile.TemporaryDirectory() as workdir:
        encode_sec = prepare(Path(workdir), args.images)
        rows = {}
        for setting in ('per-step', 'pre-encoded'):
            cmd = [sys.executable, __file__, f'--one={setting}', f'--workdir={workdir}', f'--batch={args.batch}',
                   f'--steps={args.steps}'] + (['--bf16'] if args.bf16 else []) + ([f'--batch-gpu={args.batch_gpu}'] if args.batch_gpu else [])
            out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            rows[setting] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f'\nencode (one-off, batch 4): {encode_sec:.2f} s/image')
    print(f'{"encoding":>12} {"sec/step":>9} {"peak GPU GiB":>12} {"peak RSS GiB":>12}')
    for setting, r in rows.items():
        print(f'{setting:>12} {r["sec_step"]:>9.2f} {r["gpumem"]:>12.2f} {r["cpumem"]:>12.2f}')
    print(f'per-step / pre-encoded step time: {rows["per-step"]["sec_step"] / rows["pre-encoded"]["sec_step"]:.2f}x')


if __name__ == '__main__':
    main()
