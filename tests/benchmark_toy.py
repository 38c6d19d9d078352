"""All four methods and the EDM baseline on the same small dataset at the same compute, scored the same way.

Each method trains through its own command line for a budget of process CPU seconds (the run is stopped with
Ctrl-C, which writes a training state, when its CPU time reaches the budget), then generates --num images from that
state, and `fid.py score` scores them against the data (toy_fd: Frechet distance in the feature space of a small
classifier trained on the data; lower is better; toy_fd_real is the floor that held-out real images reach).

  python tests/benchmark_toy.py --data=demo-16 --budget=300 --outdir=/tmp/toy        # every method, 300 CPU-s each
  python tests/benchmark_toy.py --data=datasets/mine-16x16.zip --budget=600 --methods=edm,patch

Budgets: EDM, Patch Diffusion: the budget. MaskDM: 70% masked pre-training, then 30% fine-tuning (and the same
U-ViT trained from scratch on full images for the whole budget, MaskDM's own baseline). Relay: 50% stage
one at half the resolution, 50% stage two. GDD: distills the EDM run's result for one more budget (its teacher's
budget is the EDM row's), so its compute is twice the others'; the table says so. One thread per run
(OMP_NUM_THREADS=1), so CPU seconds are comparable across runs on a busy machine.
"""
import argparse
import glob
import os
import re
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICKS = os.sysconf('SC_CLK_TCK')

