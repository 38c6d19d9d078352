"""Patch Diffusion vs EDM training speed: seconds per optimizer step, patch-images per second and peak memory at
real_p = 1.0 (plain EDM) and 0.5, running patch_diffusion.py's own training loop on the CelebA-64 DDPM++ config
(built-in 64x64 demo data, so nothing to download). Not a test.

The paper (its real_p ablation on CelebA-64, 16 V100) trains both for the same counter budget in 48.5 h vs 24.6 h (1.97x).
At the same budget the time ratio is (sec/step at p=1) / (sec/step at p=0.5 / batch_mul_avg).

  python tests/benchmark_patch_diffusion.py --batch=8 --steps=6            # CPU
  torchrun --standalone --nproc_per_node=1 tests/benchmark_patch_diffusion.py --batch=256 --batch-gpu=64 --steps=20
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import patch_diffusion as pd  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch', type=int, default=8, metavar='INT', help='global batch (images per step at p=1)')
    parser.add_argument('--batch-gpu', type=int, default=None, metavar='INT', help='micro-batch per GPU')
    parser.add_argument('--steps', type=int, default=6, metavar='INT', help='optimizer steps per setting (the first is not timed)')
    parser.add_argument('--bf16', action='store_true', help='autocast bf16')
    args = parser.parse_args()
    rows = {}
    for real_p in (1.0, 0.5):
        with tempfile.TemporaryDirectory() as outdir:
            flags = ['train', '--preset=celeba64', '--data=demo-64', f'--real_p={real_p}', f'--batch={args.batch}',
                     f'--duration={args.steps * int(args.batch * 1.9 if real_p < 1 else args.batch) / 1e6}',
                     '--tick=0.000001', '--snap=0', '--dump=0', '--grid=0', f'--outdir={outdir}', '--nosubdir',
                     f'--bf16={int(args.bf16)}', '--workers=1'] + ([f'--batch-gpu={args.batch_gpu}'] if args.batch_gpu else [])
            pd.train(pd.parse_args(flags))
            ticks = [json.loads(line) for line in open(Path(outdir) / 'stats.jsonl')][1:]  # tick 0 includes warm-up
        sec_step = float(np.mean([t['sec/tick'] for t in ticks]))
        nimg_step = int(args.batch * (1.9 if real_p < 1 else 1))
        memory = max(t['gpumem'] for t in ticks) or max(t['cpumem'] for t in ticks)
        rows[real_p] = (sec_step, nimg_step, memory)
    print(f'\n{"real_p":>6} {"sec/step":>9} {"counter/step":>12} {"counter img/s":>13} {"peak mem GiB":>12}')
    for real_p, (sec_step, nimg_step, memory) in rows.items():
        print(f'{real_p:>6} {sec_step:>9.3f} {nimg_step:>12} {nimg_step / sec_step:>13.1f} {memory:>12.2f}')
    (t1, n1, _), (t05, n05, _) = rows[1.0], rows[0.5]
    print(f'time for the same counter budget, p=1 / p=0.5: {(t1 / n1) / (t05 / n05):.2f}x (paper: 48.5 h / 24.6 h = 1.97x)')


if __name__ == '__main__':
    main()
