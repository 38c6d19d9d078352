"""Patch Diffusion: Faster and More Data-Efficient Training of Diffusion Models.

Wang, Jiang, Zheng, Wang, He, Wang, Chen, Zhou, NeurIPS 2023, arXiv:2304.12526v2.
Official code: https://github.com/Zhendong-Wang/Patch-Diffusion (an EDM fork; nothing here is copied from it).

The denoiser is trained on random square crops ("patches") of the training images. Each crop carries two extra
input channels with the (x, y) position of its pixels in the full image, in [-1, 1]. The crop size is drawn from
{R/4, R/2, R}; with probability `real_p` it is the full image, and smaller crops come with a proportionally larger
batch. The loss is EDM's loss on the crop. Sampling is plain EDM sampling of a full-size canvas with the full
coordinate grid attached at every network call. `--real_p=1` is plain EDM training (our baseline).

Implemented: pixel-space training (DDPM++, NCSN++, ADM backbones), the stochastic and progressive patch-size
schedules, classifier-free guidance (label dropout in training, `--cfg` in sampling), larger sampling canvases
(coordinate extrapolation). Not implemented: latent-space training (`--train_on_latents=1` needs the Stable Diffusion
VAE, outside this project's dependencies), the augmentation pipe (`--augment` must be 0, as in every paper config).

  # train DDPM++ on CelebA-64 with 8 GPUs (the official README's command)
  torchrun --standalone --nproc_per_node=8 patch_diffusion.py train --outdir=training-runs \\
      --data=datasets/celeba-64x64.zip --cond=0 --arch=ddpmpp --batch=256 --cres=1,2,2,2 --lr=2e-4 \\
      --dropout=0.05 --augment=0 --real_p=0.5
  # 50k images for FID, 50 Heun steps as in the paper
  torchrun --standalone --nproc_per_node=8 patch_diffusion.py generate --steps=50 --resolution=64 --batch=64 \\
      --outdir=fid-tmp --seeds=0-49999 --subdirs --network=training-runs/00000-*/network-snapshot-200000.pt
  torchrun --standalone --nproc_per_node=8 fid.py calc --images=fid-tmp --ref=fid-refs/celeba-64x64.npz
"""

import argparse
import copy
import json

import numpy as np
import torch
from tqdm import tqdm

from common import (AugmentPipe, EDMLoss, EDMPrecond, PerSeedRNG, TrainingRun, UserError, add_train_flags, data_stream,
                    distributed_model, edm_sampler, ema_beta, get_rank, get_world_size, init_distributed, learning_rate,
                    load_checkpoint, load_official, load_training_state, open_dataset, optimizer_step, parse_bool,
                    parse_command_line, parse_int_list, print0, reseed, run_main, save_image_grid,
                    save_seed_images, seed_batches, setup_precision, split_batch, sync_if, update_ema)

#------------------------------------------------------------------------------
# 1. Config. Presets hold the published hyperparameters; flags given on the command line override them.

PRESETS = {
    # Official README, "Train DDPM++ model for CelebA-64x64 using 8 GPUs"; the paper trains for 200 Mimg.
    'celeba64': dict(arch='ddpmpp', batch=256, cres=[1, 2, 2, 2], lr=2e-4, dropout=0.05, augment=0, real_p=0.5, duration=200),
    # NOTE: the paper gives no FFHQ/AFHQv2 command lines; we use the CelebA recipe, 75 Mimg for AFHQv2 (the paper's small-data runs).
    'ffhq64':   dict(arch='ddpmpp', batch=256, cres=[1, 2, 2, 2], lr=2e-4, dropout=0.05, augment=0, real_p=0.5, duration=200),
    'afhqv264': dict(arch='ddpmpp', batch=256, cres=[1, 2, 2, 2], lr=2e-4, dropout=0.05, augment=0, real_p=0.5, duration=75),
    # About 4 minutes on a 2-core CPU: the built-in 16x16 shapes, a 2.7M-parameter DDPM++, 667 steps.
    'demo':     dict(data='demo-16', arch='ddpmpp', cbase=32, cres=[1, 2, 2], batch=32, lr=1e-3, lr_rampup=1, ema=0.002,
                     dropout=0, duration=0.04, tick=5, snap=4, dump=8, real_p=0.5),
}

