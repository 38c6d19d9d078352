"""GDD / GDD-I: Diffusion Models Are Innate One-Step Generators.

Zheng, Yang, arXiv:2405.20750v2 (2024); the revised version (arXiv:2506.09376, "D2O / D2O-F") changes names only.
The paper states the loss in words, so comments cite the official code's files and functions.
Official code: https://github.com/Zyriix/GDD at e9267e8 (an EDM + StyleGAN-XL fork; nothing here is copied from it).

A pretrained EDM denoiser D (the teacher) becomes a one-step generator G: same architecture, initialized from the
teacher's EMA weights, evaluated once at sigma = 80 on pure noise, x = G(80 z; 80, c). G is trained with a GAN loss
only (the "exclusive distributional loss"): no regression to the teacher, no teacher at train time. The discriminator
is a projected one (StyleGAN-XL / Projected GAN): frozen ImageNet feature networks, fixed random projections, and
small trained heads with spectral norm. GDD fine-tunes every generator parameter; GDD-I freezes the 3x3 convolutions
of every residual block and the attention output projections (84% of the parameters) and trains the rest.

Implemented: GDD and GDD-I for NCSN++ and ADM teachers (ours or official EDM .pkl), the projected discriminator with
VGG16-BN, EfficientNet-lite0 and DeiT-B/16-distilled in plain torch (the state-dict keys of the public torchvision /
timm weight files, which are data files, no download: see --feature-weights), the non-saturating loss with lazy R1,
one-step generation, official GDD .pkl generators. Not implemented: the instance-distillation baselines left in the
official loss file (PD/CD/CTM targets, not runnable upstream), multi-step generators, DiffAugment/ADA (off in all runs).

  # GDD-I on CIFAR-10 with 4 GPUs (train.sh's settings), from the official EDM teacher
  torchrun --standalone --nproc_per_node=4 gdd.py train --preset=cifar10_gddi --data=datasets/cifar10-32x32.zip \\
      --transfer=pretrained/edm-cifar10-32x32-uncond-ve.pkl \\
      --feature-weights=weights/vgg16_bn-6c64b313.pth,weights/tf_efficientnet_lite0-0aa007d2.pth
  # 50k one-step images for FID
  torchrun --standalone --nproc_per_node=8 gdd.py generate --outdir=fid-tmp --seeds=0-49999 --subdirs --batch=256 \\
      --network=training-runs/00000-cifar10-32x32-uncond-gddi-gpus4-batch256-bf16/network-snapshot-005000.pt
  torchrun --standalone --nproc_per_node=8 fid.py calc --images=fid-tmp --ref=fid-refs/cifar10-32x32.npz
"""

import argparse
import math
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

from common import (EDMPrecond, Parser, PerSeedRNG, TrainingRun, UNetBlock, UsageError, UserError,
                    add_edm_train_flags, add_generate_flags, add_metric_flags, add_train_flags,
                    check_class, check_outdir, distributed_model, edm_backbone_kwargs, ema_beta,
                    get_rank, get_world_size, init_distributed, is_official, learning_rate,
                    load_checkpoint, load_official, load_snapshot, load_weights, network_and_ema,
                    number, open_dataset, optimizer_step, parse_command_line, parse_int_list,
                    print0, print_options, reseed, run_desc, run_main, save_image_grid,
                    save_seed_images, seed_batches, seed_labels, setup_precision, split_batch,
                    sync_if, training_metrics, update_ema, working)

#------------------------------------------------------------------------------
# 1. Config. Presets are the runs of the official train.sh (Zyriix/GDD:train.sh, 4 GPUs there);
#    `_gdd` and `_gddi` differ only in --freeze. The flag defaults are train.sh's too: --tick=25
#    --snap=10 --dropout=0 --lr-rampup=0 --r1-gamma=1e-4 --r1-interval=16. Teachers: the official
#    EDM checkpoints named in each comment.

# The flags train.sh gives every run, then per dataset (the same for AFHQv2 and FFHQ).
TRAIN_SH = dict(batch=256, ema=0.5, bf16=True, seed=42)
CIFAR10 = TRAIN_SH | dict(arch='ncsnpp', backbone='1', lr=1e-4, dlr=1e-4, duration=5)
CIFAR10_COND = CIFAR10 | dict(cond=True)
AFHQ_FFHQ64 = TRAIN_SH | dict(arch='ncsnpp', cres=[1, 2, 2, 2], backbone='0', lr=2e-5, dlr=4e-5,
                              duration=10)
IMAGENET64 = TRAIN_SH | dict(arch='adm', cond=True, backbone='0', batch=512, lr=8e-6, dlr=4e-5,
                             duration=10, ema=50)

PRESETS = {
    # CIFAR-10 unconditional, teacher edm-cifar10-32x32-uncond-ve.pkl,
    # VGG16-BN + EfficientNet-lite0 (--backbone=1)
    'cifar10_gdd': CIFAR10 | dict(freeze=0),
    'cifar10_gddi': CIFAR10 | dict(freeze=1),
    # CIFAR-10 conditional, teacher edm-cifar10-32x32-cond-ve.pkl
    'cifar10_cond_gdd': CIFAR10_COND | dict(freeze=0),
    'cifar10_cond_gddi': CIFAR10_COND | dict(freeze=1),
    # AFHQv2 64x64, teacher edm-afhqv2-64x64-uncond-ve.pkl,
    # DeiT-B/16-distilled + EfficientNet-lite0 (--backbone=0)
    'afhqv264_gdd': AFHQ_FFHQ64 | dict(freeze=0),
    'afhqv264_gddi': AFHQ_FFHQ64 | dict(freeze=1),
    # FFHQ 64x64, teacher edm-ffhq-64x64-uncond-ve.pkl
    'ffhq64_gdd': AFHQ_FFHQ64 | dict(freeze=0),
    'ffhq64_gddi': AFHQ_FFHQ64 | dict(freeze=1),
    # ImageNet 64x64 conditional, teacher edm-imagenet-64x64-cond-adm.pkl
    'imagenet64_gdd': IMAGENET64 | dict(freeze=0),
    'imagenet64_gddi': IMAGENET64 | dict(freeze=1),
    # Ours, CPU demo (about 9 CPU-minutes): GDD (every parameter trained) on the 8x8 shapes from
    # patch_diffusion.py's demo teacher. The discriminator's features are the teacher's own U-Net maps
    # of the images with noise 0.05 (--backbone=teacher, after LADD), heads capped at 64 channels, one
    # D pass for fakes and reals, lr 5e-4, R1 gamma 0.01, 1,920 iterations (docs/gdd.md, CPU demo: every
    # setting tried).
    'demo': dict(data='demo-8', backbone='teacher', feature_sigma=0.05, head_width=64, d_pass='joint',
                 batch=16, lr=5e-4, dlr=5e-4, r1_gamma=0.01, duration=0.03072, tick=1.6, snap=2, dump=100,
                 freeze=0, workers=0),
}

# Feature networks of the discriminator by the official --backbone numbers (train.py):
# 0 DeiT + EfficientNet, 1 VGG + EfficientNet, 3 EfficientNet only; the networks are in the appendix.
FEATURE_NETWORK_SETS = {'0': ['deit_base_distilled_patch16_224', 'tf_efficientnet_lite0'],
             '1': ['vgg16_bn', 'tf_efficientnet_lite0'], '3': ['tf_efficientnet_lite0']}

#------------------------------------------------------------------------------
# 2. Backbone: the teacher's U-Net with GDD's preconditioning; GDD-I's frozen set.

# The generator's one noise level: EDM's sigma_max (official training/loss.py, GDDLoss).
SIGMA_MAX = 80.0

