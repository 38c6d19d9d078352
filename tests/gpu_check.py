"""GPU readiness check: run on one CUDA device, not collected by pytest. About 5 minutes on an H100/H200.

For every method file that exists it runs the real training CLI for a few steps of a tiny config in fp32, bf16 and
fp16 (losses must be finite), compares the fp32 GPU weights after those steps with the same run on the CPU, samples
2 steps with `generate`, and measures img/s and peak memory of a paper config (a batch that fits one GPU) from the
run's own status lines. Prints one markdown table for the README.

  python tests/gpu_check.py                 # everything
  python tests/gpu_check.py --only=patch_diffusion --paper-steps=20
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ['--workers=2', '--nosubdir', '--snap=1', '--dump=1', '--seed=0']

# Per method: tiny flags (8-16 px, a few steps), the paper config for throughput (batch per GPU that fits), and
# generate flags. In a paper config `{kimg}` becomes a third of the timed run (the tick), `{mimg}` and `{steps}` its
# whole length.
CHECKS = {
    'patch_diffusion': dict(
        tiny=['--data=demo-16', '--cbase=32', '--cres=1,2,2', '--batch=32', '--duration=0.0002', '--tick=0.05',
              '--lr=1e-3', '--lr-rampup=0', '--dropout=0', '--grid=0', '--real_p=0.5'],
        paper=[('CelebA-64 DDPM++, p=0.5 (paper)', ['--data=demo-64', '--preset=celeba64', '--batch=128', '--grid=0', '--tick={kimg}', '--duration={mimg}']),
               ('CelebA-64 DDPM++, p=1 (EDM)', ['--data=demo-64', '--preset=celeba64', '--real_p=1', '--batch=128', '--grid=0', '--tick={kimg}', '--duration={mimg}'])],
        generate=['--network={snap}', '--steps=2', '--seeds=0-7', '--batch=8']),
    'masked_dm': dict(
        tiny=['--data=demo-16', '--arch=T', '--patch_size=2', '--embed_dim=64', '--depth=3', '--heads=2',
              '--mask_type=block', '--mask_ratio=0.5', '--block_size=2', '--batch=32', '--lr=1e-3', '--grid=0',
              '--train_steps=8', '--tick=0.1'],
        paper=[('CelebA-64 MaskDM-S, block-4 90% (pre-training)', ['--data=demo-64', '--preset=celeba64_pre_block4_90', '--batch=128', '--grid=0', '--tick={kimg}', '--train_steps={steps}']),
               ('CelebA-64 MaskDM-S, full (fine-tuning)', ['--data=demo-64', '--preset=celeba64_ft', '--batch=128', '--grid=0', '--tick={kimg}', '--train_steps={steps}'])],
        generate=['--network={snap}', '--steps=2', '--seeds=0-7', '--batch=8']),
    'relay_diffusion': dict(  # tiny: stage one (EDM); the paper configs time stage two against plain EDM
        tiny=['--preset=demo8', '--duration=0.0002', '--tick=0.05', '--lr-rampup=0', '--grid=0'],
        paper=[('CelebA-HQ-256 stage two (blur)', ['--data=demo-256', '--preset=celebahq256', '--batch=8', '--batch-gpu=8', '--grid=0', '--tick={kimg}', '--duration={mimg}']),
               ('CelebA-HQ-256, same network, plain EDM', ['--data=demo-256', '--preset=celebahq256', '--precond=edm', '--batch=8', '--batch-gpu=8', '--grid=0', '--tick={kimg}', '--duration={mimg}'])],
        generate=['--sampler_stages=first', '--network_first={snap}', '--num_steps_first=2', '--seeds=0-7', '--batch=8']),
    'gdd': dict(  # teachers are trained first with patch_diffusion.py --real_p=1 (plain EDM); GDD trains in bf16 only
        teachers={'tiny': ['--data=demo-16', '--cbase=32', '--cres=1,2,2', '--batch=32', '--duration=0.0001', '--tick=0.05', '--real_p=1', '--grid=0'],
                  'cifar': ['--data=demo-32', '--arch=ncsnpp', '--cbase=128', '--cres=2,2,2', '--batch=8', '--duration=0.000008', '--tick=0.008', '--real_p=1', '--grid=0']},
        precisions=[('fp32', []), ('bf16', ['--bf16=1'])],
        tiny=['--data=demo-16', '--transfer={tiny}', '--feature-weights=random', '--backbone=3', '--feature-res=64',
              '--batch=16', '--duration=0.000064', '--tick=0.016', '--grid=0'],
        paper=[('CIFAR-10 NCSN++ GDD', ['--data=demo-32', '--preset=cifar10_gdd', '--transfer={cifar}', '--feature-weights=random', '--batch=64', '--grid=0', '--tick={kimg}', '--duration={mimg}']),
               ('CIFAR-10 NCSN++ GDD-I', ['--data=demo-32', '--preset=cifar10_gddi', '--transfer={cifar}', '--feature-weights=random', '--batch=64', '--grid=0', '--tick={kimg}', '--duration={mimg}'])],
        generate=['--network={snap}', '--seeds=0-7', '--batch=8']),
}

def run(cmd, env=None, timeout=600):
    t0 = time.time()
    result = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                            env=dict(os.environ, **(env or {})))
    if result.returncode != 0:
        raise RuntimeError(f'{" ".join(cmd)} failed:\n{result.stderr[-3000:]}')
    return result, time.time() - t0

def stats(folder):
    return [json.loads(line) for line in open(os.path.join(folder, 'stats.jsonl'))]

def last_state(folder):
    return torch.load(sorted(glob.glob(os.path.join(folder, 'training-state-*.pt')))[-1], map_location='cpu', weights_only=True)

def check_method(name, spec, work, args, rows):
    script = f'{name}.py'
    teachers = {}
    for key, flags in spec.get('teachers', {}).items():  # GDD distills a teacher: train one for a step or two
        out = os.path.join(work, f'{name}-teacher-{key}')
        run(['patch_diffusion.py', 'train', *flags, *COMMON, f'--outdir={out}'])
        teachers[key] = sorted(glob.glob(os.path.join(out, 'network-snapshot-*.pt')))[-1]
    def fill(flags):
        for key, path in teachers.items():
            flags = [f.replace('{' + key + '}', path) for f in flags]
        return flags
    spec = dict(spec, tiny=fill(spec['tiny']), paper=[(label, fill(flags)) for label, flags in spec['paper']])
    # 1. A few steps in each precision: finite losses.
    for dtype, flags in spec.get('precisions', [('fp32', []), ('bf16', ['--bf16=1']), ('fp16', ['--fp16=1'])]):
        out = os.path.join(work, f'{name}-{dtype}')
        _, sec = run([script, 'train', *spec['tiny'], *COMMON, *flags, f'--outdir={out}'])
        losses = [v for s in stats(out) for k, v in s.items() if k.startswith('loss')]  # loss, loss_G, loss_D, ...
        finite = bool(losses) and all(v == v and abs(v) != float('inf') for v in losses)
        rows.append((name, f'train tiny {dtype}', 'ok' if finite else 'NO OR NON-FINITE LOSS', f'{len(losses)} loss values, {sec:.0f} s'))
    # 2. fp32 on the GPU equals fp32 on the CPU (same seed, same data order) within float tolerance.
    cpu = os.path.join(work, f'{name}-cpu')
    run([script, 'train', *spec['tiny'], *COMMON, '--workers=0', f'--outdir={cpu}'], env=dict(CUDA_VISIBLE_DEVICES=''))
    gpu_net, cpu_net = last_state(os.path.join(work, f'{name}-fp32'))['net'], last_state(cpu)['net']
    diff = max((gpu_net[k].float() - cpu_net[k].float()).abs().max().item() for k in gpu_net)
    scale = max(cpu_net[k].float().abs().max().item() for k in cpu_net)
    rows.append((name, 'fp32 GPU vs CPU weights', 'ok' if diff < 1e-3 * scale else 'MISMATCH', f'max |diff| {diff:.2e} (max |w| {scale:.2f})'))
    # 3. Sampling from the snapshot.
    snap = sorted(glob.glob(os.path.join(work, f'{name}-bf16', 'network-snapshot-*.pt')))[-1]
    flags = [f.replace('{snap}', snap) for f in spec['generate']]
    _, sec = run([script, 'generate', f'--outdir={os.path.join(work, name + "-gen")}', *flags])
    rows.append((name, 'generate (2 steps)', 'ok', f'{sec:.0f} s'))
    # 4. Throughput of the paper configs, fp32 / bf16 (plus --compile if asked): the last tick's img/s and gpumem.
    for label, flags in spec['paper']:
        for extra in [[], ['--bf16=1']] + ([['--bf16=1', '--compile=1']] if args.compile else []):
            out = os.path.join(work, f'{name}-paper-{len(rows)}')
            batch = int(next(f.split('=')[1] for f in flags if f.startswith('--batch=')))
            kimg = batch * args.paper_steps / 1000 / 3  # three ticks; the last one is timed
            flags_ = [f.replace('{kimg}', f'{kimg:g}').replace('{mimg}', f'{3 * kimg / 1000:g}')
                      .replace('{steps}', str(3 * args.paper_steps)) for f in flags]
            run([script, 'train', *flags_, *COMMON, '--snap=0', '--dump=0', *extra, f'--outdir={out}'])
            last = stats(out)[-1]
            rows.append((name, f'{label} {" ".join(extra) or "fp32"}', f'{last["img/s"]:.0f} img/s', f'peak {last["gpumem"]:.1f} GiB, batch {batch}'))

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--only', default=None, help='comma-separated method names')
    parser.add_argument('--paper-steps', type=int, default=30, help='steps per tick of the timed paper-config runs')
    parser.add_argument('--compile', action='store_true', help='also time --compile=1 (slow first steps)')
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit('gpu_check.py needs a CUDA device')
    print(f'device: {torch.cuda.get_device_name()}, torch {torch.__version__}', flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name, spec in CHECKS.items():
            if (args.only and name not in args.only.split(',')) or not os.path.exists(os.path.join(ROOT, f'{name}.py')):
                continue
            try:
                check_method(name, spec, work, args, rows)
            except Exception as e:  # report and go on with the next method
                rows.append((name, 'FAILED', type(e).__name__, str(e).strip().splitlines()[-1][:200]))
            print('\n'.join(' | '.join(r) for r in rows[-8:]), flush=True)
    print('\n| method | check | result | detail |\n|---|---|---|---|')
    for r in rows:
        print('| ' + ' | '.join(r) + ' |')

if __name__ == '__main__':
    main()
