"""EDM in one file: the machinery shared by every method file of this project.

Karras, Aittala, Aila, Laine, "Elucidating the Design Space of Diffusion-Based Generative Models",
NeurIPS 2022, arXiv:2206.00364v2 (equation and table numbers below refer to that version).
Official code: https://github.com/NVlabs/edm (CC BY-NC-SA 4.0; nothing here is copied from it; parameter names
match it so that official checkpoints load).

Contents, in order: EDM first, then data, then the plumbing every method file uses.
  1. EDM preconditioning (`EDMPrecond`, Table 1), loss (`EDMLoss`, Eq. 2), Heun sampler (`edm_sampler`, Alg. 2)
  2. the EDM U-Nets: layers, DDPM++/NCSN++ `SongUNet`, ADM `DhariwalUNet`, `EDM_ARCHS`
  3. EDM's augmentation pipe (`AugmentPipe`, the geometric and colour transforms of ADA)
  4. data: EDM-format `ImageFolderDataset` (zip or folder), the built-in `DemoDataset`, `open_dataset`,
     `InfiniteSampler`, `data_stream`
  5. images and labels: uint8 conversion, per-seed PNGs, grids, `seed_batches`, `seed_labels`, `check_class`
  6. Inception-v3 features and the Frechet distance (the other metrics live in fid.py)
  7. distributed setup (`init_distributed`, `print0`), the one-line errors (`UserError`, `UsageError`,
     `DataError`), `working` and the CLI entry `run_main` (exit codes)
  8. command line: `Parser`, argument types (`parse_int_list`, `parse_bool`, `number`), `parse_command_line`
     (default subcommand, presets, `--resume` defaults from the training state), `RESUME_MAY_CHANGE`,
     `add_train_flags`, `add_edm_train_flags`, `add_metric_flags` (train --metrics), `add_generate_flags`
  9. seeding: per-step reseed (`reseed`), per-image generators (`PerSeedRNG`)
 10. training plumbing: precision, batch split, memory check, DDP, lr ramp-up, EMA, gradient scrub, `network_and_ema`,
     `run_desc`, `check_outdir`, `TrainingRun` (run directory, status lines, divergence stop, periodic
     checkpoints, metrics, Ctrl-C), `read_training_options`, `load_training_state` (resume)
 11. checkpoints: `save_checkpoint`, `load_checkpoint`, `load_weights`; `load_official` for official EDM .pkl
     snapshots and torch-zip archives (no code from the file runs); `load_snapshot`, the one snapshot layout
"""
import argparse, contextlib, copy, errno, glob, io, json, math, os, pickle, re, shlex, shutil, signal, sys
import threading, time, urllib.parse, warnings, zipfile
from collections import OrderedDict

import numpy as np
import PIL.Image
import scipy.linalg
import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch.nn.parallel import DistributedDataParallel as DDP

#------------------------------------------------------------------------------
# 1. EDM preconditioning, loss and sampler. D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)   (EDM Eq. 7)
#    Coefficients are computed in float32; only the backbone F runs under autocast.

class EDMPrecond(torch.nn.Module):
    """EDM preconditioning (Table 1, "Ours"). The backbone is `self.model` (EDM's name, so checkpoints load)."""
    def __init__(self,
        img_resolution,                 # image side length
        img_channels,                   # image channels (what the sampler draws)
        label_dim       = 0,            # number of classes; 0 = unconditional
        sigma_min       = 0,            # lowest supported noise level
        sigma_max       = float('inf'), # highest supported noise level
        sigma_data      = 0.5,          # expected std of the data
        model_type      = 'SongUNet',   # 'SongUNet' (DDPM++/NCSN++) or 'DhariwalUNet' (ADM)
        **model_kwargs,                 # backbone arguments; in_channels/out_channels default to img_channels
    ):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
        self.amp_dtype = None  # set by the training loop: torch.float16 / torch.bfloat16 autocast around the backbone
        backbone = {'SongUNet': SongUNet, 'DhariwalUNet': DhariwalUNet}[model_type]
        model_kwargs = dict(in_channels=img_channels, out_channels=img_channels) | model_kwargs
        self.model = backbone(img_resolution=img_resolution, label_dim=label_dim, **model_kwargs)

    def coefficients(self, sigma):
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)          # EDM Table 1, c_skip
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()  # EDM Table 1, c_out
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()                         # EDM Table 1, c_in
        c_noise = sigma.log() / 4                                                     # EDM Table 1, c_noise
        return c_skip, c_out, c_in, c_noise

    def prepare(self, x, sigma, class_labels):
        """float32 input, sigma as [N, 1, 1, 1], labels None (unconditional) / a zero row (None given) / float."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        sigma = sigma.reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        else:
            class_labels = (torch.zeros([1, self.label_dim], device=x.device) if class_labels is None
                            else class_labels.to(torch.float32).reshape(-1, self.label_dim))
        return x, sigma, class_labels

    def backbone(self, x_in, c_noise, class_labels, augment_labels=None):
        """F, under autocast when `amp_dtype` is set; the output is returned in float32."""
        amp = dict(dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)
        with torch.autocast(x_in.device.type, **amp):
            F_x = self.model(x_in, c_noise.flatten(), class_labels=class_labels, augment_labels=augment_labels)
        return F_x.to(torch.float32)

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        x, sigma, class_labels = self.prepare(x, sigma, class_labels)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F_x = self.backbone(c_in * x, c_noise, class_labels, augment_labels)
        return c_skip * x + c_out * F_x  # EDM Eq. 7

class EDMLoss:
    """EDM training loss (Eq. 2 with Table 1's p_train and lambda): returns the unreduced per-element loss."""
    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data

    def sigma_and_weight(self, n, device):
        rnd_normal = torch.randn([n, 1, 1, 1], device=device)
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()                      # EDM Table 1, p_train (log-normal)
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2  # EDM Table 1, lambda(sigma)
        return sigma, weight

    def __call__(self, net, images, labels=None, augment_pipe=None):
        sigma, weight = self.sigma_and_weight(images.shape[0], images.device)
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        n = torch.randn_like(y) * sigma
        D_yn = net(y + n, sigma, labels, augment_labels=augment_labels)
        return weight * (D_yn - y) ** 2  # EDM Eq. 2

def edm_time_steps(num_steps=18, sigma_min=0.002, sigma_max=80, rho=7, round_sigma=torch.as_tensor):
    """Noise levels t_0 > ... > t_{N-1} of EDM Eq. 5 in float64, then t_N = 0."""
    i = torch.arange(num_steps, dtype=torch.float64)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    t = (hi + i / max(num_steps - 1, 1) * (lo - hi)) ** rho                   # EDM Eq. 5
    t = torch.as_tensor(round_sigma(t), dtype=torch.float64)
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])

@torch.no_grad()
def edm_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18, sigma_min=0.002,
                sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=float('inf'), S_noise=1):
    """EDM Algorithm 2: Heun's 2nd-order method with optional stochastic churn, state in float64.
    `net(x, sigma, class_labels)` is any denoiser; `randn_like` should be a per-image generator's."""
    sigma_min = max(sigma_min, getattr(net, 'sigma_min', 0))
    sigma_max = min(sigma_max, getattr(net, 'sigma_max', float('inf')))
    round_sigma = getattr(net, 'round_sigma', torch.as_tensor)
    t_steps = edm_time_steps(num_steps, sigma_min, sigma_max, rho, round_sigma).to(latents.device)
    x_next = latents.to(torch.float64) * t_steps[0]  # Alg. 2 line 1
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0  # Alg. 2 line 4
        t_hat = torch.as_tensor(round_sigma(t_cur + gamma * t_cur), dtype=torch.float64)        # Alg. 2 line 5
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)          # Alg. 2 line 6
        d_cur = (x_hat - net(x_hat, t_hat, class_labels).to(torch.float64)) / t_hat            # Alg. 2 line 7
        x_next = x_hat + (t_next - t_hat) * d_cur                                               # Alg. 2 line 8
        if i < num_steps - 1:                                                                   # Alg. 2 lines 9-11
            d_prime = (x_next - net(x_next, t_next, class_labels).to(torch.float64)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next

#------------------------------------------------------------------------------
# 2. The EDM U-Nets (NVlabs/edm training/networks.py): the layers, then DDPM++/NCSN++ and ADM (Table 7).

# Weight init of all EDM layers (EDM training/networks.py, weight_init); a convolution's fans count channels * k^2.
def weight_init(shape, mode, fan_in, fan_out):
    if mode == 'xavier_uniform':
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(shape) * 2 - 1)
    if mode == 'kaiming_uniform':
        return math.sqrt(3 / fan_in) * (torch.rand(shape) * 2 - 1)
    if mode == 'kaiming_normal':
        return math.sqrt(1 / fan_in) * torch.randn(shape)
    raise ValueError(f'unknown init mode {mode!r}')

# Fully connected layer; the bias is drawn like the weight and scaled by init_bias (0 = zero bias).
class Linear(torch.nn.Module):
    def __init__(self, in_features, out_features, bias=True, init_mode='kaiming_normal', init_weight=1, init_bias=0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = torch.nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

# Convolution with optional 2x up/downsampling by the separable FIR filter f f^T / (sum f)^2 (EDM training/networks.py,
# Conv2d). Unfused: resample, then convolve. Fused (NCSN++ residual encoder): convolve, wider padded, then resample.
class Conv2d(torch.nn.Module):
    def __init__(self,
        in_channels,                        # input channels
        out_channels,                       # output channels
        kernel,                             # kernel size; 0 = no weight and bias, a pure resampler
        bias            = True,             # learned bias, added last
        up              = False,            # 2x upsampling
        down            = False,            # 2x downsampling
        resample_filter = (1, 1),           # 1-D filter taps: (1, 1) = nearest / box, (1, 3, 3, 1) = binomial
        fused_resample  = False,            # convolve before downsampling, with merged paddings (NCSN++)
        init_mode       = 'kaiming_normal', # see weight_init
        init_weight     = 1,                # multiplier on the initial weight
        init_bias       = 0,                # multiplier on the initial bias; 0 = zero
    ):
        super().__init__()
        assert not (up and down)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel**2, fan_out=out_channels * kernel**2)
        shape = [out_channels, in_channels, kernel, kernel]
        self.weight = torch.nn.Parameter(weight_init(shape, **fans) * init_weight) if kernel else None
        self.bias = torch.nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = torch.outer(f, f)[None, None] / f.sum() ** 2                    # [1, 1, k, k], sums to 1
        self.register_buffer('resample_filter', f if up or down else None)

    # Depthwise 2x resampling of every channel; the transposed filter is scaled by 4 to keep the mean.
    def resample(self, x, padding):
        f = self.resample_filter.expand(x.shape[1], 1, -1, -1)              # [C, 1, k, k]
        if self.up:
            return F.conv_transpose2d(x, f * 4, stride=2, padding=padding, groups=x.shape[1])
        return F.conv2d(x, f, stride=2, padding=padding, groups=x.shape[1])

    def forward(self, x):
        w = self.weight
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (self.resample_filter.shape[-1] - 1) // 2 if self.up or self.down else 0
        if self.fused_resample and self.down and w is not None:  # NOTE: EDM's fused upsampling is unused, left out
            x = self.resample(F.conv2d(x, w, padding=w_pad + f_pad), 0)
        else:
            if self.up or self.down:
                x = self.resample(x, f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)   # keeps the autocast dtype
        return x

# Group normalization with min(32, C // 4) groups, as EDM (plain torch.nn.GroupNorm would use fixed groups).
class GroupNorm(torch.nn.Module):
    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups, self.eps = min(num_groups, num_channels // min_channels_per_group), eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

# Residual block with optional 2x up/downsampling and multi-head self-attention: the union of the DDPM++,
# NCSN++ and ADM blocks (EDM training/networks.py, UNetBlock).
class UNetBlock(torch.nn.Module):
    def __init__(self,
        in_channels,                        # input channels
        out_channels,                       # output channels
        emb_channels,                       # width of the noise/label embedding vector
        up                  = False,        # 2x upsampling at the start
        down                = False,        # 2x downsampling at the start
        attention           = False,        # self-attention after the residual branch
        num_heads           = None,         # attention heads; None = out_channels // channels_per_head
        channels_per_head   = 64,           # used only when num_heads is None
        dropout             = 0,            # dropout probability before conv1 (train mode only)
        skip_scale          = 1,            # multiplier on each residual sum (sqrt(0.5) for DDPM++/NCSN++)
        eps                 = 1e-5,         # GroupNorm epsilon
        resample_filter     = (1, 1),       # 1-D up/downsampling filter taps
        resample_proj       = False,        # 1x1 conv on a resampled skip even when channels match
        adaptive_scale      = True,         # embedding gives (scale, shift) as in ADM; False = an added bias
        init                = dict(),       # init kwargs of conv0, affine, skip (and qkv if init_attn is None)
        init_zero           = dict(init_weight=0),  # init kwargs of conv1 and proj
        init_attn           = None,         # init kwargs of qkv; None = init
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_heads = (num_heads if num_heads is not None else out_channels // channels_per_head) if attention else 0
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        resample = dict(up=up, down=down, resample_filter=resample_filter)
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, **resample, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, **resample, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def forward(self, x, emb):
        h = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None]                         # [N, C_o or 2*C_o, 1, 1]
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(shift + self.norm1(h) * (scale + 1))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = (h + (self.skip(x) if self.skip is not None else x)) * self.skip_scale

        if self.num_heads:
            # EDM's qkv channel index is (head * d + c) * 3 + s with s in (q, k, v), d = channels per head.
            qkv = self.qkv(self.norm2(x))
            qkv = qkv.to(torch.promote_types(qkv.dtype, torch.float32))     # softmax in at least fp32, as EDM
            q, k, v = rearrange(qkv, 'n (h d s) y x -> s (n h) (y x) d', h=self.num_heads, s=3)
            with torch.autocast(x.device.type, enabled=False):
                a = F.scaled_dot_product_attention(q, k, v)                 # [N*heads, H*W, d], scale 1/sqrt(d)
            a = rearrange(a, '(n h) (y x) d -> n (h d) y x', h=self.num_heads, y=x.shape[2]).to(x.dtype).contiguous()
            x = (self.proj(a) + x) * self.skip_scale
        return x

# Sinusoidal noise-level embedding [cos(c f_j), sin(c f_j)], f_j = (1/max_positions)^(j / (C/2 - endpoint))
# (EDM training/networks.py, PositionalEmbedding). DDPM++ uses endpoint=True, ADM endpoint=False.
class PositionalEmbedding(torch.nn.Module):
    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - int(self.endpoint))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))                               # [N] -> [N, C/2]
        return torch.cat([x.cos(), x.sin()], dim=1)