class GDDPrecond(EDMPrecond):
    """EDM preconditioning with c_skip and c_out shifted by eps (official training/networks.py, GDDPrecond); c_in
    and c_noise are EDM's. At sigma = 80 this differs from the teacher's D by 2.5e-5 relative."""
    def __init__(self, img_resolution, img_channels, label_dim=0, eps=0.002, **kwargs):
        super().__init__(img_resolution, img_channels, label_dim, **kwargs)
        self.eps = eps  # shift of c_skip/c_out (the sampler's sigma_min)

    def coefficients(self, sigma):
        _, _, c_in, c_noise = super().coefficients(sigma)
        s_d = self.sigma_data
        c_skip = s_d ** 2 / ((sigma - self.eps) ** 2 + s_d ** 2)           # GDDPrecond c_skip
        c_out = (sigma - self.eps) * s_d / (sigma ** 2 + s_d ** 2).sqrt()  # GDDPrecond c_out
        # NOTE: c_out's root has the unshifted sigma, as upstream.
        return c_skip, c_out, c_in, c_noise

def generator_kwargs(teacher_kwargs, dropout=0):
    """GDDPrecond kwargs from a teacher's: no augmentation conditioning, no label dropout, --dropout (train.sh: 0)."""
    kwargs = {k: v for k, v in teacher_kwargs.items() if k not in ('augment_dim', 'eps')}
    return dict(kwargs, augment_dim=0, dropout=dropout, label_dropout=0)

def network_kwargs(args, resolution, channels, label_dim):
    """GDDPrecond kwargs of --arch/--cres as EDM's train.py builds them (`train -n`)."""
    model = edm_backbone_kwargs(args.arch, None, args.cres)
    model.update(dropout=args.dropout, label_dropout=0, augment_dim=0)
    return dict(img_resolution=resolution, img_channels=channels, label_dim=label_dim, **model)

# The residual-block (UNetBlock) parts each --freeze level keeps fixed; level 1 is the paper's GDD-I. Official
# train.py's freeze_layer per level: 1 ['conv', 'proj'], 2 adds 'qkv', 3 adds 'skip'.
FREEZE_PARTS = {0: (), 1: ('conv0', 'conv1', 'proj'), 2: ('conv0', 'conv1', 'proj', 'qkv'),
                3: ('conv0', 'conv1', 'proj', 'qkv', 'skip')}
VARIANTS = ('gdd', 'gddi', 'gddi-qkv', 'gddi-qkv-skip')  # the run directory's tag of each level

def frozen_names(net, level=1):
    """Names of the generator parameters that --freeze=level keeps fixed, by module type; upstream's substring rule
    (official training/training_loop.py) picks exactly these on EDM's SongUNet and DhariwalUNet."""
    names = []
    for prefix, module in net.named_modules():
        if isinstance(module, UNetBlock):
            for part in FREEZE_PARTS[level]:
                if getattr(module, part, None) is not None:
                    params = getattr(module, part).named_parameters()
                    names += [f'{prefix}.{part}.{n}' for n, _ in params]
    return names

def freeze(net, level):
    """GDD-I: no gradients for the parameters frozen_names(net, level) lists, set before DDP
    wraps the network (frozen tensors are then not its parameters); returns their names."""
    frozen = frozen_names(net, level)
    for name, p in net.named_parameters():
        p.requires_grad_(name not in frozen)
    return frozen

def parameter_counts(net, frozen):
    total, frozen = sum(p.numel() for p in net.parameters()), set(frozen)
    num_frozen = sum(p.numel() for n, p in net.named_parameters() if n in frozen)
    return dict(total=total, frozen=num_frozen, trainable=total - num_frozen)

def init_from_teacher(net, state, where):
    """Copy the teacher's EMA parameters and buffers by name (official misc.copy_params_and_buffers). Buffers
    matter: NCSN++'s Fourier frequencies are random per checkpoint. The teacher's map_augment is dropped."""
    load_weights(net, {k: v for k, v in state.items() if not k.startswith('model.map_augment.')}, where)
    return net

#------------------------------------------------------------------------------
# 3. Method math: the GAN losses with lazy R1 and one training iteration (official training/loss.py, GDDLoss, and
#    training/training_loop.py). The projected discriminator D is not GDD's: see the appendix.

def gan_loss(logits, target_real):
    """Non-saturating logistic loss per sample, [N]: sum over networks of the mean over that network's logits of
    softplus(-l) (target real) or softplus(l) (target fake) (official GDDLoss, the G and D terms)."""
    sign = -1 if target_real else 1
    return sum(F.softplus(sign * l).mean(dim=1) for l in logits)

def r1_penalty(features, D, images, labels):
    """||grad_x sum of all real logits||^2 per sample, [N] (lazy R1, StyleGAN2), by double backward through D."""
    x = images.detach().requires_grad_(True)
    logits = D(features(x), labels)
    grad, = torch.autograd.grad(sum(l.sum() for l in logits), x, create_graph=True)
    return grad.square().sum(dim=[1, 2, 3])  # official GDDLoss, the R1 term

# NOTE: upstream (and the default --d-pass=separate) sends fakes and reals through D in separate passes: the heads'
# train-mode BatchNorm then erases a difference in a feature's batch mean or spread between them. --d-pass=joint (CPU
# demos) sends one batch, as BigGAN-PyTorch does "so that BN stats are shared" (BigGAN.py, G_D.forward); R1 is reals.
def joint_logits(D, features, fake, images, labels):
    """D's logits of [fakes; reals] in one pass, split back: (fake logits, real logits), one [N, L_k] each."""
    n = fake.shape[0]
    both = None if labels is None else torch.cat([labels, labels])
    logits = D(features(torch.cat([fake, images])), both)                 # [2N, L_k] per network
    return [l[:n] for l in logits], [l[n:] for l in logits]

def g_step(ddp_G, features, D, micro_batches, gan_weight=1, run=None, ls=1, joint=False):
    """G's gradient through D's frozen heads and the feature networks; fresh noise from the global RNG (reseeded
    per step), fakes not clamped. The plain D: no D gradient is needed (upstream: the DDP wrapper, same result)."""
    D.requires_grad_(False)
    for r, (images, labels) in enumerate(micro_batches):
        with sync_if(ddp_G, r == len(micro_batches) - 1):
            z = torch.randn_like(images)
            fake = ddp_G(z * SIGMA_MAX, SIGMA_MAX, labels)  # x = G(80 z; 80, c)
            if joint:
                logits = joint_logits(D, features, fake, images, labels)[0]
            else:
                logits = D(features(fake), labels)
            loss = gan_loss(logits, target_real=True)
            (loss.sum() * gan_weight * ls).backward()
        if run:
            run.add('loss_G', loss)
    D.requires_grad_(True)

def d_step(G, features, ddp_D, micro_batches, run=None, ls=1, joint=False):
    """D's gradient: fakes without grad, then reals, forwarded separately (BatchNorm batch
    statistics per pass); joint: in one pass."""
    for r, (images, labels) in enumerate(micro_batches):
        with torch.no_grad():
            fake = G(torch.randn_like(images) * SIGMA_MAX, SIGMA_MAX, labels)
        if joint:
            with sync_if(ddp_D, r == len(micro_batches) - 1):
                logits_fake, logits_real = joint_logits(ddp_D, features, fake, images, labels)
                loss_fake, loss_real = gan_loss(logits_fake, False), gan_loss(logits_real, True)
                ((loss_fake.sum() + loss_real.sum()) * ls).backward()
        else:
            with ddp_D.no_sync():
                loss_fake = gan_loss(ddp_D(features(fake), labels), target_real=False)
                (loss_fake.sum() * ls).backward()
            with sync_if(ddp_D, r == len(micro_batches) - 1):
                loss_real = gan_loss(ddp_D(features(images), labels), target_real=True)
                (loss_real.sum() * ls).backward()
        if run:
            run.add('loss_D', loss_fake + loss_real)

