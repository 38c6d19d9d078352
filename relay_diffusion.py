"""Relay Diffusion: Unifying diffusion process across resolutions for image synthesis.

Teng, Zheng, Ding, Hong, Wangni, Yang, Tang, ICLR 2024, arXiv:2309.03350v1 (the PDF's equation numbers were not
available to us, so comments cite paper sections, App. A.4 Algorithm 1 and the official code instead).
Official code: https://github.com/THUDM/RelayDiffusion at a97877f (an EDM fork; nothing here is copied from it).

Stage one is plain EDM at low resolution (64 px). Stage two continues the same diffusion at high resolution: the
low-resolution sample is upsampled by nearest neighbour (s = 4), which makes it constant on s x s patches, the fixed
point of a patch-wise DCT heat-dissipation blur. Noise (i.i.d. plus correlated "block noise") at a moderate level
(sigma ~ 0.9) is added and a blurring-diffusion sampler runs to sigma = 0.008. The stage-two network is EDM's
(same preconditioning, same U-Net), trained on blur(y) + noise with the sharp y as the target, on the lower part of
EDM's sigma distribution only, with the blur strength a function of the same time u as sigma.

Implemented: both training stages (`--precond=edm` / `--precond=blur`), EDM's augmentation (`--augment`), label
dropout for classifier-free guidance, the blur sampler and the two-stage pipeline, presets named after the official
runs (training flags of the README commands, sampler settings of the official generate_*.py), loading of our
snapshots, patch_diffusion.py EDM snapshots, official EDM `.pkl` files and the released RDM `.pt` checkpoints (read
without running code from them). Not implemented: xformers attention (`--eff-attn` is accepted and has no effect:
F.scaled_dot_product_attention computes the same attention).

  # stage two on ImageNet-256 (official README command)
  torchrun --standalone --nproc_per_node=8 relay_diffusion.py train --outdir=training-runs \\
      --data=datasets/imagenet-256x256.zip --eff-attn=True --cond=1 --batch=4096 --batch-gpu=8 --lr=1e-4 \\
      --dropout=0.1 --fp16=1 --ls=1 --arch=adm --precond=blur --up-scale=4 --block-scale=0.15 \\
      --prob-length=0.93 --blur-sigma-max=3.0
  # 50k two-stage samples with the official ImageNet sampler settings (generate_imagenet.py)
  torchrun --standalone --nproc_per_node=8 relay_diffusion.py generate --preset=imagenet256 --outdir=samples \\
      --network_first=ckpts/imagenet_first_stage.pkl --network_second=ckpts/imagenet_second_stage.pt --subdirs
  torchrun --standalone --nproc_per_node=8 fid.py calc --images=samples --ref=fid-refs/imagenet-256x256.npz
"""

import argparse
import io
import math
import os
import re
import warnings
import zipfile

import numpy as np
import PIL.Image
import PIL.ImageEnhance
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (AugmentPipe, EDMLoss, EDMPrecond, Parser, PerSeedRNG, SnapshotUnpickler, TrainingRun,
                    UsageError, UserError, add_edm_train_flags, add_generate_flags, add_metric_flags,
                    add_train_flags, check_class, check_memory, check_outdir, data_stream, distributed_model, download,
                    edm_backbone_kwargs, edm_sampler, edm_time_steps, ema_beta, get_rank, get_world_size,
                    init_distributed, is_official, latest_checkpoint, learning_rate, load_official, load_snapshot,
                    load_weights, network_and_ema, number, official_network, open_dataset, optimizer_step,
                    parse_bool, parse_command_line, parse_int_list, print0, print_options, reseed, run_desc,
                    run_main, save_image_grid, save_seed_images, seed_batches, setup_precision, split_batch,
                    sync_if, to_uint8, training_metrics, update_ema, working)

#------------------------------------------------------------------------------
# 1. Config. A preset is an official run: `train --preset=NAME` takes its README training command, `generate
#    --preset=NAME` the settings of the official generate_*.py that samples it (both stages). Flags override.

# Official runs (README training commands): ADM, lr 1e-4, loss scale 1, EDM augmentation 0.2.
README = dict(cond=False, arch='adm', batch=1024, lr=1e-4, augment=0.2, ls=1)
# Stage two's blur and block noise: the ImageNet README command's values (also the flag defaults).
BLUR = dict(precond='blur', up_scale=4, block_scale=0.15, prob_length=0.93, blur_sigma_max=3.0)
# Ours, CPU demo on the built-in shapes: a small DDPM++, a large lr, a short EMA, no dropout.
DEMO = dict(arch='ddpmpp', cbase=32, batch=32, lr=2e-3, lr_rampup=1, ema=0.005, dropout=0, augment=0,
            dump=100, workers=0)

PRESETS = {
    # Stage one, CelebA-HQ 64 (README). fp32; the training length is not published (train.py default: 200 Mimg).
    'celebahq64': dict(train=README | dict(precond='edm', batch_gpu=32, dropout=0.15)),
    # Stage two, CelebA-HQ 256 (README); "47M" training images in the README table for the whole model.
    # Sampling: generate_celebahq.py: 30k seeds, SDE-Heun stage one (sde_scale 0.05), 150-step grid truncated at
    # 0.95. NOTE: its sampler maps sigma -> u with L = 1.05 although the network was trained with prob_length 0.89
    # (less blur than trained at every sigma); the reason is unknown, we keep the official values.
    'celebahq256': dict(
        train=README | BLUR | dict(batch_gpu=8, dropout=0.2, fp16=True, prob_length=0.89,
                                   blur_sigma_max=2.0, duration=47),
        generate=dict(seeds='80000-109999', num_steps_first=120, sde_scale_first=0.05,
                      num_steps_second=150, rho_second=7, truncation_sigma_second=0.95,
                      truncation_t_second=1.05, blur_sigma_max_second=2.0, cfg_scale_second=1)),
    # Stage two, ImageNet 256 (README). NOTE: the README command sets no --augment, so train.py's default 0.12
    # applies (553,833,475 parameters); --label-dropout 0.1 is our assumption: the released train.py has no such
    # option, yet the ImageNet sampler uses CFG 3.5 against an all-zero label. duration: the README's 1250M total,
    # taken as stage two's (our assumption; per-stage lengths are not published).
    # Sampling: generate_imagenet.py: 50k seeds (labels seed mod 1000), EDM's stochastic ImageNet-64 sampler for
    # stage one, a 200-step rho=100 grid truncated at 0.9, CFG 3.5 in stage two.
    'imagenet256': dict(
        train=README | BLUR | dict(cond=True, batch=4096, batch_gpu=8, dropout=0.1, augment=0.12,
                                   fp16=True, label_dropout=0.1, duration=1250),
        generate=dict(seeds='10000-59999', num_steps_first=256, S_churn=40, S_min=0.05, S_max=50,
                      S_noise=1.003, num_steps_second=200, rho_second=100, truncation_sigma_second=0.9,
                      truncation_t_second=0.93, blur_sigma_max_second=3.0, cfg_scale_second=3.5)),
    # Ours, CPU demo: an 8 px EDM stage one (about 5 CPU-minutes), then a 16 px blur stage two x2 (demo16, about 5;
    # 12 kimg left the relayed tiles noisy) or a 32 px one x4 (demo32, the paper's factor; the toy benchmark's) on
    # the same built-in shapes.
    'demo8': dict(train=DEMO | dict(data='demo-8', precond='edm', cres=[1, 2], blocks=2,
                                    duration=0.06, tick=10, snap=2)),
    'demo16': dict(train=DEMO | BLUR | dict(data='demo-16', cres=[1, 2, 2], blocks=1, up_scale=2,
                                            duration=0.048, tick=4, snap=3),
                   generate=dict(up_scale_second=2)),
    'demo32': dict(train=DEMO | BLUR | dict(data='demo-32', cres=[1, 2, 2], blocks=1, batch=16, lr=1e-3,
                                            ema=0.002, duration=0.003, tick=1, snap=100)),
}

