"""Patch Diffusion: Faster and More Data-Efficient Training of Diffusion Models.

Wang, Jiang, Zheng, Wang, He, Wang, Chen, Zhou, NeurIPS 2023, arXiv:2304.12526v2.
Official code: https://github.com/Zhendong-Wang/Patch-Diffusion (an EDM fork; nothing here is
copied from it).

The denoiser is trained on random square crops ("patches") of the training images. Each crop
carries two extra input channels with the (x, y) position of its pixels in the full image, in
[-1, 1]. The crop size is drawn from {R/4, R/2, R}; with probability `real_p` it is the full
image, and smaller crops come with a proportionally larger batch. The loss is EDM's loss on the
crop. Sampling is plain EDM sampling of a full-size canvas with the full coordinate grid attached
at every network call. `--real_p=1` is plain EDM training (our baseline). The 256x256 models
(LSUN, ImageNet) run on Stable Diffusion VAE latents (4x32x32, patch sizes {R/2, R}).

Implemented: pixel-space training (DDPM++, NCSN++, ADM backbones), the stochastic and progressive
patch-size schedules, classifier-free guidance (label dropout in training, `--cfg` in sampling),
larger sampling canvases (coordinate extrapolation), EDM's augmentation pipe, latent-space training
and sampling with the SD VAE written in plain torch (sd-vae-ft-ema weights from a local file or
URL; `encode` pre-encodes a dataset once).

  # train DDPM++ on CelebA-64 with 8 GPUs (the official README's command)
  torchrun --standalone --nproc_per_node=8 patch_diffusion.py train --outdir=training-runs \\
      --data=datasets/celeba-64x64.zip --cond=0 --arch=ddpmpp --batch=256 --cres=1,2,2,2 \\
      --lr=2e-4 --dropout=0.05 --augment=0 --real_p=0.5
  # 50k images for FID, 50 Heun steps as in the paper
  torchrun --standalone --nproc_per_node=8 patch_diffusion.py generate --steps=50 \\
      --resolution=64 --batch=64 --outdir=fid-tmp --seeds=0-49999 --subdirs \\
      --network=training-runs/00000-*/network-snapshot-200000.pt
  torchrun --standalone --nproc_per_node=8 fid.py calc --images=fid-tmp \\
      --ref=fid-refs/celeba-64x64.npz
  # latent ADM on LSUN-Bedroom-256 (official README), then 256 stochastic steps decoded by the VAE
  torchrun --standalone --nproc_per_node=8 patch_diffusion.py train --outdir=training-runs \\
      --data=datasets/lsun-bedroom-256x256.zip --cond=0 --arch=adm --train_on_latents=1 \\
      --duration=200 --batch-gpu=32 --batch=1024 --lr=1e-4 --ema=50 --dropout=0.10 --fp16=1 \\
      --ls=100 --augment=0 --real_p=0.5
  torchrun --standalone --nproc_per_node=8 patch_diffusion.py generate --steps=256 \\
      --S_churn=40 --S_min=0.05 --S_max=50 --S_noise=1.003 --on_latents=1 --batch=64 \\
      --outdir=fid-tmp --seeds=0-49999 --subdirs --network=...
"""

import argparse
import contextlib
import json
import os
import re
import struct
import types
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from common import (AugmentPipe, EDMLoss, EDMPrecond, Parser, PerSeedRNG, TrainingRun, UsageError,
                    UserError, add_edm_train_flags, add_generate_flags, add_metric_flags,
                    add_train_flags, check_class, check_memory, check_outdir, distributed_model,
                    download, edm_backbone_kwargs, edm_sampler, ema_beta, get_rank, get_world_size,
                    init_distributed, is_official, learning_rate, load_official, load_snapshot,
                    load_weights, network_and_ema, number, open_dataset, optimizer_step, parse_bool,
                    parse_command_line, parse_int_list, print0, print_options, reseed, run_desc,
                    run_main, save_image_grid, save_seed_images, seed_batches, seed_labels,
                    setup_precision, split_batch, sync_if, training_metrics, update_ema, working)

#------------------------------------------------------------------------------
# 1. Config. Presets hold the published hyperparameters; flags on the command line override them.
#    The backbones are EDM's (common.EDM_ARCHS: --arch=ddpmpp, ncsnpp, adm, as EDM's train.py).

# Official README, "Train DDPM++ model for CelebA-64x64 using 8 GPUs"; the paper: 200 Mimg.
CELEBA64 = dict(arch='ddpmpp', cres=[1, 2, 2, 2], batch=256, lr=2e-4, dropout=0.05, augment=0,
                real_p=0.5, duration=200)

PRESETS = {
    'celeba64': CELEBA64,
    # NOTE: the paper gives no FFHQ/AFHQv2 command lines; we use the CelebA recipe, 75 Mimg for
    # AFHQv2 (the paper's small-data runs).
    'ffhq64':   CELEBA64,
    'afhqv264': CELEBA64 | dict(duration=75),
    # Ours, about 8 CPU-minutes (one thread): the built-in 8x8 shapes, a 1.5M-parameter DDPM++,
    # ~3,100 steps; long enough that the samples show the two-tone background and the shape
    # (docs/patch_diffusion.md, CPU demo).
    'demo':     dict(data='demo-8', arch='ddpmpp', cbase=32, cres=[1, 2], batch=32, lr=2e-3,
                     lr_rampup=1, ema=0.005, dropout=0, duration=0.19, real_p=0.5,
                     tick=20, snap=2, dump=5, workers=0),
}

# --augment: EDM train.py's geometric set (every paper config trains without it)
AUGMENT = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)

#------------------------------------------------------------------------------
# 2. Backbone: EDM's U-Net with two more input channels; the preconditioner appends the coordinates.

class PatchPrecond(EDMPrecond):
    """EDM preconditioning with coordinate channels (paper: method, coordinate channels; official
    `Patch_EDMPrecond`): D(x; sigma, pos) = c_skip x + c_out F(cat[c_in x, pos]; c_noise). pos is
    clean and unscaled at every sigma."""
    def __init__(self, img_resolution, img_channels, label_dim=0, **kwargs):
        # NOTE: upstream stores img_channels = C + 2 (the network input); we keep img_channels = C
        # (what the sampler draws) and give the network in_channels = C + 2, out_channels = C.
        super().__init__(img_resolution, img_channels, label_dim,
                         in_channels=img_channels + 2, **kwargs)

    def forward(self, x, sigma, pos, class_labels=None, augment_labels=None):
        x, sigma, class_labels = self.prepare(x, sigma, class_labels)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        pos = pos.to(torch.float32).expand(x.shape[0], -1, -1, -1)
        x_in = torch.cat([c_in * x, pos], dim=1)  # [N, C + 2, s, s]: image, x, y
        F_x = self.backbone(x_in, c_noise, class_labels, augment_labels)
        return c_skip * x + c_out * F_x  # EDM Eq. 7 on the patch

def precond_class(real_p):
    """PatchPrecond; with real_p = 1 (every crop the full image) EDMPrecond. NOTE: upstream still
    feeds the (constant) full-image coordinates there; we drop them so that the baseline is exactly
    EDM (a 3-channel net)."""
    return 'EDMPrecond' if real_p == 1 else 'PatchPrecond'