def r1_step(features, ddp_D, micro_batches, gamma, interval, run=None, ls=1):
    """Lazy R1's gradient: gamma / 2 x the mean penalty over the rank's batch, times the interval (StyleGAN2)."""
    n = sum(images.shape[0] for images, _ in micro_batches)
    for r, (images, labels) in enumerate(micro_batches):
        with sync_if(ddp_D, r == len(micro_batches) - 1):
            penalty = r1_penalty(features, ddp_D, images, labels)
            (penalty.sum() / n * (gamma / 2) * interval * ls).backward()
        if run:
            run.add('r1_penalty', penalty)

def gdd_iteration(G, ddp_G, features, D, ddp_D, opt_G, opt_D, micro_batches, step, lr_G, lr_D,
                  scaler, gan_weight=1, r1_gamma=1e-4, r1_interval=16, ls=1, run=None, joint=False):
    """One iteration on the rank's real micro-batches [(images, labels)]: G step, D step and, every r1_interval
    iterations (not at 0), an R1 step, each its own Adam step (official training_loop.py). NOTE: as upstream, the loss
    is a SUM of per-sample means over the rank's samples and networks (DDP averages ranks): it sets the D/R1 balance."""
    opt_G.zero_grad(set_to_none=True)
    g_step(ddp_G, features, D, micro_batches, gan_weight, run, ls, joint)
    optimizer_step(opt_G, scaler, lr_G)
    opt_D.zero_grad(set_to_none=True)
    d_step(G, features, ddp_D, micro_batches, run, ls, joint)
    optimizer_step(opt_D, scaler, lr_D)
    if step > 0 and step % r1_interval == 0 and r1_gamma > 0:  # iterations 16, 32, ..., never 0
        opt_D.zero_grad(set_to_none=True)
        r1_step(features, ddp_D, micro_batches, r1_gamma, r1_interval, run, ls)
        optimizer_step(opt_D, scaler, lr_D)

def build_optimizers(G, D, frozen, lr, dlr, r1_interval=16):
    """Adam (0, 0.99) for G's trainable parameters; D's with StyleGAN2's lazy-regularization corrections: lr x c
    and beta2 = 0.99^c, c = interval / (interval + 1) (official training_loop.py)."""
    c, frozen = r1_interval / (r1_interval + 1), set(frozen)
    params = [p for name, p in G.named_parameters() if name not in frozen]
    fused = params[0].is_cuda  # one fused kernel per step on GPUs
    opt_G = torch.optim.Adam(params, lr=lr, betas=(0.0, 0.99), eps=1e-8, fused=fused)
    opt_D = torch.optim.Adam(D.parameters(), lr=dlr * r1_interval / (r1_interval + 1),
                             betas=(0.0, 0.99 ** c), eps=1e-8, fused=fused)
    return opt_G, opt_D

#------------------------------------------------------------------------------
# 4. Sampler: one network evaluation (official generate.py, one_step_sampler).

@torch.no_grad()
def one_step_sampler(net, latents, labels=None, randn_like=torch.randn_like, sigma_max=SIGMA_MAX):
    """x = G(sigma_max z; sigma_max, c): float64 input, network in float32. One step draws no
    noise (randn_like is there for edm_sampler's signature)."""
    sigma = torch.full([latents.shape[0], 1, 1, 1], float(sigma_max), dtype=torch.float64,
                       device=latents.device)
    return net(latents.to(torch.float64) * sigma, sigma, labels).to(torch.float64)

def sample_images(net, seeds, device, class_idx=None, sigma_max=SIGMA_MAX):
    """Images of `seeds` as generate makes them (also the grid and train --metrics): per-seed latents, then a
    per-seed uniform class that --class overrides (EDM generate.py); every draw from the image's own generator."""
    rng = PerSeedRNG(seeds, device)
    latents = rng.randn([net.img_channels, net.img_resolution, net.img_resolution], device=device)
    labels = seed_labels(rng, net.label_dim, class_idx, device)
    return one_step_sampler(net, latents, labels, sigma_max=sigma_max)

#------------------------------------------------------------------------------
# 5. Training loop (official training/training_loop.py).

def training_setup(args, world_size):
    """(dataset, generator kwargs, info for training_options.json); every flag checked before a file is written."""
    if args.fp16:
        raise UsageError('--fp16 is not supported: GDD trains in bf16 (upstream\'s --fp16=True '
                         'means bf16); use --bf16')
    dataset = open_training_data(args)
    names = parse_feature_networks(args.backbone)
    R = dataset.resolution
    C = dataset.num_channels
    if C not in (1, 3):
        raise UsageError(f'--data={args.data}: {C}-channel images; the feature networks take RGB '
                         'or grey')
    batch_gpu, rounds = split_batch(args.batch, args.batch_gpu, world_size)
    net_kwargs = generator_source(args, R, C, dataset.label_dim)
    if 'teacher' in names and dataset.label_dim:
        raise UsageError(f'--backbone={args.backbone}: the teacher as a feature network takes unconditional '
                         'teachers only')
    counts = check_and_count(net_kwargs, names, args.freeze, args.feature_res, dataset.label_dim,
                             args.head_width, args.feature_sigma)
    info = dict(net_kwargs=net_kwargs, feature_networks=names, parameters=counts,
                batch_gpu=batch_gpu, rounds=rounds, world_size=world_size)
    return dataset, net_kwargs, info

def build_generator(args, net_kwargs):
    """G: the teacher's architecture and EMA weights (--transfer); --resume loads the training state's instead."""
    net = GDDPrecond(**net_kwargs)
    if not args.resume:
        init_from_teacher(net, load_teacher(args.transfer)[1], f'--transfer={args.transfer}')
    return net

def train(args):
    # Setup: flags checked against the data and the teacher; a dry run stops here.
    device = init_distributed()
    dataset, net_kwargs, info = training_setup(args, get_world_size())
    if args.dry_run:  # the --arch/--cres architecture; the teacher is not read
        print_options(args, info)
        return
    amp_dtype, scaler = setup_precision(False, args.bf16 and device.type == 'cuda', args.tf32, device)  # as upstream
    # The generator from the teacher (GDD-I: frozen convs), the discriminator, their optimizers.
    net, ema = network_and_ema(build_generator(args, net_kwargs), device, amp_dtype)
    frozen = freeze(net, args.freeze)
    features, D = build_discriminator(info['feature_networks'], args.seed, args.feature_res, dataset.label_dim,
                                      args.feature_weights, args.class_embedding, args.head_width,
                                      (net_kwargs, args.feature_sigma, args.transfer))
    features, D = features.to(device), D.to(device)
    opt_G, opt_D = build_optimizers(net, D, frozen, args.lr, args.dlr, args.r1_interval)
    lr_D = opt_D.param_groups[0]['lr']  # --dlr with the lazy-R1 correction
    run = training_run(args, dataset, info, device, amp_dtype, net=net, ema=ema, D=D, optimizer_G=opt_G,
                       optimizer_D=opt_D)
    ddp_G, ddp_D = distributed_pair(net, D, device, args.compile)
    stream = run.data(dataset, info['batch_gpu'], args.seed, args.workers)
    with run:
        print_header(args, dataset, info, amp_dtype, run.dir)
        while not run.done:
            # This step's randomness: a resumed run replays it.
            reseed(args.seed, get_rank(), run.cur_nimg)
            # Fetch data: `rounds` real micro-batches in [-1, 1]; the fakes take their labels. NOTE: upstream
            # takes one batch_gpu batch whatever --batch-gpu says, yet counts --batch images; we accumulate.
            batches = [next(stream) for _ in range(info['rounds'])]
            reals = [(x.to(device).to(torch.float32) / 127.5 - 1,
                      c.to(device) if dataset.label_dim else None) for x, c in batches]
            # The paper's loss (GAN loss only), backward, optimizers: G step, D step, every --r1-interval lazy R1.
            lr_G = learning_rate(args.lr, run.cur_nimg, args.lr_rampup)
            gdd_iteration(net, ddp_G, features, D, ddp_D, opt_G, opt_D, reals, run.step, lr_G,
                          lr_D, scaler, args.gan_weight, args.r1_gamma, args.r1_interval,
                          args.ls, run, args.d_pass == 'joint')
            # EMA of the generator (half-life --ema, EDM's ramp-up; n = images before this step).
            update_ema(ema, net, ema_beta(run.cur_nimg, args.batch, args.ema * 1000))
            # Tick: status line, snapshots, metrics.
            run.end_step(args.batch)
        print0(f'done: {run.dir}')