# EDM's augmentation with probability --augment: train.py's CelebA/CIFAR set, as upstream.
AUGMENT = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
MIN_SCALE = 0.001            # blur multiplier floor m (hard-coded in the official blurring.py and loss.py)
TRUNCATE_SIGMA = 7.5e-3      # lower sigma bound of stage-two training (official BlurLoss truncate_sigma)

#------------------------------------------------------------------------------
# 2. Backbone: EDM's U-Nets (common.EDM_ARCHS; ADM256 below) and preconditioning, unchanged (official
#    train.py: --precond=blur selects EDMPrecond). NOTE: there is no blur-aware preconditioning in the official
#    code: c_skip, c_out, c_in, c_noise are EDM's, computed from sigma alone (the extra 1.0225 noise variance
#    and the blurred signal are ignored); we follow it.

# --arch=adm at 256 px: ADM's 256x256 configuration (official RDM train.py); --cbase, --cres, --blocks override it.
ADM256 = dict(model_channels=256, channel_mult=[1, 1, 2, 2, 4, 4], num_blocks=2)

def network_kwargs(args, resolution, channels, label_dim):
    """EDMPrecond constructor kwargs from the CLI flags (official train.py's mapping)."""
    model = edm_backbone_kwargs(args.arch, args.cbase, args.cres, args.blocks)
    if args.arch == 'adm' and resolution == 256:
        model.update(model_channels=args.cbase or ADM256['model_channels'],
                     channel_mult=args.cres or ADM256['channel_mult'],
                     num_blocks=args.blocks or ADM256['num_blocks'])
    model.update(dropout=args.dropout, label_dropout=args.label_dropout if label_dim else 0)
    if args.augment:
        model['augment_dim'] = 9  # EDM AugmentPipe labels
    return dict(img_resolution=resolution, img_channels=channels, label_dim=label_dim, **model)

def count_parameters(net_kwargs):
    with torch.device('meta'):  # shapes only, nothing allocated
        return sum(p.numel() for p in EDMPrecond(**net_kwargs).parameters())

#------------------------------------------------------------------------------
# 3. Method math: block DCT, patch-wise blur, block noise, the truncated sigma/blur schedule, BlurLoss.
#    Images are [N, C, H, W] with H and W multiples of the block size s (any resolution, not only 256).

def dct_matrix(s, dtype=torch.float64, device='cpu'):
    """Orthonormal DCT-II matrix: C[k, n] = sqrt((2 - delta_k0) / s) cos(pi (2n + 1) k / (2s))."""
    k = torch.arange(s, dtype=dtype, device=device)[:, None]
    n = torch.arange(s, dtype=dtype, device=device)[None, :]
    return torch.cos(math.pi * (2 * n + 1) * k / (2 * s)) * ((2 - (k == 0).to(dtype)) / s).sqrt()