def network_kwargs(args, resolution, channels, label_dim):
    """Preconditioner kwargs from the CLI flags (EDM train.py's mapping)."""
    model = edm_backbone_kwargs(args.arch, args.cbase, args.cres)  # the backbone F's arguments
    model.update(dropout=args.dropout, label_dropout=args.label_dropout)
    model.update(augment_dim=9 if args.augment else 0)
    return dict(img_resolution=resolution, img_channels=channels, label_dim=label_dim, **model)

def build_network(precond, kwargs):
    return {'EDMPrecond': EDMPrecond, 'PatchPrecond': PatchPrecond}[precond](**kwargs)

def size_multiple(net):
    """Side lengths the U-Net accepts are multiples of 2 ** (number of downsampling blocks)."""
    return 2 ** sum(name.endswith('_down') for name in net.model.enc)

#------------------------------------------------------------------------------
# 3. Method math: patch-size schedule, random crops with coordinates, the patch loss.

def patch_schedule(R, real_p, latent=False):
    """Patch sizes {R/4, R/2, R} with probabilities (0.4 (1-p), 0.6 (1-p), p) (paper Eq. 5) and
    their batch multipliers R/s (official batch_mul table: 16->4, 32->2, 64->1 at R=64). Latent
    space (official train_on_latents): sizes {R/2, R} with probabilities (1-p, p), multipliers 2 and
    1 (16->2, 32->1 at R=32)."""
    sizes = [R // 2, R] if latent else [R // 4, R // 2, R]
    pmf = [1 - real_p, real_p] if latent else [0.4 * (1 - real_p), 0.6 * (1 - real_p), real_p]
    # NOTE: upstream looks the multiplier up in a fixed table that has no entry for 8 (so
    # CIFAR-sized data crashes, official issue #3) and gives 1.9 as the average only for R=64;
    # R // s reproduces that table for R=64 and extends it to any resolution.
    batch_mul = [R // s for s in sizes]
    return sizes, pmf, batch_mul

def progressive_index(progress, pmf):
    """Progressive schedule (paper ablation): the first size whose cumulative probability
    reaches `progress`."""
    cdf = np.cumsum(pmf)
    cdf[-1] = np.inf
    return int(np.argmax(cdf >= progress))

def patch_coordinates(resolution, size, i, j):
    """Coordinate channels of size x size patches at row offsets i and column offsets j ([N] int
    tensors) in an R x R image: channel 0 x = 2 col / (R - 1) - 1, channel 1 y = 2 row / (R - 1) - 1
    (official pos_embedding)."""
    steps = torch.arange(size, device=i.device)
    cols = (j[:, None] + steps).float() * 2 / (resolution - 1) - 1  # [N, s]
    rows = (i[:, None] + steps).float() * 2 / (resolution - 1) - 1  # [N, s]
    x = cols[:, None, :].expand(-1, size, -1)  # [N, s, s], constant down each column
    y = rows[:, :, None].expand(-1, -1, size)  # [N, s, s], constant along each row
    return torch.stack([x, y], dim=1)         # [N, 2, s, s]

def random_patches(images, size):
    """One size x size crop per image at an independent uniform offset (rows drawn first), and its
    coordinates. The full size takes the whole image without any random draw."""
    N, C, R, _ = images.shape
    if size == R:
        i = j = torch.zeros(N, dtype=torch.long, device=images.device)
        return images, patch_coordinates(R, size, i, j)
    i = torch.randint(0, R - size + 1, (N,), device=images.device)
    j = torch.randint(0, R - size + 1, (N,), device=images.device)
    steps = torch.arange(size, device=images.device)
    rows = (i[:, None] + steps)[:, :, None]  # [N, s, 1]
    cols = (j[:, None] + steps)[:, None, :]  # [N, 1, s]
    n = torch.arange(N, device=images.device)[:, None, None]
    patches = images[n, :, rows, cols]  # [N, s, s, C]
    patches = patches.permute(0, 3, 1, 2).contiguous()  # [N, C, s, s]
    return patches, patch_coordinates(R, size, i, j)

def reduce_loss(loss, per_gpu_batch, batch_mul):
    """EDM's reduction: per-patch sum over pixels and channels, mean over the rank's
    per_gpu_batch * batch_mul patches. A 16x16 patch thus weighs 1/16 of a 64x64 image; the official
    code does this, not a per-pixel mean."""
    return loss.sum() / (per_gpu_batch * batch_mul)

# The paper's loss (official `Patch_EDMLoss`): EDM's loss on a random crop of each image, unreduced
# [N, C, s, s]. The noise goes to the image channels; the coordinates reach the network clean, and
# an augmentation transforms the crop, not its coordinates (official code). coords=False
# (real_p = 1: an EDMPrecond) is EDM's loss exactly.
def patch_loss(net, images, labels, size, coords=True, augment_pipe=None):
    patches, pos = random_patches(images, size)  # [N, C, s, s] crops, [N, 2, s, s] coordinates
    sigma, weight = EDMLoss().sigma_and_weight(len(patches), patches.device)  # EDM Table 1
    y, augment_labels = augment_pipe(patches) if augment_pipe is not None else (patches, None)
    n = torch.randn_like(y) * sigma  # image channels only
    if coords:
        D_yn = net(y + n, sigma, pos, labels, augment_labels=augment_labels)  # pos clean, unscaled
    else:
        D_yn = net(y + n, sigma, labels, augment_labels=augment_labels)
    return weight * (D_yn - y) ** 2  # EDM Eq. 2

#------------------------------------------------------------------------------
# 4. Sampler: EDM's Heun sampler over a full canvas, its coordinates attached at every call; CFG.

def coordinate_canvas(resolution, image_size, x_start=0, y_start=0, device='cpu'):
    """[1, 2, S, S] coordinates of an S x S canvas normalized by the training resolution; a canvas
    larger than it, or a negative start, extrapolates beyond [-1, 1] (official generate.py:
    --image_size, --x_start, --y_start)."""
    i = torch.tensor([y_start], device=device)
    j = torch.tensor([x_start], device=device)
    return patch_coordinates(resolution, image_size, i, j)

def guided_denoiser(net, pos=None, cfg=None):
    """net(x, sigma, labels) for the sampler. With cfg = w: D = D(x | 0) + w (D(x | y) - D(x | 0)),
    both halves in one batch, the unconditional half with an all-zero label row (paper: ImageNet
    with w = 1.3; official generate.py --cfg)."""
    def with_pos(x, sigma, labels):
        return net(x, sigma, pos, labels)
    call = with_pos if isinstance(net, PatchPrecond) else net
    if cfg is None:
        return call

    def guided(x, sigma, labels):
        no_labels = torch.zeros_like(labels)  # the unconditional half
        D_uncond, D_cond = call(torch.cat([x, x]), sigma, torch.cat([no_labels, labels])).chunk(2)
        return D_uncond + cfg * (D_cond - D_uncond)
    return guided

def patch_sampler(net, latents, labels=None, randn_like=torch.randn_like, pos=None, cfg=None,
                  **settings):
    """EDM's Heun sampler (EDM Alg. 2; `settings` are its num_steps, sigma_min, ...) with the
    coordinates `pos` of the canvas attached at every call (official generate.py) and
    classifier-free guidance weight `cfg`."""
    return edm_sampler(guided_denoiser(net, pos, cfg), latents, labels, randn_like, **settings)

@torch.no_grad()
def sample_images(net, seeds, device, vae=None, resolution=None, image_size=None,
                  x_start=0, y_start=0, class_idx=None, cfg=None, **settings):
    """The images of `seeds` as `generate` makes them (float32 [-1, 1] [N, C, H, W], pixels: latents
    decoded by `vae`): an image_size canvas (None = resolution, None = the network's) whose
    coordinates are normalized by `resolution`, every draw from the seed's own generator (noise,
    then the label)."""
    resolution = resolution or net.img_resolution
    image_size = image_size or resolution
    pos = coordinate_canvas(resolution, image_size, x_start, y_start, device)
    rng = PerSeedRNG(seeds, device)
    latents = rng.randn([net.img_channels, image_size, image_size], device=device)
    labels = seed_labels(rng, net.label_dim, class_idx, device)
    images = patch_sampler(net, latents, labels, rng.randn_like, pos, cfg, **settings)
    return decode_latents(vae, images) if vae is not None else images

#------------------------------------------------------------------------------
# 5. Training loop (official training/training_loop.py): each optimizer step is `rounds`
#    micro-batches, each of one patch size drawn per micro-batch and rank, with batch_mul[k] times
#    the images of a full-size one. The data readers, the checks and the run's plumbing (VAE, run
#    directory, grid, metrics) are in the Appendix.

def training_setup(args, world_size):
    """(dataset, net_kwargs, info): the data, the network's arguments and what the run records
    besides its flags (the preconditioner, the parameter count, the patch schedule, the batch split;
    latent runs: the latent shape and the VAE). Every flag that depends on the data is checked here,
    before anything is written."""
    dataset, vae, R, C = open_training_data(args)
    batch_gpu, rounds = split_batch(args.batch, args.batch_gpu, world_size)
    sizes, pmf, batch_mul = patch_schedule(R, args.real_p, args.train_on_latents)
    mul_avg = float(np.dot(pmf, batch_mul))  # expected multiplier: 1.9 at p = 0.5 (latent: 1.5)
    if args.label_dropout and not dataset.label_dim:
        raise UsageError(f'--label-dropout={args.label_dropout:g} needs class labels (--cond=1)')
    precond = precond_class(args.real_p)
    net_kwargs = network_kwargs(args, R, C, dataset.label_dim)
    num_params = check_patch_sizes(precond, net_kwargs, sizes, pmf)
    check_run(args, num_params, mul_avg)
    check_metric_data(args, dataset)
    info = dict(precond_class=precond, net_kwargs=net_kwargs, num_params=num_params,
                patch_sizes=sizes, patch_pmf=pmf, batch_mul=batch_mul, batch_mul_avg=mul_avg,
                batch_gpu=batch_gpu, rounds=rounds, world_size=world_size)
    return dataset, net_kwargs, info | latent_info(args, dataset, vae, R, C)

def train(args):
    # Setup: the data, the network's arguments, every check; nothing is written before it
    device = init_distributed()
    amp_dtype, scaler = setup_precision(args.fp16, args.bf16, args.tf32, device)
    dataset, net_kwargs, info = training_setup(args, get_world_size())
    if args.dry_run:
        print_options(args, info)
        return
    # Network and EMA, EDM's Adam; the run (directory, resume, snapshots, grid, metrics)
    net, ema = training_network(args, net_kwargs, info, device, amp_dtype)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                                 fused=device.type == 'cuda')
    augment_pipe = AugmentPipe(p=args.augment, **AUGMENT) if args.augment else None
    vae = training_vae(args, info, device)  # latent runs: encodes each batch, decodes the samples
    run = training_run(args, dataset, info, device, net, ema, optimizer, scaler, vae)
    ddp = training_ddp(net, device, args.compile)
    batch_gpu, rounds = info['batch_gpu'], info['rounds']
    stream = run.data(dataset, batch_gpu, args.seed, args.workers)
    sizes, pmf, batch_mul = info['patch_sizes'], info['patch_pmf'], info['batch_mul']
    coords = info['precond_class'] == 'PatchPrecond'  # real_p = 1: EDM, no coordinates
    with run:
        print0(banner(args, dataset, info, device, run.dir))
        while not run.done:
            rng = reseed(args.seed, get_rank(), run.cur_nimg)  # a resumed run replays it
            optimizer.zero_grad(set_to_none=True)
            if args.progressive:
                k = progressive_index((run.cur_nimg // 1000) / (args.duration * 1000), pmf)
            for r in range(rounds):
                # Fetch data: a patch size per micro-batch (paper Eq. 5), batch_mul[k] images
                if not args.progressive:
                    k = int(rng.choice(len(sizes), p=pmf))
                fetched = [next(stream) for _ in range(batch_mul[k])]
                x = torch.cat([f[0] for f in fetched]).to(device)
                if args.train_on_latents:
                    images = latents_from(x, vae)
                else:
                    images = x.to(torch.float32) / 127.5 - 1
                labels = torch.cat([f[1] for f in fetched]).to(device)
                with sync_if(ddp, r == rounds - 1):
                    # The paper's loss: EDM's loss on random crops with their coordinates
                    loss = patch_loss(ddp, images, labels, sizes[k], coords, augment_pipe)
                    run.add('loss', loss)
                    # Backward: sum over each patch, mean over this GPU's patches
                    loss = reduce_loss(loss, batch_gpu * rounds, batch_mul[k])
                    scaler.scale(loss * args.ls).backward()
            # Optimizer and EMA; the patch counter (all ranks' patches) drives kimg, lr, EMA
            nimg = args.batch * (batch_mul[k] if args.progressive else info['batch_mul_avg'])
            optimizer_step(optimizer, scaler, learning_rate(args.lr, run.cur_nimg, args.lr_rampup))
            update_ema(ema, net, ema_beta(run.cur_nimg, nimg, args.ema * 1000))
            # Tick: status line, snapshots, training states, metrics
            run.end_step(nimg)
        print0(f'done: {run.dir}')

#------------------------------------------------------------------------------
# 6. Generation: one PNG per seed, identical for any --batch and any number of GPUs. The networks'
#    reader (load_network: ours and the official pickles) and the memory checks are in the Appendix.

@torch.no_grad()
def generate(args):
    device, rank, world_size = init_distributed(), get_rank(), get_world_size()
    check_outdir(args.outdir)
    net = load_network(args.network).to(device).eval()
    # NOTE: upstream's --on_latents=1 forces resolution = image_size = 32 and x_start = 0; we
    # default both sizes to the network's resolution (32 for latent models) and keep --image_size,
    # --x_start and --y_start as given.
    on_latents = getattr(net, 'latent_vae', None) is not None if args.on_latents is None else args.on_latents
    vae = load_vae(args.vae or getattr(net, 'latent_vae', None) or SD_VAE_URL).to(device) if on_latents else None
    if vae is None and net.img_channels not in (1, 3):
        raise UsageError(f'--network={args.network}: a {net.img_channels}-channel (latent) network; sample it with '
                         '--on_latents=1')
    if vae is not None and vae.post_quant_conv.in_channels != net.img_channels:
        raise UsageError(f'--network={args.network}: {net.img_channels}-channel latents, but the VAE has '
                         f'{vae.post_quant_conv.in_channels}')
    resolution = args.resolution or net.img_resolution
    image_size = args.image_size or resolution
    if image_size % size_multiple(net):
        raise UsageError(f'--image_size={image_size} must be a multiple of {size_multiple(net)} for this U-Net')
    check_class(args.class_idx, net.label_dim)
    if args.cfg is not None and not net.label_dim:
        raise UsageError('--cfg needs a class-conditional network')
    check_canvas(net, vae, min(args.batch, len(args.seeds)), image_size, device)
    settings = dict(num_steps=args.steps, sigma_min=args.sigma_min, sigma_max=args.sigma_max, rho=args.rho,
                    S_churn=args.S_churn, S_min=args.S_min, S_max=args.S_max, S_noise=args.S_noise)
    print0(f'generating {len(args.seeds)} images of {image_size}x{image_size}' + (f' latents (decoded x{vae.factor})'
           if vae else '') + f' with {args.steps} steps into {args.outdir}')
    what = f'generating {image_size}x{image_size} canvases into {args.outdir}'
    with working(), out_of_memory(what), tqdm(total=len(args.seeds), unit='img', disable=rank != 0) as bar:
        for seeds in seed_batches(args.seeds, args.batch, rank, world_size):
            images = sample_images(net, seeds, device, vae, resolution, image_size, args.x_start, args.y_start,
                                   args.class_idx, args.cfg, **settings)
            save_seed_images(images, seeds, args.outdir, args.subdirs)
            bar.update(len(seeds) * world_size)
    torch.distributed.barrier()
    print0('done')

#------------------------------------------------------------------------------
# 7. Command line.

MAX_CANVAS = 2**14  # --image_size, --resolution and the canvas offsets, in pixels (or latent pixels)

def parse_cres(s):
    """--cres: channel multipliers of the U-Net's levels, 1 to 8 levels of 1 to 64 each."""
    cres = parse_int_list(s)
    if not 1 <= len(cres) <= 8 or not all(1 <= c <= 64 for c in cres):
        raise argparse.ArgumentTypeError(f'expected 1 to 8 multipliers from 1 to 64, e.g. 1,2,2,2; got {s!r}')
    return cres

def build_parser(preset=None):
    """The parser; `preset` (a PRESETS name) gives `train` its defaults (common.parse_command_line)."""
    parser = Parser(description='Patch Diffusion (Wang et al. 2023) on EDM')
    sub = parser.add_subparsers(dest='command', required=True)
    t = sub.add_parser('train', help='train a model')
    add_train_flags(t)
    add_edm_train_flags(t)
    add_metric_flags(t)
    p01 = number(float, 0, 1)
    t.add_argument('--preset', choices=sorted(PRESETS), default=None, help='published hyperparameters; flags override')
    t.add_argument('--arch', choices=['ddpmpp', 'ncsnpp', 'adm'], default='ddpmpp',
                   help='backbone: DDPM++, NCSN++ or ADM')
    t.add_argument('--cbase', type=number(int, 1, 4096), default=None, metavar='INT',
                   help='base channel count; None = the arch\'s (128 DDPM++/NCSN++, 192 ADM)')
    t.add_argument('--cres', type=parse_cres, default=None, metavar='LIST',
                   help='channel multipliers per resolution (1-64, 1-8 levels), e.g. 1,2,2,2; None = the arch\'s')
    t.add_argument('--augment', type=p01, default=0, metavar='P',
                   help='EDM augmentation probability (EDM: 0.12; every paper config: 0)')
    t.add_argument('--label-dropout', type=p01, default=0, metavar='P',
                   help='drop labels with this probability (for --cfg)')
    t.add_argument('--real_p', type=p01, default=0.5, metavar='P',
                   help='probability of full-size images (paper Eq. 5); 1 = EDM')
    t.add_argument('--progressive', type=parse_bool, default=False, metavar='BOOL',
                   help='progressive patch-size schedule (ablation)')
    t.add_argument('--train_on_latents', type=parse_bool, default=False, metavar='BOOL',
                   help='train on SD-VAE latents of the images (or on a folder from `encode`)')
    t.add_argument('--vae', default=None, metavar='PATH|URL',
                   help='AutoencoderKL weights (.safetensors/.bin); None = the encoded folder\'s, else sd-vae-ft-ema')
    t.add_argument('--grid', type=number(int, 0, 1024), default=64, metavar='INT',
                   help='images in the sample grid written with each snapshot; 0 = none')
    t.set_defaults(**PRESETS.get(preset, {}))

    g = sub.add_parser('generate', help='generate images')
    g.add_argument('--network', required=True, metavar='PT|PKL|URL',
                   help='network snapshot (ours .pt, or official .pkl)')
    add_generate_flags(g)
    g.add_argument('--class', dest='class_idx', type=number(int, 0, 2**31 - 1), default=None, metavar='INT',
                   help='class label; None = random')
    g.add_argument('--resolution', type=number(int, 2, MAX_CANVAS), default=None, metavar='INT',
                   help='coordinate normalization size; None = training size')
    g.add_argument('--image_size', type=number(int, 1, MAX_CANVAS), default=None, metavar='INT',
                   help='canvas size; None = --resolution; larger extrapolates')
    g.add_argument('--x_start', type=number(int, -MAX_CANVAS, MAX_CANVAS), default=0, metavar='INT',
                   help='column of the canvas\'s left edge in the coordinate grid')
    g.add_argument('--y_start', type=number(int, -MAX_CANVAS, MAX_CANVAS), default=0, metavar='INT',
                   help='row of the canvas\'s top edge in the coordinate grid')
    g.add_argument('--cfg', type=number(float, 0, 100), default=None, metavar='W',
                   help='classifier-free guidance weight (paper: 1.3)')
    g.add_argument('--on_latents', type=parse_bool, default=None, metavar='BOOL',
                   help='decode with the VAE; None = as trained (official .pkl: 0)')
    g.add_argument('--vae', default=None, metavar='PATH|URL',
                   help='VAE weights; None = the training run\'s, else sd-vae-ft-ema')

    e = sub.add_parser('encode', help='encode a dataset once into VAE posterior moments (then train --data=DEST '
                                      '--train_on_latents=1)')
    e.add_argument('--data', required=True, metavar='ZIP|DIR|demo', help='EDM-format image dataset')
    e.add_argument('--dest', required=True, metavar='DIR', help='output folder: moments.npy, labels.npy, dataset.json')
    e.add_argument('--vae', default=None, metavar='PATH|URL', help='VAE weights; None = sd-vae-ft-ema')
    e.add_argument('--batch', type=number(int, 1, 4096), default=64, metavar='INT', help='images per batch per GPU')
    e.add_argument('--workers', type=number(int, 0), default=2, metavar='INT',
                   help='DataLoader worker processes per GPU')
    return parser

def parse_args(argv=None):
    return parse_command_line(build_parser, argv)

def main():
    args = parse_args()
    run_main({'train': train, 'generate': generate, 'encode': encode}[args.command], args)

#------------------------------------------------------------------------------
# 8. Appendix: latent space (paper: LSUN and ImageNet at 256x256; official --train_on_latents): the
#    Stable Diffusion VAE (kl-f8) in plain torch, with the module and parameter names of diffusers'
#    `AutoencoderKL` (autoencoders/vae.py), so the released `stabilityai/sd-vae-ft-ema` weights load
#    by name; posterior sampling; datasets encoded once. A reader of the paper can skip it: it is
#    the format the latent models need.

LATENT_SCALE = 0.18215  # SD latent scale factor: latents = 0.18215 * posterior sample (official training_loop.py)
SD_VAE_URL = 'https://huggingface.co/stabilityai/sd-vae-ft-ema/resolve/main/diffusion_pytorch_model.safetensors'

class VAEResnet(nn.Module):
    """GroupNorm-SiLU-conv3x3 twice plus the input, through a 1x1 conv where the width changes
    (diffusers ResnetBlock2D)."""
    def __init__(self, in_channels, out_channels, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h

class VAEAttention(nn.Module):
    """One-head self-attention over all positions, with a residual (diffusers Attention, mid block)."""
    def __init__(self, channels, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # key 'to_out.0' as in diffusers

    def forward(self, x):
        N, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)                            # [N, C, H, W] -> [N, HW, C]
        q, k, v = (proj(h)[:, None] for proj in (self.to_q, self.to_k, self.to_v))   # [N, 1, HW, C]: one head
        h = F.scaled_dot_product_attention(q, k, v)[:, 0]                            # softmax(q k^T / sqrt(C)) v
        return x + self.to_out[0](h).transpose(1, 2).reshape(N, C, H, W)             # [N, HW, C] -> [N, C, H, W]

class VAEResample(nn.Module):
    """2x down: zero-pad right and bottom by one, 3x3 conv with stride 2 (Downsample2D with padding
    0); 2x up: nearest-neighbour upsampling, 3x3 conv (Upsample2D)."""
    def __init__(self, channels, up):
        super().__init__()
        self.up = up
        self.conv = nn.Conv2d(channels, channels, 3, stride=1 if up else 2, padding=1 if up else 0)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode='nearest') if self.up else F.pad(x, (0, 1, 0, 1)))

class VAEStage(nn.Module):
    """`num_layers` resnets, then an optional 2x resample (DownEncoderBlock2D / UpDecoderBlock2D)."""
    def __init__(self, in_channels, out_channels, num_layers, groups, resample=None):  # resample: None, 'down', 'up'
        super().__init__()
        self.resnets = nn.ModuleList([VAEResnet(in_channels if i == 0 else out_channels, out_channels, groups)
                                      for i in range(num_layers)])
        self.resample = resample
        if resample:  # keys 'downsamplers.0.conv.*' / 'upsamplers.0.conv.*'
            self.add_module(f'{resample}samplers', nn.ModuleList([VAEResample(out_channels, up=resample == 'up')]))

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return getattr(self, f'{self.resample}samplers')[0](x) if self.resample else x

class VAEMid(nn.Module):
    """Resnet, attention, resnet at the lowest resolution (UNetMidBlock2D)."""
    def __init__(self, channels, groups):
        super().__init__()
        self.resnets = nn.ModuleList([VAEResnet(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([VAEAttention(channels, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))

class VAEEncoder(nn.Module):
    """Image -> 2 * latent_channels moments (mean, log-variance) at 1 / 2 ** (levels - 1) the size."""
    def __init__(self, in_channels, latent_channels, channels, layers_per_block, groups):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([VAEStage(channels[max(i - 1, 0)], c, layers_per_block, groups,
                                                   'down' if i < len(channels) - 1 else None)
                                          for i, c in enumerate(channels)])
        self.mid_block = VAEMid(channels[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(channels[-1], 2 * latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))

class VAEDecoder(nn.Module):
    """Latent -> image; the levels in reverse, one more resnet per level than the encoder."""
    def __init__(self, latent_channels, out_channels, channels, layers_per_block, groups):
        super().__init__()
        rev = list(reversed(channels))
        self.conv_in = nn.Conv2d(latent_channels, rev[0], 3, padding=1)
        self.mid_block = VAEMid(rev[0], groups)
        self.up_blocks = nn.ModuleList([VAEStage(rev[max(i - 1, 0)], c, layers_per_block + 1, groups,
                                                 'up' if i < len(rev) - 1 else None) for i, c in enumerate(rev)])
        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=1e-6)
        self.conv_out = nn.Conv2d(channels[0], out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))

class AutoencoderKL(nn.Module):
    """The KL-regularized autoencoder of Stable Diffusion (Rombach et al. 2022); defaults = the SD
    kl-f8 VAE (83,653,863 parameters), whose 256x256 images become 4x32x32 latents. Frozen here: no
    loss, no training."""
    def __init__(self,
        in_channels         = 3,                     # image channels
        out_channels        = 3,                     # decoded image channels
        block_out_channels  = (128, 256, 512, 512),  # width per level; downsampling factor 2 ** (levels - 1)
        layers_per_block    = 2,                     # resnets per encoder level; the decoder has one more
        latent_channels     = 4,                     # latent channels
        norm_num_groups     = 32,                    # GroupNorm groups everywhere
    ):
        super().__init__()
        self.factor = 2 ** (len(block_out_channels) - 1)
        self.encoder = VAEEncoder(in_channels, latent_channels, block_out_channels, layers_per_block, norm_num_groups)
        self.decoder = VAEDecoder(latent_channels, out_channels, block_out_channels, layers_per_block, norm_num_groups)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)

    def encode(self, x):
        """Posterior N(mean, exp(logvar)) for images in [-1, 1]; logvar clamped to [-30, 20]
        (diffusers DiagonalGaussianDistribution)."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)  # [N, 2C, h, w] -> 2 x [N, C, h, w]
        return mean, logvar.clamp(-30, 20)

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

SAFETENSORS_DTYPES = {'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
                      'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8, 'U8': torch.uint8,
                      'BOOL': torch.bool}

def read_safetensors(path):
    """Tensors of a .safetensors file, without the safetensors package: an 8-byte little-endian
    header length n, n bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]},
    '__metadata__': ...}, then the raw little-endian tensor bytes (offsets relative to the end of
    the header)."""
    with open(path, 'rb') as f:
        (n,) = struct.unpack('<Q', f.read(8))
        header = json.loads(f.read(n))
        data = bytearray(f.read())
    tensors = {}
    for name, info in header.items():
        if name == '__metadata__':
            continue
        dtype, shape, (begin, end) = SAFETENSORS_DTYPES[info['dtype']], info['shape'], info['data_offsets']
        count = int(torch.Size(shape).numel())
        if end - begin != count * dtype.itemsize or end > len(data):
            raise ValueError(f'tensor {name}: {end - begin} bytes for shape {shape} {info["dtype"]}')
        flat = torch.frombuffer(data, dtype=dtype, offset=begin, count=count) if count else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(shape)
    return tensors

# Old diffusers attention names (before v0.14; still in some hub files) -> current ones.
OLD_ATTENTION_NAMES = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}

def convert_vae_keys(state_dict):
    """Current diffusers names: query/key/value/proj_attn -> to_q/to_k/to_v/to_out.0, and attention
    weights stored as 1x1 convolutions [C, C, 1, 1] -> linear [C, C]."""
    out = {}
    for key, t in state_dict.items():
        parts = key.rsplit('.', 2)
        if len(parts) == 3 and parts[1] in OLD_ATTENTION_NAMES:
            key = f'{parts[0]}.{OLD_ATTENTION_NAMES[parts[1]]}.{parts[2]}'
        out[key] = t[:, :, 0, 0] if '.attentions.' in key and t.ndim == 4 else t
    return out

def vae_config(state_dict):
    """AutoencoderKL constructor arguments read off the weight shapes (GroupNorm groups cannot
    be: 32, as every SD VAE)."""
    enc = lambda name: state_dict[f'encoder.{name}.weight']
    levels = sum(f'encoder.down_blocks.{i}.resnets.0.conv1.weight' in state_dict for i in range(len(state_dict)))
    layers = sum(f'encoder.down_blocks.0.resnets.{j}.conv1.weight' in state_dict for j in range(len(state_dict)))
    return dict(in_channels=enc('conv_in').shape[1], out_channels=state_dict['decoder.conv_out.weight'].shape[0],
                block_out_channels=[enc(f'down_blocks.{i}.resnets.0.conv1').shape[0] for i in range(levels)],
                layers_per_block=layers, latent_channels=state_dict['post_quant_conv.weight'].shape[0])

def load_vae(path_or_url):
    """The VAE from diffusers-format weights (`diffusion_pytorch_model.safetensors` or `.bin`; old
    or current attention names), a local path or a URL (downloaded once into torch's hub cache)."""
    path = download(path_or_url, '--vae') if '://' in str(path_or_url) else str(path_or_url)
    if not os.path.isfile(path):
        raise UserError(f'{path}: no such VAE weights file (diffusers format, e.g. sd-vae-ft-ema/'
                        'diffusion_pytorch_model.safetensors)')
    with open(path, 'rb') as f:
        head = f.read(9)
    what = 'not a readable diffusers AutoencoderKL weights file'
    if len(head) < 9:
        raise UserError(f'{path}: {what} (empty or truncated: {os.path.getsize(path)} bytes)')
    try:
        if head[8:9] == b'{':  # safetensors: a JSON header follows the 8-byte length
            state_dict = read_safetensors(path)
        else:
            try:
                with warnings.catch_warnings():  # torch's note on old pickle protocols would precede our one line
                    warnings.simplefilter('ignore')
                    state_dict = torch.load(path, map_location='cpu', weights_only=True)
            except Exception:  # torch's message would advise an unsafe load
                raise UserError(f'{path}: {what} (neither safetensors nor a torch.save file of tensors)') from None
        if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
            raise UserError(f'{path}: {what} (it holds no dict of tensors)')
        state_dict = convert_vae_keys(state_dict)
        vae = AutoencoderKL(**vae_config(state_dict))
    except UserError:
        raise
    except Exception as e:
        raise UserError(f'{path}: {what} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})') from None
    expected = vae.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        what = (f'no {missing[0]}' if missing else f'unexpected {unexpected[0]}' if unexpected else
                f'{wrong[0]} has shape {list(state_dict[wrong[0]].shape)}, expected {list(expected[wrong[0]].shape)}')
        raise UserError(f'{path}: not an AutoencoderKL state dict ({what}; {len(missing)} missing, {len(unexpected)} '
                        f'unexpected, {len(wrong)} wrong shapes)')
    if not all(torch.isfinite(v).all() for v in state_dict.values() if v.is_floating_point()):
        raise UserError(f'{path}: its weights hold NaN or inf')
    vae.load_state_dict({k: v.float() for k, v in state_dict.items()})
    return vae.eval().requires_grad_(False)

@torch.no_grad()
def latents_from(batch, vae=None):
    """0.18215 * a posterior sample mean + std * eps (official training loop:
    `latent_dist.sample()`), from uint8 images encoded now by `vae`, or from float32 pre-encoded
    moments [N, 2C, h, w] = (mean, std)."""
    if batch.dtype == torch.uint8:
        mean, logvar = vae.encode(batch.to(torch.float32) / 127.5 - 1)
        std = (0.5 * logvar).exp()
    else:
        mean, std = batch.to(torch.float32).chunk(2, dim=1)  # [N, 2C, h, w] -> 2 x [N, C, h, w]
    return LATENT_SCALE * (mean + std * torch.randn_like(mean))

@torch.no_grad()
def decode_latents(vae, x):
    """Images in [-1, 1] from latents x (official generate.py: decode(x / 0.18215)). NOTE: upstream
    decodes the whole batch; we decode one image at a time, so no image depends on its batch."""
    return torch.cat([vae.decode(z[None].float() / LATENT_SCALE) for z in x])

class LatentDataset(torch.utils.data.Dataset):
    """A folder written by `patch_diffusion.py encode`: item i = (posterior moments [2C, h, w]
    float32 = mean then std, one-hot label). The moments stay on disk (memory-mapped .npy)."""
    def __init__(self, path, use_labels=False, xflip=False, **_):
        if xflip:
            raise UserError(f'{path}: pre-encoded latents cannot be x-flipped; train on the images (per-step encoding) '
                            'or without --xflip')
        if use_labels and not os.path.isfile(os.path.join(path, 'labels.npy')) and os.path.isdir(path):
            raise UserError(f'{path}: no labels.npy (encoded from a dataset without labels); train with --cond=0')
        try:
            self.moments = np.load(os.path.join(path, 'moments.npy'), mmap_mode='r')
            with open(os.path.join(path, 'dataset.json')) as f:
                self.info = json.load(f)
            self.labels = np.load(os.path.join(path, 'labels.npy'), mmap_mode='r') if use_labels else None
        except (OSError, ValueError) as e:
            raise UserError(f'{path}: not a readable folder of pre-encoded latents ({e})') from None
        self.name = os.path.basename(os.path.normpath(path))
        self.num_channels, self.resolution = self.moments.shape[1] // 2, self.moments.shape[2]
        self.label_dim = 0 if self.labels is None else self.labels.shape[1]

    def __len__(self):
        return len(self.moments)

    def __getitem__(self, i):
        label = np.array(self.labels[i]) if self.labels is not None else np.zeros([0], np.float32)
        return np.array(self.moments[i]), label

@torch.no_grad()
def encode(args):
    """`encode`: a dataset -> folder of posterior moments. NOTE: not in the official code, which
    encodes every batch (EDM2 pre-encodes this way); training from the folder samples the same
    posterior without running the encoder: moments.npy [N, 2C, h, w] float32 (mean, std), labels.npy
    [N, label_dim] if the dataset has labels, dataset.json. Each rank encodes every world_size-th
    image into the shared memory-mapped file."""
    device, rank, world_size = init_distributed(), get_rank(), get_world_size()
    check_outdir(args.dest, '--dest')
    try:
        dataset = open_dataset(args.data, use_labels=True)
    except UserError:  # no labels: encode the images alone (a missing dataset fails again below)
        dataset = open_dataset(args.data)
    vae = load_vae(args.vae or SD_VAE_URL).to(device)
    R, C = dataset.resolution, vae.post_quant_conv.in_channels
    if R % vae.factor or dataset.num_channels != vae.encoder.conv_in.in_channels:
        raise UserError(f'{args.data}: {R}x{R}x{dataset.num_channels} images; this VAE takes '
                        f'{vae.encoder.conv_in.in_channels} channels and sides divisible by {vae.factor}')
    files = {'moments': [len(dataset), 2 * C, R // vae.factor, R // vae.factor],
             'labels': [len(dataset), dataset.label_dim]}
    with working():
        if rank == 0:
            os.makedirs(args.dest, exist_ok=True)
            for name, shape in files.items():
                if shape[1]:
                    path = os.path.join(args.dest, f'{name}.npy')
                    np.lib.format.open_memmap(path, 'w+', np.float32, tuple(shape)).flush()
            with open(os.path.join(args.dest, 'dataset.json'), 'w') as f:
                json.dump(dict(source=os.path.abspath(args.data) if os.path.exists(args.data) else args.data,
                               vae=args.vae or SD_VAE_URL, image_resolution=R, num_images=len(dataset)), f)
        torch.distributed.barrier()
        out = {name: np.load(os.path.join(args.dest, f'{name}.npy'), mmap_mode='r+')
               for name, shape in files.items() if shape[1]}
        indices = list(range(rank, len(dataset), world_size))
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=args.batch,
                                             num_workers=args.workers)
        print0(f'encoding {len(dataset)} images of {R}x{R} into {args.dest} ({files["moments"][1:]} moments each)')
        bar = tqdm(loader, unit='batch', disable=rank != 0)
        for start, (images, labels) in zip(range(0, len(indices), args.batch), bar):
            mean, logvar = vae.encode(images.to(device).to(torch.float32) / 127.5 - 1)
            rows = indices[start:start + len(images)]
            out['moments'][rows] = torch.cat([mean, (0.5 * logvar).exp()], dim=1).cpu().numpy()  # (mean, std)
            if 'labels' in out:
                out['labels'][rows] = labels.numpy()
        for array in out.values():
            array.flush()
    torch.distributed.barrier()
    print0('done')

#------------------------------------------------------------------------------
# 8b. Appendix: the training run's plumbing. What train() reads (pixels, latents encoded now, or
#     pre-encoded moments), the checks of flags against the data and the machine, the network and
#     its EMA, the VAE, the run directory, grid and --metrics, DDP, the status line at the start.

def open_training_data(args):
    """(dataset, vae, R, C): what each step fetches, the VAE that encodes it every step (None for
    pixels and for pre-encoded moments), and the resolution and channels of what the network sees
    (latents of 256x256 images through the SD VAE: 32 and 4). A dry run reads no weights (the SD
    kl-f8 VAE is assumed) and, for latents, no images: a dataset that is not there is taken as
    256x256 RGB, with ImageNet's 1000 classes if --cond."""
    if os.path.isfile(os.path.join(args.data, 'moments.npy')):
        if not args.train_on_latents:
            raise UsageError(f'--data={args.data}: pre-encoded latents (patch_diffusion.py encode); '
                             'train with --train_on_latents=1')
        dataset = LatentDataset(args.data, use_labels=args.cond, xflip=args.xflip)
        return dataset, None, dataset.resolution, dataset.num_channels
    if args.dry_run and args.train_on_latents and not os.path.exists(args.data):
        name = os.path.splitext(os.path.basename(os.path.normpath(args.data)))[0]
        dataset = types.SimpleNamespace(name=name, resolution=256, num_channels=3, label_dim=1000 if args.cond else 0)
    else:
        dataset = open_dataset(args.data, use_labels=args.cond, xflip=args.xflip)
    if not args.train_on_latents:
        return dataset, None, dataset.resolution, dataset.num_channels
    if args.dry_run:
        with torch.device('meta'):
            vae = AutoencoderKL()
    else:
        vae = load_vae(args.vae or SD_VAE_URL)
    if dataset.resolution % vae.factor or dataset.num_channels != vae.encoder.conv_in.in_channels:
        raise UsageError(f'{args.data}: {dataset.resolution}x{dataset.resolution}x{dataset.num_channels} images; the '
                         f'VAE takes {vae.encoder.conv_in.in_channels} channels and sides divisible by {vae.factor}')
    return dataset, vae, dataset.resolution // vae.factor, vae.post_quant_conv.in_channels

def check_patch_sizes(precond, net_kwargs, sizes, pmf):
    """Every drawn patch size must pass the U-Net's downsampling; returns the parameter count."""
    with torch.device('meta'):  # the network's shape only, nothing allocated
        net = build_network(precond, net_kwargs)
    multiple = size_multiple(net)
    bad = [s for s, p in zip(sizes, pmf) if p > 0 and (s % multiple or s < multiple)]
    if bad:
        raise UsageError(f'patch size {bad[0]} (of {sizes} for {sizes[-1]}x{sizes[-1]} images) is not a multiple of '
                         f'{multiple}, which this {len(net_kwargs["channel_mult"])}-level U-Net needs; use fewer '
                         'levels (--cres) or --real_p=1')
    return sum(p.numel() for p in net.parameters())

def check_run(args, num_params, mul_avg):
    """Refuse, before anything is written, a network whose weights, EMA, gradients and Adam moments
    (5 x float32 per parameter) cannot fit in the device's memory, and a run of more than 10^9
    optimizer steps, which would never end."""
    check_memory(20 * num_params, f'the network has {num_params:,} parameters (see --arch, --cbase, --cres); its '
                 'weights, EMA, gradients and Adam moments')
    steps = args.duration * 1e6 / (args.batch * mul_avg)
    if steps > 1e9:
        raise UsageError(f'--duration={args.duration:g} Mimg at --batch={args.batch} is {steps:.3g} optimizer steps: '
                         'a run that would never end; train for fewer Mimg or with a larger batch')

def check_metric_data(args, dataset):
    """toy_fd on pre-encoded latents scores the decoded samples against the images the latents were
    encoded from (dataset.json's source): they must still be there."""
    if not args.train_on_latents or 'toy_fd' not in args.metrics:
        return
    source = getattr(dataset, 'info', {}).get('source', args.data)
    if not (re.fullmatch(r'demo(-\d+)?', str(source)) or os.path.exists(source)):
        raise UsageError(f'--metrics=toy_fd: {args.data} holds pre-encoded latents and toy_fd scores the decoded '
                         f'images against the images they were encoded from, {source}, which are not there; use fid*')

def latent_info(args, dataset, vae, R, C):
    """What a latent run records in its options: the VAE's weights, the latent shape, the encoding
    and the VAE's size."""
    if not args.train_on_latents:
        return {}
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return dict(vae=args.vae or getattr(dataset, 'info', {}).get('vae') or SD_VAE_URL, latent_shape=[C, R, R],
                encoding='per step' if vae else 'pre-encoded',
                image_resolution=dataset.resolution if vae else dataset.info.get('image_resolution'),
                vae_params=vae and dict(total=count(vae), encoder=count(vae.encoder), decoder=count(vae.decoder)))

def training_network(args, net_kwargs, info, device, amp_dtype):
    """(net, ema): the network, seeded with --seed, and its EMA copy, which samples (grid, --metrics)
    in float32, as generate samples a snapshot."""
    torch.manual_seed(args.seed)
    net, ema = network_and_ema(build_network(info['precond_class'], net_kwargs), device, amp_dtype)
    ema.amp_dtype = None
    return net, ema

def training_vae(args, info, device):
    """A latent run's SD VAE, frozen, float32 (official), on `device`: it encodes every batch
    (unless the data are pre-encoded moments) and decodes the samples of the grid and --metrics.
    None for pixels, and for pre-encoded moments without a grid or metrics."""
    if not args.train_on_latents:
        return None
    if info['encoding'] == 'pre-encoded' and not (args.grid or args.metrics):
        return None
    return load_vae(info['vae']).to(device)

def training_run(args, dataset, info, device, net, ema, optimizer, scaler, vae):
    """train()'s TrainingRun: the run directory (EDM's name for it), resume, length, ticks and
    saves; the snapshot content; the sample grid and --metrics, which sample the EMA as `generate`
    does (its defaults; latents decoded by `vae`) and score pixels."""
    precond = info['precond_class']
    desc = run_desc(dataset.name, 'cond' if args.cond else 'uncond', args.arch,
                    'edm' if precond == 'EDMPrecond' else 'pedm', world_size=info['world_size'], batch=args.batch,
                    fp16=args.fp16, bf16=args.bf16, desc=args.desc)

    def snapshot():
        return dict(precond=precond, net_kwargs=info['net_kwargs'], ema=ema.state_dict(), vae=info.get('vae'))

    def sample(seeds):
        return sample_images(ema, seeds, device, vae)

    def grid(path):
        save_image_grid(sample(range(args.grid)), path)

    R, C = info['net_kwargs']['img_resolution'], info['net_kwargs']['img_channels']
    metric_args = args
    if args.train_on_latents and args.metrics:  # the decoded pixels, scored against the encoded images
        source = getattr(dataset, 'info', {}).get('source', args.data)  # see check_metric_data
        metric_args = argparse.Namespace(**dict(vars(args), data=source))
        R, C = R * vae.factor, vae.decoder.conv_out.out_channels
    evaluate = training_metrics(metric_args, R, C, device, sample)
    state = dict(net=net, ema=ema, optimizer=optimizer, scaler=scaler)
    return TrainingRun('patch_diffusion', vars(args), info, device, outdir=args.outdir, desc=desc,
                       nosubdir=args.nosubdir, resume=args.resume, total_nimg=args.duration * 1e6, tick=args.tick,
                       snap=args.snap, dump=args.dump, state=state, snapshot=snapshot,
                       grid=grid if args.grid else None, evaluate=evaluate)

def training_ddp(net, device, compile):
    """DDP around the network, without its warning on gradient strides. NOTE: 1x1 convolutions on
    the 1x1 maps of small patches get weight gradients whose size-1 dims carry other strides (same
    memory layout); DDP compares strides literally and would warn every step."""
    warnings.filterwarnings('ignore', message='Grad strides do not match bucket view strides')
    return distributed_model(net, device, compile)

def banner(args, dataset, info, device, run_dir):
    """The run's first lines: the data, the network, the patch schedule, the batch split, where it
    goes."""
    R, C = info['net_kwargs']['img_resolution'], info['net_kwargs']['img_channels']
    pmf = [round(p, 3) for p in info['patch_pmf']]
    text = (f'Patch Diffusion: {dataset.name} ({len(dataset)} images, {R}x{R}x{C}), {info["precond_class"]} '
            f'{args.arch}, {info["num_params"]:,} parameters, device {device}, {info["world_size"]} process(es); '
            f'patch sizes {info["patch_sizes"]} with probabilities {pmf} and batch multipliers {info["batch_mul"]} '
            f'(average {info["batch_mul_avg"]:g}); {info["batch_gpu"]} images x {info["rounds"]} rounds x '
            f'{info["world_size"]} GPUs per step; run directory {run_dir}; training to {args.duration * 1000:g} kimg '
            '(patch counter)')
    if args.train_on_latents:
        text += (f'\nlatents {C}x{R}x{R} (x {LATENT_SCALE}) of {info["image_resolution"]}-pixel images, '
                 f'{info["encoding"]}, VAE {info["vae"]}')
    return text

#------------------------------------------------------------------------------
# 8c. Appendix: generate's plumbing. The networks' reader (our snapshots, official EDM and Patch
#     Diffusion pickles), and the canvas memory check and out-of-memory line.

def network_from(path, precond, kwargs, state_dict):
    """The network of a checkpoint: its class, constructor arguments and (finite) weights, or
    one line naming the problem."""
    if precond not in ('EDMPrecond', 'PatchPrecond'):
        raise UsageError(f'--network={path}: a {precond} network; patch_diffusion.py samples EDMPrecond and '
                         'PatchPrecond networks')
    try:
        net = build_network(precond, kwargs)
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise UsageError(f'--network={path}: its {precond} arguments build no network ({type(e).__name__}: '
                         f'{str(e).splitlines()[0] if str(e) else e!r})') from None
    if not all(torch.isfinite(t).all() for t in state_dict.values() if torch.is_tensor(t) and t.is_floating_point()):
        raise UsageError(f'--network={path}: its weights hold NaN or inf (a diverged run); use an earlier snapshot')
    load_weights(net, state_dict, f'--network={path}')
    return net

def load_network(path):
    """Our snapshots / training states (.pt), or official EDM and Patch Diffusion pickles (.pkl,
    path or URL). Official pickles count upstream's img_channels = C + 2 (the network input);
    ours count C (what is sampled)."""
    if is_official(path):
        official = load_official(path)
        kwargs = dict(official['init_kwargs'])
        precond = official['precond'] or official['class_name']  # None for a bare backbone
        if precond == 'Patch_EDMPrecond':
            out_channels = kwargs.pop('out_channels', None)
            kwargs['img_channels'] = out_channels if out_channels is not None else kwargs['img_channels'] - 2
            precond = 'PatchPrecond'
        return network_from(path, precond, kwargs, official['state_dict'])
    ckpt = load_snapshot(path, '--network', ['patch_diffusion'])
    net = network_from(path, ckpt.get('precond', 'EDMPrecond'), ckpt['net_kwargs'], ckpt['ema'])
    args = ckpt.get('args', {})
    net.latent_vae = ckpt.get('vae', args.get('vae')) if args.get('train_on_latents') else None  # generate decodes
    return net

def check_canvas(net, vae, batch, image_size, device):
    """Refuse a batch of canvases that cannot fit: at least four float32 maps of the U-Net's first
    level and the sampler's float64 state per image (a lower bound), plus one VAE decoder level of
    128 channels at pixel size."""
    width = next(iter(net.model.enc.values())).weight.shape[0]  # the first convolution's output channels
    need = batch * image_size ** 2 * (4 * 4 * width + 4 * 8 * net.img_channels)
    need += 2 * 4 * 128 * (image_size * vae.factor) ** 2 if vae is not None else 0
    check_memory(need, f'--image_size={image_size} with --batch={batch} (a lower bound; lower either)', device)

@contextlib.contextmanager
def out_of_memory(what):
    """A failed allocation while working: one line (exit 1), not a traceback."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and not re.search('alloc|out of memory', str(e)):
            raise
        raise UserError(f'out of memory {what} ({type(e).__name__}); lower --batch or --image_size') from None

if __name__ == '__main__':
    main()