# Random Fourier features [cos(2 pi f c), sin(2 pi f c)], f ~ N(0, scale^2) fixed at construction (NCSN++).
class FourierEmbedding(torch.nn.Module):
    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))         # [N] -> [N, C/2]
        return torch.cat([x.cos(), x.sin()], dim=1)

# Per-sample zeroing of class-label vectors with probability p in train mode (classifier-free guidance).
def drop_labels(labels, p, batch_size, training):
    if not training or not p:
        return labels
    keep = torch.rand([batch_size, 1], device=labels.device) >= p
    return labels * keep.to(labels.dtype)

# The U-Nets accept any H x W divisible by 2^(levels - 1), not only img_resolution (which only names layers).
def check_input_size(x, num_levels):
    divisor = 2 ** (num_levels - 1)
    if x.shape[-2] % divisor or x.shape[-1] % divisor:
        raise ValueError(f'input size {x.shape[-2]}x{x.shape[-1]} is not divisible by {divisor}, '
                         f'as a U-Net with {num_levels} resolution levels requires')

# The U-Nets' encoder and decoder passes: every encoder output is kept (an NCSN++ aux residual replaces the last);
# a decoder block whose input is wider than x takes the newest one; the decoder's 'aux' layers are Song's output head.
def encode_decode(enc, dec, x, emb):
    skips, aux = [], x
    for name, block in enc.items():
        if name.endswith('aux_residual'):
            x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
        else:
            x = block(x) if name.endswith('_conv') else block(x, emb)
            skips.append(x)
    for name, block in dec.items():
        if name.endswith('aux_norm'):
            x = F.silu(block(x))
        elif name.endswith('aux_conv'):
            x = block(x)
        else:
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
    return x

# The layers of both U-Nets under EDM's names. Encoder: per level a 3x3 conv to `conv_channels` (level 0) or a
# downsampling block (+ NCSN++'s `aux_residual` path, a function (in, out) -> layer), then `num_blocks` blocks. The
# decoder mirrors it, one block more per level; attention in every block at attn_resolutions, or only in the last
# one of the level with `attn_last` (DDPM++/NCSN++). Returns the encoder, the decoder and its output channels.
def unet_layers(img_resolution, in_channels, model_channels, conv_channels, channel_mult, num_blocks,
                attn_resolutions, attn_last, block_kwargs, init, aux_residual=None):
    enc, dec = torch.nn.ModuleDict(), torch.nn.ModuleDict()
    c = caux = in_channels
    for level, mult in enumerate(channel_mult):
        res = img_resolution >> level
        if level == 0:
            enc[f'{res}x{res}_conv'] = Conv2d(c, conv_channels, 3, **init)
            c = conv_channels
        else:
            enc[f'{res}x{res}_down'] = UNetBlock(c, c, down=True, **block_kwargs)
            if aux_residual is not None:
                enc[f'{res}x{res}_aux_residual'], caux = aux_residual(caux, c), c
        for idx in range(num_blocks):
            attn = res in attn_resolutions
            enc[f'{res}x{res}_block{idx}'] = UNetBlock(c, model_channels * mult, attention=attn, **block_kwargs)
            c = model_channels * mult
    skips = [block.out_channels for name, block in enc.items() if 'aux' not in name]
    for level, mult in reversed(list(enumerate(channel_mult))):
        res = img_resolution >> level
        if level == len(channel_mult) - 1:
            dec[f'{res}x{res}_in0'] = UNetBlock(c, c, attention=True, **block_kwargs)
            dec[f'{res}x{res}_in1'] = UNetBlock(c, c, **block_kwargs)
        else:
            dec[f'{res}x{res}_up'] = UNetBlock(c, c, up=True, **block_kwargs)
        for idx in range(num_blocks + 1):
            attn = res in attn_resolutions and (idx == num_blocks or not attn_last)
            dec[f'{res}x{res}_block{idx}'] = UNetBlock(c + skips.pop(), model_channels * mult, attention=attn,
                                                       **block_kwargs)
            c = model_channels * mult
    return enc, dec, c

# DDPM++ / NCSN++ U-Net, Song et al. 2021 (arXiv:2011.13456), as reimplemented and configured by EDM
# (Karras et al. 2022, arXiv:2206.00364, Table 7). Official code: NVlabs/edm training/networks.py, SongUNet.
class SongUNet(torch.nn.Module):
    def __init__(self,
        img_resolution,                     # image resolution; names the layers ('32x32_block0'), any input size works
        in_channels,                        # input channels (extra conditioning channels included)
        out_channels,                       # output channels
        label_dim           = 0,            # number of classes; 0 = unconditional
        augment_dim         = 0,            # augmentation label width; 0 = no augmentation conditioning
        model_channels      = 128,          # base channel count
        channel_mult        = (1, 2, 2, 2), # channel multiplier per resolution level
        channel_mult_emb    = 4,            # embedding width = model_channels * channel_mult_emb
        num_blocks          = 4,            # residual blocks per level in the encoder (decoder: one more)
        attn_resolutions    = (16,),        # resolutions (named by img_resolution) with self-attention
        dropout             = 0.10,         # dropout probability inside the blocks
        label_dropout       = 0,            # probability of zeroing a sample's label in training; 0 = never
        embedding_type      = 'positional', # 'positional' (DDPM++) or 'fourier' (NCSN++)
        channel_mult_noise  = 1,            # noise embedding width = model_channels * this; 1 DDPM++, 2 NCSN++
        encoder_type        = 'standard',   # 'standard' (DDPM++) or 'residual' (NCSN++)
        decoder_type        = 'standard',   # 'standard' (both)
        resample_filter     = (1, 1),       # (1, 1) for DDPM++, (1, 3, 3, 1) for NCSN++
    ):
        # NOTE: EDM also has 'skip' encoder/decoder variants that none of its configs uses; they are left out.
        assert embedding_type in ('positional', 'fourier') and encoder_type in ('standard', 'residual')
        assert decoder_type == 'standard'
        super().__init__()
        self.img_resolution, self.num_levels, self.label_dropout = img_resolution, len(channel_mult), label_dropout
        emb_channels, noise_channels = model_channels * channel_mult_emb, model_channels * channel_mult_noise
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)      # NOTE: small, not exactly zero (EDM)
        init_attn = dict(init_mode='xavier_uniform', init_weight=math.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
                            eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                            init=init, init_zero=init_zero, init_attn=init_attn)
        # Mapping network: noise level (+ label, + augmentation) -> embedding vector.
        self.map_noise = (PositionalEmbedding(noise_channels, endpoint=True) if embedding_type == 'positional'
                          else FourierEmbedding(noise_channels))
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        aux_residual = lambda c_in, c_out: Conv2d(c_in, c_out, 3, down=True, resample_filter=resample_filter,
                                                  fused_resample=True, **init)
        self.enc, self.dec, c = unet_layers(img_resolution, in_channels, model_channels, model_channels, channel_mult,
                                            num_blocks, attn_resolutions, True, block_kwargs, init,
                                            aux_residual if encoder_type == 'residual' else None)
        res = img_resolution                                                # one output head at full resolution
        self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(c, eps=1e-6)
        self.dec[f'{res}x{res}_aux_conv'] = Conv2d(c, out_channels, 3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        check_input_size(x, self.num_levels)
        emb = self.map_noise(noise_labels)
        emb = torch.cat(emb.chunk(2, dim=1)[::-1], dim=1)                   # [cos, sin] -> [sin, cos], as EDM
        if self.map_label is not None:
            labels = drop_labels(class_labels, self.label_dropout, x.shape[0], self.training)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))
        return encode_decode(self.enc, self.dec, x, emb)

# ADM U-Net, Dhariwal & Nichol 2021 (arXiv:2105.05233), as reimplemented by EDM (Karras et al. 2022, Table 7).
# Official code: NVlabs/edm training/networks.py, DhariwalUNet.
class DhariwalUNet(torch.nn.Module):
    def __init__(self,
        img_resolution,                     # image resolution; names the layers ('64x64_block0'), any input size works
        in_channels,                        # input channels (extra conditioning channels included)
        out_channels,                       # output channels
        label_dim           = 0,            # number of classes; 0 = unconditional
        augment_dim         = 0,            # augmentation label width; 0 = no augmentation conditioning
        model_channels      = 192,          # base channel count
        channel_mult        = (1, 2, 3, 4), # channel multiplier per resolution level
        channel_mult_emb    = 4,            # embedding width = model_channels * channel_mult_emb
        num_blocks          = 3,            # residual blocks per level in the encoder (decoder: one more)
        attn_resolutions    = (32, 16, 8),  # resolutions (named by img_resolution) with self-attention
        dropout             = 0.10,         # dropout probability inside the blocks
        label_dropout       = 0,            # probability of zeroing a sample's label in training; 0 = never
    ):
        super().__init__()
        self.img_resolution, self.num_levels, self.label_dropout = img_resolution, len(channel_mult), label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode='kaiming_uniform', init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init,
                            init_zero=init_zero)
        # Mapping network; the label enters after the MLP, with N(0, 1) weights and no bias.
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = Linear(label_dim, emb_channels, bias=False, init_mode='kaiming_normal',
                                init_weight=math.sqrt(label_dim)) if label_dim else None
        conv_channels = model_channels * channel_mult[0]
        self.enc, self.dec, c = unet_layers(img_resolution, in_channels, model_channels, conv_channels, channel_mult,
                                            num_blocks, attn_resolutions, False, block_kwargs, init)
        self.out_norm = GroupNorm(c)
        self.out_conv = Conv2d(c, out_channels, 3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        check_input_size(x, self.num_levels)
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            emb = emb + self.map_label(drop_labels(class_labels, self.label_dropout, x.shape[0], self.training))
        emb = F.silu(emb)
        return self.out_conv(F.silu(self.out_norm(encode_decode(self.enc, self.dec, x, emb))))

# The backbones as EDM's train.py configures them (EDM Table 7): --arch=ddpmpp (VP), ncsnpp (VE), adm.
EDM_ARCHS = {
    'ddpmpp': dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
                   channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2]),
    'ncsnpp': dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
                   channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2]),
    'adm':    dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4]),
}

def edm_backbone_kwargs(arch, cbase=None, cres=None, blocks=None):
    """Backbone kwargs of an --arch with EDM train.py's --cbase/--cres overrides (and a block count)."""
    model = dict(EDM_ARCHS[arch])
    model['model_channels'] = cbase or model['model_channels']
    model['channel_mult'] = cres or model['channel_mult']
    if blocks:
        model['num_blocks'] = blocks
    return model

#------------------------------------------------------------------------------
# 3. EDM's augmentation pipe (EDM Sec. 5), the pipeline of ADA: Karras et al. 2020, "Training Generative Adversarial
#     Networks with Limited Data", App. B. Official code: NVlabs/edm training/augment.py, AugmentPipe. The random
#     draws come in the official order and shapes: one torch seed gives the official batch (to 1e-6 on CPU).

# Low-pass filter of the Daubechies symlet 'sym6' wavelet (12 taps, sum sqrt(2)): the 2x up/down sampling filter.
_SYM6 = [0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633, 0.4910559419267466,
         0.787641141030194, 0.3379294217276218, -0.07263752278646252, -0.021060292512300564, 0.04472490177066578,
         0.0017677118642428036, -0.007800708325034148]

def _matrix(*rows, device=None):
    """Rows of numbers and equal-shaped tensors [...] -> float32 matrices [..., R, C] ([R, C] if all are numbers)."""
    ref = next((x for row in rows for x in row if torch.is_tensor(x)), None)
    if ref is None:
        return torch.tensor(rows, dtype=torch.float32, device=device)
    entries = [x if torch.is_tensor(x) else torch.full_like(ref, x) for row in rows for x in row]
    return torch.stack(entries, dim=-1).reshape(*ref.shape, len(rows), len(rows[0]))

def _translate2d(tx, ty, device=None):
    return _matrix([1, 0, tx], [0, 1, ty], [0, 0, 1], device=device)

def _scale2d(sx, sy, device=None):
    return _matrix([sx, 0, 0], [0, sy, 0], [0, 0, 1], device=device)

def _rotate2d(theta):  # turns +x towards +y: clockwise on screen, where y points down
    return _matrix([theta.cos(), -theta.sin(), 0], [theta.sin(), theta.cos(), 0], [0, 0, 1])

def _rotate3d(axis, theta):
    """Rotation of RGB by theta [N] about a unit axis [3] (Rodrigues' formula), as homogeneous matrices [N, 4, 4]."""
    x, y, z = axis
    K = _matrix([0, -z, y], [z, 0, -x], [-y, x, 0])   # cross-product matrix: K v = axis x v
    c, s = theta.cos()[:, None, None], theta.sin()[:, None, None]
    R = torch.eye(4, device=theta.device).repeat(len(theta), 1, 1)
    R[:, :3, :3] = torch.outer(axis, axis) * (1 - c) + torch.eye(3, device=theta.device) * c + K * s
    return R

def _resample2x(x, filt, up):
    """Separable 2x resampling with a low-pass filter [taps]: up = zero insertion then filtering, [N, C, H, W] ->
    [N, C, 2H, 2W]; down = filtering then decimation, its adjoint, [N, C, 2H, 2W] -> [N, C, H, W]."""
    w, pad = filt.to(x.dtype).tile(x.shape[1], 1), len(filt) // 2 - 1    # w: [C, taps]; even number of taps
    conv = F.conv_transpose2d if up else F.conv2d
    x = conv(x, w[:, None, None, :], stride=(1, 2), padding=(0, pad), groups=x.shape[1])
    return conv(x, w[:, None, :, None], stride=(2, 1), padding=(pad, 0), groups=x.shape[1])

