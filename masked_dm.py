"""Masked Diffusion Models are Fast Distribution Learners (MaskDM).

Jiachen Lei et al., arXiv:2306.11363v2 (the method; v1 for the DWT model). The paper's text states no equation we
tag; equation tags below are those of DDPM (Ho et al. 2020, arXiv:2006.11239v2), the cosine schedule (Nichol &
Dhariwal 2021, arXiv:2102.09672) and DDIM (Song et al., arXiv:2010.02502v4), or the official file and function.
Official code: https://github.com/jiachenlei/maskdm (HEAD 0e79a60; the DWT model from tree 40907a6). Nothing here is
copied from it; parameter names match it, so official .pt checkpoints load.

A U-ViT denoiser (discrete DDPM, T = 1000, epsilon prediction) is pre-trained with most of every image masked: a
fixed number of patch tokens per image (random patches, aligned b x b blocks of patches, or all but one crop) is
dropped before the network, which sees and denoises only the visible tokens; the loss is the epsilon-MSE on visible
patches (masked denoising score matching). The same network is then fine-tuned on full images with the standard
DDPM loss, starting from the pre-trained online weights. Sampling is DDIM (eta = 1, 250 steps in the official FIDs).

Implemented: the official U-ViT (time token, learned positions, long skips, q/v bias option, `in_chans`, the class
token `num_classes` and `mlp_time_embed`), patch / block / crop masks, masked pre-training, fine-tuning from our or
official checkpoints, linear and cosine schedules, DDIM and ancestral DDPM, the v1 DWT variant for 256 px (Haar
wavelets, two token families, per-band clamping), the ema-pytorch EMA, presets of every official config; ours:
--label-dropout and classifier-free guidance (generate --cfg). Not implemented: the v1 ViT decoder and final conv
(off in every config), the v1 Langevin corrector (off by default).

  # pre-train MaskDM-S on CelebA-64 with a 90% block-4 mask (8 GPUs), then fine-tune from its training state
  torchrun --standalone --nproc_per_node=8 masked_dm.py train --preset=celeba64_pre_block4_90 \\
      --data=datasets/celeba-64x64.zip --outdir=runs
  torchrun --standalone --nproc_per_node=8 masked_dm.py train --preset=celeba64_ft --data=datasets/celeba-64x64.zip \\
      --outdir=runs \\
      --pretrained_model_ckpt=runs/00000-celeba-64x64-S-block4-90-gpus8-batch256-fp32/training-state-051200.pt
  # 10k samples with DDIM eta=1, 250 steps (the official FID setting), then FID against the training set
  torchrun --standalone --nproc_per_node=8 masked_dm.py generate --outdir=samples --seeds=0-9999 --subdirs --batch=64 \\
      --network=runs/00001-celeba-64x64-S-full-gpus8-batch128-fp32/network-snapshot-025600.pt --steps=250 --eta=1
  python fid.py ref --data=datasets/celeba-64x64.zip --dest=fid-refs/celeba-64x64-pt.npz --preprocess=pytorch_fid
  python fid.py calc --images=samples --ref=fid-refs/celeba-64x64-pt.npz --num=10000 --preprocess=pytorch_fid
"""

import argparse
import math
import types
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

from common import (Parser, PerSeedRNG, TrainingRun, UsageError, UserError, add_generate_flags,
                    add_metric_flags, add_train_flags, check_class, check_memory, check_outdir,
                    distributed_model, drop_labels, get_rank, get_world_size, init_distributed,
                    latest_checkpoint, load_checkpoint, load_snapshot, load_weights,
                    network_and_ema, number, open_dataset, optimizer_step, parse_bool,
                    parse_command_line, print0, print_options, reseed, run_desc, run_main,
                    save_image_grid, save_seed_images, seed_batches, seed_labels, setup_precision,
                    split_batch, sync_if, training_metrics, update_ema, working)

#------------------------------------------------------------------------------
# 1. Config. Every official config, one preset each (config files of jiachenlei/maskdm; v1 = tree 40907a6); flags
#    given on the command line override them. Step counts are not in the configs: README, 200k steps (550k for the
#    DWT fine-tuning). `clip_grad=0` is the configs' `null` (no clipping).

# Backbones (official configs `network:` encoder_embed_dim, encoder_depth, encoder_heads, qkv_bias, patch_size);
# depth d builds 2 (d // 2) + 1 blocks.
ARCHS = {
    'S': dict(embed_dim=512, depth=13, heads=8, qkv_bias=False, patch_size=4),    # MaskDM-S, configs `*small*`
    'B': dict(embed_dim=768, depth=12, heads=12, qkv_bias=False, patch_size=4),   # MaskDM-B, HEAD `celebahq_base*`
    'L': dict(embed_dim=1024, depth=16, heads=16, qkv_bias=True, patch_size=4),   # MaskDM-L, v1 DWT config
    'T': dict(embed_dim=128, depth=5, heads=2, qkv_bias=False, patch_size=4),     # ours: a tiny model for CPU demos
}

# The CelebA-64 ablations (configs/ablation/pretrain/<mask>/celeba_<p>p.yml; crop: c = 15, 11, 5 tokens for "10p,
# 50p, 90p") share MaskDM-S, batch 256, lr 2e-4, no warm-up, no clipping, linear schedule, EMA 0.999 every step.
CELEBA64 = dict(arch='S', resolution=64, batch=256, lr=2e-4, warmup_steps=0, clip_grad=0,
                beta_schedule='linear', ema_decay=0.999, ema_every=1, xflip=False, train_steps=200000)
# The 256-pixel configs: cosine schedule, clipping at 1 (configs/transfer/*_small*.yml; HEAD configs/*_base*.yml).
S256 = CELEBA64 | dict(resolution=256, clip_grad=1.0, beta_schedule='cosine')
B256 = S256 | dict(arch='B')
# MaskDM-L in the Haar wavelet domain (the v1 DWT configs, below).
L256_DWT = S256 | dict(arch='L', dwt=True, ema_every=10, xflip=True)
# Ours, about 3.5 + 4 CPU-minutes (one thread): 8x8 shapes, a 1M-parameter U-ViT with 2-pixel patches (16
# tokens), block-2 50% masks, then fine-tuning. Cosine schedule: at 8x8 the linear one spends half its steps at
# SNR < 0.1. AdamW betas 0.9, 0.999: with the configs' 0.99, 0.99 the short run's tiles stay speckled. The settings
# tried: docs/masked_dm.md, CPU demo.
DEMO = dict(data='demo-8', arch='T', resolution=8, patch_size=2, batch=32, adam_betas=[0.9, 0.999],
            warmup_steps=20, clip_grad=1.0, beta_schedule='cosine', ema_decay=0.999, ema_every=1,
            xflip=False, tick=20, dump=1000, workers=0)
FULL = dict(mask_type='none', mask_ratio=0)  # fine-tuning, or training from scratch: no mask

