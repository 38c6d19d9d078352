"""Held-out loss of trained demo / benchmark networks on demo shapes not in the training set (items 4096+ of a
DemoDataset of 8192), with fixed noise and noise levels: EDM's loss on full images (Patch Diffusion, EDM; summed over
pixels, mean over 256 images and 4 noise draws) or DDPM's epsilon loss on all tokens (MaskDM).

  python tests/benchmark_heldout.py patch,training-runs,8,edm edm,teacher,8,edm masked,runs/masked-ft,8,masked
  (each argument: name,snapshot or run folder or training state,resolution,edm|masked)
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import masked_dm as md  # noqa: E402
import patch_diffusion as pd  # noqa: E402

torch.set_num_threads(1)

def images(res, n=256):
    ds = common.DemoDataset(resolution=res, size=8192)
    return torch.from_numpy(np.stack([ds[4096 + i][0] for i in range(n)])).float() / 127.5 - 1

@torch.no_grad()
def edm_heldout(path, res):
    net = pd.load_network(path).eval()
    x = images(res)
    total = 0
    for rep in range(4):
        torch.manual_seed(rep)
        loss = pd.patch_loss(net, x, None, res, isinstance(net, pd.PatchPrecond))
        total += loss.sum((1, 2, 3)).mean()
    return float(total / 4)

@torch.no_grad()
def masked_heldout(path, res):
    net = md.load_network(path).eval()
    x = images(res)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, net.num_timesteps, [len(x)], generator=g)
    noise = torch.randn(x.shape, generator=g)
    return float(md.mdsm_loss(net, x, t, noise, None).mean())

for name, path, res, kind in [arg.split(',') for arg in sys.argv[1:]]:
    f = edm_heldout if kind == 'edm' else masked_heldout
    print(f'{name:16} held-out loss {f(path, int(res)):.4f}', flush=True)