class AugmentPipe:
    """EDM's non-leaking augmentations: `images, augment_labels = pipe(images)`; the network is conditioned on the
    labels (augment_dim) and sampled with zero labels. Each enabled transform runs with probability p * multiplier
    and appends its label columns in this order (zeros where it was not applied):
    xflip 1, yflip 1, rotate_int 2, translate_int 2, scale 1, rotate_frac 2, aniso 2, translate_frac 2, brightness 1,
    contrast 1, lumaflip 1, hue 2, saturation 1. EDM's train.py set (xflip=1e8, yflip=1, scale=1, rotate_frac=1,
    aniso=1, translate_frac=1) gives 9 columns: [xflip, yflip, scale, cos-1, sin, aniso x, aniso y, tx, ty]."""
    def __init__(self,
        p                  = 1,      # overall probability multiplier (train.py --augment); 0 = nothing applied
        xflip              = 0,      # multipliers of the per-image probabilities; 0 = transform disabled
        yflip              = 0,
        rotate_int         = 0,      # 90-degree rotations (square images)
        translate_int      = 0,      # integer translation with reflection at the borders
        translate_int_max  = 0.125,  # its range, fraction of the image size
        scale              = 0,      # isotropic scaling
        rotate_frac        = 0,      # arbitrary rotation
        aniso              = 0,      # anisotropic scaling
        translate_frac     = 0,      # fractional translation
        scale_std          = 0.2,    # log2 std of isotropic scaling
        rotate_frac_max    = 1,      # range of arbitrary rotation, 1 = full circle
        aniso_std          = 0.2,    # log2 std of anisotropic scaling
        aniso_rotate_prob  = 0.5,    # probability that the anisotropic scaling axis is rotated (not a multiplier)
        translate_frac_std = 0.125,  # std of fractional translation, fraction of the image size
        brightness         = 0,      # color multipliers: brightness offset, contrast, luma flip, hue, saturation
        contrast           = 0,
        lumaflip           = 0,
        hue                = 0,
        saturation         = 0,
        brightness_std     = 0.2,    # std of the brightness offset, in image units ([-1, 1] range)
        contrast_std       = 0.5,    # log2 std of contrast
        hue_max            = 1,      # range of hue rotation, 1 = full circle
        saturation_std     = 1,      # log2 std of saturation
    ):
        for name, value in list(locals().items()):
            if name != 'self':
                setattr(self, name, float(value))

    def __call__(self, images):
        (N, C, H, W), dev = images.shape, images.device
        labels = [torch.zeros([N, 0], device=dev)]

        def gate(w, prob, shape=None):  # keep w where a fresh uniform draw falls below prob, else 0 (= not applied)
            keep = torch.rand(w.shape if shape is None else shape, device=dev) < prob
            return torch.where(keep, w, torch.zeros_like(w))

        # Pixel blitting: flips, quarter turns, integer translation; exact pixel moves, no resampling.
        for multiplier, dim in ((self.xflip, 3), (self.yflip, 2)):      # x-flip (left-right), then y-flip
            if multiplier > 0:
                w = gate(torch.randint(2, [N, 1, 1, 1], device=dev), multiplier * self.p)  # 1 = mirrored
                images = torch.where(w == 1, images.flip(dim), images)
                labels.append(w)
        if self.rotate_int > 0:
            w = gate(torch.randint(4, [N, 1, 1, 1], device=dev), self.rotate_int * self.p)  # quarter turns (rot90)
            turns = torch.stack([images.rot90(k, dims=(2, 3)) for k in range(4)])   # [4, N, C, H, W]
            images = turns[w.flatten(), torch.arange(N, device=dev)]
            labels += [(w == 1) | (w == 2), (w == 2) | (w == 3)]     # two bits: the turn's x-flip and y-flip parts
        if self.translate_int > 0:
            w = gate(torch.rand([2, N, 1, 1, 1], device=dev) * 2 - 1, self.translate_int * self.p, [1, N, 1, 1, 1])
            tx = w[0].mul(W * self.translate_int_max).round().to(torch.int64)   # [N, 1, 1, 1] content moves right by tx
            ty = w[1].mul(H * self.translate_int_max).round().to(torch.int64)   # and up by ty (official convention)
            reflect = lambda i, n: n - 1 - (n - 1 - i % (2 * n - 2)).abs()      # mirror indices into [0, n)
            x = reflect(torch.arange(W, device=dev) - tx, W)                    # [N, 1, 1, W] source column
            y = reflect(torch.arange(H, device=dev)[:, None] + ty, H)           # [N, 1, H, 1] source row
            n, c = torch.arange(N, device=dev)[:, None, None, None], torch.arange(C, device=dev)[:, None, None]
            images = images[n, c, y, x]
            labels += [tx.div(W * self.translate_int_max), ty.div(H * self.translate_int_max)]

        # General geometry: compose the inverse map G_inv [N, 3, 3] from output to input pixel coordinates
        # (origin at the image center), then resample once.
        G_inv = torch.eye(3, device=dev)
        if self.scale > 0:
            w = gate(torch.randn([N], device=dev), self.scale * self.p)
            s = w.mul(self.scale_std).exp2()                                    # isotropic scale 2^(scale_std w)
            G_inv = G_inv @ _scale2d(1 / s, 1 / s)
            labels.append(w)
        if self.rotate_frac > 0:
            w = gate((torch.rand([N], device=dev) * 2 - 1) * (np.pi * self.rotate_frac_max), self.rotate_frac * self.p)
            G_inv = G_inv @ _rotate2d(w)                                        # output pixel q reads input R(w) q
            labels += [w.cos() - 1, w.sin()]
        if self.aniso > 0:
            w = torch.randn([N], device=dev)
            r = (torch.rand([N], device=dev) * 2 - 1) * np.pi                   # direction of the stretch axis
            w = gate(w, self.aniso * self.p)
            r = gate(r, self.aniso_rotate_prob)
            s = w.mul(self.aniso_std).exp2()                                    # stretch by s along r, by 1/s across
            G_inv = G_inv @ _rotate2d(-r) @ _scale2d(1 / s, 1 / (1 / s)) @ _rotate2d(r)  # inverse, rounded as EDM does
            labels += [w * r.cos(), w * r.sin()]
        if self.translate_frac > 0:
            w = gate(torch.randn([2, N], device=dev), self.translate_frac * self.p, [1, N])
            G_inv = G_inv @ _translate2d(-w[0] * (W * self.translate_frac_std), -w[1] * (H * self.translate_frac_std))
            labels += [w[0], w[1]]

        if self.scale > 0 or self.rotate_frac > 0 or self.aniso > 0 or self.translate_frac > 0:
            filt = torch.tensor(_SYM6, device=dev)
            pad = len(_SYM6) // 4                                               # filter support at low resolution
            # Reflect-pad enough that every output pixel (and the filter around it) samples real or mirrored data.
            cx, cy = (W - 1) / 2, (H - 1) / 2
            corners = G_inv @ _matrix([-cx, cx, cx, -cx], [-cy, -cy, cy, cy], [1, 1, 1, 1], device=dev)  # [N, xyz, 4]
            corners = corners[:, :2]                                            # [N, xy, 4] in input coordinates
            reach = torch.cat([(-corners).amax(dim=(0, 2)), corners.amax(dim=(0, 2))])  # [left, top, right, bottom]
            margin = reach + torch.tensor([2 * pad - cx, 2 * pad - cy] * 2, device=dev)
            margin = margin.clamp(min=0).minimum(torch.tensor([W - 1.0, H - 1.0] * 2, device=dev))
            mx0, my0, mx1, my1 = margin.ceil().int().tolist()
            images = F.pad(images, [mx0, mx1, my0, my1], mode='reflect')
            # NOTE: the official alignment below is exact for a filter centered on tap 5 of 0..11; the centroid of
            # sym6 is 5.098, so every transform pivots about a point 0.049 px up-left of the center. We keep that.
            G_inv = _translate2d((mx0 - mx1) / 2, (my0 - my1) / 2, device=dev) @ G_inv   # origin: padded center
            # Resample at 2x resolution, so that bilinear interpolation does not alias.
            images = _resample2x(images, filt, up=True)
            G_inv = _scale2d(2, 2, device=dev) @ G_inv @ _scale2d(1 / 2, 1 / 2, device=dev)
            G_inv = _translate2d(-0.5, -0.5, device=dev) @ G_inv @ _translate2d(0.5, 0.5, device=dev)  # pixel centers
            shape = [N, C, (H + 2 * pad) * 2, (W + 2 * pad) * 2]                # output: the image plus filter support
            G_inv = (_scale2d(2 / images.shape[3], 2 / images.shape[2], device=dev) @ G_inv @
                     _scale2d(shape[3] / 2, shape[2] / 2, device=dev))          # pixels -> grid_sample's [-1, 1]
            grid = F.affine_grid(G_inv[:, :2, :].to(images.dtype), shape, align_corners=False)
            images = F.grid_sample(images, grid, mode='bilinear', padding_mode='zeros', align_corners=False)
            images = _resample2x(images, filt, up=False)[:, :, pad:-pad, pad:-pad]   # [N, C, H, W]

        # Color: compose a homogeneous 4x4 map M [N, 4, 4] of (R, G, B, 1), then apply it per pixel.
        M = I_4 = torch.eye(4, device=dev)
        v = torch.tensor(np.array([1, 1, 1, 0]) / np.sqrt(3), dtype=torch.float32, device=dev)  # luma axis
        P = torch.outer(v, v)                                                   # projection onto the luma axis
        if self.brightness > 0:
            w = gate(torch.randn([N], device=dev), self.brightness * self.p)
            b = w * self.brightness_std                                         # offset added to R, G, B
            M = _matrix([1, 0, 0, b], [0, 1, 0, b], [0, 0, 1, b], [0, 0, 0, 1]) @ M
            labels.append(w)
        if self.contrast > 0:
            w = gate(torch.randn([N], device=dev), self.contrast * self.p)
            c = w.mul(self.contrast_std).exp2()                                 # RGB scaled by 2^(contrast_std w)
            M = _matrix([c, 0, 0, 0], [0, c, 0, 0], [0, 0, c, 0], [0, 0, 0, 1]) @ M
            labels.append(w)
        if self.lumaflip > 0:
            w = gate(torch.randint(2, [N, 1, 1], device=dev), self.lumaflip * self.p)
            M = (I_4 - 2 * P * w) @ M                                           # mirror the luma component
            labels.append(w)
        if self.hue > 0:
            w = gate((torch.rand([N], device=dev) * 2 - 1) * (np.pi * self.hue_max), self.hue * self.p)
            M = _rotate3d(v[:3], w) @ M                                         # rotate the chroma about the luma axis
            labels += [w.cos() - 1, w.sin()]
        if self.saturation > 0:
            w = gate(torch.randn([N, 1, 1], device=dev), self.saturation * self.p)
            M = (P + (I_4 - P) * w.mul(self.saturation_std).exp2()) @ M         # scale the chroma component
            labels.append(w)

        if self.brightness > 0 or self.contrast > 0 or self.lumaflip > 0 or self.hue > 0 or self.saturation > 0:
            x = images.reshape(N, C, H * W)
            if C == 3:
                x = M[:, :3, :3] @ x + M[:, :3, 3:]
            elif C == 1:  # gray in, gray out: average the R, G, B rows of M, applied to (g, g, g, 1)
                m = M[:, :3, :].mean(dim=1, keepdim=True)                       # [N, 1, 4]
                x = x * m[:, :, :3].sum(dim=2, keepdim=True) + m[:, :, 3:]
            else:
                raise ValueError(f'color augmentation needs 1 or 3 channels, not {C}')
            images = x.reshape(N, C, H, W)

        return images, torch.cat([x.to(torch.float32).reshape(N, -1) for x in labels], dim=1)
#------------------------------------------------------------------------------
# 4. Data. Images are uint8 CHW; the training loop maps them to [-1, 1]. Labels are float32 one-hot vectors
#    (shape [0] when unused). EDM format: `00000/img00000000.png` files plus `dataset.json` {"labels": [[name, k]]}.

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.tif', '.tiff', '.ppm', '.pgm')