PRESETS = {
    'celeba64_pre_patch_10':  CELEBA64 | dict(mask_type='patch', mask_ratio=0.1),
    'celeba64_pre_patch_50':  CELEBA64 | dict(mask_type='patch', mask_ratio=0.5),
    'celeba64_pre_patch_90':  CELEBA64 | dict(mask_type='patch', mask_ratio=0.9),
    'celeba64_pre_block2_10': CELEBA64 | dict(mask_type='block', mask_ratio=0.1, block_size=2),
    'celeba64_pre_block2_50': CELEBA64 | dict(mask_type='block', mask_ratio=0.5, block_size=2),
    'celeba64_pre_block2_90': CELEBA64 | dict(mask_type='block', mask_ratio=0.9, block_size=2),
    'celeba64_pre_block4_10': CELEBA64 | dict(mask_type='block', mask_ratio=0.1, block_size=4),
    'celeba64_pre_block4_50': CELEBA64 | dict(mask_type='block', mask_ratio=0.5, block_size=4),
    'celeba64_pre_block4_90': CELEBA64 | dict(mask_type='block', mask_ratio=0.9, block_size=4),
    'celeba64_pre_block8_50': CELEBA64 | dict(mask_type='block', mask_ratio=0.5, block_size=8),
    'celeba64_pre_crop_10':   CELEBA64 | dict(mask_type='crop', mask_ratio=0, crop_size=15),
    'celeba64_pre_crop_50':   CELEBA64 | dict(mask_type='crop', mask_ratio=0, crop_size=11),
    'celeba64_pre_crop_90':   CELEBA64 | dict(mask_type='crop', mask_ratio=0, crop_size=5),
    # configs/ablation/celeba_small.yml: fine-tuning / the from-scratch baseline
    'celeba64_ft':            CELEBA64 | FULL | dict(batch=128),
    # configs/transfer/vggface2_small_90p.yml, celebahq_small_90p.yml, celebahq_small_0.1.yml
    'vgg256s_pre90':    S256 | dict(mask_type='block', mask_ratio=0.9, block_size=4),
    'hq256s_pre90':     S256 | dict(mask_type='block', mask_ratio=0.9, block_size=4),
    'hq256s_ft10pct':   S256 | FULL | dict(batch=64, lr=5e-5, clip_grad=0, xflip=True),
    # HEAD configs/celebahq_base_90p.yml, celebahq_base_50p.yml, celebahq_base.yml, church256_base.yml
    'hq256b_pre90':     B256 | dict(mask_type='block', mask_ratio=0.9, block_size=4),
    'hq256b_pre50':     B256 | dict(mask_type='block', mask_ratio=0.5, block_size=4, batch=64, warmup_steps=5000),
    'hq256b_ft':        B256 | FULL | dict(batch=32, lr=1e-5, warmup_steps=5000),
    'church256b_ft':    B256 | FULL | dict(batch=64, lr=1e-4, warmup_steps=5000, beta_schedule='linear',
                                           ema_decay=0.9999, xflip=True),
    # v1 configs/celebahq_maskdml_dwt.yml, celebahq_baseline_dwt.yml (no clip_grad: the script's 1.0). NOTE: the v1
    # DWT script hard-codes patch masks and ignores the config's block-4; we follow the code.
    'hq256l_dwt_pre70': L256_DWT | dict(mask_type='patch', mask_ratio=0.7, block_size=4, batch=128, lr=1e-4),
    'hq256l_dwt_ft':    L256_DWT | FULL | dict(batch=16, lr=5e-5, train_steps=550000),
    # Ours (DEMO above): pre-training, then fine-tuning from its training state.
    'demo_pre': DEMO | dict(mask_type='block', mask_ratio=0.5, block_size=2, lr=3e-4, train_steps=8000, snap=4),
    'demo_ft':  DEMO | FULL | dict(lr=2e-4, train_steps=6000, snap=3),
}

#------------------------------------------------------------------------------
# 2. Backbone: the U-ViT of the official code (models/mask_uvit.py, MaskedUViT / UViTEncoder; v1 MaskedDWTUViT).
#    Tokens are [label,] time, patches of family 0, patches of family 1, ...; one family (the image) normally, two
#    for DWT (LL, details). The standard U-ViT layers (PatchEmbed, Block, ...) are in the Appendix; PatchEmbed
#    embeds only the visible patches, so masked tokens never enter the network.