def block_dct(x, s, inverse=False):
    """2-D DCT-II of every s x s patch, coefficients in place: coefficient (k, l) of the patch at block (i, j) sits
    at pixel (s i + k, s j + l) (official blurring.dct_2d with norm='ortho'). inverse=True applies C^T X C."""
    N, C, H, W = x.shape
    if H % s or W % s:
        raise ValueError(f'image size {H}x{W} is not divisible by the block size {s}')
    D = dct_matrix(s, x.dtype, x.device)
    D = D.T if inverse else D
    p = x.reshape(N, C, H // s, s, W // s, s).transpose(3, 4)   # [N, C, H, W] -> [N, C, H/s, W/s, s, s]
    p = D @ p @ D.T                                              # P -> D P D^T per patch
    return p.transpose(3, 4).reshape(N, C, H, W)                 # -> [N, C, H, W], coefficients in place

def block_idct(X, s):
    return block_dct(X, s, inverse=True)

def blur_multipliers(B, s, H, W, min_scale=MIN_SCALE):
    """Per-coefficient multipliers d_kl(B) = (1 - m) exp(-(w_k^2 + w_l^2) B^2 / 2) + m, w_k = pi k / s, tiled over
    the H/s x W/s patches: [N, 1, H, W] for B of shape [N] (or a scalar -> [1, 1, H, W]). Paper Sec. 3 (blurring
    diffusion of Hoogeboom & Salimans restricted to patches); official blurring.get_alpha_t / loss.DCTBlur."""
    B = torch.as_tensor(B).reshape(-1, 1, 1, 1)
    w = math.pi * torch.arange(s, dtype=B.dtype, device=B.device) / s
    w2 = (w[:, None] ** 2 + w[None, :] ** 2).repeat(H // s, W // s)  # [s, s] -> [H, W]
    return (1 - min_scale) * torch.exp(-w2 * (B ** 2 / 2)) + min_scale

def blur(x, B, s, min_scale=MIN_SCALE):
    """A(B) x = V diag(d(B)) V^T x with V the block DCT: patch means are kept, higher frequencies damped."""
    return block_idct(block_dct(x, s) * blur_multipliers(B, s, *x.shape[-2:], min_scale).to(x.dtype), s)

def block_noise(x, s, randn_like=torch.randn_like):
    """Block noise (paper Sec. 3, official blurring.block_noise): a circular s x s box sum of i.i.d. N(0, 1) noise,
    divided by s, so every pixel has unit variance and neighbours correlate as (s-|dx|)(s-|dy|)/s^2."""
    eps = randn_like(x)
    rows = sum(torch.roll(eps, dx, dims=-2) for dx in range(s))     # rows[x, y] = sum_i eps[x - i, y] (wraps)
    return sum(torch.roll(rows, dy, dims=-1) for dy in range(s)) / s  # + sum_j over columns: the s x s window

def mixed_noise(x, s, alpha, randn_like=torch.randn_like, paper_noise_norm=False):
    """eps + alpha Block_s(eps'), eps first, then eps' (skipped when alpha = 0), as the official code draws them.
    NOTE: the paper scales this by 1/sqrt(1 + alpha^2) (its Eq. 8 as issue #8 numbers it); the official code does not
    (variance 1.0225 at alpha = 0.15; issue #8: "little impact"), and the released checkpoints were trained without
    it: off by default."""
    xi = randn_like(x)
    if alpha > 0:
        xi = xi + alpha * block_noise(x, s, randn_like)
    return xi / math.sqrt(1 + alpha ** 2) if paper_noise_norm else xi

# The stage-two time u in [0, 1] drives both sigma and the blur (paper Sec. 3; official BlurLoss, get_alpha_t).
# Phi and its inverse in float64 (P_mean, P_std as EDM).
P_MEAN, P_STD = -1.2, 1.2

def sigma_of_u(u, prob_length):
    """sigma(u) = exp(P_mean + P_std Phi^-1(L u)): EDM's log-normal restricted to its lower L fraction."""
    u = torch.as_tensor(u, dtype=torch.float64)
    return (P_MEAN + P_STD * torch.special.ndtri(prob_length * u)).exp()

def u_of_sigma(sigma, prob_length):
    """Inverse of sigma_of_u, u(sigma) = Phi((ln sigma - P_mean) / P_std) / L (the sampler's map, L = truncation_t)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return torch.special.ndtr((sigma.log() - P_MEAN) / P_STD) / prob_length

def blur_of_u(u, blur_sigma_max):
    """B(u) = B_max sin^2(pi u / 2) (Hoogeboom & Salimans 2022's schedule)."""
    return blur_sigma_max * torch.sin(torch.as_tensor(u) * math.pi / 2) ** 2

def u_min(prob_length, truncate_sigma=TRUNCATE_SIGMA):
    """Lower clamp of u: L Phi((ln 0.0075 - P_mean) / P_std). NOTE: L enters here and again in sigma_of_u, so the
    smallest trained sigma is 0.0071 at L = 0.93, not the nominal 0.0075 (official BlurLoss)."""
    z = torch.tensor((math.log(truncate_sigma) - P_MEAN) / P_STD, dtype=torch.float64)
    return prob_length * torch.special.ndtr(z).item()

class BlurLoss:
    """Stage-two loss (paper Sec. 3, official training/loss.py BlurLoss): u ~ U(u_min, 1) per image (clamped),
    x = A(B(u)) y + sigma(u) (eps + alpha Block(eps')), loss = min(lambda(sigma), 1e5) |D(x; sigma) - y|^2 with the
    sharp (augmented) y as target and EDM's lambda. Returns the unreduced per-element loss."""
    def __init__(self,
        up_scale            = 4,        # block size s of the DCT and the block noise (= upsampling factor)
        prob_length         = 0.93,     # L: the lower fraction of EDM's sigma distribution that is trained
        blur_sigma_max      = 3.0,      # B_max: blur strength at u = 1
        block_scale         = 0.15,     # alpha: weight of block noise; 0 = i.i.d. noise only
        paper_noise_norm    = False,    # divide the noise mix by sqrt(1 + alpha^2) (paper), not (code)
        sigma_data          = 0.5,      # EDM's sigma_data in lambda(sigma)
    ):
        self.up_scale, self.prob_length, self.blur_sigma_max = up_scale, prob_length, blur_sigma_max
        self.block_scale, self.paper_noise_norm, self.sigma_data = block_scale, paper_noise_norm, sigma_data

    def schedule(self, n, device):
        """u, sigma(u) (float32) and B(u) for n images, one shared u per image."""
        u = torch.rand([n], device=device, dtype=torch.float64).clamp(min=u_min(self.prob_length))
        sigma = sigma_of_u(u, self.prob_length).float().reshape(-1, 1, 1, 1)
        return u, sigma, blur_of_u(u, self.blur_sigma_max).float()

    def __call__(self, net, images, labels=None, augment_pipe=None):
        u, sigma, B = self.schedule(images.shape[0], images.device)
        lam = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2  # EDM Table 1, lambda(sigma)
        weight = lam.clamp(max=1e5)  # official BlurLoss clamp (never fires)
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        xi = mixed_noise(y, self.up_scale, self.block_scale, torch.randn_like, self.paper_noise_norm)
        n = sigma * xi
        x = blur(y, B, self.up_scale) + n  # x_t = A(B(u)) y + n
        D_yn = net(x, sigma, labels, augment_labels=augment_labels)
        return weight * (D_yn - y) ** 2  # target: the sharp y (official BlurLoss)

#------------------------------------------------------------------------------
# 4. Samplers: stage one is EDM's (or the official CelebA-HQ SDE-Heun variant), stage two the blur sampler.

def guided(net, cfg_scale):
    """Classifier-free guidance as the official scripts: w D(x | y) - (w - 1) D(x | 0) when w > 1."""
    if cfg_scale <= 1:
        return net
    return lambda x, sigma, labels: cfg_scale * net(x, sigma, labels) - (cfg_scale - 1) * net(x, sigma, None)

@torch.no_grad()
def sde_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=120, sigma_min=0.002,
                sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=float('inf'), S_noise=1, sde_scale=0.05):
    """Official generate_celebahq.py stage one: EDM's Heun steps with a DDIM-eta-like noise g = sde_scale sigma_next
    injected at the Euler and again (fresh) at the corrected step, x' = x + (a - 1) sigma d + g eps with
    a = sqrt(sigma_next^2 - g^2) / sigma. The (zero-strength by default) churn draw is kept so seeds match upstream."""
    t_steps = edm_time_steps(num_steps, sigma_min, sigma_max, rho).to(latents.device)
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0   # EDM Alg. 2 line 4
        t_hat = t_cur + gamma * t_cur
        x_hat = x_next + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_next)
        d_cur = (x_hat - net(x_hat, t_hat, class_labels).to(torch.float64)) / t_hat
        g = sde_scale * t_next                                              # official generate_celebahq.py
        a = (t_next ** 2 - g ** 2).sqrt() / t_hat
        x_next = x_hat + (a - 1) * t_hat * d_cur + g * randn_like(x_hat)     # Euler with noise g
        if i < num_steps - 1:
            d_prime = (x_next - net(x_next, t_next, class_labels).to(torch.float64)) / t_next
            x_next = x_hat + (a - 1) * t_hat * (d_cur + d_prime) / 2 + g * randn_like(x_hat)
    return x_next

def relay_time_steps(num_steps=18, sigma_min=0.008, sigma_max=80, rho=7, truncation_sigma=0.9):
    """EDM's grid (Eq. 5) with every leading level >= truncation_sigma dropped, then 0 (official blur_sampler).
    NOTE: truncation_sigma is the stage-two start (upper bound), not training's lower bound 0.0075 (issue #3)."""
    t = edm_time_steps(num_steps, sigma_min, sigma_max, rho)
    kept = t[:-1][t[:-1] < truncation_sigma]
    if len(kept) == 0:
        raise ValueError(f'truncation_sigma={truncation_sigma}: no level of the {num_steps}-step grid '
                         'lies below it')
    return torch.cat([kept, t[-1:]])

@torch.no_grad()
def blur_sampler(net, images, class_labels=None, randn_like=torch.randn_like, num_steps=18, sigma_min=0.008,
                 sigma_max=80, rho=7, truncation_sigma=0.9, truncation_t=0.93, up_scale=4, cfg_scale=1, s_block=0.15,
                 s_noise=0.2, blur_sigma_max=3, paper_noise_norm=False):
    """Stage-two sampler (paper App. A.4 Algorithm 1; official generate.py blur_sampler), state in float64.
    `images`: the nearest-upsampled stage-one output, constant on s x s patches, so it is its own blurred version.
    Step n, T the block DCT (U = T x, U0 = T D(x), a = d(B(u(sigma))), gamma = sqrt(1 - eta^2) sigma'/sigma):
      x' = T^-1[a' U0 + gamma (U - a U0)] + eta sigma' xi (xi added in pixel space), then Heun: the same with the
      mean of both slopes.
    NOTE: the paper's Algorithm 1 shows i.i.d. step noise; the code draws xi = eps + s_block Block(eps') for the start
    and both step noises, as here. generate_celebahq.py also draws one unused N(0, 1) field per step for a churn of
    strength 0; we leave that draw out, so its seeds give other (equally distributed) images than upstream's."""
    s = up_scale
    sigma_min = max(sigma_min, getattr(net, 'sigma_min', 0))
    sigma_max = min(sigma_max, getattr(net, 'sigma_max', float('inf')))
    t_steps = relay_time_steps(num_steps, sigma_min, sigma_max, rho, truncation_sigma).to(images.device)
    denoise = guided(net, cfg_scale)
    x_up = images.to(torch.float64)
    H, W = x_up.shape[-2:]
    def alpha(sigma):  # a = d(B(u(sigma))), the blur multipliers at noise level sigma
        return blur_multipliers(blur_of_u(u_of_sigma(sigma, truncation_t), blur_sigma_max), s, H, W)
    def xi():  # every xi drawn fresh
        return mixed_noise(x_up, s, s_block, randn_like, paper_noise_norm)
    x = x_up + t_steps[0] * xi()  # relay start state, no further blur
    K = len(t_steps) - 1
    a_next = alpha(t_steps[0])
    for n, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        D_0 = denoise(x, t_cur, class_labels).to(torch.float64)  # Alg. 1: D_0 = D(x; sigma_n)
        if n == K - 1:
            return D_0  # sigma_min is the last level evaluated; nothing steps to 0
        a_cur, a_next = a_next, alpha(t_next)  # a_n = d(B(u(sigma_n))), each level's table built once
        gamma = math.sqrt(1 - s_noise ** 2) * t_next / t_cur  # Alg. 1: gamma
        U = block_dct(x, s)
        g = (U - block_dct(D_0, s)) / t_cur
        c_U = a_next + gamma * (1 - a_cur)
        c_g = t_cur * (gamma * a_cur - a_next)
        x_prop = block_idct(c_U * U + c_g * g, s) + s_noise * t_next * xi()  # Alg. 1: Euler proposal
        D_1 = denoise(x_prop, t_next, class_labels).to(torch.float64)
        g_prime = (block_dct(x_prop, s) - block_dct(D_1, s)) / t_next
        # Alg. 1: 2nd order (the mean of both slopes), fresh noise
        x = block_idct(c_U * U + c_g * (g + g_prime) / 2, s) + s_noise * t_next * xi()
    return x

@torch.no_grad()
def sample_images(net, seeds, device, first=None, low=None, class_idx=None, first_settings={}, second_settings={},
                  relayed=None):
    """Images of `seeds` as `generate` makes them, [N, C, H, W] in [-1, 1] (the samplers' float64: generate's PNGs
    are its uint8 rounding). `net` alone is a stage-one network; with `first` (stage one) or `low` (stage-one images)
    it is the stage-two network that relays them. One generator per seed for both stages: labels (seed mod classes,
    or class_idx), stage one's draws, then stage two's. first_settings: edm_sampler's (or sde_sampler's, with
    sde_scale) plus cfg_scale; second_settings: blur_sampler's. `relayed` (a list) receives (upsampled, relayed)."""
    rng = PerSeedRNG(seeds, device)
    labels = None
    if net.label_dim:  # seed mod classes (official generate_imagenet.py), or --class for all
        index = torch.as_tensor(seeds, device=device) % net.label_dim
        index = index if class_idx is None else torch.full_like(index, class_idx)
        labels = torch.eye(net.label_dim, device=device)[index]
    if low is None:
        one, settings = (net if first is None else first), dict(first_settings)
        sampler = sde_sampler if 'sde_scale' in settings else edm_sampler
        latents = rng.randn([one.img_channels, one.img_resolution, one.img_resolution], device=device)
        low = sampler(guided(one, settings.pop('cfg_scale', 1)), latents, labels, rng.randn_like, **settings)
        if first is None:
            return low
    x_up = F.interpolate(low, scale_factor=second_settings.get('up_scale', 4), mode='nearest')  # NOTE: upstream
    images = blur_sampler(net, x_up, labels, rng.randn_like, **second_settings)     # resizes to 256 whatever s is
    if relayed is not None:
        relayed.append((x_up, images))
    return images

#------------------------------------------------------------------------------
# 5. Training loop: one loop for both stages; --precond picks EDMLoss (stage one) or BlurLoss (stage two).

def stage_of(args):
    """What generation needs to know about the stage a network was trained for (stored in its snapshots)."""
    if args.precond == 'edm':
        return dict(precond='edm')
    return dict(precond='blur', up_scale=args.up_scale, prob_length=args.prob_length,
                blur_sigma_max=args.blur_sigma_max, block_scale=args.block_scale,
                paper_noise_norm=args.paper_noise_norm)

def training_setup(args, world_size):
    """(dataset, network kwargs, what the run records besides its flags: net_kwargs, num_params, stage, batch_gpu,
    rounds, world_size); the flags that depend on the data are checked here, before anything is written."""
    dataset, R, C, label_dim = dataset_shape(args)
    net_kwargs = network_kwargs(args, R, C, label_dim)
    check_train_flags(args, R, label_dim, net_kwargs)
    batch_gpu, rounds = split_batch(args.batch, args.batch_gpu, world_size)
    num_params = count_parameters(net_kwargs)
    if not args.dry_run:  # weights, EMA, gradients and Adam's two moments: 5 float32 copies
        check_memory(20 * num_params, f'the network has {num_params:,} parameters (see --cbase, --cres, --blocks); '
                     'its weights, EMA, gradients and Adam moments')
    info = dict(net_kwargs=net_kwargs, num_params=num_params, stage=stage_of(args), batch_gpu=batch_gpu,
                rounds=rounds, world_size=world_size)
    return dataset, net_kwargs, info

def make_loss(args):
    """Stage one: EDM's loss; stage two: BlurLoss with this run's blur and block noise."""
    if args.precond == 'edm':
        return EDMLoss()
    return BlurLoss(up_scale=args.up_scale, prob_length=args.prob_length, blur_sigma_max=args.blur_sigma_max,
                    block_scale=args.block_scale, paper_noise_norm=args.paper_noise_norm)

def train(args):
    device = init_distributed()
    rank, world_size = get_rank(), get_world_size()
    amp_dtype, scaler = setup_precision(args.fp16, args.bf16, args.tf32, device)
    dataset, net_kwargs, info = training_setup(args, world_size)
    if args.dry_run:
        print_options(args, info)
        return
    torch.manual_seed(args.seed)
    net, ema = network_and_ema(EDMPrecond(**net_kwargs), device, amp_dtype)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8,  # EDM's optimizer
                                 fused=device.type == 'cuda')
    augment_pipe = AugmentPipe(args.augment, **AUGMENT) if args.augment else None
    loss_fn = make_loss(args)
    state = dict(net=net, ema=ema, optimizer=optimizer, scaler=scaler)
    run = training_run(args, dataset, net_kwargs, info, loss_fn, device, state)
    ddp = distributed_model(net, device, args.compile)
    batch_gpu, rounds = info['batch_gpu'], info['rounds']
    stream = run.data(dataset, batch_gpu, args.seed, args.workers)
    with run:
        print0(banner(args, dataset, info, device))
        while not run.done:
            reseed(args.seed, rank, run.cur_nimg)  # per-step randomness: resume == uninterrupted
            optimizer.zero_grad(set_to_none=True)
            for r in range(rounds):
                # Fetch data
                images, labels = next(stream)
                images = images.to(device).to(torch.float32) / 127.5 - 1
                labels = labels.to(device)
                with sync_if(ddp, r == rounds - 1):
                    # The paper's loss: EDMLoss (stage one) or BlurLoss (stage two, paper Sec. 3)
                    loss = loss_fn(ddp, images, labels, augment_pipe)
                    run.add('loss', loss)
                    # Backward. NOTE: upstream back-propagates sum(loss) ls / T with T = 32 at 64 px and 256
                    # otherwise; we use EDM's sum over pixels, mean over this GPU's images (Adam makes the constant
                    # nearly irrelevant).
                    scaler.scale(loss.sum() * (args.ls / (batch_gpu * rounds))).backward()
            # Optimizer and EMA (EDM's lr ramp-up and EMA half-life)
            optimizer_step(optimizer, scaler, learning_rate(args.lr, run.cur_nimg, args.lr_rampup))
            update_ema(ema, net, ema_beta(run.cur_nimg, args.batch, args.ema * 1000))
            # Tick: status line, snapshots, training states, metrics
            run.end_step(args.batch)
        print0(f'done: {run.dir}')