class ImageFolderDataset(torch.utils.data.Dataset):
    """An EDM-format dataset: a folder (searched recursively) or a zip of images, optionally with labels. Every
    image's header is checked when it opens (size, mode, a PNG's end marker), so a bad file stops the run at once."""
    def __init__(self,
        path,                       # folder or .zip
        resolution  = None,         # expected side length; None = whatever the images are
        use_labels  = False,        # return one-hot labels from dataset.json
        max_size    = None,         # seeded random subset of this many images; None = all
        xflip       = False,        # append horizontally flipped copies (doubles the length)
        random_seed = 0,            # seed of the max_size subset
        check       = True,         # read every image's header now (fast); False = find bad files when read
    ):
        self.path, self.name = path, os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
        self._zip, self._zip_pid = None, None
        if os.path.isdir(path):
            names = [os.path.relpath(os.path.join(root, f), path).replace('\\', '/')
                     for root, _, files in os.walk(path) for f in files]
        elif os.path.isfile(path) and zipfile.is_zipfile(path):
            names = self._open_zip().namelist()
        elif os.path.exists(path):
            raise UsageError(f'{path}: not a folder or a zip file')
        else:
            raise UsageError(f'{path}: no such dataset (make one with dataset_tool.py, or use --data=demo)')
        self.image_names = sorted(n for n in names if n.lower().endswith(IMAGE_EXTENSIONS))
        if not self.image_names:
            raise UserError(f'{path}: no images found')
        self.labels = self._load_labels() if use_labels else None
        self.label_dim = 0 if self.labels is None else self.labels.shape[1]
        self.indices = np.arange(len(self.image_names))
        if max_size is not None and max_size < len(self.indices):
            self.indices = np.sort(np.random.RandomState(random_seed % (1 << 31)).permutation(self.indices)[:max_size])
        self.xflip = xflip
        self.num_channels, height, width = self._read(self.indices[0]).shape
        if height != width:
            raise UserError(f'{path}/{self.image_names[self.indices[0]]}: images must be square, got {width}x{height}')
        self.resolution = height
        if resolution is not None and resolution != self.resolution:
            raise UserError(f'{path}: images are {height}x{height}, but resolution {resolution} was requested')
        if check:
            self._check_headers()

    def _check_headers(self):
        """Every image's size and mode from its header, without decoding; a PNG must end with its IEND chunk."""
        expected = None
        for index in self.indices:
            name = self.image_names[index]
            try:
                with self._open(name) as f, PIL.Image.open(f) as image:
                    found, complete = f'{image.size[0]}x{image.size[1]} {image.mode}', True
                    if name.lower().endswith('.png'):
                        f.seek(-12, os.SEEK_END)
                        complete = f.read(12)[4:8] == b'IEND'
            except Exception as e:
                raise UserError(f'{self.path}/{name}: cannot read image ({e})') from None
            expected = expected or found
            if not complete:
                raise UserError(f'{self.path}/{name}: truncated PNG (no IEND chunk at its end)')
            if found != expected:
                raise UserError(f'{self.path}/{name}: image is {found}, the first is {expected}; all images must '
                                'match (see dataset_tool.py)')

    def _open_zip(self):
        if self._zip is None or self._zip_pid != os.getpid():  # one handle per DataLoader worker
            self._zip, self._zip_pid = zipfile.ZipFile(self.path), os.getpid()
        return self._zip

    def _open(self, name):
        return open(os.path.join(self.path, name), 'rb') if os.path.isdir(self.path) else self._open_zip().open(name)

    def _load_labels(self):
        try:
            with self._open('dataset.json') as f:
                labels = json.load(f).get('labels')
        except (KeyError, FileNotFoundError):
            labels = None
        except (ValueError, AttributeError) as e:
            raise UserError(f'{self.path}/dataset.json: cannot parse ({e})')
        if labels is None:
            raise UserError(f'{self.path}: no labels in dataset.json; train with --cond=0 or add labels')
        labels = {name.replace('\\', '/'): label for name, label in labels}
        missing = [n for n in self.image_names if n not in labels]
        if missing:
            raise UserError(f'{self.path}/dataset.json: no label for {missing[0]} '
                            f'({len(missing)} images without labels)')
        labels = np.array([labels[n] for n in self.image_names])
        if labels.ndim == 1:  # class indices -> one-hot
            return np.eye(labels.max() + 1, dtype=np.float32)[labels]
        return labels.astype(np.float32)

    def _read(self, raw_index):
        name = self.image_names[raw_index]
        try:
            with self._open(name) as f:
                image = np.array(PIL.Image.open(io.BytesIO(f.read())))
        except Exception as e:
            raise DataError(f'{self.path}/{name}: cannot read image ({e})') from None
        image = (image[:, :, np.newaxis] if image.ndim == 2 else image).transpose(2, 0, 1)  # [H, W, C] -> [C, H, W]
        if hasattr(self, 'num_channels') and image.shape != (self.num_channels, self.resolution, self.resolution):
            raise DataError(f'{self.path}/{name}: image is {tuple(image.shape)} (CHW), expected '
                            f'{(self.num_channels, self.resolution, self.resolution)} like the others')
        return image

    def __len__(self):
        return len(self.indices) * (2 if self.xflip else 1)

    def __getitem__(self, idx):
        raw_index = self.indices[idx % len(self.indices)]
        image = self._read(raw_index)
        if idx >= len(self.indices):  # second half: flipped copies
            image = image[:, :, ::-1]
        label = self.labels[raw_index] if self.labels is not None else np.zeros([0], np.float32)
        return image.copy(), label.copy()

class DemoDataset(torch.utils.data.Dataset):
    """Built-in toy data (`--data=demo` or `demo-RES`): deterministic random discs, squares and triangles on a
    two-tone background, label = shape class (3 classes). No download, any resolution."""
    def __init__(self, resolution=32, size=4096, use_labels=False, xflip=False, num_channels=3, **_):
        self.name, self.resolution, self.num_channels, self.size = f'demo{resolution}', resolution, num_channels, size
        self.label_dim, self.use_labels, self.xflip = (3 if use_labels else 0), use_labels, xflip

    def __len__(self):
        return self.size * (2 if self.xflip else 1)

    def __getitem__(self, idx):
        rng = np.random.default_rng([1234, idx % self.size])
        shape, inside = demo_shape(self.resolution, rng)
        top, bottom, color = rng.uniform(0, 255, (3, self.num_channels))
        image = np.where(demo_top_half(self.resolution)[None], top[:, None, None], bottom[:, None, None])
        image = np.where(inside[None], color[:, None, None], image).astype(np.uint8)
        if idx >= self.size:
            image = image[:, :, ::-1]
        label = np.eye(3, dtype=np.float32)[shape] if self.use_labels else np.zeros([0], np.float32)
        return image.copy(), label

def demo_top_half(R):
    """[R, R] bool: the pixels of the demo images' top background (pixel centres above the middle)."""
    return ((np.mgrid[0:R, 0:R][0] + 0.5) / R < 0.5)

def demo_shape(R, rng):
    """One shape draw of the demo data: (class, [R, R] bool mask) from the generator `rng`."""
    shape = int(rng.integers(3))
    y, x = (np.mgrid[0:R, 0:R] + 0.5) / R  # pixel centres in [0, 1]
    cx, cy = rng.uniform(0.3, 0.7, 2)
    r = rng.uniform(0.15, 0.3)
    inside = [(x - cx) ** 2 + (y - cy) ** 2 < r ** 2,                      # disc
              (abs(x - cx) < r * 0.85) & (abs(y - cy) < r * 0.85),         # square
              (y - cy < r * 0.8) & (y - cy > 2 * abs(x - cx) - r)][shape]  # triangle
    return shape, inside

def open_dataset(data, **kwargs):
    """`--data`: 'demo' (32x32), 'demo-64', ... for the built-in toy set; otherwise an EDM-format zip or folder."""
    m = re.fullmatch(r'demo(?:-(\d+))?', data)
    if m and not 4 <= int(m[1] or 32) <= 1024:
        raise UsageError(f'--data={data}: the demo resolution must be 4 to 1024 pixels')
    return DemoDataset(resolution=int(m[1] or 32), **kwargs) if m else ImageFolderDataset(data, **kwargs)

class InfiniteSampler(torch.utils.data.Sampler):
    """Endless, seeded index stream for one rank: epoch e is a permutation seeded by (seed, e), of which ranks take
    interleaved positions. `start` skips that many items of this rank's stream, so a resumed run sees the same data."""
    def __init__(self, size, rank=0, world_size=1, seed=0, start=0):
        self.size, self.rank, self.world_size, self.seed, self.start = size, rank, world_size, seed, start

    def __iter__(self):
        epoch, order = None, None
        for i in range(self.start, 1 << 62):
            e, pos = divmod(i * self.world_size + self.rank, self.size)
            if e != epoch:
                epoch, order = e, np.random.default_rng([self.seed, e]).permutation(self.size)
            yield int(order[pos])

def data_stream(dataset, batch_gpu, rank, world_size, seed, start, workers):
    """Endless iterator over (uint8 images, labels) micro-batches, starting `start` items into this rank's stream."""
    sampler = InfiniteSampler(len(dataset), rank, world_size, seed, start)
    return iter(torch.utils.data.DataLoader(dataset, batch_size=batch_gpu, sampler=sampler, num_workers=workers,
        pin_memory=torch.cuda.is_available(), prefetch_factor=2 if workers else None, persistent_workers=workers > 0))

#------------------------------------------------------------------------------
# 5. Images and labels: float [-1, 1] NCHW -> uint8 (EDM: floor(clip(127.5 x + 128))), PNGs per seed, grids, labels.

def to_uint8(images):
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)

def save_image(array, path):
    """uint8 [C, H, W] tensor or array -> PNG (1 channel as grey)."""
    array = np.asarray(array.cpu() if torch.is_tensor(array) else array).transpose(1, 2, 0)
    PIL.Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(path)

def save_seed_images(images, seeds, outdir, subdirs=False):
    """`{seed:06d}.png`, in folders of 1,000 seeds with `subdirs` (EDM's layout)."""
    for image, seed in zip(to_uint8(images), seeds):
        folder = os.path.join(outdir, f'{seed - seed % 1000:06d}') if subdirs else outdir
        os.makedirs(folder, exist_ok=True)
        save_image(image, os.path.join(folder, f'{seed:06d}.png'))

def save_image_grid(images, path, cols=None):
    """float [-1, 1] images [N, C, H, W] -> one PNG grid, `cols` wide (default: about square)."""
    images = to_uint8(images)
    n, c, h, w = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.cat([images, images.new_zeros([rows * cols - n, c, h, w])])   # padded with black cells
    grid = grid.reshape(rows, cols, c, h, w).permute(2, 0, 3, 1, 4)            # -> [C, rows, H, cols, W]
    grid = grid.reshape(c, rows * h, cols * w)                                  # -> [C, rows*H, cols*W]
    save_image(grid, path)

def seed_batches(seeds, batch, rank, world_size):
    """Split seeds into about-equal batches of at most `batch`, dealt round-robin to the ranks (EDM generate.py)."""
    num = max((len(seeds) - 1) // (batch * world_size) + 1, 1) * world_size
    return [list(chunk) for chunk in np.array_split(np.asarray(seeds, dtype=np.int64), num)[rank::world_size]]

def seed_labels(rng, label_dim, class_idx=None, device=None):
    """One-hot class labels of a batch of seeds (None without classes): `class_idx` for all, else drawn from each
    seed's generator (EDM generate.py; drawn under `class_idx` too, so the seed's later draws do not change)."""
    if not label_dim:
        return None
    index = rng.randint(label_dim, device=device)
    if class_idx is not None:
        index = torch.full_like(index, class_idx)
    return torch.eye(label_dim, device=device)[index]

def check_class(class_idx, label_dim):
    if class_idx is not None and not 0 <= class_idx < max(label_dim, 1):
        unconditional = '' if label_dim else ' (unconditional)'
        raise UsageError(f'--class={class_idx}: the network has {label_dim} classes{unconditional}')

#------------------------------------------------------------------------------
# 6. Inception features and the Frechet distance.

def resize_tf1(x, size=299):
    """TensorFlow-1 bilinear resize (align_corners=False, half_pixel_centers=False): output pixel j reads the source at
    j * n_in / n_out, clamped at the last pixel. NVIDIA's detector does this with affine_grid/grid_sample."""
    for dim in (2, 3):
        n = x.shape[dim]
        src = torch.arange(size, dtype=torch.float64, device=x.device) * (n / size)
        i0 = src.floor().long().clamp(max=n - 1)
        i1 = (i0 + 1).clamp(max=n - 1)
        w = (src - i0).to(x.dtype).view([-1 if d == dim else 1 for d in range(4)])
        x0 = x.index_select(dim, i0)
        x = x0 + (x.index_select(dim, i1) - x0) * w
    return x

class _BasicConv2d(torch.nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3, as TF) + ReLU; torchvision's BasicConv2d."""
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.bn = torch.nn.BatchNorm2d(out_channels, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))