def cpu_seconds(pid):
    """User + system CPU time of a process and its waited-for children."""
    with open(f'/proc/{pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / TICKS

def run(argv, log, budget=None):
    """Run a command (a method file's CLI); with a budget, Ctrl-C it when its CPU time reaches it. Returns the CPU
    seconds it used and its output."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    with open(log, 'w') as out:
        proc = subprocess.Popen([sys.executable] + argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        used = 0
        while proc.poll() is None:
            time.sleep(0.5)
            try:
                used = cpu_seconds(proc.pid)
            except OSError:
                break
            if budget is not None and used >= budget:
                proc.send_signal(signal.SIGINT)
                proc.wait()
    text = open(log).read()
    if proc.returncode not in (0, 130):
        sys.exit(f'{" ".join(argv[:2])} failed (exit {proc.returncode}); see {log}')
    return used, text

def last_state(folder):
    states = sorted(glob.glob(f'{folder}/training-state-*.pt'), key=os.path.getmtime)
    if not states:
        sys.exit(f'no training state in {folder}')
    return states[-1]

def train(name, argv, budget, outdir):
    folder = f'{outdir}/{name}'
    used, _ = run(argv + [f'--outdir={folder}', '--nosubdir'], f'{outdir}/{name}.log', budget)
    return used, last_state(folder)

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--data', default='demo-16', help='demo-RES or an EDM-format dataset (square, side divisible by 4)')
    p.add_argument('--res', type=int, default=None, help='image side of --data (read from a demo name)')
    p.add_argument('--budget', type=float, default=300, help='process CPU seconds of training per method')
    p.add_argument('--num', type=int, default=500, help='images generated and scored per method')
    p.add_argument('--methods', default='edm,patch,masked,relay,gdd')
    p.add_argument('--outdir', default='/tmp/benchmark_toy')
    args = p.parse_args()
    os.makedirs(args.outdir, exist_ok=True)
    R = args.res or int(re.fullmatch(r'demo-(\d+)', args.data)[1])
    B, D, seeds = args.budget, f'--data={args.data}', f'--seeds=0-{args.num - 1}'
    small = dict(cbase=32, cres='1,2,2' if R >= 16 else '1,2')
    edm_flags = ['train', D, f'--cbase={small["cbase"]}', f'--cres={small["cres"]}', '--arch=ddpmpp', '--batch=32',
                 '--lr=1e-3', '--lr-rampup=1', '--ema=0.002', '--dropout=0', '--duration=1000', '--tick=5',
                 '--snap=1000', '--dump=1000', '--grid=0', '--workers=0']
    rows = {}

    def score(name, folder, cpu, note=''):
        _, text = run(['fid.py', 'score', f'--images={folder}', D, f'--num={args.num}'], f'{args.outdir}/{name}-score.log')
        values = dict(re.findall(r'^(\w+)\s+([-\d.e+]+)$', text, re.M))
        rows[name] = (cpu, values, note)
        print(f'{name:8} CPU {cpu:7.0f} s  toy_fd {float(values["toy_fd"]):8.2f}  confident {values["confident"]}  '
              f'(real: {values["toy_fd_real"]}, noise: {values.get("toy_fd_noise")}) {note}', flush=True)

    methods = args.methods.split(',')
    if 'edm' in methods or 'gdd' in methods:
        cpu, state = train('edm', ['patch_diffusion.py'] + edm_flags + ['--real_p=1'], B, args.outdir)
        edm_state = state
        run(['patch_diffusion.py', 'generate', f'--network={state}', f'--outdir={args.outdir}/edm-img', seeds,
             '--steps=18'], f'{args.outdir}/edm-gen.log')
        score('edm', f'{args.outdir}/edm-img', cpu, '(EDM, 18 Heun steps, 35 NFE)')
    if 'patch' in methods:
        cpu, state = train('patch', ['patch_diffusion.py'] + edm_flags + ['--real_p=0.5'], B, args.outdir)
        run(['patch_diffusion.py', 'generate', f'--network={state}', f'--outdir={args.outdir}/patch-img', seeds,
             '--steps=18'], f'{args.outdir}/patch-gen.log')
        score('patch', f'{args.outdir}/patch-img', cpu, '(p = 0.5, 35 NFE)')
    if 'masked' in methods:
        masked = ['masked_dm.py', 'train', D, f'--resolution={R}', '--arch=T', '--patch_size=2', '--batch=32',
                  '--lr=1e-3', '--warmup_steps=20', '--train_steps=1000000', '--tick=5', '--snap=1000', '--dump=1000',
                  '--grid=0', '--workers=0']
        cpu1, pre = train('masked-pre', masked + ['--mask_type=block', '--mask_ratio=0.75', '--block_size=2'],
                          0.7 * B, args.outdir)
        cpu2, state = train('masked-ft', masked + ['--mask_type=none', '--mask_ratio=0', '--lr=5e-4',
                                                   f'--pretrained_model_ckpt={pre}'], 0.3 * B, args.outdir)
        run(['masked_dm.py', 'generate', f'--network={state}', f'--outdir={args.outdir}/masked-img', seeds,
             '--steps=50', '--eta=1'], f'{args.outdir}/masked-gen.log')
        score('masked', f'{args.outdir}/masked-img', cpu1 + cpu2, '(70% pre-training, 30% fine-tuning; DDIM 50)')
        cpu, state = train('masked-scratch', masked + ['--mask_type=none', '--mask_ratio=0', '--lr=5e-4'], B, args.outdir)
        run(['masked_dm.py', 'generate', f'--network={state}', f'--outdir={args.outdir}/masked-scratch-img', seeds,
             '--steps=50', '--eta=1'], f'{args.outdir}/masked-scratch-gen.log')
        score('masked-scratch', f'{args.outdir}/masked-scratch-img', cpu, '(MaskDM\'s U-ViT, no pre-training)')
    if 'relay' in methods:
        relay = ['relay_diffusion.py'] + edm_flags[:1] + edm_flags[2:] + ['--blocks=1']
        cpu1, first = train('relay-one', relay + [f'--data={args.data.replace(str(R), str(R // 2))}' if
                                                  args.data.startswith('demo') else D, '--precond=edm',
                                                  '--cres=1,2'], 0.5 * B, args.outdir)
        cpu2, second = train('relay-two', relay + [D, '--precond=blur', '--up-scale=2'], 0.5 * B, args.outdir)
        run(['relay_diffusion.py', 'generate', f'--network_first={first}', f'--network_second={second}',
             '--up_scale_second=2', f'--outdir={args.outdir}/relay-img', seeds], f'{args.outdir}/relay-gen.log')
        score('relay', f'{args.outdir}/relay-img', cpu1 + cpu2, f'(stage one at {R // 2} px, stage two x2)')
    if 'gdd' in methods:
        cpu, state = train('gdd', ['gdd.py', 'train', D, f'--transfer={edm_state}', '--batch=16', '--lr=1e-4',
                                   '--dlr=1e-4', '--backbone=tf_efficientnet_lite0', '--feature-weights=random',
                                   '--feature-res=32', '--duration=1000', '--tick=1', '--snap=1000', '--dump=1000',
                                   '--grid=0', '--workers=0'], B, args.outdir)
        run(['gdd.py', 'generate', f'--network={state}', f'--outdir={args.outdir}/gdd-img', seeds],
            f'{args.outdir}/gdd-gen.log')
        score('gdd', f'{args.outdir}/gdd-img', cpu, '(one step; plus the EDM row as its teacher; random features)')

    print('\n| method | training CPU s | toy_fd (lower is better) | confident |\n|---|---|---|---|')
    for name, (cpu, values, note) in rows.items():
        print(f'| {name} {note} | {cpu:.0f} | {float(values["toy_fd"]):.2f} | {values["confident"]} |')
    if rows:
        any_row = next(iter(rows.values()))[1]
        print(f'| held-out real images (floor) | - | {any_row["toy_fd_real"]} | {any_row.get("confident_real")} |')

if __name__ == '__main__':
    main()