#------------------------------------------------------------------------------
# 6. Generation: stage one (EDM sampler) -> nearest upsampling -> stage two (blur sampler); one PNG per seed,
#    identical for any --batch, any GPU count, and (for stage two) whether stage one ran now or came from --indir.
#    The networks' reader (load_network) and the flags -> sampler settings map are in the Appendix.

@torch.no_grad()
def generate(args):
    device, rank, world_size = init_distributed(), get_rank(), get_world_size()
    check_outdir(args.outdir)
    stages, s = args.sampler_stages, args.up_scale_second
    check_generate_flags(args)
    first = second = None
    if stages in ('first', 'both'):
        first = load_network(args.network_first, '--network_first', 'edm').to(device).eval()
    if stages in ('second', 'both'):
        second = load_network(args.network_second, '--network_second', 'blur').to(device).eval()
    check_networks(args, first, second)
    indir = indir_paths(args.indir, args.seeds, second.img_resolution // s) if first is None else None
    first_settings, second_settings = sampler_settings(args, (getattr(second, 'stage', None) or {}).get(
        'paper_noise_norm', False))
    print0(f'sampler stages {stages}: first {first_settings if first else "-"}; '
           f'second {second_settings if second else "-"}')
    relayed = [] if grid_path(args) and rank == 0 else None
    with working(), tqdm(total=len(args.seeds), unit='img', disable=rank != 0) as bar:
        for seeds in seed_batches(args.seeds, args.batch, rank, world_size):
            low = read_images([indir[seed] for seed in seeds], args.indir, s, second, device) if indir else None
            images = sample_images(second or first, seeds, device, first=first if second else None, low=low,
                                   class_idx=args.class_idx, first_settings=first_settings,
                                   second_settings=second_settings, relayed=relayed)
            save_images(images, seeds, args.outdir, args.subdirs, args.enhance)
            bar.update(len(seeds) * world_size)
        if relayed:
            os.makedirs(os.path.dirname(grid_path(args)) or '.', exist_ok=True)
            save_relay_grid(torch.cat([r[0] for r in relayed]), torch.cat([r[1] for r in relayed]), grid_path(args))
    torch.distributed.barrier()
    print0('done')

#------------------------------------------------------------------------------
# 7. Command line. Flag spellings follow the official train.py / generate.py so published commands run unchanged.

def build_parser(preset=None):
    """The parser; `preset` (a PRESETS name, an official run) gives `train` its training flags and `generate` its
    sampler settings as defaults (see common.parse_command_line)."""
    parser = Parser(description='Relay Diffusion (Teng et al. 2024) on EDM. --preset names an official run: train '
                    '--preset takes its README training command, generate --preset its generate_*.py settings.')
    sub = parser.add_subparsers(dest='command', required=True)
    t = sub.add_parser('train', help='train stage one (--precond=edm) or stage two (--precond=blur)')
    add_train_flags(t, lr=1e-4)  # NOTE: upstream's default lr is 1e-4 (EDM: 1e-3); every README command sets it
    add_edm_train_flags(t)
    p01, nonneg, pos = number(float, 0, 1), number(float, 0, 1e4), number(float, 0, 1e5, low_open=True)
    blur_max = number(float, 0, 100, low_open=True)  # B_max: from about 20 on every non-DC coefficient is at the floor
    steps, rho, cfg = number(int, 1, 10**5), number(float, 0, 1000, low_open=True), number(float, 0, 100)
    scale, weight = number(int, 1, 256), number(float, 0, 10)
    add = t.add_argument
    add('--preset', choices=sorted(PRESETS), default=None,
        help='an official run: its README training flags (generate --preset: its sampler settings); flags override')
    add('--arch', choices=['ddpmpp', 'ncsnpp', 'adm'], default='adm', help='backbone (adm: ADM-64, ADM-256 at 256 px)')
    add('--precond', choices=['edm', 'blur'], default='edm',
        help='edm: stage one (EDMLoss); blur: stage two (BlurLoss), same EDM preconditioning')
    add('--cbase', type=number(int, 1, 4096), default=None, metavar='INT', help="base channel count; None = the arch's")
    add('--cres', type=parse_cres, default=None, metavar='LIST', help="channel multipliers; None = the arch's")
    add('--blocks', type=number(int, 1, 64), default=None, metavar='INT', help="blocks per level; None = the arch's")
    add('--augment', type=p01, default=0, metavar='P', help='EDM augmentation probability (augment_dim 9 when > 0)')
    add('--label-dropout', type=p01, default=0, metavar='P', help='drop class labels with this probability (for CFG)')
    add('--eff-attn', type=parse_bool, default=True, metavar='BOOL', help='accepted for the official README commands; '
        'no effect here (attention is always F.scaled_dot_product_attention)')
    add('--up-scale', type=scale, default=4, metavar='INT',
        help='stage two: block size s of the DCT blur and block noise (= the upsampling factor)')
    add('--block-scale', type=weight, default=0.15, metavar='FLOAT', help='stage two: alpha, weight of block noise')
    add('--prob-length', type=number(float, 0, 1, low_open=True), default=0.93, metavar='FLOAT',
        help="stage two: L, the trained lower fraction of EDM's sigma distribution")
    add('--blur-sigma-max', type=blur_max, default=3.0, metavar='FLOAT', help='stage two: B_max, the blur at u = 1')
    add('--paper-noise-norm', type=parse_bool, default=False, metavar='BOOL',
        help="stage two: scale noise by 1/sqrt(1+alpha^2) (paper; the code doesn't)")
    add('--grid', type=number(int, 0, 1024), default=64, metavar='INT',
        help='images in the sample grid written with each snapshot; 0 = none')
    add_metric_flags(t)
    add('--metrics-first', default=None, metavar='PT|DIR|PKL',
        help='stage two\'s --metrics: the stage-one network (snapshot or run directory) whose samples it relays')
    t.set_defaults(**PRESETS.get(preset, {}).get('train', {}))

    g = sub.add_parser('generate', help='two-stage generation')
    add_generate_flags(g, edm_sampler=False)
    add = g.add_argument
    add('--preset', choices=sorted(k for k in PRESETS if 'generate' in PRESETS[k]), default=None,
        help='an official run: the settings of the generate_*.py that samples it (both stages); flags override')
    add('--class', dest='class_idx', type=int, default=None, metavar='INT', help='class label; None = seed mod classes')
    add('--sampler_stages', choices=['first', 'second', 'both'], default='both', help='which stages to run')
    add('--indir', default=None, metavar='DIR', help='stage-one PNGs for --sampler_stages=second')
    add('--enhance', choices=sorted(ENHANCE), default='none', help='official PIL post-processing (not in the paper)')
    add('--grid', default=None, metavar='PNG', help='also write a grid of the first 64 seeds: stage one (upsampled) '
        'above, relayed below; a bare file name goes beside --outdir, not into it')
    add('--network_first', default=None, metavar='PT|PKL|URL',
        help='stage-one network (ours, patch_diffusion --real_p=1, EDM .pkl, RDM .pt)')
    add('--num_steps_first', type=steps, default=18, metavar='INT', help='stage-one sampling steps')
    add('--sigma_min_first', type=pos, default=0.002, metavar='FLOAT', help='lowest noise level')
    add('--sigma_max_first', type=pos, default=80, metavar='FLOAT', help='highest noise level')
    add('--rho_first', type=rho, default=7, metavar='FLOAT', help='time step exponent (EDM Eq. 5)')
    add('--cfg_scale_first', type=cfg, default=1, metavar='FLOAT', help='classifier-free guidance; <= 1 = none')
    add('--S_churn', type=nonneg, default=0, metavar='FLOAT', help='stage-one stochasticity strength (EDM Alg. 2)')
    add('--S_min', type=nonneg, default=0, metavar='FLOAT', help='lowest sigma with churn')
    add('--S_max', type=number(float, 0, inf=True), default=float('inf'), metavar='FLOAT', help='top sigma with churn')
    add('--S_noise', type=weight, default=1, metavar='FLOAT', help='churn noise inflation')
    add('--sde_scale_first', type=number(float, 0, 1), default=0, metavar='FLOAT',
        help='SDE-Heun noise of generate_celebahq.py (0.05); 0 = EDM Heun')
    add('--network_second', default=None, metavar='PT|PKL|URL', help='stage-two network (ours or RDM .pt)')
    add('--num_steps_second', type=steps, default=18, metavar='INT', help='stage-two grid, before truncation')
    add('--sigma_min_second', type=pos, default=0.008, metavar='FLOAT', help='lowest noise level')
    add('--sigma_max_second', type=pos, default=80, metavar='FLOAT', help='highest noise level of the grid')
    add('--rho_second', type=rho, default=7, metavar='FLOAT', help='time step exponent')
    add('--blur_sigma_max_second', type=blur_max, default=3, metavar='FLOAT', help='B_max of the blur schedule')
    add('--cfg_scale_second', type=cfg, default=1, metavar='FLOAT', help='classifier-free guidance; <= 1 = none')
    add('--up_scale_second', type=scale, default=4, metavar='INT', help='upsampling factor = DCT block size')
    add('--truncation_sigma_second', type=pos, default=0.9, metavar='FLOAT', help='start: grid levels >= it dropped')
    add('--truncation_t_second', type=number(float, 0, 1.1, low_open=True), default=0.93, metavar='FLOAT',
        help="L of the sampler's sigma -> u map (official: 0.93, 1.05); u at the start must be <= 1")
    add('--s_block_second', type=weight, default=0.15, metavar='FLOAT', help='weight of block noise')
    add('--s_noise_second', type=p01, default=0.2, metavar='FLOAT', help='eta, stochasticity of the blur sampler')
    add('--paper_noise_norm', type=parse_bool, default=None, metavar='BOOL',
        help='1/sqrt(1+s_block^2) noise scale; None = as the network was trained')
    g.set_defaults(**PRESETS.get(preset, {}).get('generate', {}))
    return parser

def main():
    args = parse_command_line(build_parser)
    run_main({'train': train, 'generate': generate}[args.command], args)

#------------------------------------------------------------------------------
# 8. Appendix: what a reader of the paper can skip: the network reader and generate's sampler settings, the
#    checks of flag combinations, the dry run's dataset guess, the run directory and the sample grid written
#    during training, official-checkpoint reading, stage-one PNGs from disk, the official PNG post-processing.

def load_network(path, flag='--network', stage=None):
    """EDMPrecond (EMA weights) from our snapshots or training states (relay_diffusion.py; patch_diffusion.py
    --real_p=1 as a stage one), official EDM .pkl (path or URL) or official RDM .pt. `stage` ('edm' or 'blur'), if
    given, is the stage the network must have been trained for. net.stage: the stage settings of our snapshots
    (dict(precond, up_scale, ...)); None for official files, which do not record them."""
    if is_official(path):
        return load_official_network(path, flag)
    path = latest_checkpoint(path, 'network-snapshot', flag)  # a run directory: its newest snapshot, named below
    try:
        ckpt = load_snapshot(path, flag, ['relay_diffusion', 'patch_diffusion'])
    except UsageError:
        raise
    except UserError as ours:  # not loadable with weights_only: maybe an official RDM torch.save archive
        try:
            return load_official_network(path, flag)
        except UserError as theirs:
            raise UsageError(f'{flag}={path}: neither one of our snapshots ({one_line(ours).split(": ", 1)[-1]}) '
                             f'nor an official network ({one_line(theirs).split(": ", 1)[-1]})') from None
    if ckpt['method'] == 'patch_diffusion' and ckpt.get('precond', 'EDMPrecond') != 'EDMPrecond':
        raise UsageError(f'{flag}={path}: a Patch Diffusion network with coordinate channels; only --real_p=1 '
                         'snapshots (plain EDM) can serve as a first stage')
    info = ckpt.get('stage', dict(precond='edm')) if ckpt['method'] == 'relay_diffusion' else dict(precond='edm')
    if stage is not None and info['precond'] != stage:
        want = 'a stage-one (--precond=edm)' if stage == 'edm' else 'a stage-two (--precond=blur)'
        raise UsageError(f'{flag}={path}: a --precond={info["precond"]} network, but {flag} needs {want} network')
    net = build_network(ckpt['net_kwargs'], flag, path, f'a {ckpt["method"]}.py snapshot')
    load_weights(net, ckpt['ema'], path)
    net.stage = info
    return net

def sampler_settings(args, trained_noise_norm=False):
    """sample_images' first_settings and second_settings from generate's flags; --paper_noise_norm None = as the
    stage-two network was trained."""
    first = dict(num_steps=args.num_steps_first, sigma_min=args.sigma_min_first, sigma_max=args.sigma_max_first,
                 rho=args.rho_first, S_churn=args.S_churn, S_min=args.S_min, S_max=args.S_max, S_noise=args.S_noise,
                 cfg_scale=args.cfg_scale_first)
    if args.sde_scale_first:
        first['sde_scale'] = args.sde_scale_first
    norm = trained_noise_norm if args.paper_noise_norm is None else args.paper_noise_norm
    second = dict(num_steps=args.num_steps_second, sigma_min=args.sigma_min_second, sigma_max=args.sigma_max_second,
                  rho=args.rho_second, up_scale=args.up_scale_second, truncation_sigma=args.truncation_sigma_second,
                  truncation_t=args.truncation_t_second, cfg_scale=args.cfg_scale_second, s_block=args.s_block_second,
                  s_noise=args.s_noise_second, blur_sigma_max=args.blur_sigma_max_second, paper_noise_norm=norm)
    return first, second

def parse_cres(s):
    """--cres: 1 to 16 channel multipliers, each 1 to 64."""
    cres = parse_int_list(s)
    if not 1 <= len(cres) <= 16 or not all(1 <= c <= 64 for c in cres):
        raise argparse.ArgumentTypeError(f'expected 1 to 16 channel multipliers from 1 to 64, e.g. 1,2,2; got {s!r}')
    return cres

def check_train_flags(args, R, label_dim, net_kwargs):
    """Flag combinations that depend on the data, checked before anything is written."""
    if args.precond == 'blur' and args.up_scale < 2:
        raise UsageError('--up-scale=1: a 1x1 block neither blurs nor relays anything; stage two needs 2 or more')
    if args.precond == 'blur' and R % args.up_scale:
        raise UsageError(f'--up-scale={args.up_scale} must divide the image size: {args.data} has {R}x{R} images')
    if args.label_dropout and not label_dim:
        raise UsageError(f'--label-dropout={args.label_dropout} needs class labels (--cond=1)')
    if args.precond == 'edm' and args.metrics_first:
        raise UsageError(f'--metrics-first={args.metrics_first}: only stage two (--precond=blur) relays a first stage; '
                         'stage one samples by itself')
    if args.precond == 'blur' and args.metrics and not args.metrics_first:
        raise UsageError(f'--metrics={",".join(args.metrics)}: stage two relays stage-one samples; name the first '
                         'stage with --metrics-first=SNAPSHOT|RUN_DIR (its resolution x --up-scale = this run\'s)')
    levels = len(net_kwargs['channel_mult'])
    if R % 2 ** (levels - 1):
        raise UsageError(f'--cres={",".join(map(str, net_kwargs["channel_mult"]))}: a {levels}-level U-Net needs '
                         f'image sides divisible by {2 ** (levels - 1)}; {args.data} has {R}x{R} images')

def check_generate_flags(args):
    """Flag combinations, checked before any network is loaded or any file written."""
    stages = args.sampler_stages
    for flag, needed in (('network_first', stages != 'second'), ('network_second', stages != 'first'),
                         ('indir', stages == 'second')):
        if needed and not getattr(args, flag):
            raise UsageError(f'--sampler_stages={stages} needs --{flag}')
    if args.indir and not os.path.isdir(args.indir):
        raise UsageError(f'--indir={args.indir}: not a folder')
    if args.grid is not None:
        if not args.grid.lower().endswith('.png') or stages == 'first':
            raise UsageError(f'--grid={args.grid}: expected a .png path, and a run with a second stage')
        check_outdir(os.path.dirname(grid_path(args)) or '.', '--grid')
    for low, high in (('sigma_min_first', 'sigma_max_first'), ('sigma_min_second', 'sigma_max_second'),
                      ('S_min', 'S_max')):
        if getattr(args, low) >= getattr(args, high):
            raise UsageError(f'--{low}={getattr(args, low):g} must be below --{high}={getattr(args, high):g}')
    if stages != 'first':  # the truncated grid must keep at least one level, and start at u <= 1
        grid = edm_time_steps(args.num_steps_second, args.sigma_min_second, args.sigma_max_second, args.rho_second)
        if not (grid[:-1] < args.truncation_sigma_second).any():
            raise UsageError(f'--truncation_sigma_second={args.truncation_sigma_second}: no level of the '
                             f'{args.num_steps_second}-step grid lies below it')
        start = relay_time_steps(args.num_steps_second, args.sigma_min_second, args.sigma_max_second, args.rho_second,
                                 args.truncation_sigma_second)[0]
        if u_of_sigma(start, args.truncation_t_second) > 1:
            raise UsageError(f'--truncation_t_second={args.truncation_t_second:g}: the first level, sigma '
                             f'{start:.4g}, maps to u = {u_of_sigma(start, args.truncation_t_second):.3f} > 1, where '
                             'the blur schedule runs backwards; raise it or lower --truncation_sigma_second')

def check_networks(args, first, second):
    """The two stages fit each other (classes, resolution x --up_scale_second) and the flags (--class, CFG)."""
    s = args.up_scale_second
    if first is not None and second is not None:
        if first.label_dim != second.label_dim:
            raise UsageError(f'--network_first has {first.label_dim} classes, --network_second {second.label_dim}')
        if first.img_resolution * s != second.img_resolution:
            raise UsageError(f'--up_scale_second={s}: stage one makes {first.img_resolution}x{first.img_resolution} '
                             f'images, x{s} = {first.img_resolution * s}, but the second stage was trained at '
                             f'{second.img_resolution}')
    for flag, net in (('cfg_scale_first', first), ('cfg_scale_second', second)):
        if net is not None and getattr(args, flag) > 1 and not net.label_dim:
            raise UsageError(f'--{flag}={getattr(args, flag)} needs a class-conditional network')
    check_class(args.class_idx, (first or second).label_dim)

def dataset_shape(args):
    """(dataset or None, resolution, channels, label_dim). A dry run of a dataset that is not on this machine takes
    the resolution from its name ('imagenet-256x256.zip', 'demo-256') and 1000 classes for --cond=1 (ImageNet)."""
    m = re.search(r'(\d+)x\1', os.path.basename(str(args.data)))
    if args.dry_run and not os.path.exists(args.data) and m and not args.data.startswith('demo'):
        print0(f'note: {args.data} not found; assuming {m[1]}x{m[1]} RGB images' +
               (', 1000 classes' if args.cond else ''))
        return None, int(m[1]), 3, 1000 if args.cond else 0
    dataset = open_dataset(args.data, use_labels=args.cond, xflip=args.xflip)
    return dataset, dataset.resolution, dataset.num_channels, dataset.label_dim

def training_run(args, dataset, net_kwargs, info, loss_fn, device, state):
    """common.TrainingRun: the run directory (EDM's name for it), log, status lines, snapshots with a sample grid
    (progress_grid), --metrics (metrics_evaluate)."""
    ema = state['ema']

    def snapshot():  # what a network snapshot holds besides the method's name and the flags
        return dict(precond='EDMPrecond', net_kwargs=net_kwargs, stage=info['stage'], ema=ema.state_dict())

    evaluate = metrics_evaluate(args, ema, net_kwargs, device)  # --metrics: of samples as `generate` makes them
    grid = progress_grid(ema, args.grid, dataset, args.seed, device, loss_fn) if args.grid else None
    data_name = os.path.splitext(os.path.basename(args.data))[0]
    desc = run_desc(data_name, 'cond' if args.cond else 'uncond', args.arch, args.precond,
                    world_size=info['world_size'], batch=args.batch, fp16=args.fp16, bf16=args.bf16, desc=args.desc)
    return TrainingRun('relay_diffusion', vars(args), info, device, outdir=args.outdir, desc=desc,
                       nosubdir=args.nosubdir, resume=args.resume, total_nimg=args.duration * 1e6, tick=args.tick,
                       snap=args.snap, dump=args.dump, state=state, snapshot=snapshot, grid=grid, evaluate=evaluate)

def banner(args, dataset, info, device):
    """The run's first status line: stage, data, network, device and how a step's batch is split."""
    stage = 'one (EDM)' if args.precond == 'edm' else 'two (blur)'
    return (f'Relay Diffusion stage {stage}: {dataset.name} ({len(dataset)} images, {dataset.resolution} px), '
            f'{args.arch}, {info["num_params"]:,} parameters, device {device}, {info["world_size"]} process(es); '
            f'{info["batch_gpu"]} images x {info["rounds"]} rounds x {info["world_size"]} per step')

def progress_grid(net, num, dataset, seed, device, loss_fn):
    """grid(path) for TrainingRun, a PNG of seeds 0..num-1: stage one samples them as generate does; stage two
    relays the block means of `num` fixed training images (drawn now; average-pooled by s, nearest-upsampled: a
    stand-in for stage-one samples), each above its relayed result (save_relay_grid)."""
    fixed = next(data_stream(dataset, num, 0, 1, seed, 0, 0))[0] if isinstance(loss_fn, BlurLoss) else None

    def grid(path):
        if fixed is None:
            return save_image_grid(sample_images(net, list(range(num)), device), path)
        s, relayed = loss_fn.up_scale, []
        low = F.avg_pool2d(fixed.to(device).to(torch.float64) / 127.5 - 1, s)
        sample_images(net, list(range(num)), device, low=low, relayed=relayed, second_settings=dict(
            up_scale=s, truncation_t=loss_fn.prob_length, blur_sigma_max=loss_fn.blur_sigma_max,
            s_block=loss_fn.block_scale, paper_noise_norm=loss_fn.paper_noise_norm))
        save_relay_grid(*relayed[0], path)
    return grid

def save_relay_grid(x_up, images, path, cols=8):
    """At most 64 samples, 8 per row, each row of upsampled stage-one images above the row of their relayed results."""
    n, cols = min(len(images), 64), min(cols, len(images))
    pad = lambda x: torch.cat([x[:n], x.new_full([-n % cols, *x.shape[1:]], -1.0)])  # black cells end the last row
    x_up, images = pad(x_up), pad(images)
    save_image_grid(torch.cat([torch.cat([x_up[i:i + cols], images[i:i + cols]]) for i in range(0, len(x_up), cols)]),
                    path, cols=cols)

def grid_path(args):
    """generate --grid: a bare file name goes beside --outdir (in its parent folder, so the sample folder holds only
    samples, as fid.py reads it); a path with a folder is taken as given."""
    if not args.grid or os.path.dirname(args.grid):
        return args.grid
    return os.path.join(os.path.dirname(os.path.abspath(args.outdir)), args.grid)

def metrics_evaluate(args, ema, net_kwargs, device):
    """TrainingRun's `evaluate` for --metrics (None without): fid.py's numbers of what `generate` makes from this
    run's snapshots (the EMA weights) with its default settings (the preset's, if it has them; --up_scale_second =
    --up-scale): stage one alone, or stage two relaying --metrics-first's samples, checked to fit this run
    (resolution x --up-scale, channels, classes)."""
    if not args.metrics:
        return None
    g = build_parser(args.preset).parse_args(['generate', '--outdir=.', f'--up_scale_second={args.up_scale}'])
    first_settings, second_settings = sampler_settings(g, args.paper_noise_norm)
    first = None
    if args.precond == 'blur':
        first = load_network(args.metrics_first, '--metrics-first', 'edm').to(device).eval()
        R, C, label_dim = net_kwargs['img_resolution'], net_kwargs['img_channels'], net_kwargs['label_dim']
        found = (first.img_resolution * args.up_scale, first.img_channels, first.label_dim)
        if found != (R, C, label_dim):
            raise UsageError(f'--metrics-first={args.metrics_first}: makes {first.img_resolution}x'
                             f'{first.img_resolution}x{first.img_channels} images with {first.label_dim} classes '
                             f'(x{args.up_scale} = {found[0]}); this run trains {R}x{R}x{C} with {label_dim} classes')

    def sample(seeds):
        return sample_images(ema, seeds, device, first, first_settings=first_settings,
                             second_settings=second_settings)
    return training_metrics(args, net_kwargs['img_resolution'], net_kwargs['img_channels'], device, sample)

def one_line(e):
    return ' '.join(str(e).split())

def build_network(net_kwargs, flag, path, what):
    """EDMPrecond(**net_kwargs) of a loaded file, or one line saying why its arguments do not build one."""
    try:
        return EDMPrecond(**net_kwargs)
    except (TypeError, ValueError, KeyError, AssertionError, RuntimeError) as e:
        raise UsageError(f'{flag}={path}: {what} whose network arguments do not build an EDMPrecond ({one_line(e)})'
                         ) from None

def load_official_network(path, flag):
    """EDMPrecond from an official EDM .pkl (common.load_official) or RDM .pt (load_torch_zip): no code from the
    file runs; the official files do not record the stage (net.stage = None)."""
    try:
        official = read_official(path, flag)
    except UserError as e:
        raise UsageError(one_line(e)) from None
    if official['precond'] != 'EDMPrecond':
        raise UsageError(f'{flag}={path}: a {official["precond"]} network; Relay Diffusion uses EDMPrecond networks')
    if not all(torch.isfinite(v).all() for v in official['state_dict'].values() if v.is_floating_point()):
        raise UsageError(f'{flag}={path}: its weights hold NaN or inf (a diverged run)')
    kwargs = {k: v for k, v in official['init_kwargs'].items() if k != 'eff_attn'}  # xformers switch (upstream)
    net = build_network(kwargs, flag, path, 'an official network')
    load_weights(net, official['state_dict'], path)
    net.stage = None
    return net

def read_official(path_or_url, flag):
    """What common.load_official returns (class_name, precond, init_kwargs, state_dict), from an official RDM .pt
    (a torch.save zip archive that pickles whole modules) or, through load_official, an EDM-format .pkl."""
    path = download(path_or_url, flag) if '://' in str(path_or_url) else path_or_url
    if not zipfile.is_zipfile(path):
        return load_official(path, flag)  # one line for a missing file, an EDM pickle otherwise
    try:
        return official_network(load_torch_zip(path))
    except Exception as e:
        raise UsageError(f'{flag}={path}: cannot load it as an official network ({e})') from e

class TorchZipUnpickler(SnapshotUnpickler):
    """common's restricted unpickler for torch.save zip archives (official RDM .pt files that pickle whole modules):
    tensors and plain containers only; the official classes become inert stubs."""
    def __init__(self, file, archive, prefix):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module, name):
        module = 'builtins' if module == '__builtin__' else module  # torch.save's protocol 2 uses Python 2 names
        if module == 'torch' and name.endswith('Storage') and isinstance(getattr(torch, name, None), type):
            return getattr(torch, name)  # torch.FloatStorage etc.: only its dtype is used
        return super().find_class(module, name)

    def persistent_load(self, pid):
        _, storage_type, key, _, _ = pid  # ('storage', torch.FloatStorage, '0', 'cuda:0', numel)
        data = torch.UntypedStorage.from_buffer(self.archive.read(f'{self.prefix}/data/{key}'), dtype=torch.uint8)
        return torch.storage.TypedStorage(wrap_storage=data, dtype=storage_type.dtype, _internal=True)