class UViTEncoder(torch.nn.Module):
    """Patch embeddings, [label,] time token, learned positions, depth // 2 in-blocks, a mid-block, depth // 2
    out-blocks paired with the in-blocks in mirror order, final LayerNorm (official UViTEncoder / MaskedDWTEncoder)."""
    def __init__(self, families, img_size, patch_size, embed_dim, depth, heads, mlp_ratio, qkv_bias, num_classes=0,
                 mlp_time_embed=False):
        super().__init__()
        self.embed_names = [name for name, _ in families]
        for name, chans in families:
            self.add_module(name, PatchEmbed(chans, embed_dim, patch_size))
        self.num_patches = (img_size // patch_size) ** 2  # per family
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.extras = 2 if num_classes else 1  # tokens before the patches: [label,] time
        if num_classes:  # official UViTEncoder: a class token; `uncond_embed` stands in when there is no label
            self.label_emb = torch.nn.Embedding(num_classes, embed_dim)  # PyTorch default init N(0, 1), as official
            self.uncond_embed = torch.nn.Parameter(torch.zeros(1, embed_dim))
            torch.nn.init.trunc_normal_(self.uncond_embed, std=0.02, a=-2, b=2)
        self.time_embed = torch.nn.Sequential(torch.nn.Linear(embed_dim, 4 * embed_dim), torch.nn.SiLU(),
                                              torch.nn.Linear(4 * embed_dim, embed_dim)) if mlp_time_embed else None
        self.in_blocks = torch.nn.ModuleList([Block(embed_dim, heads, mlp_ratio, qkv_bias) for _ in range(depth // 2)])
        self.mid_block = Block(embed_dim, heads, mlp_ratio, qkv_bias)
        self.out_blocks = torch.nn.ModuleList([Block(embed_dim, heads, mlp_ratio, qkv_bias, skip=True)
                                               for _ in range(depth // 2)])
        self.norm = torch.nn.LayerNorm(embed_dim)
        rows = self.extras + len(families) * self.num_patches  # official: extras + num_patches
        self.encoder_pos_embed = torch.nn.Parameter(torch.zeros(1, rows, embed_dim))

    def label_token(self, labels, batch):
        """[B, 1, D]: label_emb of each one-hot row; `uncond_embed` for labels=None (official y=None) and for all-zero
        rows (our unconditional rows: --label-dropout, --cfg)."""
        uncond = self.uncond_embed.expand(batch, -1)  # [1, D] -> [B, D]
        if labels is None:
            return uncond[:, None]
        emb = self.label_emb(labels.argmax(dim=1))  # one-hot float -> class index (the official code passes indices)
        return torch.where(labels.any(dim=1, keepdim=True), emb, uncond)[:, None]

    def forward(self, inputs, t, keep, labels=None):
        pos = self.encoder_pos_embed[0]  # [extras + F N, D]: rows of [label,] time, then every family's patches
        e = self.extras
        time = timestep_embedding(t, self.embed_dim)  # [B, D]; official default mlp_time_embed: False (no MLP)
        x = [(time if self.time_embed is None else self.time_embed(time))[:, None] + pos[e - 1:e]]
        if self.num_classes:  # official order [label, time, patches]: the label token goes first
            x.insert(0, self.label_token(labels, len(time)) + pos[:1])
        for f, (name, x_f, keep_f) in enumerate(zip(self.embed_names, inputs, keep)):
            rows = pos[e + f * self.num_patches:e + (f + 1) * self.num_patches]  # this family's positions
            x.append(getattr(self, name)(x_f, keep_f) + (rows if keep_f is None else rows[keep_f]))  # [B, n_f, D]
        # Masks drop patch tokens only: the label and time tokens are always kept (official datasets prepend 0s).
        x = torch.cat(x, dim=1)  # [B, extras + sum n_f, D]; positions were gathered with their tokens
        skips = []
        for block in self.in_blocks:
            x = block(x)
            skips.append(x)
        x = self.mid_block(x)
        for block in self.out_blocks:
            x = block(x, skips.pop())  # out-block 0 pairs with the last in-block
        return self.norm(x)

class MaskedUViT(torch.nn.Module):
    """The MaskDM network: epsilon(x_t, t[, labels]) of the visible tokens. With dwt=True the input is the Haar domain
    [LL, H, V, D] x C at half resolution, with LL and detail tokens embedded and predicted separately."""
    def __init__(self,
        img_size,                   # network input side (pixels; the wavelet grid side with dwt)
        in_chans    = 3,            # network input channels: image channels (official `in_chans`); 4x that with dwt
        patch_size  = 4,            # token side in pixels
        embed_dim   = 512,          # width D; heads have D / heads features (64 in every config)
        depth       = 13,           # config depth: 2 (depth // 2) + 1 blocks are built
        heads       = 8,            # attention heads
        mlp_ratio   = 4,            # MLP hidden width / D
        qkv_bias    = False,        # learned q and v biases (MaskDM-L)
        dwt         = False,        # two token families (LL: C channels, details: 3C), official MaskedDWTUViT
        num_classes = 0,            # class-label token (official `num_classes`; 0 = unconditional, official -1)
        mlp_time_embed = False,     # Linear-SiLU-Linear on the time embedding (official `mlp_time_embed`)
    ):
        super().__init__()
        self.img_size = img_size
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.dwt = dwt
        self.num_classes = num_classes
        # NOTE: v1 also allows a larger patch for the detail family (`scale`); its only config uses scale 1, as here.
        C = in_chans // 4 if dwt else in_chans  # image channels (v1 `data_chans`)
        names = [('approx_patch_embed', 'approx_to_output', C), ('detail_patch_embed', 'detail_to_output', 3 * C)] \
            if dwt else [('patch_embed', 'encoder_to_output', C)]
        self.family_chans = [chans for _, _, chans in names]
        self.head_names = [head for _, head, _ in names]
        self.encoder = UViTEncoder([(e, c) for e, _, c in names], img_size, patch_size, embed_dim, depth, heads,
                                   mlp_ratio, qkv_bias, num_classes, mlp_time_embed)
        for head, chans in zip(self.head_names, self.family_chans):
            self.add_module(head, torch.nn.Linear(embed_dim, patch_size ** 2 * chans))
        self.num_patches = self.encoder.num_patches
        self.apply(init_weights)  # official _init_weights (Appendix)
        torch.nn.init.trunc_normal_(self.encoder.encoder_pos_embed, std=0.02, a=-2, b=2)

    def split(self, x):
        """[B, in_chans, H, W] -> the input of each token family."""
        return list(x.split(self.family_chans, dim=1))

    def forward(self, x, t, keep=None, labels=None):
        """keep: None (all tokens; returns epsilon [B, in_chans, H, W]) or one [B, n_f] index tensor of visible
        tokens per family (returns a list of [B, n_f, p p C_f] patch predictions, in the order of `keep`).
        labels: one-hot [B, num_classes]; None or an all-zero row = the unconditional token."""
        keep_f = keep if keep is not None else [None] * len(self.family_chans)
        x = self.encoder(self.split(x), t, keep_f, labels)
        counts = [self.num_patches if k is None else k.shape[1] for k in keep_f]
        x = x[:, self.encoder.extras:]  # drop the [label,] time tokens (official `noise[:, self.extras:]`)
        outs = [getattr(self, head)(h) for head, h in zip(self.head_names, x.split(counts, dim=1))]
        if keep is not None:
            return outs
        return torch.cat([unpatchify(o, self.patch_size, c) for o, c in zip(outs, self.family_chans)], dim=1)

def network_kwargs(args, resolution, channels=3, num_classes=0):
    """GaussianDiffusion kwargs from --beta_schedule, --arch and the size overrides; with --dwt the network sees
    R/2 x R/2 x 4C. The class token and the time MLP enter only when on, so unconditional kwargs stay as they were."""
    arch = dict(ARCHS[args.arch])
    for key in ('embed_dim', 'depth', 'heads', 'patch_size'):
        arch[key] = getattr(args, key) or arch[key]
    if args.qkv_bias is not None:
        arch['qkv_bias'] = args.qkv_bias
    extra = dict(num_classes=num_classes) if num_classes else {}
    if getattr(args, 'mlp_time_embed', False):
        extra['mlp_time_embed'] = True
    return dict(beta_schedule=args.beta_schedule, img_size=resolution // 2 if args.dwt else resolution,
                in_chans=4 * channels if args.dwt else channels, dwt=args.dwt, **arch, **extra)

#------------------------------------------------------------------------------
# 3. Method math: masks, the DDPM process, masked denoising score matching. Images enter as [-1, 1] pixels, or for
#    the v1 DWT variant as Haar coefficients (Appendix: to_model_space, to_image_space, x0_range).

def draw_mask(kind, h, w, rng, ratio=0.0, block_size=1, crop_size=None):
    """Per-image token mask on the h x w grid (True = masked) with a fixed count (official
    datasets/masking_generator.py: RandomMaskingGenerator, RandomBlockMaskingGenerator, CropMaskingGenerator):
    patch: int(r N) random tokens; block: int(int(r N) / b^2) aligned b x b squares; crop: all but one c x c window."""
    N = h * w
    mask = np.zeros(N, dtype=bool)
    if kind == 'patch':
        mask[rng.permutation(N)[:int(ratio * N)]] = True
    elif kind == 'block':
        hb, wb = h // block_size, w // block_size
        chosen = np.zeros(hb * wb, dtype=bool)
        chosen[rng.permutation(hb * wb)[:int(ratio * N) // block_size ** 2]] = True
        mask = np.repeat(np.repeat(chosen.reshape(hb, wb), block_size, 0), block_size, 1).reshape(N)  # [h, w]
    elif kind == 'crop':
        i, j = rng.integers(0, h - crop_size + 1), rng.integers(0, w - crop_size + 1)  # top-left corner, row first
        grid = np.ones((h, w), dtype=bool)
        grid[i:i + crop_size, j:j + crop_size] = False
        mask = grid.reshape(N)
    return mask

def draw_keep(net, batch, rng, kind, ratio=0.0, block_size=1, crop_size=None, device='cpu'):
    """Visible-token indices per family, [B, n_f] ascending, one independent mask per image and family (official
    masking_generator.py; v1 DWT: one mask per family); None when nothing is masked (fine-tuning)."""
    if kind == 'none':
        return None
    side = net.img_size // net.patch_size
    masks = [np.stack([draw_mask(kind, side, side, rng, ratio, block_size, crop_size) for _ in range(batch)])
             for _ in net.family_chans]
    if not any(m.any() for m in masks):
        return None
    return [torch.from_numpy(np.nonzero(~m)[1].reshape(batch, -1)).to(device) for m in masks]  # row-major order kept

def make_alphas_cumprod(name, T=1000):
    """alpha_bar_t, t = 0..T-1, in float64 (official gaussian_ddpm.py linear_beta_schedule, cosine_beta_schedule):
    linear betas 1e-4..0.02 (scaled by 1000/T), or the cosine schedule with s = 0.008, betas clipped to [0, 0.999]."""
    if name == 'linear':
        betas = torch.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=torch.float64)  # DDPM Sec. 4
    elif name == 'cosine':
        u = torch.linspace(0, T, T + 1, dtype=torch.float64)
        f = torch.cos((u / T + 0.008) / 1.008 * math.pi / 2) ** 2  # f(u), Nichol & Dhariwal Eq. 17
        betas = (1 - f[1:] / f[:-1]).clip(0, 0.999)  # 1 - alpha_bar_{t+1} / alpha_bar_t: f(0) cancels
    else:
        raise ValueError(f'unknown beta schedule {name!r}')
    return torch.cumprod(1 - betas, dim=0)

class GaussianDiffusion(torch.nn.Module):
    """The U-ViT plus its noise schedule (official gaussian_ddpm.GaussianDiffusion): state-dict keys are `model.` +
    the network's, as in the official checkpoints. Calls run the network under autocast and return float32."""
    def __init__(self, beta_schedule='linear', timesteps=1000, **model_kwargs):
        super().__init__()
        self.model = MaskedUViT(**model_kwargs)
        self.beta_schedule = beta_schedule
        self.num_timesteps = timesteps
        self.register_buffer('alphas_cumprod', make_alphas_cumprod(beta_schedule, timesteps), persistent=False)
        self.amp_dtype = None
        for name in ('img_size', 'in_chans', 'dwt', 'num_patches', 'family_chans', 'patch_size', 'num_classes'):
            setattr(self, name, getattr(self.model, name))

    def forward(self, x, t, keep=None, labels=None):
        with torch.autocast(x.device.type, self.amp_dtype, enabled=self.amp_dtype is not None):
            out = self.model(x.to(torch.float32), t, keep, labels)
        return [o.float() for o in out] if keep is not None else out.float()

def mdsm_loss(net, x0, t, noise, keep, call=None, labels=None):
    """Per-image epsilon-MSE on the visible patches, [B] (masked denoising score matching; official gaussian_ddpm.py
    p_losses with a mask): x_t is noised over the whole image, then only visible tokens enter the net; keep=None is
    DDPM's loss on all tokens (fine-tuning). With dwt the LL and detail families are separate element-means, summed
    (v1 loss_fn). `call` runs the network (its DDP wrapper; default: net) on the batch's labels, as p_losses does."""
    ab = net.alphas_cumprod[t][:, None, None, None]
    x_t = ab.sqrt().float() * x0 + (1 - ab).sqrt().float() * noise  # DDPM Eq. 4 (official q_sample)
    if keep is None:  # all tokens, through the same token path
        keep = [torch.arange(net.num_patches, device=x0.device).expand(len(x0), -1)] * len(net.family_chans)
    preds = (call or net)(x_t, t, keep, labels)
    loss = 0
    for pred, eps, keep_f in zip(preds, net.model.split(noise), keep):
        target = patchify(eps, net.patch_size).gather(1, keep_f[:, :, None].expand(-1, -1, pred.shape[2]))  # [B,n,F]
        loss = loss + (pred - target).square().mean(dim=(1, 2))  # DDPM Eq. 14 on the visible patches, mean per image
    return loss

#------------------------------------------------------------------------------
# 4. Sampler: DDIM, the official FID sampler (Appendix: 1000-step ancestral DDPM). State in float64, the
#    network in float32; epsilon from guided_eps (Appendix: the network, or our classifier-free guidance).

def ddim_time_pairs(num_steps, T=1000):
    """(t, s) pairs: trunc(linspace(-1, T-1, S+1)) reversed; S=250 -> (999, 995), ..., (7, 3), (3, -1) (official
    gaussian_ddpm.py ddim_sample)."""
    times = list(reversed(torch.linspace(-1, T - 1, num_steps + 1).int().tolist()))  # float32 linspace, as official
    return list(zip(times[:-1], times[1:]))

@torch.no_grad()
def ddim_sampler(net, latents, labels=None, randn_like=torch.randn_like, num_steps=250, eta=1.0, clamp=True,
                 alphas_cumprod=None, cfg=None):
    """DDIM (official ddim_sample) over ddim_time_pairs; eps is the raw network output, not re-derived from the
    clamped x0, and the last pair returns x0. labels, cfg: see guided_eps."""
    ab = (net.alphas_cumprod if alphas_cumprod is None else alphas_cumprod).double().to(latents.device)
    lo, hi = (b.to(latents.device) for b in x0_range(net)) if clamp else (None, None)
    x = latents.to(torch.float64)
    for t, s in ddim_time_pairs(num_steps, len(ab)):
        t_batch = torch.full([len(x)], t, device=x.device, dtype=torch.long)
        eps = guided_eps(net, x.to(torch.float32), t_batch, labels, cfg).double()
        x0 = (x - (1 - ab[t]).sqrt() * eps) / ab[t].sqrt()  # DDIM Eq. 12, "predicted x0"
        x0 = x0.clamp(lo, hi) if clamp else x0
        if s < 0:
            return x0
        sigma = eta * ((1 - ab[t] / ab[s]) * (1 - ab[s]) / (1 - ab[t])).sqrt()  # DDIM Eq. 16
        x = ab[s].sqrt() * x0 + (1 - ab[s] - sigma ** 2).sqrt() * eps  # DDIM Eq. 12, with the raw eps
        if eta > 0:
            x = x + sigma * randn_like(x)
    return x

def sample_images(net, seeds, device, sampler='ddim', num_steps=250, eta=1.0, class_idx=None, cfg=None):
    """Images of `seeds` as generate makes them, float32 [N, C, H, W] in [-1, 1], each drawn with its own generator.
    A conditional net draws each seed's class after its latents; `class_idx` replaces it (still drawn, as EDM)."""
    rng = PerSeedRNG(seeds, device)
    latents = rng.randn([net.in_chans, net.img_size, net.img_size], device=device, dtype=torch.float64)
    labels = seed_labels(rng, net.num_classes, class_idx, device)
    if sampler == 'ddim':
        x = ddim_sampler(net, latents, labels, rng.randn_like, num_steps=num_steps, eta=eta, cfg=cfg)
    else:
        x = ddpm_sampler(net, latents, labels, rng.randn_like, cfg=cfg)
    return to_image_space(x, net.dwt).to(torch.float32)

#------------------------------------------------------------------------------
# 5. Training loop (official main.py, train_step.py): AdamW (betas 0.99, 0.99 in every config; our CPU demo: 0.9,
#    0.999) with weight decay 0.03 on every parameter, linear lr warm-up, grad-norm clipping, the ema-pytorch EMA (its
#    decay schedule: Appendix, ema_decay), all counted in optimizer steps. Setup helpers: Appendix.

def train(args):
    # Setup: process group, precision, data, flag checks
    device = init_distributed()
    amp_dtype, scaler = setup_precision(args.fp16, args.bf16, args.tf32, device)
    dataset, net_kwargs, info = training_setup(args, get_world_size())
    if args.dry_run:
        print_options(args, info)
        print0(f'{info["num_params"]:,} parameters, {info["tokens"]} tokens per image')
        return
    # Network and EMA (fine-tuning: the pre-trained online weights), AdamW
    net, ema, start = training_network(args, net_kwargs, info, device, amp_dtype)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=tuple(args.adam_betas), eps=1e-8,
                                  weight_decay=args.weight_decay, fused=device.type == 'cuda')
    run = training_run(args, dataset, info, device, net, ema, optimizer, scaler)
    ddp = distributed_model(net, device, args.compile)
    batch_gpu, rounds = info['batch_gpu'], info['rounds']
    stream = run.data(dataset, batch_gpu, args.seed, args.workers)
    with run:
        print0(banner(args, dataset, info, device))
        if start:
            print0(start)
        while not run.done:
            rng = reseed(args.seed, get_rank(), run.cur_nimg)  # t, noise (torch) and masks (numpy) of this step
            optimizer.zero_grad(set_to_none=True)
            for r in range(rounds):
                # Fetch data: [-1, 1] pixels (v1 DWT: Haar coefficients), one-hot labels.
                images, labels = next(stream)
                x0 = to_model_space(images.to(device), args.dwt)
                # The paper's loss (masked denoising score matching): a uniform t in {0..999}, noise and one
                # mask per image (official datasets draw it in __getitem__); epsilon-MSE on visible patches.
                t = torch.randint(0, net.num_timesteps, [batch_gpu], device=device)
                noise = torch.randn_like(x0)
                keep = draw_keep(net, batch_gpu, rng, args.mask_type, args.mask_ratio, args.block_size,
                                 args.crop_size, device)
                if args.cond:  # --label-dropout (ours, for --cfg) zeroes rows: the unconditional token
                    labels = drop_labels(labels.to(device), args.label_dropout, batch_gpu, True)
                else:
                    labels = None
                with sync_if(ddp, r == rounds - 1):
                    loss = mdsm_loss(net, x0, t, noise, keep, ddp, labels)
                    run.add('loss', loss)
                    # Backward: the mean over this process's images (DDP averages the processes).
                    scaler.scale(loss.sum() * (args.ls / (batch_gpu * rounds))).backward()
            # Optimizer: official LambdaLR warm-up (lr 0 at step 0), clipping, AdamW.
            lr = args.lr * min(run.step / args.warmup_steps, 1) if args.warmup_steps else args.lr
            if args.clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(net.parameters(), args.clip_grad)
            optimizer_step(optimizer, scaler, lr)
            # EMA: ema-pytorch's schedule at optimizer step run.step + 1 (Appendix, ema_decay).
            beta = ema_decay(run.step + 1, args.ema_decay, args.ema_every)
            if beta is not None:
                update_ema(ema, net, beta)
            # Tick: status line, snapshots, training states, metrics.
            run.end_step(args.batch)
        print0(f'done: {run.dir}')

#------------------------------------------------------------------------------
# 6. Generation: one PNG per seed, identical for any --batch and any number of GPUs (load_network: Appendix).

@torch.no_grad()
def generate(args):
    device = init_distributed()
    rank = get_rank()
    world_size = get_world_size()
    check_outdir(args.outdir)
    net = load_network(args.network, args.preset).to(device).eval()
    check_class(args.class_idx, net.num_classes)
    if args.cfg is not None and not net.num_classes:
        raise UsageError(f'--cfg={args.cfg} needs a class-conditional network')
    what = f'DDIM {args.steps} steps, eta {args.eta:g}' if args.sampler == 'ddim' else 'ancestral DDPM, 1000 steps'
    side = net.img_size * (2 if net.dwt else 1)
    print0(f'generating {len(args.seeds)} images of {side}x{side} ({what}) into {args.outdir}')
    with working(), tqdm(total=len(args.seeds), unit='img', disable=rank != 0) as bar:
        for seeds in seed_batches(args.seeds, args.batch, rank, world_size):
            images = sample_images(net, seeds, device, args.sampler, args.steps, args.eta, args.class_idx, args.cfg)
            save_seed_images(images, seeds, args.outdir, args.subdirs)
            bar.update(len(seeds) * world_size)
    torch.distributed.barrier()
    print0('done')

#------------------------------------------------------------------------------
# 7. Command line.

def build_parser(preset=None):
    """The parser; `preset` (a PRESETS name) becomes the defaults of `train` (see common.parse_command_line)."""
    parser = Parser(description='Masked Diffusion Models (Lei et al. 2023)')
    sub = parser.add_subparsers(dest='command', required=True)
    t = sub.add_parser('train', help='train a model')
    add_train_flags(t, help=dict(dropout='must be 0: the MaskDM U-ViT has no dropout'),
                    duration=51.2, batch=256, lr=2e-4, dropout=0, tick=50, snap=50, dump=100)
    p01, steps = number(float, 0, 1), number(int, 1, 1000)  # DDIM steps: at most T = 1000
    size, count = number(int, 1, 2**14), number(int, 1, 10**9)  # widths, sides; step counts (official: 550k at most)
    t.add_argument('--preset', choices=sorted(PRESETS), default=None, help='an official config; flags override')
    t.add_argument('--arch', choices=sorted(ARCHS), default='S', help='U-ViT size: S 512/13/8, B 768/12/12, '
                   'L 1024/16/16, T tiny (width/depth/heads)')
    t.add_argument('--embed_dim', '--encoder_embed_dim', type=size, default=None, metavar='INT',
                   help='width; None = the arch\'s')
    t.add_argument('--depth', '--encoder_depth', type=number(int, 1, 1000), default=None, metavar='INT',
                   help='config depth, 2 (depth // 2) + 1 blocks; None = the arch\'s')
    t.add_argument('--heads', '--encoder_heads', type=size, default=None, metavar='INT',
                   help='attention heads; None = the arch\'s')
    t.add_argument('--patch_size', type=size, default=None, metavar='INT', help='patch side in pixels; None = 4')
    t.add_argument('--qkv_bias', type=parse_bool, default=None, metavar='BOOL', help='q/v biases; None = the arch\'s')
    t.add_argument('--mlp_time_embed', type=parse_bool, default=False, metavar='BOOL',
                   help='MLP on the time embedding (official config key)')
    t.add_argument('--dwt', type=parse_bool, default=False, metavar='BOOL',
                   help='train in the Haar wavelet domain (v1 DWT model)')
    t.add_argument('--resolution', type=size, default=None, metavar='INT', help='expected image size; None = any')
    t.add_argument('--mask_type', choices=['patch', 'block', 'crop', 'none'], default='block',
                   help='pre-training mask; none = fine-tuning')
    t.add_argument('--mask_ratio', type=p01, default=0.9, metavar='FLOAT',
                   help='fraction of tokens to mask (patch, block); at least one token must stay visible')
    t.add_argument('--block_size', type=size, default=4, metavar='INT', help='block side in tokens (block masks)')
    t.add_argument('--crop_size', type=size, default=None, metavar='INT',
                   help='visible window side in tokens (crop masks)')
    t.add_argument('--beta_schedule', choices=['linear', 'cosine'], default='linear', help='DDPM noise schedule')
    t.add_argument('--train_steps', '--training_steps', type=count, default=None, metavar='INT',
                   help='training length in optimizer steps; None = --duration')
    t.add_argument('--warmup_steps', type=number(int, 0, 10**9), default=0, metavar='INT',
                   help='linear lr warm-up in optimizer steps; 0 = none')
    t.add_argument('--clip_grad', type=number(float, 0, 1e6), default=1.0, metavar='FLOAT',
                   help='gradient-norm clipping; 0 = off')
    t.add_argument('--weight_decay', type=number(float, 0, 10), default=0.03, metavar='FLOAT',
                   help='AdamW weight decay; --lr times it must be below 1')
    t.add_argument('--adam_betas', type=parse_betas, default=[0.99, 0.99], metavar='B1,B2',
                   help='AdamW betas (official config key; every official config: 0.99,0.99)')
    t.add_argument('--ema_decay', type=p01, default=0.999, metavar='FLOAT',
                   help='EMA beta (ema-pytorch warm-up below it)')
    t.add_argument('--ema_update_every', '--ema_every', dest='ema_every', type=count, default=1, metavar='STEPS',
                   help='optimizer steps between EMA updates')
    t.add_argument('--pretrained_model_ckpt', default=None, metavar='PT',
                   help='fine-tune from the online weights of this masked_dm.py training state or official .pt')
    t.add_argument('--label-dropout', type=p01, default=0, metavar='P',
                   help='probability of replacing a label by the unconditional token (ours, for --cfg; official: 0)')
    t.add_argument('--grid', type=number(int, 0, 1024), default=36, metavar='INT',
                   help='images in the sample grid written with each snapshot; 0 = none')
    t.add_argument('--grid_steps', type=steps, default=50, metavar='INT', help='DDIM steps for the sample grid')
    add_metric_flags(t, preprocess='pytorch_fid')  # MaskDM's FIDs: pytorch-fid (docs/masked_dm.md)
    t.add_argument('--metrics-steps', type=steps, default=None, metavar='INT',
                   help='DDIM steps (eta 1) of the --metrics samples; None = --grid_steps')
    t.set_defaults(**PRESETS.get(preset, {}))

    g = sub.add_parser('generate', help='generate images')
    g.add_argument('--network', required=True, metavar='PT', help='network snapshot (ours), or an official MaskDM .pt')
    add_generate_flags(g, edm_sampler=False)
    g.add_argument('--preset', choices=sorted(PRESETS), default=None,
                   help='architecture of an official checkpoint (ours carry theirs)')
    g.add_argument('--sampler', choices=['ddim', 'ddpm'], default='ddim', help='DDIM, or 1000-step ancestral DDPM')
    g.add_argument('--steps', type=steps, default=250, metavar='INT', help='DDIM steps (official FIDs: 250)')
    g.add_argument('--eta', type=p01, default=1.0, metavar='FLOAT',
                   help='DDIM eta; 1 = the official FID setting, 0 = deterministic')
    g.add_argument('--class', dest='class_idx', type=number(int, 0, 2**31 - 1), default=None, metavar='INT',
                   help='class label; None = random per seed')
    g.add_argument('--cfg', type=number(float, 0, 100), default=None, metavar='W',
                   help='classifier-free guidance weight (ours); 0 = the unconditional token')
    return parser

def main():
    args = parse_command_line(build_parser)
    run_main({'train': train, 'generate': generate}[args.command], args)

#------------------------------------------------------------------------------
# 8. Appendix: what a reader of the paper can skip: the U-ViT layers, the data space (v1 DWT: Haar), the EMA's
#    schedule, ancestral DDPM, guidance (ours), training setup, checkpoint files (load_network, the fine-tuning init).

# U-ViT layers (Bao et al. 2023, arXiv:2209.12152; the official models/mask_uvit.py names): the standard ViT pieces
# that MaskedUViT / UViTEncoder (section 2) assemble.

def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of the integer step t, cosines first: [cos(t w_i), sin(t w_i)], w_i = 10^4^(-i/k), k = D/2
    (official mask_uvit.py, timestep_embedding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # [B, D/2]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, D]

def patchify(x, p):
    """[B, C, h p, w p] -> [B, h w, p p C]: row-major tokens, features (row a, column b, channel c), channel fastest."""
    return rearrange(x, 'B C (h a) (w b) -> B (h w) (a b C)', a=p, b=p)

def unpatchify(x, p, channels):
    """The inverse of patchify (square grids): [B, h w, p p C] -> [B, C, h p, w p]."""
    return rearrange(x, 'B (h w) (a b C) -> B C (h a) (w b)', h=math.isqrt(x.shape[1]), a=p, b=p, C=channels)

class PatchEmbed(torch.nn.Module):
    """p x p stride-p convolution (timm PatchEmbed, key `proj`), applied as a linear map to patch vectors so that
    masked tokens can be dropped before embedding; the result equals the convolution on the visible patches."""
    def __init__(self, in_chans, embed_dim, patch_size):
        super().__init__()
        self.patch_size = patch_size
        self.proj = torch.nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)  # PyTorch default init

    def forward(self, x, keep=None):
        p = self.patch_size
        tokens = rearrange(x, 'B C (h a) (w b) -> B (h w) (C a b)', a=p, b=p)  # [B, N, C p p]: conv weight order
        if keep is not None:  # [B, n] indices of visible tokens, ascending
            tokens = tokens.gather(1, keep[:, :, None].expand(-1, -1, tokens.shape[2]))  # [B, N, F] -> [B, n, F]
        return F.linear(tokens, self.proj.weight.flatten(1), self.proj.bias)  # [B, n, D]

class Attention(torch.nn.Module):
    """Multi-head self-attention, qkv without bias; with qkv_bias, learned q and v biases and no k bias (BEiT)."""
    def __init__(self, dim, heads, qkv_bias=False):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = torch.nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = torch.nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias]) if self.q_bias is not None else None
        q, k, v = rearrange(F.linear(x, self.qkv.weight, bias), 'B L (K H d) -> K B H L d', K=3, H=self.heads)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head dim)) v; head dim 64 in every config
        return self.proj(rearrange(x, 'B H L d -> B L (H d)'))

class Mlp(torch.nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = torch.nn.Linear(dim, hidden)
        self.fc2 = torch.nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU

class Block(torch.nn.Module):
    """Pre-norm transformer block; an out-block first mixes in its long skip: x <- Linear([x, skip]) (U-ViT)."""
    def __init__(self, dim, heads, mlp_ratio=4, qkv_bias=False, skip=False):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = torch.nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.skip_linear = torch.nn.Linear(2 * dim, dim) if skip else None

    def forward(self, x, skip=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))  # current stream first
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

def init_weights(m):  # official MaskedUViT._init_weights: timm's trunc_normal_(std=0.02), cut at +-2 absolute (no cut)
    if isinstance(m, torch.nn.Linear):
        torch.nn.init.trunc_normal_(m.weight, std=0.02, a=-2, b=2)
        if m.bias is not None:
            torch.nn.init.zeros_(m.bias)
    elif isinstance(m, torch.nn.LayerNorm):
        torch.nn.init.ones_(m.weight)
        torch.nn.init.zeros_(m.bias)

# The data space: [-1, 1] pixels, or for the v1 DWT variant (arXiv:2306.11363v1, MaskedDWTUViT) the Haar
# coefficients, with per-band bounds for the sampler's x0 clamp.

def to_model_space(images, dwt):
    """uint8 images -> what the diffusion runs on: [-1, 1] pixels, or with dwt the Haar transform of the [0, 1] image
    with only LL mapped by 2u - 1 (LL in [-1, 3], details in [-1, 1]; official v1 datasets/celebahq.py)."""
    if not dwt:
        return images.to(torch.float32) / 127.5 - 1
    coeffs = haar_dwt(images.to(torch.float32) / 255)
    C = images.shape[1]  # LL is the first C bands
    return torch.cat([coeffs[:, :C] * 2 - 1, coeffs[:, C:]], dim=1)

def to_image_space(x, dwt):
    """The inverse, to [-1, 1] pixels for saving: LL back by (u + 1) / 2, inverse Haar (official v1 sample())."""
    if not dwt:
        return x
    C = x.shape[1] // 4
    return haar_idwt(torch.cat([(x[:, :C] + 1) / 2, x[:, C:]], dim=1)) * 2 - 1

def x0_range(net):
    """Clamp bounds of the predicted x0 per channel: [-1, 1]; with dwt LL in [-1, 3], details in [-1, 1] (v1 code)."""
    hi = torch.ones(net.in_chans, 1, 1, dtype=torch.float64)
    if net.dwt:
        hi[:net.in_chans // 4] = 3  # the LL bands
    return -torch.ones_like(hi), hi

def haar_dwt(x):
    """One-level orthonormal Haar (PyWavelets dwt2 'haar'): [B, C, H, W] -> [B, 4C, H/2, W/2], [LL, H, V, D] x C."""
    a, b, c, d = x[..., 0::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    return torch.cat([a + b + c + d, a + b - c - d, a - b + c - d, a - b - c + d], dim=1) / 2

def haar_idwt(y):
    """The inverse: [B, 4C, H, W] -> [B, C, 2H, 2W]."""
    LL, H, V, D = y.chunk(4, dim=1)
    out = torch.empty(*LL.shape[:2], LL.shape[2] * 2, LL.shape[3] * 2, dtype=y.dtype, device=y.device)
    out[..., 0::2, 0::2] = (LL + H + V + D) / 2
    out[..., 0::2, 1::2] = (LL + H - V - D) / 2
    out[..., 1::2, 0::2] = (LL - H + V - D) / 2
    out[..., 1::2, 1::2] = (LL - H - V + D) / 2
    return out

# The official code's EMA decay schedule and ancestral sampler (generate --sampler=ddpm); the samplers' epsilon.

def ema_decay(n, beta, every=1, after=100):
    """EMA decay at optimizer step n (1-indexed) as ema-pytorch 2023 (beta, update_after_step=100, power 2/3): None on
    steps that skip the update ((n - 1) % every != 0), 0 (a copy) while n - 1 <= after (+ one more update, see the
    NOTE), then delta(n) = min(beta, 1 - (n - after)^(-2/3))."""
    if (n - 1) % every:
        return None
    # NOTE: ema-pytorch's formula gives delta(102) = 1 - 2^(-2/3); its 2023 code (the `initted` flag) copies once more
    # on the first update after the warm-up, so that update is a copy too. We follow the code.
    if n - 1 <= after + every:
        return 0.0
    return min(beta, 1 - (n - after) ** (-2 / 3))

@torch.no_grad()
def ddpm_sampler(net, latents, labels=None, randn_like=torch.randn_like, clamp=True, alphas_cumprod=None, cfg=None):
    """Ancestral DDPM over all T steps (official p_sample_loop): x_{t-1} ~ q(x_{t-1} | x_t, x0) with the clamped x0."""
    ab = (net.alphas_cumprod if alphas_cumprod is None else alphas_cumprod).double().to(latents.device)
    ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
    beta = 1 - ab / ab_prev
    lo, hi = (b.to(latents.device) for b in x0_range(net)) if clamp else (None, None)
    x = latents.to(torch.float64)
    for t in reversed(range(len(ab))):
        t_batch = torch.full([len(x)], t, device=x.device, dtype=torch.long)
        eps = guided_eps(net, x.to(torch.float32), t_batch, labels, cfg).double()
        x0 = (x - (1 - ab[t]).sqrt() * eps) / ab[t].sqrt()
        # NOTE: v1 clamps the DWT x0 to [-1, 1] here (p_mean_variance), cutting LL in half; we use per-band bounds.
        x0 = x0.clamp(lo, hi) if clamp else x0
        mean = (beta[t] * ab_prev[t].sqrt() * x0 + (1 - ab_prev[t]) * (1 - beta[t]).sqrt() * x) / (1 - ab[t])  # Eq. 7
        var = (beta[t] * (1 - ab_prev[t]) / (1 - ab[t])).clamp(min=1e-20)  # beta~_t, DDPM Eq. 7
        x = mean + var.sqrt() * randn_like(x) if t > 0 else mean
    return x

def guided_eps(net, x, t, labels=None, cfg=None):
    """epsilon for the samplers: net(x, t), or net(x, t | labels) for one-hot labels; with cfg = w, guided, both
    halves in one batch (all-zero label rows: the unconditional token). w = 0 is the official unconditional sampling.
    NOTE: classifier-free guidance (Ho & Salimans 2022) is our addition, not the official code's: its sampler
    (gaussian_ddpm.py, model_predictions) passes no labels, so it always samples with `uncond_embed`."""
    if labels is None:
        return net(x, t)
    if cfg is None:
        return net(x, t, labels=labels)
    eps_uncond, eps_cond = net(torch.cat([x, x]), torch.cat([t, t]),
                               labels=torch.cat([torch.zeros_like(labels), labels])).chunk(2)
    return eps_uncond + cfg * (eps_cond - eps_uncond)

# Training setup: flag checks, the network, the run directory and its banner; --adam_betas's type.

def parse_betas(s):
    """'0.9,0.999' -> [0.9, 0.999]: two numbers in [0, 1) (a list, as the training options store it)."""
    try:
        betas = [float(b) for b in s.split(',')]
    except ValueError:
        betas = []
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise argparse.ArgumentTypeError(f'expected two numbers in [0, 1) like 0.9,0.999; got {s!r}')
    return betas

def training_setup(args, world_size):
    """(dataset, net_kwargs, info): every flag checked against the data and the token grid before anything is
    written; `info` is what setup resolved (training_options.json)."""
    check_train_flags(args)
    dataset = open_dataset(args.data, use_labels=args.cond, xflip=args.xflip)
    R, C = dataset.resolution, dataset.num_channels  # any channel count (official config key `in_chans`)
    net_kwargs = network_kwargs(args, R, C, dataset.label_dim)
    shape_net, keep = check_token_grid(args, R, net_kwargs)  # the network's shapes and one drawn mask
    batch_gpu, rounds = split_batch(args.batch, args.batch_gpu, world_size)
    if keep is None:
        patches = shape_net.num_patches * len(shape_net.family_chans)
    else:
        patches = sum(k.shape[1] for k in keep)  # the visible ones
    total_nimg = args.train_steps * args.batch if args.train_steps else int(args.duration * 1e6)
    info = dict(net_kwargs=net_kwargs,
                num_params=sum(w.numel() for w in shape_net.parameters()),
                mask=mask_name(args, keep),
                tokens=shape_net.model.encoder.extras + patches,  # [label,] time, patches
                batch_gpu=batch_gpu,
                rounds=rounds,
                world_size=world_size,
                total_nimg=total_nimg,
                total_kimg=total_nimg / 1000)
    return dataset, net_kwargs, info

def check_train_flags(args):
    """Flag combinations that do not depend on the data, checked before the data are opened."""
    if args.cond and args.dwt:
        raise UsageError('--cond=1 --dwt=1: only the pixel U-ViT (official MaskedUViT) has the class token')
    if args.label_dropout and not args.cond:
        raise UsageError(f'--label-dropout={args.label_dropout} needs class labels (--cond=1)')
    if args.dropout:
        raise UsageError(f'--dropout={args.dropout}: the MaskDM U-ViT has no dropout (every official config: 0)')
    if args.mask_type == 'crop' and args.crop_size is None:
        raise UsageError('--mask_type=crop needs --crop_size (the visible window\'s side in tokens)')
    if args.lr * args.weight_decay >= 1:  # AdamW scales every weight by 1 - lr * weight_decay at each step
        raise UsageError(f'--weight_decay={args.weight_decay:g} with --lr={args.lr:g}: their product must be below 1')
    if args.train_steps and args.train_steps * args.batch > 1e11:  # --duration's bound, 100,000 Mimg
        raise UsageError(f'--train_steps={args.train_steps} x --batch={args.batch} is '
                         f'{args.train_steps * args.batch / 1e6:,.0f} Mimg; at most 100,000 Mimg (as --duration)')

def check_token_grid(args, R, net_kwargs):
    """The flags against the data (R x R images) and the token grid. Returns the network on the meta device (shapes
    only) and one image's mask as draw_keep draws it."""
    if args.resolution and R != args.resolution:
        raise UsageError(f'--data={args.data}: {R}x{R} images, but this configuration (--preset/--resolution) is for '
                         f'{args.resolution}x{args.resolution}')
    p = net_kwargs['patch_size']
    side = net_kwargs['img_size'] // p
    if net_kwargs['img_size'] % p or (args.dwt and R % 2):
        raise UsageError(f'--patch_size={p}: {R}x{R} images do not split into {p}-pixel patches' +
                         (' after the wavelet transform' if args.dwt else ''))
    if net_kwargs['embed_dim'] % net_kwargs['heads']:
        raise UsageError(f'--heads={net_kwargs["heads"]} does not divide --embed_dim={net_kwargs["embed_dim"]}')
    if args.mask_type == 'block' and side % args.block_size:
        raise UsageError(f'--block_size={args.block_size} does not tile the {side}x{side} token grid')
    if args.mask_type == 'crop' and args.crop_size > side:
        raise UsageError(f'--crop_size={args.crop_size} must be in 1..{side} (tokens of the {side}x{side} grid)')
    with torch.device('meta'):  # shapes only, nothing allocated
        shape_net = GaussianDiffusion(**net_kwargs)
    keep = draw_keep(shape_net, 1, np.random.default_rng(0), args.mask_type, args.mask_ratio, args.block_size,
                     args.crop_size)
    if keep is not None and min(k.shape[1] for k in keep) == 0:
        raise UsageError(f'--mask_ratio={args.mask_ratio} masks every token of the {side}x{side} grid' +
                         (f' in blocks of {args.block_size}' if args.mask_type == 'block' else '') +
                         '; at least one must stay visible')
    if keep is None and args.mask_type != 'none':
        print0(f'note: --mask_type={args.mask_type} masks no token of the {side}x{side} grid at these settings: '
               'full-image training')
    return shape_net, keep

def training_network(args, net_kwargs, info, device, amp_dtype):
    """(net, ema, what it loaded): seeded, or the pre-trained online weights (--resume restores its own)."""
    num_params = info['num_params']  # weights, EMA, gradients and AdamW's two moments: 5 float32 copies
    check_memory(20 * num_params, f'a U-ViT of {num_params:,} parameters (--arch, --embed_dim, --depth set the size); '
                 'its weights, EMA, gradients and AdamW moments', device)
    torch.manual_seed(args.seed)
    pretrained = None if args.resume else args.pretrained_model_ckpt
    net, start = load_pretrained(GaussianDiffusion(**net_kwargs), pretrained)
    net, ema = network_and_ema(net, device, amp_dtype)
    ema.amp_dtype = None  # the EMA samples (grid, --metrics) in float32, as generate does from its snapshots
    return net, ema, start

def training_run(args, dataset, info, device, net, ema, optimizer, scaler):
    """common.TrainingRun: the run directory, log, status lines, snapshots with a sample grid, --metrics."""
    def snapshot():  # what a network snapshot holds besides the method's name and the flags
        return dict(net_kwargs=info['net_kwargs'], ema=ema.state_dict())

    def save_grid(path):  # the sample grid written with each snapshot
        save_image_grid(sample_images(ema, range(args.grid), device, num_steps=args.grid_steps), path)

    steps = args.metrics_steps or args.grid_steps  # --metrics: what generate makes (DDIM, eta 1) in `steps` steps
    evaluate = training_metrics(args, dataset.resolution, dataset.num_channels, device,
                                lambda seeds: sample_images(ema, seeds, device, num_steps=steps))
    desc = run_desc(dataset.name, args.arch, *['dwt'] * args.dwt, *['cond'] * args.cond, info['mask'],
                    world_size=info['world_size'], batch=args.batch, fp16=args.fp16, bf16=args.bf16,
                    desc=args.desc)
    return TrainingRun('masked_dm', vars(args), info, device, outdir=args.outdir, desc=desc,
                       nosubdir=args.nosubdir, resume=args.resume, total_nimg=info['total_nimg'],
                       tick=args.tick, snap=args.snap, dump=args.dump, snapshot=snapshot,
                       state=dict(net=net, ema=ema, optimizer=optimizer, scaler=scaler),
                       grid=save_grid if args.grid else None, evaluate=evaluate)

def mask_name(args, keep):
    """The mask in the run directory's name and the banner: full, patch-90, block4-90, crop-5."""
    if keep is None:
        return 'full'
    if args.mask_type == 'crop':
        return f'crop-{args.crop_size}'
    block = args.block_size if args.mask_type == 'block' else ''
    return f'{args.mask_type}{block}-{round(args.mask_ratio * 100)}'

def banner(args, dataset, info, device):
    """The run's first status line: data, network, tokens per image, schedule and batch layout."""
    R, C = dataset.resolution, dataset.num_channels
    return (f'MaskDM: {dataset.name} ({len(dataset)} images, {R}x{R}x{C}'
            f'{f", {dataset.label_dim} classes" if args.cond else ""}), U-ViT-{args.arch}{" DWT" if args.dwt else ""} '
            f'{info["num_params"]:,} parameters, {info["tokens"]} tokens per image ({info["mask"]}), '
            f'{args.beta_schedule} schedule, device {device}, {info["batch_gpu"]} images x {info["rounds"]} rounds x '
            f'{info["world_size"]} processes per step, to {info["total_kimg"]:g} kimg')

# Checkpoint files. An official MaskDM .pt (main.py, save_training_state) holds {'step', 'model': the
# online GaussianDiffusion state ('model.' + network keys, schedule buffers), 'opt', 'ema': the ema-pytorch state
# ('ema_model.' + the same keys), 'scaler'} and no configuration: the architecture comes from a preset.

def load_network(path, preset=None, flag='--network'):
    """The EMA network of our snapshot / training state (a folder: its newest snapshot), or of an official .pt (whose
    architecture `preset` names)."""
    path = latest_checkpoint(path, 'network-snapshot', flag)
    ckpt = read_checkpoint(path, flag)
    if is_official_maskdm(ckpt):
        return official_network(ckpt, path, preset, flag)
    if ckpt.get('method') != 'masked_dm':
        raise UsageError(f'{flag}={path}: {checkpoint_kind(ckpt)}; expected a masked_dm.py network snapshot (or '
                         'training state), or an official MaskDM .pt with --preset')
    ckpt = load_snapshot(path, flag, ['masked_dm'])
    try:
        net = GaussianDiffusion(**ckpt['net_kwargs'])
        load_weights(net, ckpt['ema'], path)
    except (TypeError, ValueError, RuntimeError, AttributeError) as e:  # a file made by hand, not by train
        raise UsageError(f'{flag}={path}: a masked_dm.py checkpoint whose net_kwargs / ema describe no MaskDM '
                         f'network ({str(e).splitlines()[0]})') from None
    return net

def load_pretrained(net, path, flag='--pretrained_model_ckpt'):
    """Fine-tuning init (official main.py, `pretrained_model_ckpt`): the ONLINE weights of a pre-training checkpoint:
    our training state ('net'), our snapshot ('ema', the only weights it holds), or an official .pt ('model').
    Returns `net` and the line that says what it loaded ('' for path None, which leaves `net` as it is)."""
    if path is None:
        return net, ''
    path = latest_checkpoint(path, 'training-state', flag)  # a folder: its newest training state
    ckpt = read_checkpoint(path, flag)
    if is_official_maskdm(ckpt):
        if not isinstance(ckpt.get('model'), dict):
            raise UsageError(f'{flag}={path}: an official MaskDM .pt without "model" (the online weights)')
        weights = {k: v for k, v in ckpt['model'].items() if k.startswith('model.')}  # not the schedule buffers
        what = f'an official MaskDM .pt (step {ckpt.get("step", "unknown")}): its online weights "model", not its "ema"'
    else:
        if ckpt.get('method') != 'masked_dm':  # before anything else is read: another method's options mean nothing
            raise UsageError(f'{flag}={path}: {checkpoint_kind(ckpt)}; expected a masked_dm.py training state or '
                             'snapshot, or an official MaskDM .pt')
        ckpt = load_snapshot(path, flag, ['masked_dm'])
        where = f'kimg {ckpt.get("cur_nimg", 0) / 1000:g}' + (f', step {ckpt["step"]}' if 'step' in ckpt else '')
        what = (f'a masked_dm.py training state ({where}): its online weights "net", not its EMA' if 'net' in ckpt else
                f'a masked_dm.py network snapshot ({where}): its EMA weights, the only ones it holds (the paper '
                'fine-tunes from the online weights of a training state)')
        weights = ckpt.get('net', ckpt['ema'])
    if not isinstance(weights, dict):
        raise UsageError(f'{flag}={path}: a checkpoint without network weights (a {type(weights).__name__})')
    if not all(torch.isfinite(w).all() for w in weights.values() if torch.is_tensor(w) and w.is_floating_point()):
        raise UsageError(f'{flag}={path}: its weights hold NaN or inf (a diverged run); use an earlier checkpoint')
    # NOTE: upstream loads with strict=False and prints what did not match; the stages share one architecture, so we
    # load strictly and stop with the first mismatching name (a wrong --preset would otherwise train from scratch).
    try:
        load_weights(net, weights, path)
    except UserError as e:
        raise UsageError(f'{flag}={e}') from None
    return net, f'fine-tuning from {path}: {what}'

def read_checkpoint(path, flag):
    """A torch.save dict named by `flag`, memory-mapped where it can be (tensors are read when used); a one-line
    UsageError naming the flag if it is not a checkpoint."""
    with warnings.catch_warnings():  # torch warns about the pickle protocol of a raw pickle: the one line says it
        warnings.simplefilter('ignore')
        try:
            ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        except Exception:  # not a zip archive (mmap needs one), or not a checkpoint: load_checkpoint's one line
            try:
                ckpt = load_checkpoint(path)
            except UserError as e:
                raise UsageError(f'{flag}={e}') from None
    if not isinstance(ckpt, dict):
        raise UsageError(f'{flag}={path}: not a checkpoint of this project (a {type(ckpt).__name__})')
    return ckpt

def checkpoint_kind(ckpt):
    """What a checkpoint dict is, for the one line that refuses it: 'a gdd.py training state', ..."""
    method = ckpt.get('method')
    if not isinstance(method, str):
        return 'not a checkpoint of this project'
    return f'a {method}.py {"training state" if "optimizer" in ckpt else "network snapshot"}'

def is_official_maskdm(ckpt):
    return 'method' not in ckpt and isinstance(ckpt.get('model', ckpt.get('ema')), dict)

def preset_network_kwargs(name):
    """Network kwargs of a preset (official checkpoints carry no configuration)."""
    preset = PRESETS[name]
    arch = types.SimpleNamespace(arch=preset['arch'], dwt=preset.get('dwt', False), embed_dim=None, depth=None,
                                 heads=None, patch_size=None, qkv_bias=None,  # None: the arch's own sizes
                                 beta_schedule=preset['beta_schedule'])
    return network_kwargs(arch, preset['resolution'])

def official_options(weights):
    """What an official config sets beyond the preset, read off the weights: `num_classes` (rows of label_emb),
    `mlp_time_embed` (time_embed.* present) and, for the pixel U-ViT, `in_chans` (the patch embedding's input)."""
    options = {}
    label_emb = weights.get('model.encoder.label_emb.weight')
    if label_emb is not None:
        options['num_classes'] = label_emb.shape[0]
    if 'model.encoder.time_embed.0.weight' in weights:
        options['mlp_time_embed'] = True
    proj = weights.get('model.encoder.patch_embed.proj.weight')
    if proj is not None:
        options['in_chans'] = proj.shape[1]
    return options

def official_network(ckpt, path, preset, flag):
    """The EMA network of an official .pt ('ema': 'ema_model.' + GaussianDiffusion keys); the architecture from
    `preset`, the schedule from the checkpoint's alphas_cumprod, classes / time MLP / channels from its weights."""
    if not isinstance(ckpt.get('ema'), dict):
        raise UsageError(f'{flag}={path}: an official MaskDM .pt without "ema" (the EMA weights)')
    if preset is None:
        raise UsageError(f'{flag}={path}: official MaskDM checkpoints carry no configuration; name the architecture '
                         'with --preset=NAME (e.g. --preset=hq256b_ft)')
    kwargs = preset_network_kwargs(preset)
    ab = ckpt['ema'].get('ema_model.alphas_cumprod')
    if ab is not None:  # the schedule the checkpoint was trained with
        kwargs['beta_schedule'] = min(('linear', 'cosine'),
                                      key=lambda s: (make_alphas_cumprod(s) - ab.double()).abs().max())
    weights = {k[len('ema_model.'):]: v for k, v in ckpt['ema'].items() if k.startswith('ema_model.model.')}
    kwargs.update(official_options(weights))
    net = GaussianDiffusion(**kwargs)
    try:
        load_weights(net, weights, path)
    except UserError as e:
        raise UsageError(f'--preset={preset}: does not fit {e}') from None
    return net

if __name__ == '__main__':
    main()