def _avg_pool_tf(x):
    """3x3/1 average pool that ignores the zero padding, as TF's (pytorch-fid's FIDInception* patch)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

class _InceptionA(torch.nn.Module):
    """Mixed_5b/5c/5d (pytorch-fid FIDInceptionA)."""
    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = _BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = _BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = _BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = _BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = _BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))), self.branch_pool(_avg_pool_tf(x))], dim=1)

class _InceptionB(torch.nn.Module):
    """Mixed_6a (torchvision InceptionB): grid reduction 35 -> 17."""
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = _BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = _BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = _BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)

class _InceptionC(torch.nn.Module):
    """Mixed_6b..6e (pytorch-fid FIDInceptionC): factorized 1x7 / 7x1 convolutions."""
    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = _BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = _BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = _BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = _BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = x
        for i in range(1, 6):
            d7 = getattr(self, f'branch7x7dbl_{i}')(d7)
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(_avg_pool_tf(x))], dim=1)

class _InceptionD(torch.nn.Module):
    """Mixed_7a (torchvision InceptionD): grid reduction 17 -> 8."""
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = _BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = _BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = _BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)

class _InceptionE(torch.nn.Module):
    """Mixed_7b / 7c (pytorch-fid FIDInceptionE_1 / _2). NOTE: the TF graph pools with max, not average, in Mixed_7c."""
    def __init__(self, in_channels, pool):
        super().__init__()
        self.pool = pool                                        # 'avg' (Mixed_7b) or 'max' (Mixed_7c)
        self.branch1x1 = _BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = _BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = _BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = _BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        b3, d3 = self.branch3x3_1(x), self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _avg_pool_tf(x) if self.pool == 'avg' else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3), self.branch_pool(pooled)], dim=1)

class InceptionV3(torch.nn.Module):
    """The FID Inception-v3 (TF graph inception-2015-12-05) with pytorch-fid's state-dict names, so that
    pt_inception-2015-12-05-6726825d.pth loads with strict=True. Input: uint8-valued [N, 1 or 3, H, W], any size.
      'nvidia'      TF1 bilinear resize to 299, (x-128)/128, as NVIDIA's detector and ADM's TF graph. Comparable with
                    EDM's fid-refs/*.npz and FIDs published with NVIDIA's tooling (EDM, EDM2, StyleGAN2-ADA/3) and
                    with ADM's evaluator (FID, sFID, IS, precision/recall; guided-diffusion and papers that use it).
      'pytorch_fid' half-pixel bilinear resize (F.interpolate) of x/255, then 2x-1, exactly pytorch-fid. Comparable
                    with `python -m pytorch_fid` numbers, not with EDM's refs (the resizes differ most at 32-64 px)."""
    def __init__(self, preprocess='nvidia'):
        super().__init__()
        self.preprocess = preprocess
        self.Conv2d_1a_3x3 = _BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = _BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = _BasicConv2d(80, 192, 3)
        self.Mixed_5b = _InceptionA(192, pool_features=32)
        self.Mixed_5c = _InceptionA(256, pool_features=64)
        self.Mixed_5d = _InceptionA(288, pool_features=64)
        self.Mixed_6a = _InceptionB(288)
        self.Mixed_6b = _InceptionC(768, channels_7x7=128)
        self.Mixed_6c = _InceptionC(768, channels_7x7=160)
        self.Mixed_6d = _InceptionC(768, channels_7x7=160)
        self.Mixed_6e = _InceptionC(768, channels_7x7=192)
        self.Mixed_7a = _InceptionD(768)
        self.Mixed_7b = _InceptionE(1280, pool='avg')
        self.Mixed_7c = _InceptionE(2048, pool='max')
        self.fc = torch.nn.Linear(2048, 1008)
        self.eval()

    def preprocess_images(self, images):
        """uint8-valued [N, 1 or 3, H, W] -> float32 [N, 3, 299, 299] in about [-1, 1]."""
        x = images.to(torch.float32).expand(-1, 3, -1, -1)                  # grey -> RGB
        if self.preprocess == 'nvidia':
            return (resize_tf1(x, 299) - 128) / 128
        return 2 * F.interpolate(x / 255, size=(299, 299), mode='bilinear', align_corners=False) - 1

    def forward(self, images, return_dict=False):
        """Pool3 features [N, 2048]; with return_dict=True a dict of 'pool', 'logits' [N, 1008] (no bias, as the
        original IS code and NVIDIA's no_output_bias) and 'spatial' [N, 2023] (ADM's sFID: mixed_6/conv, 7 channels)."""
        x = self.preprocess_images(images)
        x = F.max_pool2d(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))), kernel_size=3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))))
        spatial = self.Mixed_6d.branch1x1(x)[:, :7] if return_dict else None  # TF 'mixed_6/conv', [N, 7, 17, 17]
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(self.Mixed_6d(x)))))
        pool = x.mean(dim=(2, 3))                                             # [N, 2048, 8, 8] -> [N, 2048]
        if not return_dict:
            return pool
        spatial = spatial.permute(0, 2, 3, 1).flatten(1)                      # [N, 7, 17, 17] -> [N, 17*17*7], TF order
        return dict(pool=pool, logits=pool @ self.fc.weight.t(), spatial=spatial)

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017), as EDM: scipy sqrtm of the
    product, real part of the result. NOTE: EDM passes disp=False, deprecated in SciPy 1.17; the plain call is equal."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f'statistics do not match: mu {mu1.shape} vs {mu2.shape}, '
                         f'sigma {sigma1.shape} vs {sigma2.shape}')
    with warnings.catch_warnings():  # a singular product (fewer images than dimensions) warns; EDM silences it too
        warnings.simplefilter('ignore', scipy.linalg.LinAlgWarning)
        s = scipy.linalg.sqrtm(np.dot(sigma1, sigma2))
    return float(np.real(np.square(mu1 - mu2).sum() + np.trace(sigma1 + sigma2 - s * 2)))

#------------------------------------------------------------------------------
# 7. Distributed setup: always a process group (torchrun's, or a world of one; nccl on GPUs, gloo on CPU), errors.

def init_distributed():
    """Join the torchrun group, or make a world of one (an in-memory store: no port, no environment variables)."""
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():  # without RANK (a plain `python x.py`) a world of one
        world_of_one = {} if 'RANK' in os.environ else dict(store=dist.HashStore(), rank=0, world_size=1)
        dist.init_process_group('nccl' if cuda else 'gloo', **world_of_one)
    device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0))) if cuda else torch.device('cpu')
    if cuda:
        torch.cuda.set_device(device)
    elif 'OMP_NUM_THREADS' not in os.environ and hasattr(os, 'getloadavg'):  # torch takes every core: slow if busy
        idle = max(int(os.cpu_count() - os.getloadavg()[0] + 0.5), 1)
        if idle < torch.get_num_threads():
            torch.set_num_threads(idle)
            print0(f'note: the CPU is busy (load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores): '
                   f'{torch.get_num_threads()} thread(s); set OMP_NUM_THREADS to choose')
    return device

def get_rank():
    return dist.get_rank() if dist.is_initialized() else 0

def get_world_size():
    return dist.get_world_size() if dist.is_initialized() else 1

def print0(*args, **kwargs):
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)

class UserError(Exception):
    """A problem with the user's input (flag, file, data) or a fault while working (disk full, divergence): one line.
    Exit code (every CLI of this project): 2 if raised before the work starts (the input is wrong), 1 if raised while
    working (inside `working()` or a `TrainingRun`), 130 for Ctrl-C."""

class UsageError(UserError):
    """A bad flag value or combination, found before anything is written."""

class DataError(UserError):
    """An image or label that cannot be read; raised by the datasets, so a run can save its state before it stops."""

@contextlib.contextmanager
def working():
    """The work itself (generation, feature extraction, conversion): an error raised inside is a failure while
    working (exit 1); before it, bad input (exit 2)."""
    try:
        yield
    except (UserError, OSError) as e:
        e.while_working = True
        raise

def exit_code(e):
    return 1 if getattr(e, 'while_working', False) else 2

def run_main(command, args):
    """Run a CLI command: errors become one line on stderr (exit 2 bad input, 1 a failure while working, 130
    interrupt), never a traceback; the process group is torn down."""
    try:
        command(args)
    except UserError as e:  # from a DataLoader worker it comes back with the worker's traceback in its message
        print(f'error: {re.split("(?:User|Usage|Data)Error: ", str(e))[-1].strip()}', file=sys.stderr)
        sys.exit(exit_code(e))
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        sys.exit(130)
    except OSError as e:  # a file that cannot be written or read: name it, no traceback
        print(f'error: {e.filename or "(no file name)"}: {e.strerror or e}', file=sys.stderr)
        sys.exit(exit_code(e))
    finally:
        if dist.is_initialized():
            gloo = dist.get_backend() == 'gloo' and dist.get_world_size() > 1
            dist.destroy_process_group()
            # NOTE: gloo's worker threads free a finished collective after the caller has moved on and need the GIL
            # to do it; once the interpreter is shutting down they are killed mid-destructor and the process aborts
            # (SIGABRT, torch 2.13 on CPU). Half a second lets them finish.
            if gloo:
                time.sleep(0.5)

#------------------------------------------------------------------------------
# 8. Command line: argument types, the parser (presets, resume), the shared flags.

MAX_SEEDS = 10**7  # one command's seeds: 200 times EDM's 50,000 FID images

def parse_int_list(s):
    """'0-3,7' -> [0, 1, 2, 3, 7] (EDM's seed syntax). An empty result is an error."""
    out = []
    for part in s.split(','):
        m = re.fullmatch(r'\s*(-?\d+)\s*-\s*(-?\d+)\s*', part)
        try:
            low, high = (int(m[1]), int(m[2])) if m else (int(part), int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected integers or ranges like 0-49999,7; got {s!r}') from None
        if high < low:
            raise argparse.ArgumentTypeError(f'{part.strip()!r} is an empty range (write low-high)')
        if len(out) + high - low + 1 > MAX_SEEDS:
            raise argparse.ArgumentTypeError(f'{s!r} holds more than {MAX_SEEDS:,} numbers; split the work')
        out.extend(range(low, high + 1))
    if min(out, default=0) < 0:
        raise argparse.ArgumentTypeError(f'{s!r} holds a negative number ({min(out)}); seeds and sizes are >= 0')
    return out

def parse_bool(s):
    """Booleans that published commands pass as values: --cond=1, --fp16=True."""
    words = {'1': True, 'true': True, 'yes': True, 'on': True, '0': False, 'false': False, 'no': False, 'off': False}
    if s.lower() not in words:
        raise argparse.ArgumentTypeError(f'expected a boolean (1/0/true/false); got {s!r}')
    return words[s.lower()]

def number(kind, low=None, high=None, low_open=False, inf=False):
    """argparse type: a finite int or float within [low, high] (or (low, high] with low_open), e.g. number(int, 1);
    `inf=True` also takes +inf (a bound that may be absent, e.g. EDM's S_max)."""
    def parse(s):
        try:
            value = kind(s)
        except (ValueError, OverflowError):
            what = 'an integer' if kind is int else 'a number'
            raise argparse.ArgumentTypeError(f'expected {what}, got {s!r}') from None
        if kind is float and not math.isfinite(value) and not (inf and value == math.inf):
            raise argparse.ArgumentTypeError(f'{s} is not a finite number' + (' (or inf)' if inf else ''))
        below = low is not None and (value <= low if low_open else value < low)
        if below or (high is not None and value > high):
            bounds = [f'{"> " if low_open else ">= "}{low}'] if low is not None else []
            bounds += [f'<= {high:g}' if isinstance(high, float) else f'<= {high}'] if high is not None else []
            raise argparse.ArgumentTypeError(f'{s} is out of range: must be {" and ".join(bounds)}')
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse

class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and defaults shown in --help; its subcommands are Parsers too.
    It keeps its subcommands (`subcommands`: name -> Parser) and each option's --spelling (`flags`: dest -> flag)."""
    def __init__(self, *args, **kwargs):
        self.subcommands = {}
        self.flags = {}  # before argparse adds -h
        super().__init__(*args, formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)

    def add_subparsers(self, **kwargs):
        group = super().add_subparsers(**kwargs)
        self.subcommands = group.choices  # filled by group.add_parser
        return group

    def add_argument(self, *names, **kwargs):
        action = super().add_argument(*names, **kwargs)
        long = [name for name in names if name.startswith('--')]
        if long:
            self.flags[action.dest] = long[0]
        return action

    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message}\n')

# Training options that may change when a run is resumed; every other option defines the run, and `--resume`
# refuses a different value. Flags left out take the training state's values, these too.
RESUME_MAY_CHANGE = {'command', 'outdir', 'resume', 'duration', 'train_steps', 'tick', 'snap', 'dump', 'workers',
                     'grid', 'grid_steps', 'desc', 'nosubdir', 'dry_run', 'compile', 'batch_gpu', 'preset', 'metrics',
                     'metrics_ref', 'metrics_detector', 'metrics_preprocess', 'metrics_cache', 'metrics_first',
                     'metrics_steps'}