# Backbones as configured by EDM's train.py (EDM Table 7): DDPM++ (VP), NCSN++ (VE), ADM.
ARCHS = {
    'ddpmpp': dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
                   channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2]),
    'ncsnpp': dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
                   channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2]),
    'adm':    dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4]),
}

#------------------------------------------------------------------------------
# 2. Backbone: EDM's U-Net with two more input channels, fed by a preconditioner that appends the coordinates.

class PatchPrecond(EDMPrecond):
    """EDM preconditioning with coordinate channels (paper: method, coordinate channels; official `Patch_EDMPrecond`):
    D(x; sigma, pos) = c_skip x + c_out F(cat[c_in x, pos]; c_noise). pos is clean and unscaled at every sigma."""
    def __init__(self, img_resolution, img_channels, label_dim=0, **kwargs):
        # NOTE: upstream stores img_channels = C + 2 (the network input); we keep img_channels = C (what the sampler
        # draws) and give the network in_channels = C + 2, out_channels = C.
        super().__init__(img_resolution, img_channels, label_dim, in_channels=img_channels + 2, **kwargs)

    def forward(self, x, sigma, pos, class_labels=None, augment_labels=None):
        x, sigma, class_labels = self.prepare(x, sigma, class_labels)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        pos = pos.to(torch.float32).expand(x.shape[0], -1, -1, -1)
        F_x = self.backbone(torch.cat([c_in * x, pos], dim=1), c_noise, class_labels, augment_labels)  # image first, then (x, y)
        return c_skip * x + c_out * F_x  # EDM Eq. 7 on the patch

def network_kwargs(args, resolution, channels, label_dim):
    """Preconditioner class name and constructor kwargs from the CLI flags (EDM train.py's mapping)."""
    model = dict(ARCHS[args.arch])
    model['model_channels'] = args.cbase or model['model_channels']
    model['channel_mult'] = args.cres or model['channel_mult']
    model.update(dropout=args.dropout, label_dropout=args.label_dropout, augment_dim=9 if args.augment else 0)
    # NOTE: with real_p = 1 every crop is the full image; upstream still feeds the (constant) full-image coordinates,
    # we drop them so that the baseline is exactly EDM (3-channel network, EDMPrecond).
    precond = 'EDMPrecond' if args.real_p == 1 else 'PatchPrecond'
    return precond, dict(img_resolution=resolution, img_channels=channels, label_dim=label_dim, **model)

def build_network(precond, kwargs):
    return {'EDMPrecond': EDMPrecond, 'PatchPrecond': PatchPrecond}[precond](**kwargs)

def size_multiple(net):
    """Side lengths the U-Net accepts are multiples of this: 2 ** (number of downsampling blocks)."""
    return 2 ** sum(name.endswith('_down') for name in net.model.enc)

#------------------------------------------------------------------------------
# 3. Method math: patch-size schedule, random crops with coordinates, the patch loss.