def load_torch_zip(path):
    """The unpickled object of a torch.save zip archive, read with TorchZipUnpickler."""
    with zipfile.ZipFile(path) as archive:
        pkl = [n for n in archive.namelist() if n.endswith('/data.pkl')]
        if not pkl:
            raise ValueError('no data.pkl in the archive')
        prefix = pkl[0].rsplit('/', 1)[0]
        with warnings.catch_warnings():  # TypedStorage is deprecated, but it is what carries the dtype here
            warnings.simplefilter('ignore', UserWarning)
            return TorchZipUnpickler(io.BytesIO(archive.read(pkl[0])), archive, prefix).load()

def indir_paths(indir, seeds, resolution):
    """{seed: path} of stage-one PNGs `{seed:06d}.png`, flat or in EDM's folders of 1,000; all must exist, and the
    first must be resolution x resolution (the second stage's / --up_scale_second)."""
    paths = {}
    for seed in seeds:
        tries = [os.path.join(indir, f'{seed - seed % 1000:06d}', f'{seed:06d}.png'),
                 os.path.join(indir, f'{seed:06d}.png')]
        paths[seed] = next((p for p in tries if os.path.isfile(p)), None)
        if paths[seed] is None:
            raise UsageError(f'--indir={indir}: no image for seed {seed} ({tries[0]} or {tries[1]})')
    with PIL.Image.open(paths[seeds[0]]) as image:
        if image.size != (resolution, resolution):
            raise UsageError(f'--indir={indir}: {paths[seeds[0]]} is {image.size[0]}x{image.size[1]}; the second stage '
                             f'takes {resolution}x{resolution} images (its resolution / --up_scale_second)')
    return paths