def parse_command_line(build_parser, argv=None):
    """`train` is the default subcommand (`x.py --preset=demo` trains). `build_parser(preset)` builds the parser; a
    preset's values are defaults of the subcommand that has --preset. With `train --resume=STATE` the state's options
    are the defaults, and a flag that gives a run-defining option another value is an error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith('-') and argv[0] not in ('-h', '--help')):
        argv.insert(0, 'train')
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, 'preset', None) is not None:
        parser = build_parser(args.preset)
        args = parser.parse_args(argv)
    if args.command == 'train' and getattr(args, 'resume', None):
        try:
            args.resume = latest_checkpoint(args.resume, 'training-state', '--resume')
            method, options = read_training_options(args.resume)
            expected = os.path.splitext(os.path.basename(sys.modules[build_parser.__module__].__file__))[0]
            if method != expected:  # before any option comparison: the options of another method mean nothing here
                raise UsageError(f'{args.resume}: a {method}.py training state; {expected}.py continues only its own')
            stored = {k: v for k, v in options.items() if hasattr(args, k)}
            branch = any(a == '--outdir' or a.startswith('--outdir=') for a in argv)
            if not branch:
                check_no_later_states(args.resume)
        except UserError as e:
            parser.error(f'argument --resume: {e}')
        train = parser.subcommands['train']
        train.set_defaults(**{k: v for k, v in stored.items() if k not in ('command', 'resume', 'dry_run')})
        resume, args = args.resume, parser.parse_args(argv)
        args.resume = resume
        if not branch:  # one training, one run directory: continue in the state's folder (as EDM2), not --outdir's
            args.outdir, args.nosubdir = os.path.dirname(os.path.abspath(resume)), True
        elif '--nosubdir' not in argv:  # a branch: a new numbered run directory in --outdir
            args.nosubdir = False
        changed = [k for k, v in stored.items() if k not in RESUME_MAY_CHANGE and getattr(args, k) != v]
        if changed:
            parser.error(f'--resume={args.resume} continues a run with other options: ' + '; '.join(
                f'{train.flags[k]}={getattr(args, k)} given, {stored[k]} in the training state' for k in changed) +
                ' (leave them out to continue that run, or start a new run)')
    if args.command == 'train' and getattr(args, 'data', '') is None:
        parser.error('--data is required (an EDM-format zip or folder, or demo)')
    if args.command == 'generate' and getattr(args, 'pick', None) and getattr(args, 'network', None):
        try:
            args.network = pick_snapshot(args.network, args.pick, '--network')
        except UserError as e:
            parser.error(str(e))
    if getattr(args, 'sigma_min', None) is not None and getattr(args, 'sigma_max', None) is not None:
        if args.sigma_min >= args.sigma_max:
            parser.error(f'--sigma_min={args.sigma_min:g} must be below --sigma_max={args.sigma_max:g}')
    return args

def check_no_later_states(state):
    """Continuing a run in its folder from an older training state would overwrite the later ones."""
    folder, name = os.path.split(os.path.abspath(state))
    later = sorted(n for n in os.listdir(folder) if re.fullmatch(r'training-state-[\d_]+\.pt', n) and n > name)
    if later:
        raise UsageError(f'{state}: its folder holds later training states ({later[-1]}); continuing there would '
                         'overwrite them: resume from the latest, or branch into a new run directory with --outdir=DIR')

def add_train_flags(p, help=None, **defaults):
    """The training flags every method file shares (EDM's names and units); `defaults` overrides per method, `help`
    the help text of a flag (by its name without dashes)."""
    d = dict(outdir='training-runs', duration=200, batch=512, lr=1e-3, dropout=0.13, tick=50, snap=50, dump=500)
    d |= defaults
    helps = help or {}
    pos_int, nonneg, nonneg_int = number(int, 1, 2**24), number(int, 0), number(int, 0, 256)
    pos_float = lambda high: number(float, 0, high, low_open=True)  # noqa: E731

    def add(*names, **kwargs):
        name = names[-1].lstrip('-').replace('-', '_')
        p.add_argument(*names, **dict(kwargs, help=helps.get(name, kwargs.get('help'))))
    add('--outdir', default=d['outdir'], metavar='DIR', help='where to make the run directory')
    add('--data', default=None, metavar='ZIP|DIR|demo',
        help='required: an EDM-format zip or folder (dataset_tool.py), or demo[-RES] for built-in shapes')
    add('--cond', type=parse_bool, default=False, metavar='BOOL', help='class-conditional (labels from dataset.json)')
    add('--duration', type=pos_float(1e5), default=d['duration'], metavar='MIMG', help='training length, Mimg')
    add('--batch', type=pos_int, default=d['batch'], metavar='INT', help='global batch size (images per step)')
    add('--batch-gpu', type=pos_int, default=None, metavar='INT', help='max images per GPU pass; rest accumulated')
    add('--lr', type=pos_float(None), default=d['lr'], metavar='FLOAT', help='learning rate')
    add('--dropout', type=number(float, 0, 1), default=d['dropout'], metavar='FLOAT', help='dropout probability')
    add('--xflip', type=parse_bool, default=False, metavar='BOOL', help='add x-flipped copies of the dataset')
    add('--fp16', type=parse_bool, default=False, metavar='BOOL', help='fp16 autocast around the network, GradScaler')
    add('--bf16', type=parse_bool, default=False, metavar='BOOL', help='bf16 autocast around the network')
    add('--ls', type=pos_float(1e6), default=1, metavar='FLOAT', help='loss scaling (a constant multiplier, as EDM)')
    add('--tf32', type=parse_bool, default=False, metavar='BOOL', help='allow TF32 matmuls/convolutions')
    add('--compile', type=parse_bool, default=False, metavar='BOOL', help='torch.compile the network (GPU speed)')
    add('--tick', type=pos_float(1e6), default=d['tick'], metavar='KIMG', help='kimg between status lines')
    add('--snap', type=nonneg, default=d['snap'], metavar='TICKS', help='ticks between snapshots; 0 = at the end')
    add('--dump', type=nonneg, default=d['dump'], metavar='TICKS', help='ticks between training states; 0 = at end')
    add('--seed', type=number(int, 0, 2**32 - 1), default=0, metavar='INT', help='random seed')
    add('--resume', default=None, metavar='PT', help='continue a training-state-*.pt; flags left out take its values')
    add('--desc', default=None, metavar='STR', help='appended to the run directory name')
    add('--nosubdir', action='store_true', help='write into --outdir itself, no numbered run directory')
    add('--workers', type=nonneg_int, default=1, metavar='INT', help='DataLoader worker processes per GPU')
    add('-n', '--dry-run', action='store_true', help='print the resolved options as JSON and exit')

def add_edm_train_flags(p, ema=0.5, lr_rampup=10000):
    """EDM's lr ramp-up and EMA half-life (the methods that train with EDM's schedule: all but MaskDM)."""
    p.add_argument('--lr-rampup', type=number(float, 0), default=lr_rampup, metavar='KIMG', help='lr ramp-up, kimg')
    p.add_argument('--ema', type=number(float, 0), default=ema, metavar='MIMG', help='EMA half-life, Mimg')

# Sample quality during training (train --metrics): name -> generated images, seeds 0..N-1. The FIDs are
# StyleGAN2-ADA's metrics of those names (metric_main.py: against the full dataset's statistics), computed as
# `fid.py calc` does; toy_fd is `fid.py score`'s. fid.py evaluates them (`fid.TrainingMetrics`).
TRAINING_METRICS = dict(fid50k_full=50000, fid10k_full=10000, toy_fd=500)

def parse_metric_names(s):
    names = [] if s.strip().lower() in ('', 'none') else [name.strip() for name in s.split(',')]
    unknown = [name for name in names if name not in TRAINING_METRICS]
    if unknown:
        known = ', '.join(TRAINING_METRICS)
        raise argparse.ArgumentTypeError(f'unknown metric {unknown[0]!r}; known: {known}, none')
    return names

def add_metric_flags(p, preprocess='nvidia'):
    """`train --metrics`: evaluated on every network snapshot (see TrainingRun.run_metrics and fid.TrainingMetrics)."""
    add = p.add_argument
    add('--metrics', type=parse_metric_names, default=[], metavar='LIST',
        help=f'sample quality at every snapshot: {", ".join(TRAINING_METRICS)} or none (fid*: against '
             '--metrics-ref; toy_fd: fid.py score against --data, offline)')
    add('--metrics-ref', default=None, metavar='NPZ|URL', help='reference statistics for fid* (fid.py ref)')
    add('--metrics-detector', default=None, metavar='PATH|URL', help='Inception weights for fid* (default: fid.py\'s)')
    add('--metrics-preprocess', choices=['nvidia', 'pytorch_fid'], default=preprocess,
        help='fid* resize/normalization, as fid.py --preprocess')
    add('--metrics-cache', default=None, metavar='DIR', help='toy_fd classifier cache (default: fid.py score\'s)')

def training_metrics(args, resolution, channels, device, sample):
    """The `evaluate` of a TrainingRun for `--metrics` (None without): fid.py's numbers of the images that
    `sample(seeds)` makes (float [-1, 1] [N, C, H, W]; the method's generate, with its defaults). Everything the
    metrics need (reference, detector, toy classifier) is checked and loaded here, before the first step."""
    if not args.metrics:
        return None
    try:
        import fid  # fid.py imports this file: imported when used
    except ImportError:
        raise UsageError('--metrics needs fid.py beside common.py') from None
    metrics = fid.TrainingMetrics(args.metrics, args.data, resolution, channels, device, ref=args.metrics_ref,
                                  detector=args.metrics_detector, preprocess=args.metrics_preprocess,
                                  cache=args.metrics_cache)
    return lambda: metrics(sample)

def pick_snapshot(path, pick, flag):
    """`generate --pick`: for a run directory (or an --outdir: its newest run), its newest snapshot (`latest`) or the
    one with the lowest value of a metric in its metric-<name>.jsonl (`best`: the only metric there; `best:NAME`); a
    file is itself."""
    if not os.path.isdir(path):
        return path
    if pick == 'latest':
        newest = latest_checkpoint(path, 'network-snapshot', flag)
        if os.environ.get('RANK', '0') == '0':  # before the process group exists
            print(f'{flag}={path}: its newest snapshot, {os.path.relpath(newest, path)}', flush=True)
        return newest
    path = os.path.dirname(latest_checkpoint(path, 'network-snapshot', flag))  # --outdir of runs: the newest run
    files = sorted(glob.glob(os.path.join(path, 'metric-*.jsonl')))
    names = [os.path.basename(f)[len('metric-'):-len('.jsonl')] for f in files]
    name = pick.partition(':')[2]
    if not name and len(names) != 1:
        listed = ', '.join(names) or 'none: train with --metrics'
        raise UsageError(f'--pick=best: {path} has {len(names)} metrics ({listed}); say which: --pick=best:NAME')
    name = name or names[0]
    if name not in names:
        raise UsageError(f'--pick={pick}: {path} has no metric-{name}.jsonl (it has: {", ".join(names) or "none"})')
    lines = [json.loads(line) for line in open(os.path.join(path, f'metric-{name}.jsonl')) if line.strip()]
    lines = [line for line in lines if math.isfinite(line['results'][name])
             and os.path.isfile(os.path.join(path, line['snapshot_pkl']))]
    if not lines:
        raise UsageError(f'--pick={pick}: no snapshot in {path} has a finite {name}')
    best = min(lines, key=lambda line: line['results'][name])
    if os.environ.get('RANK', '0') == '0':
        print(f'--pick={pick}: {best["snapshot_pkl"]} ({name} {best["results"][name]:.4g} at kimg {best["kimg"]:g})',
              flush=True)
    return os.path.join(path, best['snapshot_pkl'])

def parse_pick(s):
    if s not in ('latest', 'best') and not s.startswith('best:'):
        raise argparse.ArgumentTypeError(f'expected latest, best or best:NAME; got {s!r}')
    return s

def add_generate_flags(g, edm_sampler=True, steps=18):
    """The generation flags every method file shares (EDM generate.py's names); EDM's sampler flags if it uses it."""
    add, positive, nonneg = g.add_argument, number(float, 0, low_open=True), number(float, 0)
    add('--outdir', required=True, metavar='DIR', help='where to write {seed:06d}.png')
    add('--seeds', type=parse_int_list, default='0-63', metavar='LIST', help='random seeds, e.g. 0-49999')
    add('--subdirs', action='store_true', help='put seeds in folders of 1,000')
    add('--pick', type=parse_pick, default='latest', metavar='latest|best[:NAME]',
        help='for a run directory as --network: its newest snapshot, or the one with the best (lowest) metric')
    add('--batch', type=number(int, 1, 2**20), default=64, metavar='INT', help='images per batch per GPU')
    if edm_sampler:
        add('--steps', type=number(int, 1, 10**5), default=steps, metavar='INT', help='Heun steps (EDM Alg. 2)')
        add('--sigma_min', type=positive, default=0.002, metavar='FLOAT', help='lowest noise level')
        add('--sigma_max', type=positive, default=80, metavar='FLOAT', help='highest noise level')
        add('--rho', type=positive, default=7, metavar='FLOAT', help='time step exponent (EDM Eq. 5)')
        add('--S_churn', type=nonneg, default=0, metavar='FLOAT', help='stochasticity strength (EDM Alg. 2)')
        add('--S_min', type=nonneg, default=0, metavar='FLOAT', help='lowest sigma with churn')
        add('--S_max', type=number(float, 0, inf=True), default=float('inf'), metavar='FLOAT',
            help='highest sigma with churn')
        add('--S_noise', type=nonneg, default=1, metavar='FLOAT', help='churn noise inflation')

#------------------------------------------------------------------------------
# 9. Seeding. Training reseeds at every step from (seed, rank, cur_nimg), so a resumed run replays the same
#    randomness (as EDM2). Generation gives every image its own generator, so image N depends on seed N only.

def reseed(seed, rank, cur_nimg):
    """Seed torch's global RNG for this step; returns a numpy Generator drawn from the same state."""
    state = np.random.SeedSequence([seed, rank, cur_nimg]).generate_state(2)
    torch.manual_seed(int(state[0]))
    return np.random.default_rng(int(state[1]))

class PerSeedRNG:
    """One torch.Generator per image seed; every draw is a stack of per-image draws."""
    def __init__(self, seeds, device):
        self.generators = [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def randn(self, size, **kwargs):
        return torch.stack([torch.randn(size, generator=g, **kwargs) for g in self.generators])

    def randn_like(self, x):
        return self.randn(x.shape[1:], dtype=x.dtype, layout=x.layout, device=x.device)

    def randint(self, high, size=(), **kwargs):
        return torch.stack([torch.randint(high, size, generator=g, **kwargs) for g in self.generators])

#------------------------------------------------------------------------------
# 10. Training plumbing shared by the method files.

def setup_precision(fp16, bf16, tf32, device):
    """Autocast dtype for the backbone (None = fp32) and a GradScaler (enabled for fp16 only)."""
    if fp16 and bf16:
        raise UsageError('--fp16 and --bf16 are exclusive')
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(tf32)
    amp_dtype = torch.float16 if fp16 else torch.bfloat16 if bf16 else None
    return amp_dtype, torch.amp.GradScaler(device.type, enabled=bool(fp16))

def split_batch(batch, batch_gpu, world_size):
    """Global batch -> (micro-batch per GPU, accumulation rounds); batch = batch_gpu * rounds * world_size."""
    per_gpu = batch // world_size
    batch_gpu = min(batch_gpu or per_gpu, per_gpu)
    rounds = per_gpu // max(batch_gpu, 1)
    if batch_gpu < 1 or batch != batch_gpu * rounds * world_size:
        raise UsageError(f'--batch={batch} must be a multiple of {world_size} GPUs x --batch-gpu ({batch_gpu})')
    return batch_gpu, rounds

def check_memory(nbytes, what, device=None):
    """Refuse, before anything is written, work that needs `nbytes` bytes on `device` (None: this process's GPU, set
    by init_distributed, else the CPU): more than the GPU's memory or this machine's RAM. No check where the OS does
    not say (no os.sysconf: Windows)."""
    if device is None:
        cuda = torch.cuda.is_available()
        device = torch.device('cuda', torch.cuda.current_device()) if cuda else torch.device('cpu')
    if device.type == 'cuda':
        have, where = torch.cuda.get_device_properties(device).total_memory, str(device)
    elif hasattr(os, 'sysconf') and 'SC_PHYS_PAGES' in os.sysconf_names:
        have, where = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'), 'this machine'
    else:
        return
    if nbytes > have:
        raise UsageError(f'{what}: {nbytes / 2**30:,.1f} GiB of memory needed, {where} has {have / 2**30:,.1f} GiB')

def distributed_model(net, device, compile=False, **ddp_kwargs):
    """DDP around the network (one process too), torch.compile'd if asked; checkpoints save `net`: plain names."""
    ddp = DDP(net, device_ids=[device] if device.type == 'cuda' else None, **ddp_kwargs)
    return torch.compile(ddp) if compile else ddp

def sync_if(ddp, sync):
    """DDP all-reduces gradients only on the last accumulation round."""
    return contextlib.nullcontext() if sync else ddp.no_sync()

def learning_rate(lr, cur_nimg, rampup_kimg=10000):
    """Linear lr ramp-up over `rampup_kimg` thousand images (EDM training_loop's lr_rampup_kimg); 0 = none."""
    return lr * min(cur_nimg / (rampup_kimg * 1000), 1) if rampup_kimg > 0 else lr

def ema_beta(cur_nimg, batch_size, ema_halflife_kimg=500, ema_rampup_ratio=0.05):
    """Per-step EMA decay for a half-life in images, with EDM's ramp-up: the half-life is at most
    ema_rampup_ratio * cur_nimg (so the first step copies the weights)."""
    ema_nimg = min(ema_halflife_kimg * 1000, cur_nimg * ema_rampup_ratio)
    return 0.5 ** (batch_size / max(ema_nimg, 1e-8))

@torch.no_grad()
def update_ema(ema, net, beta):
    for p_ema, p_net in zip(ema.parameters(), net.parameters()):
        p_ema.copy_(p_net.detach().lerp(p_ema, beta))

def optimizer_step(optimizer, scaler, lr):
    """Set the lr and step. Without a GradScaler non-finite gradients are scrubbed first (NaN -> 0, +-inf -> +-1e5,
    as EDM); with one, the scaler skips steps whose gradients overflowed."""
    for group in optimizer.param_groups:
        group['lr'] = lr
    if scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
    else:
        for group in optimizer.param_groups:
            for p in group['params']:
                if p.grad is not None:
                    torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        optimizer.step()

def network_and_ema(net, device, amp_dtype):
    """The network to train, on `device` with its autocast dtype, and its EMA copy (EDM training_loop)."""
    net = net.to(device).train().requires_grad_(True)
    net.amp_dtype = amp_dtype
    return net, copy.deepcopy(net).eval().requires_grad_(False)

def print_options(args, info):
    """`--dry-run`: the resolved options and what setup resolved, as JSON, and the parameter count."""
    print0(json.dumps(dict(vars(args), **info), indent=2))
    if 'num_params' in info:
        print0(f'{info["num_params"]:,} parameters')

def run_desc(*parts, world_size, batch, fp16=False, bf16=False, desc=None):
    """The run directory's name after its number (EDM): `<parts>-gpus<N>-batch<B>-<dtype>[-<desc>]`."""
    dtype = 'fp16' if fp16 else 'bf16' if bf16 else 'fp32'
    return '-'.join([*map(str, parts), f'gpus{world_size}', f'batch{batch}', dtype] + ([desc] if desc else []))

def check_outdir(path, flag='--outdir'):
    """A folder we may create or write into: the flag's one-line error otherwise, before anything is written."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f'{flag}={path}: exists and is not a folder')
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f'{flag}={path}: cannot write there ({parent} is not a writable folder)')

def _all_finite(obj):
    """True if every floating-point tensor in a (nested) dict or list is finite."""
    if isinstance(obj, (dict, list, tuple)):
        return all(_all_finite(v) for v in (obj.values() if isinstance(obj, dict) else obj))
    return not (torch.is_tensor(obj) and obj.is_floating_point()) or bool(torch.isfinite(obj).all())

class TrainingRun:
    """One training run, the part every method's loop shares (EDM training_loop). Made after all setup, it resumes
    the objects of `state` (modules, optimizers, scaler) from `resume`, then makes the run directory with
    training_options.json (`flags`, the command line's options, and `info`, what setup resolved) and log.txt. In the
    loop: `run.data(...)` gives the micro-batches, `run.add('loss', loss)` accumulates tick means, `run.end_step(nimg)`
    counts the step's images and, at the end of each tick (the first after one step, then every `tick` kimg), prints
    the status line (also in stats.jsonl), stops on a non-finite mean, writes network snapshots every `snap` ticks
    (`snapshot()`: the method's snapshot content; `grid(path)` a sample grid beside it) and training states every
    `dump` ticks. Ctrl-C ends the step, writes a training state and stops; so does an unreadable image (before its
    step changes any weight); a full disk names the last good state."""
    def __init__(self, method, flags, info, device, *, outdir, desc, nosubdir, resume, total_nimg, tick, snap, dump,
                 state, snapshot, grid=None, evaluate=None):
        self.method, self.flags, self.device, self.total_nimg, self.tick_kimg = method, flags, device, total_nimg, tick
        self.snap, self.dump, self.objects, self.snapshot, self.grid = snap, dump, state, snapshot, grid
        self.evaluate, self.best, self.eval_time = evaluate, {}, 0.0
        self.cur_nimg = self.step = self.data_pos = self.pending_pos = self.tick = self.tick_start_nimg = 0
        self.last_state, self.log, self.interrupted, self.data_failed = resume, None, False, False
        if resume:
            loaded = load_training_state(resume, get_rank(), get_world_size(), **state)
            self.cur_nimg, self.step, self.data_pos = loaded['cur_nimg'], loaded['step'], loaded['data_pos']
            # Ticks, snapshots and states stay on the uninterrupted run's grid (states before this one: a new tick).
            self.tick = loaded.get('tick', 1)
            self.tick_start_nimg = loaded.get('tick_start_nimg', self.cur_nimg)
        check_outdir(outdir)
        path = [outdir]  # `<outdir>/<5-digit id>-<desc>` (EDM), made by rank 0; every rank gets the path
        if get_rank() == 0:
            if not nosubdir:
                names = os.listdir(outdir) if os.path.isdir(outdir) else []
                ids = [int(m[1]) for m in (re.match(r'(\d+)-', name) for name in names) if m]
                path[0] = os.path.join(outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')
            os.makedirs(path[0], exist_ok=True)
        dist.broadcast_object_list(path)
        self.dir = path[0]
        if get_rank() == 0:
            for folder in {self.dir, os.path.dirname(os.path.abspath(resume or self.dir))}:
                remove_stale_temp_files(folder)
            self.log, self.stdout = open(os.path.join(self.dir, 'log.txt'), 'a'), sys.stdout
            sys.stdout = self  # tee: what rank 0 prints goes to the terminal and to log.txt (write, flush below)
            with open(os.path.join(self.dir, 'training_options.json'), 'w') as f:
                json.dump(dict(flags, **info), f, indent=2)
        if resume:  # marked in log.txt and stats.jsonl, which a resume in the same folder continues
            print0(f'resumed from {resume} at kimg {self.cur_nimg / 1000:g}, step {self.step}; options not given on '
                   'the command line are the training state\'s')
            self._write_stats(dict(resumed_from=resume, kimg=self.cur_nimg / 1000, step=self.step))
            self.best = resume_metric_history(self.dir, self.cur_nimg) if get_rank() == 0 else {}
        self.sums = {}
        self.start_time = self.tick_start_time = self.tick_end_time = self.last_print = time.time()

    def __enter__(self):
        self.previous_handler = signal.getsignal(signal.SIGINT)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._on_interrupt)
        return self

    def _on_interrupt(self, *_):
        """First Ctrl-C: finish the step, save, stop. A second one stops at once (as Python's default)."""
        self.interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print0('\ninterrupt: finishing this step, then writing a training state (Ctrl-C again to stop at once)')

    def __exit__(self, exc_type, exc, tb):
        if isinstance(exc, (UserError, OSError)):
            exc.while_working = True  # exit code 1
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self.previous_handler)
        if self.data_failed and get_world_size() == 1:  # nothing lost: the weights are those of the last whole step
            path = self.save('training-state', self.full_state())
            exc.args = (f'{exc.args[0] if exc.args else exc}; training state at kimg {self.cur_nimg / 1000:g} '
                        f'written: {os.path.basename(path)}; to continue: {resume_command(self.method, self.dir)}',)
        if self.log:
            if exc is not None:
                self.log.write(f'error: {exc}\n')  # the terminal gets it from run_main
            sys.stdout = self.stdout
            self.log.close()

    def write(self, text):
        self.log.write(text)
        self.stdout.write(text)

    def flush(self):
        self.log.flush()
        self.stdout.flush()

    def data(self, dataset, batch_gpu, seed, workers):
        """Endless (uint8 images, labels) micro-batches of this rank, from the run's data position on. The DataLoader
        is made now, not at the first batch: it draws its base seed from torch's RNG when made."""
        stream = data_stream(dataset, batch_gpu, get_rank(), get_world_size(), seed, self.data_pos, workers)

        def batches():
            while True:
                try:
                    batch = next(stream)
                except UserError:
                    self.data_failed = True
                    raise
                self.pending_pos += len(batch[0])
                yield batch
        return batches()

    def add(self, name, value):
        """Accumulate a tensor (e.g. per-sample losses) for this tick's mean, on the device: no host sync."""
        total, n = self.sums.get(name, (0, 0))
        self.sums[name] = (total + value.detach().float().sum(), n + value.numel())

    @property
    def done(self):
        return self.cur_nimg >= self.total_nimg

    def end_step(self, nimg):
        """Count a finished optimizer step of `nimg` images (all ranks); ends the tick when it is due."""
        self.cur_nimg, self.step = self.cur_nimg + int(nimg), self.step + 1
        self.data_pos, self.pending_pos = self.data_pos + self.pending_pos, 0
        if self.done or self.tick == 0 or self.cur_nimg >= self.tick_start_nimg + self.tick_kimg * 1000:
            self.end_tick()
        elif time.time() - self.last_print > 60:  # a long tick on a CPU: show that it is moving
            self.last_print = time.time()
            print0(f'  ... kimg {self.cur_nimg / 1000:<8g} step {self.step}')
        if self.interrupted and get_world_size() == 1 and not self.done:
            self._stop()

    def _stop(self):
        """After Ctrl-C: write a training state and stop."""
        self.save('training-state', self.full_state())
        print0(f'stopped at kimg {self.cur_nimg / 1000:g}; to continue: {resume_command(self.method, self.dir)}')
        raise KeyboardInterrupt

    def full_state(self):
        positions = [None] * get_world_size()
        dist.all_gather_object(positions, self.data_pos)
        return dict(self.snapshot_content(), step=self.step, tick=self.tick, tick_start_nimg=self.tick_start_nimg,
                    data_pos=positions, **{name: obj.state_dict() for name, obj in self.objects.items()})

    def snapshot_content(self):
        return dict(method=self.method, args=self.flags, cur_nimg=self.cur_nimg, **self.snapshot())

    def end_tick(self):
        """Status line, divergence check, checkpoints and metrics, barrier; all ranks call it. The metrics' time is
        part of the next tick's 'maintenance', not of its sec/kimg, nor of the training time."""
        tick, means, fields = self.tick, *self.tick_fields()
        bad = [name for name, value in means.items() if not math.isfinite(value)]
        if bad:
            self._print_status(fields)
            raise UserError(f'training diverged: mean {bad[0]} is {means[bad[0]]} in tick {tick} (kimg '
                            f'{self.cur_nimg / 1000:g}); stopped without saving. Last good training state: '
                            f'{self.last_state or "none"}')
        if self.done or (tick > 0 and self.snap and tick % self.snap == 0):
            path = self.save('network-snapshot', self.snapshot_content())
            if self.grid and get_rank() == 0:
                self.grid(path.replace('network-snapshot', 'samples')[:-3] + '.png')
            if self.evaluate:
                fields |= self.run_metrics(os.path.basename(path))
        self._print_status(fields)
        if self.done or (tick > 0 and self.dump and tick % self.dump == 0):
            self.last_state = self.save('training-state', self.full_state())
        if get_world_size() > 1:  # Ctrl-C under torchrun: every rank agrees at the tick's end
            flag = torch.tensor([float(self.interrupted)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and not self.done:
                self._stop()
        dist.barrier()
        self.tick_start_time = self.last_print = time.time()  # the time since the status line: 'maintenance'

    def run_metrics(self, snapshot_name):
        """Evaluate the metrics on the snapshot just written (all ranks); one line each in metric-<name>.jsonl
        (StyleGAN's layout), the best so far in log.txt. Returns the values for the status line."""
        start = time.time()
        results = self.evaluate()
        seconds = time.time() - start
        self.eval_time += seconds
        for name, value in results.items():
            best = self.best.get(name)
            if math.isfinite(value) and (best is None or value < best[0]):
                self.best[name] = best = (value, snapshot_name)
            if get_rank() == 0:
                line = dict(results={name: value}, metric=name, total_time=seconds, total_time_str=f'{seconds:.0f}s',
                            num_gpus=get_world_size(), snapshot_pkl=snapshot_name, kimg=self.cur_nimg / 1000,
                            timestamp=time.time())
                with open(os.path.join(self.dir, f'metric-{name}.jsonl'), 'a') as f:
                    f.write(json.dumps(line) + '\n')
                if best:
                    print0(f'  {name} {value:.4g} ({seconds:.1f} s); best so far {best[0]:.4g} at {best[1]}')
        return results

    def save(self, kind, data):
        """`<kind>-<kimg:06d>.pt` (EDM); a save in the first kimg, or a second one in the same kimg (--tick under 1,
        the last tick), appends `_<rest of the image count>` (no overwrites, no trained network named 000000; names
        sort in training order). Non-finite weights stop the run; so does a failed write, with one line naming the
        file, the free space and the last good training state."""
        if not _all_finite(data):
            raise UserError(f'training diverged: non-finite weights at kimg {self.cur_nimg / 1000:g}; {kind} not '
                            f'saved. Last good training state: {self.last_state or "none"}')
        path = os.path.join(self.dir, f'{kind}-{self.cur_nimg // 1000:06d}.pt')
        if 0 < self.cur_nimg < 1000 or (get_rank() == 0 and os.path.exists(path) and self.cur_nimg % 1000):
            path = path[:-3] + f'_{self.cur_nimg % 1000:03d}.pt'
        if get_rank() == 0:
            try:
                save_checkpoint(data, path)
            except OSError as e:
                raise UserError(f'cannot write {path} ({e.strerror}; {shutil.disk_usage(self.dir).free / 2**20:.1f} '
                                f'MiB free there). Last good training state: {self.last_state or "none"}') from None
        return path

    def _write_stats(self, fields):
        if get_rank() == 0:
            with open(os.path.join(self.dir, 'stats.jsonl'), 'a') as f:
                f.write(json.dumps(dict(fields, timestamp=time.time())) + '\n')

    def tick_fields(self):
        """The means (all-reduced over ranks) and the status fields of the tick that just ended; starts the next."""
        now, means, cur_nimg, dev = time.time(), {}, self.cur_nimg, self.device
        for name, (total, n) in sorted(self.sums.items()):
            t = torch.stack([torch.as_tensor(total, device=dev).float(), torch.tensor(float(n), device=dev)])
            dist.all_reduce(t)
            means[name] = (t[0] / t[1]).item()
        kimg_done, tick_time = max(cur_nimg - self.tick_start_nimg, 1) / 1000, now - self.tick_start_time
        fields = dict(tick=self.tick, kimg=cur_nimg / 1000, time=now - self.start_time - self.eval_time, **means, **{
            'sec/tick': tick_time, 'sec/kimg': tick_time / kimg_done, 'img/s': kimg_done * 1000 / max(tick_time, 1e-9),
            'maintenance': self.tick_start_time - self.tick_end_time,
            'cpumem': peak_cpu_memory_gib(),
            'gpumem': torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == 'cuda' else 0}, step=self.step)
        if self.device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(self.device)
        self.tick, self.tick_start_nimg, self.sums, self.tick_end_time = self.tick + 1, cur_nimg, {}, now
        return means, fields

    def _print_status(self, fields):
        print0('  '.join(f'{k} {v:<8.4g}' if isinstance(v, float) else f'{k} {v:<5}' for k, v in fields.items()))
        self._write_stats(fields)

def peak_cpu_memory_gib():
    """Peak resident memory of this process (0 where the OS does not say: `resource` is Unix-only)."""
    try:
        import resource
    except ImportError:
        return 0.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

def resume_command(method, run_dir):
    """The command line that continues the run in `run_dir` (torchrun's, under torchrun)."""
    world = get_world_size()
    launcher = f'torchrun --standalone --nproc_per_node={world}' if world > 1 else 'python'
    return f'{launcher} {method}.py train --resume={shlex.quote(run_dir)}'

def resume_metric_history(run_dir, cur_nimg):
    """On resume: drop metric lines of snapshots after the resumed state (the run evaluates them again) and return
    the best value of each metric so far, {name: (value, snapshot file name)}."""
    best = {}
    for path in sorted(glob.glob(os.path.join(run_dir, 'metric-*.jsonl'))):
        lines = [json.loads(line) for line in open(path) if line.strip()]
        kept = [line for line in lines if line.get('kimg', 0) * 1000 <= cur_nimg + 1e-6]
        if len(kept) < len(lines):
            with open(path, 'w') as f:
                f.writelines(json.dumps(line) + '\n' for line in kept)
        for line in kept:
            value = line['results'][line['metric']]
            if math.isfinite(value) and (line['metric'] not in best or value < best[line['metric']][0]):
                best[line['metric']] = (value, line['snapshot_pkl'])
    return best

def read_training_options(path):
    """The method and the options a training state was written with (its 'args'), read without loading its
    tensors."""
    if not os.path.isfile(path):
        raise UserError(f'{path}: no such training state')
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            state = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception:
        state = load_checkpoint(path)  # its one-line error
    if not isinstance(state, dict) or 'method' not in state or not isinstance(state.get('args'), dict):
        raise UserError(f'{path}: not a training state of this project; --resume takes a training-state-*.pt')
    if 'ema' in state and not any(k.startswith('optimizer') for k in state):
        raise UserError(f'{path}: a {state["method"]}.py network snapshot, not a training state; --resume takes a '
                        'training-state-*.pt')
    return state['method'], state['args']

def load_training_state(path, rank, world_size, **objects):
    """Resume: load `path` (a training state of this method: parse_command_line checked it with
    read_training_options) into the named objects (modules, optimizers, scaler: anything with load_state_dict).
    Returns the state, with `data_pos` this rank's data position."""
    state = load_checkpoint(path)
    missing = [name for name in objects if name not in state]
    if missing:
        raise UserError(f'{path}: training state without {", ".join(missing)}')
    for name, obj in objects.items():
        if isinstance(obj, torch.nn.Module):
            load_weights(obj, state[name], f'{path} ({name})')
            continue
        try:
            obj.load_state_dict(state[name])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f'{path}: its {name} state does not fit this run ({str(e).splitlines()[0]})') from None
    positions = state['data_pos']
    if len(positions) != world_size:
        print0(f'warning: {path} was written by {len(positions)} processes, not {world_size}: '
               'the data order will differ from the uninterrupted run')
    return dict(state, data_pos=positions[rank % len(positions)])

#------------------------------------------------------------------------------
# 11. Checkpoints: plain dicts of tensors, numbers and strings; written to a temp file and renamed, so a kill
#    never leaves a truncated file; always read with weights_only=True (no code runs).

def save_checkpoint(obj, path):
    """Written to a hidden `.<name>.tmp<pid>` beside `path`, then renamed: no glob of checkpoints matches it. A
    failed write (full disk: torch reports it as RuntimeError) removes the temp file and raises OSError."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f'.{name}.tmp{os.getpid()}')
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        full = shutil.disk_usage(folder or '.').free < 2**20
        with contextlib.suppress(OSError):
            os.remove(tmp)
        reason = 'no space left on device' if full else getattr(e, 'strerror', None) or str(e).splitlines()[0]
        raise OSError(errno.ENOSPC if full else getattr(e, 'errno', None), reason, path) from None

def remove_stale_temp_files(folder):
    """Delete temp files that killed runs left behind (their process is gone). Not on Windows, where signal 0 is
    CTRL_C_EVENT rather than a question."""
    if os.name == 'nt':
        return
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        m = re.fullmatch(r'\..+\.tmp(\d+)', name)
        if m:
            try:
                os.kill(int(m[1]), 0)  # signal 0 only asks whether the process exists
            except ProcessLookupError:
                os.remove(os.path.join(folder, name))
            except PermissionError:  # it does, under another user
                pass

def load_checkpoint(path):
    if not os.path.isfile(path):
        raise UsageError(f'{path}: no such checkpoint')
    try:
        with warnings.catch_warnings():  # torch's notes on old pickle protocols would precede our one line
            warnings.simplefilter('ignore')
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch's message would advise weights_only=False, which runs code from the file
        first = 'not a torch.save file, or truncated'
        if zipfile.is_zipfile(path) and ('weights_only' in str(e) or 'Unsupported global' in str(e)):
            first = 'it holds Python objects other than tensors and plain containers'
        raise UserError(f'{path}: not a checkpoint of this project ({first})') from None

def load_weights(module, state_dict, where):
    """module.load_state_dict(state_dict) with one line naming the first mismatch (missing or extra names, shapes)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    extra = [k for k in state_dict if k not in own]
    shapes = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or extra or shapes:
        k = shapes[0] if shapes else None
        first = (f'{k} is {tuple(state_dict[k].shape)} there, {tuple(own[k].shape)} here' if shapes
                 else f'{missing[0]} is missing' if missing else f'{extra[0]} is not in this network')
        raise UserError(f'{where}: weights of another architecture: {first} ({len(shapes)} shapes differ, '
                        f'{len(missing)} missing, {len(extra)} extra); use the flags or preset it was trained with')
    module.load_state_dict(state_dict)

def download(url, flag):
    """Local path for a URL: downloaded once into torch's hub cache ($TORCH_HOME/hub/checkpoints), then reused."""
    dest = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(urllib.parse.urlparse(url).path))
    if not os.path.isfile(dest):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, dest, progress=True)
        except OSError as e:  # includes urllib.error.URLError: no network, DNS failure, HTTP error
            raise UserError(f'Could not download {url} ({e}). Download it on a machine with network access and '
                f'pass the local file with {flag}=PATH, or copy it to {dest}.') from e
    return dest

# Official checkpoints (see load_official). _Stub: an inert stand-in for a class or object of the official code base;
# it keeps only what was pickled.
class _Stub:
    name, args, state = None, (), None

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

# Replaces torch_utils.persistence._reconstruct_persistent_obj, which would exec the class source in the pickle.
def _persistent_obj(meta):
    obj = _Stub()
    obj.name, obj.state = meta.get('class_name'), meta.get('state')
    return obj

def _expect(obj, kind, what):
    if not isinstance(obj, kind):
        raise pickle.UnpicklingError(f'{what} built from a {type(obj).__name__}')
    return obj

def _tensor(storage, offset, size, stride, *unused):
    _expect(storage, (torch.storage.TypedStorage, torch.UntypedStorage), 'tensor')
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())

# The only globals that resolve to callables: tensor/storage rebuilders and plain containers. Other classes of
# the official code (and torch.nn containers such as ModuleDict) become _Stubs; anything else is refused.
_SAFE_GLOBALS = {
    ('torch._utils', '_rebuild_tensor_v2'): _tensor,
    ('torch._utils', '_rebuild_parameter'): lambda data, *unused: _expect(data, torch.Tensor, 'parameter'),
    ('torch._utils', '_rebuild_parameter_with_state'): lambda data, *unused: _expect(data, torch.Tensor, 'parameter'),
    ('torch.storage', '_load_from_bytes'): lambda data: torch.load(io.BytesIO(data), map_location='cpu',
                                                                   weights_only=True),
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _persistent_obj,
    ('collections', 'OrderedDict'): OrderedDict, ('builtins', 'set'): set, ('numpy', 'dtype'): np.dtype,
    ('dnnlib.util', 'EasyDict'): dict, ('dnnlib', 'EasyDict'): dict,
    ('numpy.core.multiarray', 'scalar'): lambda dtype, data: np.frombuffer(data, dtype=dtype)[0].item(),
    ('numpy._core.multiarray', 'scalar'): lambda dtype, data: np.frombuffer(data, dtype=dtype)[0].item(),
}

class SnapshotUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[module, name]
        if (module + '.').startswith(('dnnlib.', 'torch_utils.', 'training.', 'torch.nn.modules.')):
            return type(name, (_Stub,), dict(name=f'{module}.{name}'))
        raise pickle.UnpicklingError(f'refusing global {module}.{name} (only tensors and containers are loaded)')

# Module tree of stubs -> flat state dict with the official names ('model.enc.32x32_conv.weight').
def _flatten(obj, prefix, out):
    state = getattr(obj, 'state', None)
    if not isinstance(state, dict) or '_parameters' not in state:
        raise ValueError(f'{prefix or "ema"!r} is not a pickled torch module')
    transient = state.get('_non_persistent_buffers_set') or set()
    for name, t in list(state['_parameters'].items()) + list(state.get('_buffers', {}).items()):
        if t is not None and name not in transient:
            out[prefix + name] = t
    for name, child in state.get('_modules', {}).items():
        if child is not None:
            _flatten(child, f'{prefix}{name}.', out)
    return out

def _plain(value, key):
    if isinstance(value, dict):
        return {k: _plain(v, f'{key}.{k}') for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, key) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f'constructor argument {key} is a {type(value).__name__}, not a plain value')

def official_network(data):
    """What load_official returns, from the unpickled snapshot dict (its 'ema' a tree of stubs)."""
    if not isinstance(data, dict) or not isinstance(data.get('ema'), _Stub):
        raise ValueError("not an EDM network snapshot (expected a dict whose 'ema' is a pickled network)")
    ema = data['ema']
    kwargs = _plain(ema.state.get('_init_kwargs') or {}, 'init_kwargs')
    kwargs.pop('use_fp16', None)
    model = ema.state.get('_modules', {}).get('model')                      # None: a bare backbone, no preconditioner
    if model is not None:
        kwargs.setdefault('model_type', model.name)
    return dict(class_name=(ema if model is None else model).name, precond=None if model is None else ema.name,
                init_kwargs=kwargs, state_dict=_flatten(ema, '', {}))

def load_official(path_or_url, flag='--network'):
    """An official network, read without its source tree and without running code from the file: an EDM-format .pkl
    snapshot (EDM, Patch Diffusion, GDD; path or URL). relay_diffusion.py reads RDM's torch.save archives with the
    same unpickler.
    Returns dict(class_name: the backbone, precond: its preconditioner or None, init_kwargs: the constructor's, with
    model_type, without use_fp16, state_dict: the EMA weights, 'model.enc.32x32_conv.weight'); EDMPrecond(**init_kwargs)
    loads the state_dict."""
    path = download(path_or_url, flag) if '://' in str(path_or_url) else path_or_url
    if not os.path.isfile(path):
        raise UsageError(f'{flag}={path}: no such file')
    try:
        if zipfile.is_zipfile(path):
            raise ValueError('a torch.save archive, not an EDM-format pickle')
        with open(path, 'rb') as f:
            return official_network(SnapshotUnpickler(f).load())
    except Exception as e:
        raise UsageError(f'{flag}={path}: cannot load it as an official network ({e})') from e

def is_official(path):
    """An official pickle (.pkl, or a URL) rather than one of our snapshots."""
    return str(path).endswith('.pkl') or '://' in str(path)

def latest_checkpoint(path, kind, flag):
    """`path` itself, or for a folder (a run directory, or the --outdir of several) its newest `<kind>-*.pt`."""
    if os.path.isdir(path):
        found = glob.glob(os.path.join(path, f'{kind}-*.pt')) or glob.glob(os.path.join(path, '*', f'{kind}-*.pt'))
        if not found:
            raise UsageError(f'{flag}={path}: a folder without {kind}-*.pt files (in it or one level down)')
        return max(found, key=os.path.getmtime)
    if not os.path.isfile(path):
        raise UsageError(f'{flag}={path}: no such file')
    return path

def load_snapshot(path, flag, methods):
    """A network snapshot or training state written by one of `methods` (file names), in the one layout of this
    project: {method, precond (the network's class; older files lack it), net_kwargs (its constructor arguments),
    ema (its weights), args (the training flags), cur_nimg} plus what the method's generation needs; a training
    state adds the training objects (net, optimizer, ...), step, tick and data_pos."""
    path = latest_checkpoint(path, 'network-snapshot', flag)
    ckpt = load_checkpoint(path)  # UserError if unreadable: a caller may try the official formats next
    method = ckpt.get('method') if isinstance(ckpt, dict) else None
    if method not in methods:
        what = f'a {method}.py checkpoint' if method else 'not a checkpoint of this project'
        expected = ' or '.join(m + '.py' for m in methods)
        raise UsageError(f'{flag}={path}: {what}; expected a network snapshot of {expected}')
    if 'ema' not in ckpt or 'net_kwargs' not in ckpt:
        raise UsageError(f'{flag}={path}: a {method}.py checkpoint without a network (no "ema"/"net_kwargs")')
    if not _all_finite(ckpt['ema']):
        raise UsageError(f'{flag}={path}: its weights hold NaN or inf (a diverged run); use an earlier snapshot')
    return ckpt