#------------------------------------------------------------------------------
# 6. Generation: one network evaluation per image, one PNG per seed, the same for any --batch and GPU count.

def load_network(path):
    """Our gdd.py snapshots / training states (.pt), or an official GDD .pkl (path or URL)."""
    precond, kwargs, state = read_network(path, '--network', ['gdd'])
    if is_official(path) and precond != 'GDDPrecond':  # a .pt is ours (method gdd)
        raise UsageError(f'--network={path}: a {precond} network, not a one-step GDD generator (GDDPrecond); '
                         'sample EDM teachers with patch_diffusion.py generate')
    net = GDDPrecond(**kwargs)
    load_weights(net, state, f'--network={path}')
    return net

@torch.no_grad()
def generate(args):
    device, rank, world_size = init_distributed(), get_rank(), get_world_size()
    check_outdir(args.outdir)
    net = load_network(args.network).to(device).eval()
    check_class(args.class_idx, net.label_dim)
    R = net.img_resolution
    print0(f'generating {len(args.seeds)} images of {R}x{R}, one step each, into {args.outdir}')
    with working(), tqdm(total=len(args.seeds), unit='img', disable=rank != 0) as bar:
        for seeds in seed_batches(args.seeds, args.batch, rank, world_size):
            images = sample_images(net, seeds, device, args.class_idx, args.sigma_max)
            save_seed_images(images, seeds, args.outdir, args.subdirs)
            bar.update(len(seeds) * world_size)
        torch.distributed.barrier()
    print0('done')

#------------------------------------------------------------------------------
# 7. Command line.

def build_parser(preset=None):
    """The parser; a PRESETS name `preset` gives `train` its defaults (common.parse_command_line)."""
    parser = Parser(description='GDD / GDD-I (Zheng & Yang 2024): one-step generators from EDM teachers')
    sub = parser.add_subparsers(dest='command', required=True)
    t = sub.add_parser('train', help='distill a teacher into a one-step generator')
    add_train_flags(t, duration=5, batch=256, lr=1e-4, dropout=0, tick=25, snap=10)
    add_edm_train_flags(t, ema=0.5, lr_rampup=0)  # upstream: no lr warm-up
    t.add_argument('--preset', choices=sorted(PRESETS), default=None,
                   help='train.sh\'s settings; flags override')
    t.add_argument('--transfer', default=None, metavar='PT|PKL|URL',
                   help='teacher: EDM snapshot .pt (ours) or official edm-*.pkl (required)')
    t.add_argument('--freeze', type=int, choices=sorted(FREEZE_PARTS), default=0,
                   help='0 = GDD; 1 = GDD-I: freeze the blocks\' 3x3 convs and attention proj; 2 = '
                        'also attention qkv; 3 = also the blocks\' skips')
    t.add_argument('--arch', choices=['ddpmpp', 'ncsnpp', 'adm'], default='ncsnpp',
                   help='teacher architecture for `train -n` (a run uses the teacher\'s)')
    t.add_argument('--cres', type=parse_cres, default=None, metavar='LIST',
                   help='channel multipliers for `train -n`; None = the arch\'s')
    t.add_argument('--dlr', type=number(float, 0, 1, low_open=True), default=1e-4, metavar='FLOAT',
                   help='discriminator lr before the lazy-R1 correction x interval / (interval + 1)')
    t.add_argument('--r1-gamma', type=number(float, 0, 1e4), default=1e-4, metavar='FLOAT',
                   help='R1 weight; 0 = no R1')
    t.add_argument('--r1-interval', type=number(int, 1, 10**6), default=16, metavar='INT',
                   help='steps between lazy R1 steps')
    t.add_argument('--gan-weight', type=number(float, 0, 1e3), default=1, metavar='FLOAT',
                   help='weight of G\'s adversarial loss (1; 0 only for tests)')
    t.add_argument('--backbone', type=check_feature_networks, default='1', metavar='0|1|3|LIST',
                   help='feature networks: official numbers (0 DeiT+EffNet, 1 VGG+EffNet, 3 '
                        'EffNet) or a comma list of vgg16_bn, tf_efficientnet_lite0, '
                        'deit_base_distilled_patch16_224, teacher (the teacher\'s U-Net; ours, '
                        'after LADD)')
    t.add_argument('--feature-weights', default=None, metavar='PTH,...|random|random-he',
                   help='ImageNet weight files of the feature networks in --backbone order '
                        '(torchvision/timm .pth); random / random-he = untrained, PyTorch\'s / '
                        'timm\'s He-normal init (demos only)')
    t.add_argument('--feature-sigma', type=number(float, 0.002, 80), default=0.1, metavar='FLOAT',
                   help='noise level of the images the teacher sees with --backbone=teacher (ours)')
    t.add_argument('--feature-res', type=number(int, 32, 1024), default=224, metavar='INT',
                   help='side the images are resized to for the feature networks (official 224; '
                        'smaller only for CPU tests/demos)')
    t.add_argument('--d-pass', choices=['separate', 'joint'], default='separate',
                   help='fakes and reals through D in separate passes (upstream) or one '
                        '(BatchNorm statistics shared; CPU demos)')
    t.add_argument('--head-width', type=number(int, 1, 2048), default=None, metavar='INT',
                   help='cap on the discriminator heads\' widths (CPU demos); None = upstream\'s (up to 2048)')
    t.add_argument('--class-embedding', default=None, metavar='PT|random',
                   help='[1000, 320] class table of the conditional heads (official in_embeddings/'
                        'tf_efficientnet_lite0.pkl as a tensor file); None/random = N(0, 1)')
    t.add_argument('--grid', type=number(int, 0, 1024), default=64, metavar='INT',
                   help='one-step samples in the grid written with each snapshot; 0 = none')
    add_metric_flags(t)
    t.set_defaults(**PRESETS.get(preset, {}))

    g = sub.add_parser('generate', help='generate images, one network evaluation each')
    g.add_argument('--network', required=True, metavar='PT|PKL|URL',
                   help='gdd.py snapshot .pt, or official GDD .pkl')
    add_generate_flags(g, edm_sampler=False)
    g.add_argument('--class', dest='class_idx', type=int, default=None, metavar='INT',
                   help='class label; None = random')
    g.add_argument('--sigma_max', type=number(float, 0, 1e3, low_open=True), default=SIGMA_MAX,
                   metavar='FLOAT', help='the noise level of the one step (the generator was trained at 80)')
    return parser

def main():
    args = parse_command_line(build_parser)
    run_main({'train': train, 'generate': generate}[args.command], args)