def read_images(paths, indir, up_scale, second, device):
    """Stage-one PNGs as float64 in [-1, 1], [N, C, H, W], checked against the second stage."""
    images = [np.array(PIL.Image.open(path)) for path in paths]
    images = [image[:, :, None] if image.ndim == 2 else image for image in images]
    if len({im.shape for im in images}) > 1:
        raise UserError(f'--indir={indir}: images of different sizes {sorted({im.shape for im in images})}')
    images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # [N, H, W, C] -> [N, C, H, W]
    if images.shape[-1] * up_scale != second.img_resolution or images.shape[1] != second.img_channels:
        raise UserError(f'--indir={indir}: stage-one images {tuple(images.shape[1:])} x{up_scale} do not fit the '
                        f'second stage ({second.img_channels}x{second.img_resolution}x{second.img_resolution})')
    return images.to(device).to(torch.float64) / 127.5 - 1

# PIL post-processing of the official generate_celebahq.py / generate_imagenet.py, applied to every saved PNG
# before their FID. NOTE: not in the paper; off by default, --enhance=celebahq|imagenet reproduces it.
ENHANCE = {'none': [], 'celebahq': [(PIL.ImageEnhance.Contrast, 0.9), (PIL.ImageEnhance.Brightness, 1.05),
                                    (PIL.ImageEnhance.Color, 0.99)], 'imagenet': [(PIL.ImageEnhance.Brightness, 1.06)]}

def save_images(images, seeds, outdir, subdirs, enhance):
    if enhance == 'none':
        return save_seed_images(images, seeds, outdir, subdirs)
    for image, seed in zip(to_uint8(images).permute(0, 2, 3, 1).cpu().numpy(), seeds):  # -> [N, H, W, C]
        pil = PIL.Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
        for op, factor in ENHANCE[enhance]:
            pil = op(pil).enhance(factor)
        folder = os.path.join(outdir, f'{seed - seed % 1000:06d}') if subdirs else outdir
        os.makedirs(folder, exist_ok=True)
        pil.save(os.path.join(folder, f'{seed:06d}.png'))

if __name__ == '__main__':
    main()
