"""Training-step speed of the EDM U-Nets at their paper configs (EDM Table 7): forward + backward images/s and
peak memory. Not a test. Example: python tests/benchmark.py --device=cuda --batch=64 --iters=20 --amp=bf16"""

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import DhariwalUNet, SongUNet  # noqa: E402

DDPMPP = dict(in_channels=3, out_channels=3, model_channels=128, embedding_type='positional', channel_mult_noise=1,
              encoder_type='standard', decoder_type='standard', resample_filter=[1, 1])
CONFIGS = {  # name: (class, kwargs, resolution); augment_dim 9 as EDM's train.py builds with --augment > 0
    'DDPM++ CIFAR-10 32px': (SongUNet, dict(DDPMPP, img_resolution=32, channel_mult=[2, 2, 2], augment_dim=9, dropout=0.13), 32),
    'DDPM++ 64px cres 1,2,2,2': (SongUNet, dict(DDPMPP, img_resolution=64, channel_mult=[1, 2, 2, 2], augment_dim=9, dropout=0.05), 64),
    'ADM ImageNet-64 cond': (DhariwalUNet, dict(img_resolution=64, in_channels=3, out_channels=3, label_dim=1000, dropout=0.10), 64),
}

def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cuda or cpu')
    parser.add_argument('--batch', type=int, default=None, metavar='INT', help='images per step (default 64 on cuda, 2 on cpu)')
    parser.add_argument('--iters', type=int, default=None, metavar='INT', help='timed steps after one warm-up step (default 10 on cuda, 2 on cpu)')
    parser.add_argument('--amp', choices=['bf16', 'fp16', 'none'], default='bf16', help='autocast dtype around the network')
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == 'cuda'
    batch = args.batch or (64 if cuda else 2)
    iters = args.iters or (10 if cuda else 2)
    amp = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'none': None}[args.amp]
    print(f'device {device}, batch {batch}, iters {iters}, amp {args.amp}, torch {torch.__version__}')

    for name, (cls, kwargs, res) in CONFIGS.items():
        torch.manual_seed(0)
        net = cls(**kwargs).to(device).train()
        x = torch.randn(batch, 3, res, res, device=device)
        sigma = torch.randn(batch, device=device)
        label_dim, augment_dim = kwargs.get('label_dim', 0), kwargs.get('augment_dim', 0)
        labels = torch.eye(label_dim, device=device)[torch.randint(label_dim, (batch,), device=device)] if label_dim else None
        augment = torch.zeros(batch, augment_dim, device=device) if augment_dim else None

        def step():
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                y = net(x, sigma, labels, augment)
            y.float().square().mean().backward()
            net.zero_grad(set_to_none=True)

        step()                                                              # warm-up
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(iters):
            step()
        if cuda:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        if cuda:
            memory = f'peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB'
        else:
            memory = f'peak process RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB'
        params = sum(p.numel() for p in net.parameters())
        print(f'{name:26s} {params / 1e6:7.2f}M params  {batch * iters / seconds:9.1f} img/s  {memory}')

if __name__ == '__main__':
    main()