#------------------------------------------------------------------------------
# 8. Appendix: what a reader of the paper may skip. 8a: the flag checks and file readers of train and generate.

def parse_feature_networks(value):
    """--backbone: the official numbers (FEATURE_NETWORK_SETS) or a comma list of feature networks -> their names."""
    names = FEATURE_NETWORK_SETS.get(str(value), str(value).split(','))
    bad = [n for n in names if n not in TRUNKS and n != 'teacher']
    if bad:
        raise argparse.ArgumentTypeError(f'unknown feature network {bad[0]!r} in {value!r}; use 0, 1, 3 (official '
                                         f'numbers) or a comma list of {", ".join(TRUNKS)}, teacher')
    if len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f'{value!r} names a feature network twice')
    return names

def parse_cres(s):
    cres = parse_int_list(s)
    if not 1 <= len(cres) <= 16 or not all(1 <= c <= 64 for c in cres):
        raise argparse.ArgumentTypeError(f'expected 1 to 16 channel multipliers from 1 to 64, e.g. 1,2,2; got {s!r}')
    return cres

def check_feature_networks(value):
    parse_feature_networks(value)
    return value  # kept as typed: the training options (and a resume's comparison) see the flag's own value

def with_flag(flag, load, *args):
    """load(*args); a one-line error from it (a file of the wrong kind) becomes a usage error naming the flag."""
    try:
        return load(*args)
    except UserError as e:
        raise UsageError(str(e) if str(e).startswith(flag) else f'{flag}={e}') from None

def check_finite(state, where):
    """Weights with NaN or inf (a diverged run, a damaged file) are refused in one line naming the file."""
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise UsageError(f'{where}: its weights hold NaN or inf ({bad[0]}; {len(bad)} tensors)')
    return state

def read_network(path, flag, methods):
    """(preconditioner, constructor kwargs, EMA weights) of our snapshot written by one of `methods` or of an
    official EDM-format .pkl (path or URL)."""
    if is_official(path):
        official = load_official(path, flag)
        return official['precond'], official['init_kwargs'], check_finite(official['state_dict'], f'{flag}={path}')
    ckpt = with_flag(flag, load_snapshot, path, flag, methods)
    precond = ckpt.get('precond', 'EDMPrecond')
    if (ckpt.get('stage') or {}).get('precond', 'edm') != 'edm':
        precond = 'relay_diffusion.py stage-two (--precond=blur)'
    return precond, ckpt['net_kwargs'], ckpt['ema']

def load_teacher(path):
    """(constructor kwargs, EMA weights) of an EDM denoiser: our snapshots of plain EDM training
    (patch_diffusion.py --real_p=1, relay_diffusion.py stage one) or an official EDM .pkl (path or URL)."""
    precond, kwargs, state = read_network(path, '--transfer', ['patch_diffusion', 'relay_diffusion'])
    if precond != 'EDMPrecond':
        raise UsageError(f'--transfer={path}: a {precond} network; GDD starts from an EDM denoiser (EDMPrecond: '
                         'patch_diffusion.py --real_p=1, relay_diffusion.py stage one, or an official edm-*.pkl)')
    return dict(kwargs), state

def generator_source(args, R, C, label_dim):
    """GDDPrecond kwargs checked against the data: the teacher's, the training state's (--resume) or --arch's (-n)."""
    flag = f'--transfer={args.transfer}'
    if args.dry_run:
        kwargs = network_kwargs(args, R, C, label_dim)
        levels = len(kwargs['channel_mult'])
        if R % 2 ** (levels - 1):
            raise UsageError(f'--cres={",".join(map(str, kwargs["channel_mult"]))}: a {levels}-level U-Net needs '
                             f'image sides divisible by {2 ** (levels - 1)}; --data={args.data} has {R}x{R} images')
    elif args.resume:  # a gdd.py training state (parse_command_line checked); mmap: only what is used is read
        flag = f'--resume={args.resume}'
        kwargs = torch.load(args.resume, 'cpu', weights_only=True, mmap=True)['net_kwargs']
    elif not args.transfer:
        raise UsageError('--transfer is required: the teacher (an EDM snapshot .pt or an official edm-*.pkl)')
    else:
        kwargs = load_teacher(args.transfer)[0]
    kwargs = generator_kwargs(kwargs, args.dropout)
    shape = (kwargs['img_resolution'], kwargs['img_channels'], kwargs.get('label_dim', 0))
    if shape != (R, C, label_dim):
        raise UsageError(f'{flag}: a network of {shape[0]}x{shape[0]}x{shape[1]} with {shape[2]} classes; '
                         f'--data={args.data} has {R}x{R}x{C} with {label_dim} (check --cond)')
    return kwargs

def check_and_count(net_kwargs, names, freeze, feature_res, label_dim, head_width=None, feature_sigma=None):
    """Parameter counts on the meta device (no teacher, no weight files); two images through D check its shapes."""
    with torch.device('meta'):
        G = GDDPrecond(**net_kwargs)
        features = FeatureNetworks(names, 0, feature_res, (net_kwargs, feature_sigma))
        D = Discriminator(features.maps, label_dim, head_width)
        R, C = net_kwargs['img_resolution'], net_kwargs['img_channels']
        trunks = [name for name in names if name != 'teacher']  # the teacher's maps fit its heads by construction
        try:
            for name in trunks:
                for head, f in zip(D.heads[name], features.nets[name](torch.zeros(2, C, R, R))):
                    head(f, torch.zeros(2, label_dim))
        except (RuntimeError, ValueError) as e:
            raise UsageError(f'--feature-res={feature_res}: the discriminator ({", ".join(trunks)}) cannot take it '
                             f'({str(e).splitlines()[0]}); use 224 (official) or a power of two >= 32') from None
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    return dict(parameter_counts(G, frozen_names(G, freeze)), discriminator_heads=count(D),
                feature_networks=count(features))

def training_run(args, dataset, info, device, amp_dtype, **state):
    """common.TrainingRun: the run directory, snapshots of the EMA generator, sample grids, metrics, states."""
    ema = state['ema']
    ema.amp_dtype = None  # it samples (grid, metrics) in float32, as generate samples a snapshot
    evaluate = training_metrics(args, dataset.resolution, dataset.num_channels, device,
                                lambda seeds: sample_images(ema, seeds, device))  # generate's defaults
    desc = run_desc(dataset.name, 'cond' if args.cond else 'uncond', VARIANTS[args.freeze],
                    world_size=get_world_size(), batch=args.batch, bf16=amp_dtype is not None, desc=args.desc)

    def snapshot():  # a network snapshot's own entries: the generator and how it was trained
        names = info['feature_networks']
        random = {'random': 'RANDOM (demo only)', 'random-he': 'RANDOM-HE (demo only)'}
        weights = random.get(args.feature_weights, args.feature_weights) if names != ['teacher'] else None
        return dict(precond='GDDPrecond', net_kwargs=info['net_kwargs'], ema=ema.state_dict(),
                    freeze=args.freeze, feature_networks=names, feature_weights=weights)

    def save_grid(path):  # the one-step images of seeds 0..--grid-1 in one PNG
        save_image_grid(sample_images(ema, range(args.grid), device), path)

    return TrainingRun('gdd', vars(args), info, device, outdir=args.outdir, desc=desc, nosubdir=args.nosubdir,
                       resume=args.resume, total_nimg=args.duration * 1e6, tick=args.tick, snap=args.snap,
                       dump=args.dump, state=state, snapshot=snapshot, grid=save_grid if args.grid else None,
                       evaluate=evaluate)

