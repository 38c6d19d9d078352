"""Benchmarks for gdd.py (a script, not collected by pytest): cost of one training iteration (G step + D step, and
the lazy R1 step separately) at the CIFAR-10 configuration (NCSN++ 56M generator, VGG16-BN + EfficientNet-lite0 at
224 px, official heads), GDD against GDD-I, and the sampling cost of one network evaluation against the teacher's
35 (EDM Heun, 18 steps). Random weights: only the cost is measured. Each measurement runs in its own process, so
the peak memory (max RSS on CPU, max allocated on CUDA) is that configuration's.

  python tests/benchmark_gdd.py                 # everything, batch 2 on CPU
  python tests/benchmark_gdd.py step --freeze=1 --batch=8 --iters=3
  python tests/benchmark_gdd.py sample --batch=4
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import gdd  # noqa: E402

CIFAR = dict(img_resolution=32, img_channels=3, label_dim=0, augment_dim=0, dropout=0, **common.EDM_ARCHS['ncsnpp'])

def peak_memory_gb(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)

def bench_step(args):
    device = common.init_distributed()
    torch.manual_seed(0)
    G = gdd.GDDPrecond(**CIFAR).to(device).train()
    frozen = gdd.frozen_names(G) if args.freeze else []
    for name, p in G.named_parameters():
        p.requires_grad_(name not in frozen)
    G.amp_dtype = torch.bfloat16 if device.type == 'cuda' else None  # upstream: bf16 on CUDA only
    features, D = gdd.build_discriminator(gdd.FEATURE_NETWORK_SETS['1'], 0, 224, 0, 'random')
    features, D = features.to(device), D.to(device).train()
    opt_G, opt_D = gdd.build_optimizers(G, D, frozen, 1e-4, 1e-4)
    ddp_G = common.distributed_model(G, device, broadcast_buffers=False)
    ddp_D = common.distributed_model(D, device, broadcast_buffers=False)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    batches = [[(torch.rand(args.batch, 3, 32, 32, device=device) * 2 - 1, None)]]
    times = dict(G=[], D=[], R1=[])
    for it in range(args.iters + 1):  # the first iteration warms up
        for name, run in [('G', lambda: gdd.g_step(ddp_G, features, D, batches[0])),
                          ('D', lambda: gdd.d_step(G, features, ddp_D, batches[0])),
                          ('R1', lambda: gdd.r1_step(features, ddp_D, batches[0], 1e-4, 16))]:
            opt = opt_G if name == 'G' else opt_D
            sync(device)
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            run()
            common.optimizer_step(opt, scaler, 1e-4)
            sync(device)
            if it:
                times[name].append(time.perf_counter() - t)
    mean = {k: sum(v) / len(v) for k, v in times.items()}
    print(json.dumps(dict(kind='step', freeze=args.freeze, batch=args.batch, device=str(device),
                          trainable=gdd.parameter_counts(G, frozen)['trainable'], sec_G=mean['G'], sec_D=mean['D'],
                          sec_R1=mean['R1'], sec_iteration_with_lazy_R1=mean['G'] + mean['D'] + mean['R1'] / 16,
                          peak_memory_gb=peak_memory_gb(device))))

@torch.no_grad()
def bench_sample(args):
    device = common.init_distributed()
    torch.manual_seed(0)
    G = gdd.GDDPrecond(**CIFAR).to(device).eval()
    teacher = common.EDMPrecond(**CIFAR).to(device).eval()
    latents = torch.randn(args.batch, 3, 32, 32, device=device)
    result = dict(kind='sample', batch=args.batch, device=str(device))
    for name, run, nfe in [('one_step', lambda: gdd.one_step_sampler(G, latents), 1),
                           ('teacher_heun18', lambda: common.edm_sampler(teacher, latents, num_steps=18), 35)]:
        run()  # warm-up
        sync(device)
        t = time.perf_counter()
        for _ in range(args.repeats):
            run()
        sync(device)
        result[f'{name}_img_per_s'] = args.batch * args.repeats / (time.perf_counter() - t)
        result[f'{name}_nfe'] = nfe
    print(json.dumps(result))

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('what', nargs='?', choices=['all', 'step', 'sample'], default='all')
    p.add_argument('--freeze', type=int, default=0, help='1 = GDD-I')
    p.add_argument('--batch', type=int, default=2, help='images per iteration')
    p.add_argument('--iters', type=int, default=2, help='timed iterations (after one warm-up)')
    p.add_argument('--repeats', type=int, default=1, help='timed sampling repeats')
    args = p.parse_args()
    if args.what == 'step':
        bench_step(args)
    elif args.what == 'sample':
        bench_sample(args)
    else:
        common_flags = [f'--batch={args.batch}', f'--iters={args.iters}', f'--repeats={args.repeats}']
        for extra in (['step', '--freeze=0'], ['step', '--freeze=1'], ['sample']):
            out = subprocess.run([sys.executable, __file__, *extra, *common_flags], capture_output=True, text=True,
                                 check=True)
            print(out.stdout.strip().splitlines()[-1], flush=True)

if __name__ == '__main__':
    main()