def patch_schedule(resolution, real_p):
    """Patch sizes {R/4, R/2, R} with probabilities (0.4 (1-p), 0.6 (1-p), p) (paper Eq. 5) and their batch
    multipliers R/s (official batch_mul table: 16->4, 32->2, 64->1 at R=64)."""
    sizes = [resolution // 4, resolution // 2, resolution]
    pmf = [0.4 * (1 - real_p), 0.6 * (1 - real_p), real_p]
    # NOTE: upstream looks the multiplier up in a fixed table that has no entry for 8 (so CIFAR-sized data crashes,
    # official issue #3) and gives 1.9 as the average only for R=64; R // s reproduces that table for R=64 and
    # extends it to any resolution.
    batch_mul = [resolution // s for s in sizes]
    return sizes, pmf, batch_mul

def progressive_index(progress, pmf):
    """Progressive schedule (paper ablation): the first size whose cumulative probability reaches progress."""
    cdf = np.cumsum(pmf)
    cdf[-1] = np.inf
    return int(np.argmax(cdf >= progress))

def patch_coordinates(resolution, size, i, j):
    """Coordinate channels of size x size patches at row offsets i and column offsets j ([N] int tensors) in an
    R x R image: channel 0 x = 2 col / (R - 1) - 1, channel 1 y = 2 row / (R - 1) - 1 (official pos_embedding)."""
    steps = torch.arange(size, device=i.device)
    cols = (j[:, None] + steps).float() * 2 / (resolution - 1) - 1  # [N, s]
    rows = (i[:, None] + steps).float() * 2 / (resolution - 1) - 1  # [N, s]
    x = cols[:, None, :].expand(-1, size, -1)  # [N, s, s], constant down each column
    y = rows[:, :, None].expand(-1, -1, size)  # [N, s, s], constant along each row
    return torch.stack([x, y], dim=1)         # [N, 2, s, s]

def random_patches(images, size):
    """One size x size crop per image at an independent uniform offset (rows drawn first), and its coordinates.
    The full size takes the whole image without any random draw."""
    N, C, R, _ = images.shape
    if size == R:
        i = j = torch.zeros(N, dtype=torch.long, device=images.device)
        return images, patch_coordinates(R, size, i, j)
    i = torch.randint(0, R - size + 1, (N,), device=images.device)
    j = torch.randint(0, R - size + 1, (N,), device=images.device)
    steps = torch.arange(size, device=images.device)
    rows, cols = (i[:, None] + steps)[:, :, None], (j[:, None] + steps)[:, None, :]  # [N, s, 1], [N, 1, s]
    patches = images[torch.arange(N, device=images.device)[:, None, None], :, rows, cols]  # [N, s, s, C]
    return patches.permute(0, 3, 1, 2).contiguous(), patch_coordinates(R, size, i, j)  # [N, C, s, s]

def reduce_loss(loss, per_gpu_batch, batch_mul):
    """EDM's reduction: per-patch sum over pixels and channels, mean over the rank's per_gpu_batch * batch_mul
    patches. A 16x16 patch thus weighs 1/16 of a 64x64 image; the official code does this, not a per-pixel mean."""
    return loss.sum() / (per_gpu_batch * batch_mul)

def patch_loss(net, loss_fn, images, labels, size, coords=True, augment_pipe=None):
    """EDM loss on random crops (official `Patch_EDMLoss`): unreduced, shape [N, C, s, s]. The noise is added to the
    image channels only; the coordinates go to the network clean. coords=False is plain EDM (real_p = 1). The
    augmentation, if any, transforms the crop, not its coordinates (official code)."""
    patches, pos = random_patches(images, size)
    if not coords:
        return loss_fn(net, patches, labels, augment_pipe)
    return loss_fn(lambda x, sigma, labels, augment_labels=None: net(x, sigma, pos, labels, augment_labels), patches,
                   labels, augment_pipe)

#------------------------------------------------------------------------------
# 4. Sampler: EDM's Heun sampler over a full canvas, the coordinate grid attached at every call, optional CFG.

def coordinate_canvas(resolution, image_size, x_start=0, y_start=0, device='cpu'):
    """[1, 2, S, S] coordinates of an S x S canvas normalized by the training resolution; a canvas larger than
    it, or a negative start, extrapolates beyond [-1, 1] (official generate.py: --image_size, --x_start, --y_start)."""
    i = torch.tensor([y_start], device=device)
    j = torch.tensor([x_start], device=device)
    return patch_coordinates(resolution, image_size, i, j)

def guided_denoiser(net, pos=None, cfg=None):
    """net(x, sigma, labels) for the sampler. With cfg = w: D = D(x | 0) + w (D(x | y) - D(x | 0)), both halves in
    one batch, the unconditional half with an all-zero label row (paper: ImageNet with w = 1.3; official generate.py --cfg)."""
    call = (lambda x, sigma, labels: net(x, sigma, pos, labels)) if isinstance(net, PatchPrecond) else net
    if cfg is None:
        return call

    def denoise(x, sigma, labels):
        D_uncond, D_cond = call(torch.cat([x, x]), sigma, torch.cat([torch.zeros_like(labels), labels])).chunk(2)
        return D_uncond + cfg * (D_cond - D_uncond)
    return denoise

#------------------------------------------------------------------------------
# 5. Training loop.

def train(args):
    device = init_distributed()
    rank, world_size = get_rank(), get_world_size()
    if args.train_on_latents:
        raise UserError('--train_on_latents=1 needs the Stable Diffusion VAE (sd-vae-ft-ema), which patch_diffusion.py '
                        'does not include yet; train in pixel space (--train_on_latents=0)')
    if not 0 <= args.real_p <= 1 or not 0 <= args.augment <= 1:
        raise UserError(f'--real_p={args.real_p} and --augment={args.augment} must be in [0, 1]')
    amp_dtype, scaler = setup_precision(args.fp16, args.bf16, args.tf32, device)
    dataset = open_dataset(args.data, use_labels=args.cond, xflip=args.xflip)
    R, C = dataset.resolution, dataset.num_channels
    batch_gpu, rounds = split_batch(args.batch, args.batch_gpu, world_size)
    sizes, pmf, batch_mul = patch_schedule(R, args.real_p)
    mul_avg = float(np.dot(pmf, batch_mul))  # expected multiplier: 1.9 at p = 0.5
    precond, net_kwargs = network_kwargs(args, R, C, dataset.label_dim)
    with torch.device('meta'):  # the network's shape only, nothing allocated
        shape_net = build_network(precond, net_kwargs)
    num_params, multiple = sum(p.numel() for p in shape_net.parameters()), size_multiple(shape_net)
    bad = [s for s, p in zip(sizes, pmf) if p > 0 and (s % multiple or s < multiple)]
    if bad:
        raise UserError(f'patch size {bad[0]} (of {sizes} for {R}x{R} images) is not a multiple of {multiple}, which '
                        f'this {len(net_kwargs["channel_mult"])}-level U-Net needs; use fewer levels (--cres) or --real_p=1')
    desc = f'{dataset.name}-{"cond" if args.cond else "uncond"}-{args.arch}-{args.precond}-gpus{world_size}-batch{args.batch}-' \
           f'{"fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"}' + (f'-{args.desc}' if args.desc else '')
    options = dict(vars(args), precond_class=precond, net_kwargs=net_kwargs, num_params=num_params, patch_sizes=sizes,
                   patch_pmf=pmf, batch_mul=batch_mul, batch_mul_avg=mul_avg, batch_gpu=batch_gpu, rounds=rounds,
                   world_size=world_size)
    if args.dry_run:
        print0(json.dumps(options, indent=2))
        return

    # Network, EMA, optimizer, augmentation; a training state to resume from.
    torch.manual_seed(args.seed)
    net = build_network(precond, net_kwargs).to(device).train().requires_grad_(True)
    net.amp_dtype = amp_dtype
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, fused=device.type == 'cuda')
    # EDM train.py's geometric set; the network gets the 9 augmentation parameters as a condition (augment_dim 9).
    augment_pipe = AugmentPipe(p=args.augment, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1) if args.augment else None
    state = load_training_state(args.resume, 'patch_diffusion', rank, world_size, net=net, ema=ema, optimizer=optimizer,
                                scaler=scaler) if args.resume else dict(cur_nimg=0, step=0, data_pos=0)
    cur_nimg, step, data_pos = state['cur_nimg'], state['step'], state['data_pos']
    ddp = distributed_model(net, device, args.compile)
    loss_fn, coords, total_nimg = EDMLoss(), precond == 'PatchPrecond', args.duration * 1e6

    with TrainingRun(args, 'patch_diffusion', desc, options, device, cur_nimg) as run:
        print0(f'Patch Diffusion: {dataset.name} ({len(dataset)} images, {R}x{R}x{C}), {precond} {args.arch}, '
               f'{num_params:,} parameters, device {device}, {world_size} process(es)')
        print0(f'patch sizes {sizes} with probabilities {[round(p, 3) for p in pmf]} and batch multipliers {batch_mul} '
               f'(average {mul_avg:g}); {batch_gpu} images x {rounds} rounds x {world_size} GPUs per step')
        print0(f'run directory {run.dir}; training to {args.duration * 1000:g} kimg (patch counter)')
        stream = data_stream(dataset, batch_gpu, rank, world_size, args.seed, data_pos, args.workers)
        while True:
            # One optimizer step: `rounds` micro-batches, each of one patch size (official training loop).
            rng = reseed(args.seed, rank, cur_nimg)
            optimizer.zero_grad(set_to_none=True)
            if args.progressive:
                k = progressive_index((cur_nimg // 1000) / (args.duration * 1000), pmf)
            for r in range(rounds):
                if not args.progressive:
                    k = int(rng.choice(len(sizes), p=pmf))  # stochastic schedule, drawn per micro-batch and rank
                fetched = [next(stream) for _ in range(batch_mul[k])]  # batch_mul[k] micro-batches -> one of patches
                data_pos += batch_mul[k] * batch_gpu
                images = torch.cat([f[0] for f in fetched]).to(device).to(torch.float32) / 127.5 - 1
                labels = torch.cat([f[1] for f in fetched]).to(device)
                with sync_if(ddp, r == rounds - 1):
                    loss = patch_loss(ddp, loss_fn, images, labels, sizes[k], coords, augment_pipe)
                    run.add('loss', loss)
                    scaler.scale(reduce_loss(loss, batch_gpu * rounds, batch_mul[k]) * args.ls).backward()
            nimg_step = args.batch * (batch_mul[k] if args.progressive else mul_avg)  # patches per step, all ranks
            optimizer_step(optimizer, scaler, learning_rate(args.lr, cur_nimg, args.lr_rampup))
            update_ema(ema, net, ema_beta(cur_nimg, nimg_step, args.ema * 1000))
            cur_nimg += int(nimg_step)  # the patch counter drives kimg, lr ramp-up, EMA and the end of training
            step += 1
            done = cur_nimg >= total_nimg
            if run.due(cur_nimg, done):
                snapshot = run.end_tick(cur_nimg, done, step, data_pos,
                    snapshot=lambda: dict(precond=precond, net_kwargs=net_kwargs, ema=ema.state_dict()),
                    state=lambda: dict(net=net.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict()))
                if snapshot and args.grid:
                    save_sample_grid(ema, snapshot.replace('network-snapshot', 'samples')[:-3] + '.png', args.grid, device)
                if done:
                    break
        print0(f'done: {run.dir}')

@torch.no_grad()
def save_sample_grid(net, path, num, device, num_steps=18):
    """A quick look at training progress: seeds 0..num-1, 18 Heun steps, one PNG grid."""
    rng = PerSeedRNG(range(num), device)
    latents = rng.randn([net.img_channels, net.img_resolution, net.img_resolution], device=device)
    labels = torch.eye(net.label_dim, device=device)[rng.randint(net.label_dim, device=device)] if net.label_dim else None
    pos = coordinate_canvas(net.img_resolution, net.img_resolution, device=device)
    images = edm_sampler(guided_denoiser(net, pos), latents, labels, rng.randn_like, num_steps=num_steps)
    save_image_grid(images, path)

#------------------------------------------------------------------------------
# 6. Generation: one PNG per seed, identical for any --batch and any number of GPUs.

def load_network(path):
    """Our snapshots / training states (.pt), or official EDM and Patch Diffusion pickles (.pkl, path or URL)."""
    if path.endswith('.pkl') or '://' in path:
        official = load_official(path)
        kwargs = dict(official['init_kwargs'])
        if official['precond'] == 'Patch_EDMPrecond':  # upstream: img_channels = network input = C + 2
            out_channels = kwargs.pop('out_channels', None)
            kwargs['img_channels'] = out_channels if out_channels is not None else kwargs['img_channels'] - 2
            precond = 'PatchPrecond'
        elif official['precond'] == 'EDMPrecond':
            precond = 'EDMPrecond'
        else:
            raise UserError(f'{path}: a {official["precond"]} network; patch_diffusion.py samples EDMPrecond and '
                            'Patch_EDMPrecond networks')
        net = build_network(precond, kwargs)
        net.load_state_dict(official['state_dict'])
        return net
    ckpt = load_checkpoint(path)
    if ckpt.get('method') != 'patch_diffusion':
        raise UserError(f'{path}: not a patch_diffusion.py snapshot (method {ckpt.get("method")!r})')
    net = build_network(ckpt['precond'], ckpt['net_kwargs'])
    net.load_state_dict(ckpt['ema'])
    return net

@torch.no_grad()
def generate(args):
    device = init_distributed()
    rank, world_size = get_rank(), get_world_size()
    if args.on_latents:
        raise UserError('--on_latents=1 needs the Stable Diffusion VAE decoder, which patch_diffusion.py does not include yet')
    net = load_network(args.network).to(device).eval()
    resolution = args.resolution or net.img_resolution
    image_size = args.image_size or resolution
    if image_size % size_multiple(net):
        raise UserError(f'--image_size={image_size} must be a multiple of {size_multiple(net)} for this U-Net')
    if args.class_idx is not None and not 0 <= args.class_idx < max(net.label_dim, 1):
        raise UserError(f'--class={args.class_idx}: the network has {net.label_dim} classes')
    if args.cfg is not None and not net.label_dim:
        raise UserError('--cfg needs a class-conditional network')
    pos = coordinate_canvas(resolution, image_size, args.x_start, args.y_start, device)
    denoise = guided_denoiser(net, pos, args.cfg)
    sampler_kwargs = dict(num_steps=args.steps, sigma_min=args.sigma_min, sigma_max=args.sigma_max, rho=args.rho,
                          S_churn=args.S_churn, S_min=args.S_min, S_max=args.S_max, S_noise=args.S_noise)
    batches = seed_batches(args.seeds, args.batch, rank, world_size)
    print0(f'generating {len(args.seeds)} images of {image_size}x{image_size} with {args.steps} steps into {args.outdir}')
    for seeds in tqdm(batches, unit='batch', disable=rank != 0):
        rng = PerSeedRNG(seeds, device)
        latents = rng.randn([net.img_channels, image_size, image_size], device=device)
        labels = None
        if net.label_dim:
            labels = torch.eye(net.label_dim, device=device)[rng.randint(net.label_dim, device=device)]
            if args.class_idx is not None:
                labels[:] = 0
                labels[:, args.class_idx] = 1
        images = edm_sampler(denoise, latents, labels, rng.randn_like, **sampler_kwargs)
        save_seed_images(images, seeds, args.outdir, args.subdirs)
    torch.distributed.barrier()
    print0('done')

#------------------------------------------------------------------------------
# 7. Command line.

def build_parser(preset=None):
    """The parser; `preset` (a PRESETS name) becomes the defaults of `train` (see common.parse_command_line)."""
    parser = argparse.ArgumentParser(description='Patch Diffusion (Wang et al. 2023) on EDM',
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    t = sub.add_parser('train', help='train a model', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_train_flags(t)
    t.add_argument('--preset', choices=sorted(PRESETS), default=None, help='published hyperparameters; flags override')
    t.add_argument('--arch', choices=sorted(ARCHS), default='ddpmpp', help='backbone: DDPM++, NCSN++ or ADM')
    t.add_argument('--precond', choices=['edm', 'pedm'], default='edm', help='EDM preconditioning (pedm: the official name)')
    t.add_argument('--cbase', type=int, default=None, metavar='INT', help='base channel count; None = the arch\'s (128 DDPM++/NCSN++, 192 ADM)')
    t.add_argument('--cres', type=parse_int_list, default=None, metavar='LIST', help='channel multipliers per resolution, e.g. 1,2,2,2; None = the arch\'s')
    t.add_argument('--augment', type=float, default=0, metavar='P', help='EDM augmentation probability (EDM: 0.12; every paper config: 0)')
    t.add_argument('--label-dropout', type=float, default=0, metavar='P', help='drop labels with this probability (for --cfg)')
    t.add_argument('--real_p', type=float, default=0.5, metavar='P', help='probability of full-size images (paper Eq. 5); 1 = EDM')
    t.add_argument('--progressive', type=parse_bool, default=False, metavar='BOOL', help='progressive patch-size schedule (ablation)')
    t.add_argument('--train_on_latents', type=parse_bool, default=False, metavar='BOOL', help='latent training (not implemented)')
    t.add_argument('--grid', type=int, default=64, metavar='INT', help='images in the sample grid written with each snapshot; 0 = none')
    t.set_defaults(**PRESETS.get(preset, {}))

    g = sub.add_parser('generate', help='generate images', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g.add_argument('--network', required=True, metavar='PT|PKL|URL', help='network snapshot (ours .pt, or official .pkl)')
    g.add_argument('--outdir', required=True, metavar='DIR', help='where to write {seed:06d}.png')
    g.add_argument('--seeds', type=parse_int_list, default='0-63', metavar='LIST', help='random seeds, e.g. 0-49999')
    g.add_argument('--subdirs', action='store_true', help='put seeds in folders of 1,000')
    g.add_argument('--class', dest='class_idx', type=int, default=None, metavar='INT', help='class label; None = random')
    g.add_argument('--batch', type=int, default=64, metavar='INT', help='images per batch per GPU')
    g.add_argument('--steps', type=int, default=18, metavar='INT', help='Heun steps (the paper uses 50 for 64x64)')
    g.add_argument('--sigma_min', type=float, default=0.002, metavar='FLOAT', help='lowest noise level')
    g.add_argument('--sigma_max', type=float, default=80, metavar='FLOAT', help='highest noise level')
    g.add_argument('--rho', type=float, default=7, metavar='FLOAT', help='time step exponent (EDM Eq. 5)')
    g.add_argument('--S_churn', type=float, default=0, metavar='FLOAT', help='stochasticity strength (EDM Alg. 2)')
    g.add_argument('--S_min', type=float, default=0, metavar='FLOAT', help='lowest sigma with churn')
    g.add_argument('--S_max', type=float, default=float('inf'), metavar='FLOAT', help='highest sigma with churn')
    g.add_argument('--S_noise', type=float, default=1, metavar='FLOAT', help='churn noise inflation')
    g.add_argument('--resolution', type=int, default=None, metavar='INT', help='coordinate normalization size; None = training size')
    g.add_argument('--image_size', type=int, default=None, metavar='INT', help='canvas size; None = --resolution; larger extrapolates')
    g.add_argument('--x_start', type=int, default=0, metavar='INT', help='column of the canvas\'s left edge in the coordinate grid')
    g.add_argument('--y_start', type=int, default=0, metavar='INT', help='row of the canvas\'s top edge in the coordinate grid')
    g.add_argument('--cfg', type=float, default=None, metavar='W', help='classifier-free guidance weight (paper: 1.3)')
    g.add_argument('--on_latents', type=parse_bool, default=False, metavar='BOOL', help='decode latents (not implemented)')
    return parser

def parse_args(argv=None):
    return parse_command_line(build_parser, argv)

def main():
    args = parse_command_line(build_parser)
    run_main(train if args.command == 'train' else generate, args)

if __name__ == '__main__':
    main()