def distributed_pair(net, D, device, compile):
    """DDP wrappers of G and D without buffer broadcasts: BatchNorm and spectral-norm buffers stay per rank (as
    upstream). The heads' convs on 1x1 maps get gradients with other strides (same layout): DDP would warn each step."""
    warnings.filterwarnings('ignore', message='Grad strides do not match bucket view strides')
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='`broadcast_buffers` is deprecated')
        return (distributed_model(net, device, compile, broadcast_buffers=False),
                distributed_model(D, device, False, broadcast_buffers=False))

def print_header(args, dataset, info, amp_dtype, run_dir):
    counts, names, R, C = info['parameters'], info['feature_networks'], dataset.resolution, dataset.num_channels
    level = f' (--freeze={args.freeze})' if args.freeze > 1 else ''
    nets = [f'the teacher at sigma {args.feature_sigma:g}' if n == 'teacher' else n for n in names]
    print0(f'GDD{"-I" if args.freeze else ""}{level}: {dataset.name} ({len(dataset)} images, {R}x{R}x{C}), teacher '
           f'{args.transfer}; generator {counts["total"]:,} parameters, {counts["frozen"]:,} frozen, '
           f'{counts["trainable"]:,} trainable; discriminator {", ".join(nets)}, heads '
           f'{counts["discriminator_heads"]:,}')
    if args.feature_weights in ('random', 'random-he') and names != ['teacher']:
        print0(f'WARNING: --feature-weights={args.feature_weights}: the discriminator\'s feature networks are '
               'RANDOM, not ImageNet-pretrained: the machinery runs, the results are not the paper\'s.')
    if args.bf16 and amp_dtype is None:
        print0('note: --bf16 applies on CUDA only (upstream runs the generator in fp32 elsewhere); this run is fp32')
    if dataset.label_dim and args.class_embedding in (None, 'random'):
        print0('note: conditional heads start from a random N(0, 1) class embedding (upstream rand_embedding=True), '
               'not the official ImageNet table (--class-embedding)')
    print0(f'{info["batch_gpu"]} images x {info["rounds"]} rounds x {info["world_size"]} GPUs per step; run directory '
           f'{run_dir}')

# Each paper preset's teacher data (image side, classes when --cond), for a dry run of a preset whose dataset is absent.
PRESET_DATA = {'cifar10': (32, 10), 'afhqv264': (64, 0), 'ffhq64': (64, 0), 'imagenet64': (64, 1000)}

def open_training_data(args):
    data = next((v for k, v in PRESET_DATA.items() if (args.preset or '').startswith(k + '_')), None)
    if args.dry_run and data and not os.path.exists(args.data):
        name = os.path.splitext(os.path.basename(os.path.normpath(args.data)))[0]
        return argparse.Namespace(name=name, resolution=data[0], num_channels=3, label_dim=data[1] if args.cond else 0)
    return open_dataset(args.data, use_labels=args.cond, xflip=args.xflip)

#------------------------------------------------------------------------------
# 8b. The projected discriminator (official pg_modules/): frozen feature networks, fixed random projections (Projected
#     GAN's CCM and CSM), trained heads (StyleGAN-XL); the feature networks in plain torch (official feature_networks/).

# NOTE: --feature-weights=random keeps PyTorch's default conv init (1/3 of He's variance): the signal shrinks about
# 10x per EfficientNet-lite0 stage and D stays at chance. random-he draws the convs as timm (`_init_weight_goog`) and
# torchvision (`VGG.__init__`) do without weights: N(0, 2 / fan_out), biases 0; BatchNorm stays the identity.
def he_init(trunk, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in trunk.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2 / fan_out))
                if m.bias is not None:
                    m.bias.zero_()
    return trunk

def build_discriminator(names, seed, resolution, label_dim, weights, class_embedding=None, head_width=None,
                        teacher=None):
    """Frozen feature networks (weight files or random; `teacher`: (net_kwargs, --feature-sigma, --transfer)), heads."""
    features = FeatureNetworks(names, seed, resolution, teacher and teacher[:2])
    if 'teacher' in names:
        init_from_teacher(features.nets['teacher'].net, load_teacher(teacher[2])[1], f'--transfer={teacher[2]}')
    trunks = [name for name in names if name != 'teacher']
    if weights == 'random-he':
        for i, name in enumerate(names):
            if name in trunks:
                he_init(features.nets[name].trunk, seed + i)
    elif weights != 'random' and trunks:
        paths = weights.split(',') if weights else []
        if len(paths) != len(trunks):
            n = trunks[min(len(paths), len(trunks) - 1)]
            raise UsageError(f'--feature-weights: {len(paths)} file(s) for {len(trunks)} feature network(s) '
                             f'({", ".join(trunks)}), one each' + (f'; missing the {n} ImageNet weights, '
                             f'{WEIGHT_FILES.get(n, n)} (download it elsewhere), or give --feature-weights=random for '
                             'a demo whose discriminator sees random features' if len(paths) < len(trunks) else ''))
        for name, path in zip(trunks, paths):
            load_trunk(features.nets[name].trunk, name, path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        D = Discriminator(features.maps, label_dim, head_width)
    if label_dim and class_embedding not in (None, 'random'):
        table = with_flag('--class-embedding', load_checkpoint, class_embedding)
        table = table.get('weight', table) if isinstance(table, dict) else table
        if not torch.is_tensor(table) or tuple(table.shape) != (1000, 320):
            raise UsageError(f'--class-embedding={class_embedding}: expected the [1000, 320] class embedding '
                             '(official in_embeddings/tf_efficientnet_lite0.pkl, converted to a tensor file)')
        check_finite(dict(weight=table), f'--class-embedding={class_embedding}')
        for heads in D.heads.values():
            for head in heads:
                head.embed.weight.data.copy_(table)
    return features, D

IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
INCEPTION_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

class FeatureNetwork(nn.Module):
    """One frozen feature network (official F_RandomProj, proj_type 2, cout 64, expand): trunk -> CCM (1x1 convs) ->
    CSM (top-down x2 upsampling, 1x1 convs): maps of 64, 64, 128, 256 channels at twice the trunk's sizes."""
    def __init__(self, name, seed, resolution=224, cout=64):
        super().__init__()
        self.name, self.resolution = name, resolution
        mean, std = INCEPTION_MEAN_STD if 'efficientnet' in name else IMAGENET_MEAN_STD  # each network's own
        self.register_buffer('mean', torch.tensor(mean).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std).reshape(1, -1, 1, 1), persistent=False)
        # NOTE: upstream builds the random CCM/CSM (and DeiT readout) from each rank's own torch seed, so every GPU
        # projects differently; we seed them from the global --seed, identical on all ranks.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.trunk = TRUNKS[name]()
            width = [cout, cout * 2, cout * 4, cout * 8]
            self.ccm = nn.ModuleList(nn.Conv2d(c, w, 1) for c, w in zip(self.trunk.CHANNELS, width))
            self.csm = nn.ModuleList(nn.Conv2d(w, w // 2 if i else w, 1) for i, w in enumerate(width))
        self.channels = [cout, cout, cout * 2, cout * 4]
        sizes, end = head_sizes(resolution)
        self.maps = [(c, size, end) for c, size in zip(self.channels, sizes)]  # what the heads take

    def forward(self, x):
        if x.shape[1] == 1:  # grey images (none upstream): the RGB ImageNet networks see the grey value as R = G = B
            x = x.repeat(1, 3, 1, 1)                                                  # [N, 1, H, W] -> [N, 3, H, W]
        elif x.shape[1] != 3:
            raise ValueError(f'the {self.name} feature network takes RGB or grey images, not {x.shape[1]} channels')
        x = ((x + 1) / 2 - self.mean) / self.std                                      # [-1, 1] -> [0, 1] -> normalized
        x = F.interpolate(x, self.resolution, mode='bilinear', align_corners=False)  # official: always for < 224 px
        mixed = [ccm(f) for ccm, f in zip(self.ccm, self.trunk(x))]                  # cross-channel mixing
        out, y = [None] * 4, None
        for i in reversed(range(4)):                                                 # cross-scale mixing, deepest first
            y = mixed[i] if y is None else y + mixed[i]
            y = out[i] = self.csm[i](F.interpolate(y, scale_factor=2, mode='bilinear', align_corners=True))
        return out

# Ours, for CPU demos: the teacher as a feature network (`--backbone=teacher`), as LADD does (Sauer et al. 2024,
# "Fast High-Resolution Image Synthesis with Latent Adversarial Diffusion Distillation", arXiv:2403.12015, Sec. 3:
# the discriminator's features are the pretrained diffusion model's on re-noised images). Unlike a random or an
# ImageNet network it has seen the data. The images get noise of level --feature-sigma; the teacher's U-Net then
# runs once and the output of the last block at each resolution, in the encoder and the decoder, is a feature map
# (no random projections); each map gets a head that halves it down to half the smallest map's side.
class TeacherFeatures(nn.Module):
    """The frozen teacher (an EDMPrecond of `net_kwargs`; build_discriminator loads its EMA weights) -> its U-Net's
    per-resolution maps of x + sigma n."""
    def __init__(self, net_kwargs, sigma):
        super().__init__()
        self.net, self.sigma = EDMPrecond(**net_kwargs), sigma
        last = {}  # (encoder or decoder, side) -> the last block there
        for part in ('enc', 'dec'):
            for name, block in getattr(self.net.model, part).items():
                if isinstance(block, UNetBlock):
                    last[part, int(name.split('x')[0])] = block
        self.blocks = list(last.values())
        end = max(1, min(side for _, side in last) // 2)
        self.maps = [(block.out_channels, side, end) for block, (_, side) in zip(self.blocks, last)]

    def forward(self, x):
        outputs = []
        hooks = [block.register_forward_hook(lambda m, i, out: outputs.append(out)) for block in self.blocks]
        try:
            sigma = torch.full([x.shape[0], 1, 1, 1], self.sigma, device=x.device)
            _, _, c_in, c_noise = self.net.coefficients(sigma)
            self.net.model(c_in * (x + torch.randn_like(x) * sigma), c_noise.flatten(), None)  # F's input, EDM Eq. 7
        finally:
            for hook in hooks:
                hook.remove()
        return outputs

class FeatureNetworks(nn.Module):
    """The discriminator's frozen feature networks, always in eval mode; `teacher`: (net_kwargs, --feature-sigma)."""
    def __init__(self, names, seed, resolution=224, teacher=None):
        super().__init__()
        self.nets = nn.ModuleDict({name: TeacherFeatures(*teacher) if name == 'teacher' else
                                   FeatureNetwork(name, seed + i, resolution) for i, name in enumerate(names)})
        self.maps = {name: net.maps for name, net in self.nets.items()}
        self.requires_grad_(False).eval()

    def train(self, mode=True):
        return super().train(False)

    def forward(self, x):
        return {name: net(x) for name, net in self.nets.items()}

class DownBlock(nn.Sequential):
    """Spectral-norm conv 4x4 stride 2 -> BatchNorm -> LeakyReLU(0.2) (official pg_modules/blocks.py, DownBlock)."""
    def __init__(self, cin, cout):
        super().__init__(nn.utils.spectral_norm(nn.Conv2d(cin, cout, 4, 2, 1)), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2))

class Head(nn.Module):
    """One trained head on one feature map (official SingleDisc / SingleDiscCond): DownBlocks from the nominal size
    `start` down to `end`, then a spectral-norm conv to 1 logit, or (conditional) 64 channels dotted with e(c)."""
    WIDTH = {1: 2048, 2: 1024, 4: 512, 8: 512, 16: 256, 32: 128, 64: 64, 128: 64, 256: 32, 512: 16, 1024: 8}

    def __init__(self, in_channels, start, end, conditional, cmap_dim=64, num_classes=1000, embed_dim=320,
                 max_width=None):
        super().__init__()
        width = {**{k: min(w, max_width or w) for k, w in self.WIDTH.items()}, start: in_channels}
        blocks, s = [], start
        while s > end:
            blocks.append(DownBlock(width[s], width[s // 2]))
            s //= 2
        self.main = nn.Sequential(*blocks)
        kernel = 4 if end >= 8 else max(1, end // 2)
        out_channels = cmap_dim if conditional else 1
        self.cls = nn.utils.spectral_norm(nn.Conv2d(width[end], out_channels, kernel, 1, 0, bias=False))
        self.cmap_dim, self.embed = cmap_dim, nn.Embedding(num_classes, embed_dim) if conditional else None
        if conditional:  # NOTE: the table has ImageNet's 1,000 rows for any dataset; class k uses row k (upstream).
            self.embed_proj = nn.Linear(embed_dim, cmap_dim)
            nn.init.normal_(self.embed_proj.weight)
            nn.init.zeros_(self.embed_proj.bias)

    def forward(self, x, labels):
        out = self.cls(self.main(x))
        if self.embed is None:
            return out.flatten(1)
        e = self.embed(labels.argmax(1))
        w = self.embed_proj.weight / math.sqrt(self.embed_proj.in_features)          # equalized learning rate
        cmap = F.leaky_relu(F.linear(e, w, self.embed_proj.bias), 0.2) * math.sqrt(2)  # bias_act 'lrelu' gain
        return ((out * cmap[:, :, None, None]).sum(dim=1) / math.sqrt(self.cmap_dim)).flatten(1)

def head_sizes(resolution):
    """Nominal input sizes of the 4 heads and their end size (official MultiScaleD). NOTE: at 224 px upstream sizes
    heads for 256 px, [128, 64, 32, 16] -> 8, whatever the true map sizes; other sizes: its native rule, R/2 .. R/16."""
    R = 256 if resolution == 224 else resolution
    keys = sorted(Head.WIDTH)
    sizes = [min(keys, key=lambda k: abs(k - R // 2 ** (i + 1))) for i in range(4)]
    return sizes, min(sizes[-1], 8)

class Discriminator(nn.Module):
    """The heads, one per map of `maps` = {network: [(channels, size, end size)]}; [N, L_k] logits per network."""
    def __init__(self, maps, label_dim=0, max_width=None):
        super().__init__()
        self.heads = nn.ModuleDict({name: nn.ModuleList(Head(c, s, end, label_dim > 0, max_width=max_width)
                                                        for c, s, end in shapes) for name, shapes in maps.items()})

    def forward(self, features, labels=None):
        return [torch.cat([head(f, labels) for head, f in zip(heads, features[name])], dim=1)
                for name, heads in self.heads.items()]

WEIGHT_FILES = {
    'vgg16_bn': 'torchvision\'s https://download.pytorch.org/models/vgg16_bn-6c64b313.pth',
    'tf_efficientnet_lite0': 'timm\'s https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/tf_efficientnet_lite0-0aa007d2.pth',
    'deit_base_distilled_patch16_224': 'timm\'s (DeiT) https://dl.fbaipublicfiles.com/deit/deit_base_distilled_patch16_224-df68dfff.pth',
}

class VGG16BN(nn.Module):
    """torchvision vgg16_bn `features[:43]` (the last max-pool dropped), split at 13/23/33/43:
    128@112^2, 256@56^2, 512@28^2, 512@14^2 at 224 px (official _feature_splitter)."""
    CHANNELS, SPLITS = (128, 256, 512, 512), (13, 23, 33, 43)
    UNUSED = ('classifier.',)  # weight-file keys the discriminator does not use

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for v in [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512]:
            conv = [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)] if v != 'M' else None
            layers += [nn.MaxPool2d(2, 2)] if v == 'M' else conv
            c = c if v == 'M' else v
        self.features = nn.Sequential(*layers)

    def forward(self, x):
        out, start = [], 0
        for end in self.SPLITS:
            x = self.features[start:end](x)
            out.append(x)
            start = end
        return out

class Conv2dSame(nn.Conv2d):
    """TensorFlow "SAME" padding (timm's tf_* models): strided convs pad (k - s) asymmetrically, more at the end."""
    def __init__(self, cin, cout, k, stride=1, groups=1):
        super().__init__(cin, cout, k, stride, padding=k // 2 if stride == 1 else 0, groups=groups, bias=False)

    def forward(self, x):
        if self.stride[0] > 1:
            k, s = self.kernel_size[0], self.stride[0]
            pad_h, pad_w = (max((math.ceil(n / s) - 1) * s + k - n, 0) for n in x.shape[-2:])
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return super().forward(x)

class MBConv(nn.Module):
    """EfficientNet block, timm key names: inverted residual (conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3) or, with
    expand = 1, depthwise-separable (conv_dw, bn1, conv_pw, bn2); ReLU6, no squeeze-excite (the lite variant)."""
    def __init__(self, cin, cout, k, stride, expand):
        super().__init__()
        self.separable, mid = expand == 1, cin * expand
        bn = lambda c: nn.BatchNorm2d(c, eps=1e-3)  # TF's BatchNorm epsilon
        if self.separable:
            self.conv_dw, self.bn1 = Conv2dSame(cin, cin, k, stride, groups=cin), bn(cin)
            self.conv_pw, self.bn2 = nn.Conv2d(cin, cout, 1, bias=False), bn(cout)
        else:
            self.conv_pw, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), bn(mid)
            self.conv_dw, self.bn2 = Conv2dSame(mid, mid, k, stride, groups=mid), bn(mid)
            self.conv_pwl, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        if self.separable:
            h = self.bn2(self.conv_pw(F.relu6(self.bn1(self.conv_dw(x)))))
        else:
            h = F.relu6(self.bn2(self.conv_dw(F.relu6(self.bn1(self.conv_pw(x))))))
            h = self.bn3(self.conv_pwl(h))
        return h + x if self.skip else h

class EfficientNetLite0(nn.Module):
    """timm tf_efficientnet_lite0 up to its last block, split as official _make_efficientnet: stem + blocks[0:2] |
    blocks[2] | blocks[3:5] | blocks[5:7] -> 24@56^2, 40@28^2, 112@14^2, 320@7^2 at 224 px."""
    CHANNELS, SPLITS = (24, 40, 112, 320), (2, 3, 5, 7)
    UNUSED = ('conv_head.', 'bn2.', 'classifier.')
    STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
              (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]  # (repeats, kernel, stride, expand, channels)

    def __init__(self):
        super().__init__()
        self.conv_stem, self.bn1 = Conv2dSame(3, 32, 3, 2), nn.BatchNorm2d(32, eps=1e-3)
        stages, c = [], 32
        for repeats, k, s, e, cout in self.STAGES:
            stages.append(nn.Sequential(*[MBConv(c if i == 0 else cout, cout, k, s if i == 0 else 1, e)
                                          for i in range(repeats)]))
            c = cout
        self.blocks = nn.Sequential(*stages)

    def forward(self, x):
        x, out, start = F.relu6(self.bn1(self.conv_stem(x))), [], 0
        for end in self.SPLITS:
            x = self.blocks[start:end](x)
            out.append(x)
            start = end
        return out

class ViTBlock(nn.Module):
    """Pre-norm transformer block with timm's names (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2)."""
    def __init__(self, dim=768, heads=12):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        q, k, v = rearrange(self.attn.qkv(self.norm1(x)), 'b n (s h d) -> s b h n d', s=3, h=self.heads)
        x = x + self.attn.proj(rearrange(F.scaled_dot_product_attention(q, k, v), 'b h n d -> b n (h d)'))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))

class DeiTBaseDistilled(nn.Module):
    """timm deit_base_distilled_patch16_224 (classifier heads unused) and DPT's random "readout" convs (official
    feature_networks/vit.py): patch tokens of blocks 2, 5, 8, 11 -> 96@56^2, 192@28^2, 384@14^2, 768@7^2."""
    CHANNELS, HOOKS = (96, 192, 384, 768), (2, 5, 8, 11)
    UNUSED = ()

    def __init__(self, dim=768, depth=12):
        super().__init__()
        self.cls_token, self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)), nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 14 * 14 + 2, dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 16, 16)
        self.blocks = nn.Sequential(*[ViTBlock(dim) for _ in range(depth)])
        self.norm, self.head, self.head_dist = nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 1000), nn.Linear(dim, 1000)
        c = self.CHANNELS
        self.readout = nn.ModuleList([  # random, frozen; not in the weight file
            nn.Sequential(nn.Conv2d(dim, c[0], 1), nn.ConvTranspose2d(c[0], c[0], 4, 4)),
            nn.Sequential(nn.Conv2d(dim, c[1], 1), nn.ConvTranspose2d(c[1], c[1], 2, 2)),
            nn.Sequential(nn.Conv2d(dim, c[2], 1)),
            nn.Sequential(nn.Conv2d(dim, c[3], 1), nn.Conv2d(c[3], c[3], 3, 2, 1))])

    def forward(self, x):
        h, w = x.shape[2] // 16, x.shape[3] // 16
        if (h, w) != (14, 14):
            raise ValueError(f'DeiT-B/16 takes 224x224 inputs, got {x.shape[2]}x{x.shape[3]}')
        x = rearrange(self.patch_embed.proj(x), 'b c h w -> b (h w) c')
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), self.dist_token.expand(x.shape[0], -1, -1), x], dim=1)
        x, out = x + self.pos_embed, []
        for i, block in enumerate(self.blocks[:self.HOOKS[-1] + 1]):
            x = block(x)
            if i in self.HOOKS:
                tokens = rearrange(x[:, 2:], 'b (h w) c -> b c h w', h=h, w=w)  # [N, 196, 768] -> [N, 768, 14, 14]
                out.append(self.readout[len(out)](tokens))
        return out

TRUNKS = {'vgg16_bn': VGG16BN, 'tf_efficientnet_lite0': EfficientNetLite0,
          'deit_base_distilled_patch16_224': DeiTBaseDistilled}

def load_trunk(trunk, name, path):
    """Strict load of a torchvision/timm weight file: extras only in UNUSED, missing only the random readout convs."""
    state = with_flag('--feature-weights', load_checkpoint, path)
    state = state.get('model', state.get('state_dict', state)) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise UsageError(f'--feature-weights={path}: not a state dict of {name}')
    own = trunk.state_dict()
    missing = [k for k in own if k not in state and not k.startswith('readout.')]
    extra = [k for k in state if k not in own and not k.startswith(trunk.UNUSED)]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or extra or shapes:
        first = (missing or extra or shapes)[0]
        raise UsageError(f'--feature-weights={path}: not the {name} weights ({WEIGHT_FILES[name]}): {first} '
                         f'({len(missing)} missing, {len(extra)} extra, {len(shapes)} shapes differ)')
    check_finite({k: state[k] for k in own if k in state}, f'--feature-weights={path}')
    trunk.load_state_dict({k: state[k] for k in own if k in state}, strict=False)

if __name__ == '__main__':
    main()
