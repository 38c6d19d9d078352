"""masked_dm.py: fidelity to the official code (jiachenlei/maskdm: parameter counts, blocks, sequence lengths, masks,
locality, time embedding, schedules, DDIM grid, Haar, EMA, loss, transfer) and end-to-end properties (closed-form
DDIM, overfitting, DDP, resume, per-seed generation, torchrun CLI, official checkpoint layout, every bad flag)."""
import functools
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, fid_score

import common
import masked_dm as md
from common import UserError, load_checkpoint, parse_command_line, to_uint8

TINY = dict(img_size=8, in_chans=3, patch_size=2, embed_dim=32, depth=3, heads=1)  # 16 tokens, 3 blocks
TINY_FLAGS = ['--arch=T', '--patch_size=2', '--embed_dim=32', '--depth=3', '--heads=1', '--mask_type=block',
              '--mask_ratio=0.5', '--block_size=2', '--batch=4', '--lr=1e-3', '--grid=0', '--workers=0']

def tiny_net(seed=0, **kw):
    torch.manual_seed(seed)
    return md.GaussianDiffusion(**dict(TINY, **kw))

def parse(argv):
    return parse_command_line(md.build_parser, argv)

#------------------------------------------------------------------------------
# Official models/mask_uvit.py: parameter counts, blocks, state-dict names, sequence lengths.

@pytest.mark.parametrize('img_size, arch, extra, count', [
    (64, 'S', {}, 44_292_144), (256, 'S', {}, 46_258_224), (256, 'B', {}, 102_417_456), (64, 'B', {}, 99_468_336),
    (128, 'S', {}, 44_685_360), (64, 'S', dict(qkv_bias=True), 44_305_456),
    (128, 'L', dict(in_chans=12, dwt=True), 233_399_488)])
def test_parameter_counts(img_size, arch, extra, count):
    a = dict(md.ARCHS[arch], **extra)
    with torch.device('meta'):
        net = md.MaskedUViT(img_size=img_size, **a)
    assert sum(p.numel() for p in net.parameters()) == count
    D, L = a['embed_dim'], a['depth']
    blocks = 2 * (L // 2) + 1
    # Closed form: per block 12 D^2 + 10 D (+ 2 D q/v biases), per skip linear 2 D^2 + D, final LayerNorm 2 D.
    closed = blocks * (12 * D * D + 10 * D + (2 * D if a['qkv_bias'] else 0)) + (L // 2) * (2 * D * D + D) + 2 * D
    for d_p in (16 * c for c in net.family_chans):  # patch embed d_p D + D, head D d_p + d_p
        closed += d_p * D + D + D * d_p + d_p
    closed += (1 + len(net.family_chans) * (img_size // 4) ** 2) * D  # positions
    assert closed == count

@pytest.mark.parametrize('depth, ins', [(12, 6), (13, 6), (16, 8)])
def test_block_counts(depth, ins):
    with torch.device('meta'):
        enc = md.MaskedUViT(img_size=16, embed_dim=64, depth=depth, heads=1).encoder
    assert len(enc.in_blocks) == len(enc.out_blocks) == ins and enc.mid_block.skip_linear is None
    assert all(b.skip_linear is not None for b in enc.out_blocks) and all(b.skip_linear is None for b in enc.in_blocks)

def test_state_dict_names_are_the_official_ones():
    keys = set(md.MaskedUViT(**dict(TINY, qkv_bias=True)).state_dict())
    block = ['norm1.weight', 'norm1.bias', 'attn.qkv.weight', 'attn.q_bias', 'attn.v_bias', 'attn.proj.weight',
             'attn.proj.bias', 'norm2.weight', 'norm2.bias', 'mlp.fc1.weight', 'mlp.fc1.bias', 'mlp.fc2.weight',
             'mlp.fc2.bias']
    expected = {'encoder.patch_embed.proj.weight', 'encoder.patch_embed.proj.bias', 'encoder.norm.weight',
                'encoder.norm.bias', 'encoder.encoder_pos_embed', 'encoder_to_output.weight', 'encoder_to_output.bias'}
    expected |= {f'encoder.in_blocks.0.{k}' for k in block} | {f'encoder.mid_block.{k}' for k in block}
    expected |= {f'encoder.out_blocks.0.{k}' for k in block + ['skip_linear.weight', 'skip_linear.bias']}
    assert keys == expected
    dwt = set(md.MaskedUViT(**dict(TINY, in_chans=12, dwt=True)).state_dict())
    assert {'encoder.approx_patch_embed.proj.weight', 'encoder.detail_patch_embed.proj.weight',
            'approx_to_output.weight', 'detail_to_output.bias'} <= dwt
    assert not any('encoder.patch_embed' in k or 'encoder_to_output' in k for k in dwt)
    assert 'attn.qkv.bias' not in ' '.join(keys)  # q/v biases only: no k bias

@pytest.mark.parametrize('img_size, in_chans, kind, ratio, b, c, visible', [
    (64, 3, 'block', 0.9, 4, None, [32]), (64, 3, 'patch', 0.9, 1, None, [26]), (64, 3, 'crop', 0, 1, 5, [25]),
    (256, 3, 'block', 0.9, 4, None, [416]), (128, 12, 'patch', 0.7, 1, None, [308, 308])])
def test_masked_sequence_lengths_and_output_shapes(img_size, in_chans, kind, ratio, b, c, visible):
    net = md.GaussianDiffusion(img_size=img_size, in_chans=in_chans, dwt=in_chans == 12, embed_dim=16, depth=1, heads=1)
    keep = md.draw_keep(net, 2, np.random.default_rng(0), kind, ratio, b, c)
    assert [k.shape for k in keep] == [(2, v) for v in visible]
    with torch.no_grad():
        outs = net(torch.randn(2, in_chans, img_size, img_size), torch.tensor([1, 2]), keep)
    assert [tuple(o.shape) for o in outs] == [(2, v, 16 * ch) for v, ch in zip(visible, net.family_chans)]  # 48 / 144
    if kind == 'patch' and img_size == 128:
        assert 1 + sum(visible) == 617  # DWT: 2049 tokens in full
        assert md.draw_keep(net, 2, np.random.default_rng(0), 'none') is None

#------------------------------------------------------------------------------
# Official datasets/masking_generator.py: masks at exact counts; blocks aligned; crops one window.

@pytest.mark.parametrize('side, kind, ratio, b, c, masked', [
    (16, 'patch', 0.1, 1, None, 25), (16, 'patch', 0.5, 1, None, 128), (16, 'patch', 0.9, 1, None, 230),
    (16, 'block', 0.1, 2, None, 24), (16, 'block', 0.9, 2, None, 228), (16, 'block', 0.1, 4, None, 16),
    (16, 'block', 0.5, 4, None, 128), (16, 'block', 0.9, 4, None, 224), (16, 'block', 0.5, 8, None, 128),
    (16, 'crop', 0, 1, 15, 31), (16, 'crop', 0, 1, 11, 135), (16, 'crop', 0, 1, 5, 231),
    (64, 'block', 0.9, 4, None, 3680), (64, 'block', 0.5, 4, None, 2048), (64, 'block', 0.7, 4, None, 2864),
    (32, 'patch', 0.7, 1, None, 716)])
def test_mask_counts_and_structure(side, kind, ratio, b, c, masked):
    rng = np.random.default_rng(1)
    masks = [md.draw_mask(kind, side, side, rng, ratio, b, c).reshape(side, side) for _ in range(20)]
    assert all(m.sum() == masked for m in masks)
    if kind == 'block':
        for m in masks:  # every aligned b x b square is all masked or all visible
            squares = m.reshape(side // b, b, side // b, b).transpose(0, 2, 1, 3).reshape(-1, b * b)
            assert (squares.all(1) | ~squares.any(1)).all()
    if kind == 'crop':
        for m in masks:  # the visible set is one c x c square
            rows, cols = np.nonzero(~m)
            assert rows.max() - rows.min() + 1 == c and cols.max() - cols.min() + 1 == c and (~m).sum() == c * c
    assert len({m.tobytes() for m in masks}) >= 3  # drawn per image (block-8 50% has 6 possible masks, crop-15 has 4)

def test_mask_positions_are_uniform():
    rng = np.random.default_rng(2)
    counts = sum(md.draw_mask('block', 16, 16, rng, 0.5, 4).astype(int) for _ in range(4000))
    assert abs(counts.mean() / 4000 - 0.5) < 1e-9 and counts.std() / counts.mean() < 0.05  # every square equally likely
    corners = [tuple(np.argwhere(~md.draw_mask('crop', 16, 16, rng, crop_size=11).reshape(16, 16))[0])
               for _ in range(3000)]
    assert set(corners) == {(i, j) for i in range(6) for j in range(6)}  # all (16 - 11 + 1)^2 top-left corners

#------------------------------------------------------------------------------
# Locality of the masked forward; visible-patch loss.

def test_masked_forward_locality_and_full_equivalence():
    net = tiny_net(qkv_bias=True).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # non-zero q/v biases too
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([0, 500, 999])
    keep = md.draw_keep(net, 3, np.random.default_rng(0), 'patch', 0.5)
    masked = torch.ones(3, 16, dtype=torch.bool)
    for i, k in enumerate(keep[0]):
        masked[i, k] = False
    pixel_mask = md.unpatchify(masked[:, :, None].float().expand(-1, -1, 12), 2, 3).bool()  # masked patches in pixels
    y = torch.where(pixel_mask, torch.randn_like(x) * 100, x)
    with torch.no_grad():
        a, b = net(x, t, keep)[0], net(y, t, keep)[0]
        assert torch.equal(a, b)  # bitwise: masked pixels never enter
        assert not torch.equal(net(x + (~pixel_mask) * 0.1, t, keep)[0], a)  # visible pixels do
        full = net(x, t)
        all_keep = [torch.arange(16).expand(3, -1)]
        assert torch.equal(net(x, t, all_keep)[0], md.patchify(full, 2))  # all-visible masked path = full path

def test_loss_ignores_masked_targets_and_counts_visible_elements():
    net = tiny_net()
    x0, t = torch.rand(4, 3, 8, 8) * 2 - 1, torch.tensor([5, 50, 500, 900])
    noise = torch.randn_like(x0)
    keep = md.draw_keep(net, 4, np.random.default_rng(3), 'block', 0.5, 2)
    loss = md.mdsm_loss(net, x0, t, noise, keep)
    # Independent of mdsm_loss: noise the whole image, run the net on the visible tokens, score against the visible
    # patches of the noise picked one by one.
    ab = md.make_alphas_cumprod('linear')[t].float()[:, None, None, None]
    with torch.no_grad():
        pred = net(ab.sqrt() * x0 + (1 - ab).sqrt() * noise, t, keep)[0]
    target = torch.stack([md.patchify(noise, 2)[i, k] for i, k in enumerate(keep[0])])
    assert pred.numel() == 4 * 8 * 12  # B N_vis 48-style count: 8 visible tokens of 2*2*3
    assert torch.allclose(loss, (pred - target).square().mean(dim=(1, 2)), atol=1e-6)
    # Changing the noise in masked patches leaves the loss unchanged: only visible patches are noised and scored.
    vis = torch.zeros(4, 16, dtype=torch.bool)
    for i, k in enumerate(keep[0]):
        vis[i, k] = True
    hidden = ~md.unpatchify(vis[:, :, None].float().expand(-1, -1, 12), 2, 3).bool()
    assert torch.equal(md.mdsm_loss(net, x0, t, torch.where(hidden, torch.randn_like(noise), noise), keep), loss)

def test_loss_at_init_is_about_one():
    torch.manual_seed(0)
    net = md.GaussianDiffusion(img_size=16, patch_size=4, embed_dim=64, depth=3, heads=1)
    x0 = torch.rand(64, 3, 16, 16) * 2 - 1
    keep = md.draw_keep(net, 64, np.random.default_rng(0), 'block', 0.9, 1)
    with torch.no_grad():
        loss = md.mdsm_loss(net, x0, torch.randint(0, 1000, (64,)), torch.randn_like(x0), keep).mean()
    assert 0.9 < loss < 1.4  # the official code gives 1.22 (MaskDM-S, CelebA 64, block-4 90%)

#------------------------------------------------------------------------------
# Time embedding, schedules, DDIM grid, Haar, EMA decay (values of the official functions).

def test_timestep_embedding_values():
    e = md.timestep_embedding(torch.tensor([10, 0]), 8)
    assert e[0].tolist() == pytest.approx([-0.8391, 0.5403, 0.9950, 0.99995, -0.5440, 0.8415, 0.0998, 0.0100], abs=1e-4)
    assert e[1].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]

def test_schedules_table():
    lin, cos = md.make_alphas_cumprod('linear'), md.make_alphas_cumprod('cosine')
    ts = [0, 99, 249, 499, 749, 899, 999]
    assert lin[ts].tolist() == pytest.approx([0.99990, 0.897018, 0.524085, 0.0785872, 3.35055e-3, 2.75206e-4,
                                              4.03583e-5], rel=1e-5)
    assert cos[ts].tolist() == pytest.approx([0.9999587, 0.972093, 0.847012, 0.493844, 0.144272, 2.40917e-2,
                                              2.42877e-9], rel=1e-5)
    betas = 1 - cos / torch.cat([torch.ones(1, dtype=torch.float64), cos[:-1]])
    assert betas[0].item() == pytest.approx(4.1284e-5, rel=1e-4) and betas[999].item() == pytest.approx(0.999)
    assert (betas > 0.999 - 1e-12).sum() == 1  # only the last beta hits the clip
    assert torch.allclose(1 - lin / torch.cat([torch.ones(1, dtype=torch.float64), lin[:-1]]),
                          torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))

def test_ddim_grid():
    pairs = md.ddim_time_pairs(250)
    times = [t for t, _ in pairs] + [pairs[-1][1]]
    assert len(pairs) == 250 and times[:4] == [999, 995, 991, 987] and times[-5:] == [15, 11, 7, 3, -1]
    assert [t for t, _ in md.ddim_time_pairs(500)][:3] == [999, 997, 995]
    assert md.ddim_time_pairs(500)[-2:] == [(3, 1), (1, -1)]
    assert md.ddim_time_pairs(1000) == [(t, t - 1) for t in range(999, -1, -1)]

def test_haar_dwt():
    x = torch.arange(16, dtype=torch.float64).reshape(1, 1, 4, 4)
    y = md.haar_dwt(x)
    assert y[0, 0].tolist() == [[5, 9], [21, 25]]
    assert (y[0, 1] == -4).all() and (y[0, 2] == -1).all() and (y[0, 3] == 0).all()
    assert torch.equal(md.haar_dwt(torch.full((1, 3, 4, 4), 0.3, dtype=torch.float64))[:, :3],
                       torch.full((1, 3, 2, 2), 0.6, dtype=torch.float64))
    img = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    w = md.haar_dwt(img)
    assert w.shape == (2, 12, 128, 128) and (md.haar_idwt(w) - img).abs().max() < 1e-6
    assert w.square().sum().item() == pytest.approx(img.square().sum().item(), rel=1e-5)  # orthonormal
    # Independent: each 2x2 block [a, b, c, d] times the orthonormal Haar matrix, channel order [LL, H, V, D] x RGB.
    H = torch.tensor([[1, 1, 1, 1], [1, 1, -1, -1], [1, -1, 1, -1], [1, -1, -1, 1]], dtype=torch.float32) / 2
    blocks = img[0].reshape(3, 128, 2, 128, 2).permute(0, 1, 3, 2, 4).reshape(3, 128, 128, 4)
    assert torch.allclose(w[0].reshape(4, 3, 128, 128), torch.einsum('kj,chwj->kchw', H, blocks), atol=1e-6)
    u8 = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    z = md.to_model_space(u8, dwt=True)
    assert z[:, :3].min() >= -1 and z[:, :3].max() <= 3 and z[:, 3:].abs().max() <= 1  # LL in [-1, 3], details [-1, 1]
    assert torch.allclose(md.to_image_space(z, dwt=True), u8.float() / 127.5 - 1, atol=1e-6)

def test_ema_decay():
    assert all(md.ema_decay(n, 0.999) == 0 for n in range(1, 103))  # copies (n <= 101, and once more: see the NOTE)
    assert md.ema_decay(103, 0.999) == pytest.approx(1 - 3 ** (-2 / 3))
    assert md.ema_decay(1100, 0.999) == pytest.approx(0.99)
    assert md.ema_decay(31722, 0.999) < 0.999 and md.ema_decay(31723, 0.999) == 0.999
    assert md.ema_decay(10 ** 6, 0.9999) < 0.9999
    assert [md.ema_decay(n, 0.999, every=10) for n in (2, 10, 101, 111)] == [None, None, 0, 0]
    assert md.ema_decay(121, 0.999, every=10) == pytest.approx(1 - 21 ** (-2 / 3))
    assert md.ema_decay(122, 0.999, every=10) is None

#------------------------------------------------------------------------------
# Samplers: DDIM on Gaussian data against the exact answer; eta=1 at 1000 steps is ancestral DDPM.

class GaussianEps:
    """Exact epsilon predictor for data N(0, s^2): E[eps | x_t] = sqrt(1 - ab) x_t / (ab s^2 + 1 - ab)."""
    def __init__(self, s, schedule='cosine'):
        self.s, self.alphas_cumprod = s, md.make_alphas_cumprod(schedule)
        self.in_chans, self.dwt = 3, False

    def __call__(self, x, t):
        ab = self.alphas_cumprod[t].to(torch.float32)[:, None, None, None]
        return (1 - ab).sqrt() * x / (ab * self.s ** 2 + 1 - ab)

def test_ddim_eta0_on_gaussian_data():
    s = 0.5
    eps = GaussianEps(s)
    ab = eps.alphas_cumprod
    v = lambda t: ab[t] * s ** 2 + 1 - ab[t]  # Var x_t
    z = torch.randn(256, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errors = []
    for steps in (10, 40, 160):
        out = md.ddim_sampler(eps, z, num_steps=steps, eta=0, clamp=False)
        t_last = md.ddim_time_pairs(steps)[-1][0]
        # Exact probability-flow ODE from t = 999: x_t = x_999 sqrt(v_t / v_999); the output is E[x0 | x_t_last].
        exact = z * (v(t_last) / v(999)).sqrt() * ab[t_last].sqrt() * s ** 2 / v(t_last)
        errors.append((out - exact).abs().max().item() / exact.abs().max().item())
    assert errors[1] < errors[0] / 2.5 and errors[2] < errors[1] / 3 and errors[2] < 0.015  # ~first order: 4x, ~3-4x
    # Each DDIM step is, for this model, the closed-form linear map
    # x_s = x_t (sqrt(ab_s ab_t) s^2 + sqrt((1-ab_s)(1-ab_t))) / v_t.
    # (Linear schedule: cosine's ab_999 = 2e-9 amplifies the fp32 network call's rounding 2e4 times in the first x0.)
    eps = GaussianEps(s, 'linear')
    ab = eps.alphas_cumprod
    gain = 1.0
    for t, s_ in md.ddim_time_pairs(10):
        if s_ < 0:
            gain *= ab[t].sqrt() * s ** 2 / v(t)
        else:
            gain *= ((ab[s_] * ab[t]).sqrt() * s ** 2 + ((1 - ab[s_]) * (1 - ab[t])).sqrt()) / v(t)
    assert torch.allclose(md.ddim_sampler(eps, z, num_steps=10, eta=0, clamp=False), z * gain, rtol=1e-5, atol=1e-6)

def test_ddim_eta1_1000_steps_is_ancestral_ddpm():
    eps = GaussianEps(0.5, 'linear')
    z = torch.randn(8, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    def noise(seed):
        g = torch.Generator().manual_seed(seed)
        return lambda x: torch.randn(x.shape, dtype=x.dtype, generator=g)
    a = md.ddim_sampler(eps, z, randn_like=noise(2), num_steps=1000, eta=1.0, clamp=False)
    b = md.ddpm_sampler(eps, z, randn_like=noise(2), clamp=False)
    assert torch.allclose(a, b, atol=1e-7) and a.std() > 0.3

def test_clamping_bounds():
    class Huge(GaussianEps):
        def __call__(self, x, t):
            return torch.full_like(x, -50.0)
    plain = Huge(0.5)
    near = lambda out, value: (out - value).abs().max() < 1e-9
    assert near(md.ddim_sampler(plain, torch.zeros(1, 3, 2, 2), num_steps=5, eta=0), 1)  # x0 clamped to [-1, 1]
    assert md.ddim_sampler(plain, torch.zeros(1, 3, 2, 2), num_steps=5, eta=0, clamp=False).min() > 10
    dwt = Huge(0.5)
    dwt.in_chans, dwt.dwt = 12, True
    out = md.ddim_sampler(dwt, torch.zeros(1, 12, 2, 2), num_steps=5, eta=0)
    assert near(out[:, :3], 3) and near(out[:, 3:], 1)  # LL to [-1, 3], details to [-1, 1]

#------------------------------------------------------------------------------
# Training: overfitting in both stages, transfer, DDP, resume.

@pytest.mark.parametrize('masked', [True, False])
def test_overfits_one_batch(masked):
    net = tiny_net(1)
    x0, t = torch.rand(4, 3, 8, 8) * 2 - 1, torch.tensor([100, 300, 600, 900])
    noise = torch.randn_like(x0)
    keep = md.draw_keep(net, 4, np.random.default_rng(0), 'block', 0.5, 2) if masked else None
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = md.mdsm_loss(net, x0, t, noise, keep).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]

def _ddp_worker(rank, store_path, x0, t, noise, keep, out):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{store_path}', rank=rank, world_size=2)
    net = tiny_net(3)
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    half = slice(2 * rank, 2 * rank + 2)
    loss = md.mdsm_loss(net, x0[half], t[half], noise[half], [keep[0][half]], ddp)
    (loss.sum() / 2).backward()
    if rank == 0:
        torch.save({k: p.grad for k, p in net.named_parameters()}, out)
    dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown, which torch 2.13's gloo threads can abort (docs/testing.md)

def test_ddp_two_processes_equal_one(tmp_path):
    net = tiny_net(3)
    x0, t = torch.rand(4, 3, 8, 8) * 2 - 1, torch.tensor([1, 200, 700, 999])
    noise = torch.randn_like(x0)
    keep = md.draw_keep(net, 4, np.random.default_rng(0), 'patch', 0.5)
    md.mdsm_loss(net, x0, t, noise, keep).mean().backward()
    # spawn: forking a process with gloo threads can hang
    torch.multiprocessing.start_processes(_ddp_worker, nprocs=2, start_method='spawn',
                                          args=(str(tmp_path / 'store'), x0, t, noise, keep, str(tmp_path / 'g.pt')))
    grads = torch.load(tmp_path / 'g.pt')
    for k, p in net.named_parameters():
        assert torch.allclose(grads[k], p.grad, atol=1e-6, rtol=1e-4), k

def run_train(argv):
    md.train(parse(['train'] + argv))

def state_at(folder, nimg):
    """The training state a run wrote at `nimg` images."""
    states = [load_checkpoint(folder / name) for name in sorted(os.listdir(folder))
              if name.startswith('training-state-')]
    return next(s for s in states if s['cur_nimg'] == nimg)

def test_resume_equals_uninterrupted_and_finetune_from_online_weights(dataset_zip, tmp_path, capsys):
    base = TINY_FLAGS + [f'--data={dataset_zip}', '--tick=0.004', '--snap=1', '--dump=2', '--nosubdir',
                         '--train_steps=4']
    run_train(base + [f'--outdir={tmp_path / "a"}'])
    run_train(base + [f'--outdir={tmp_path / "b"}', '--train_steps=2'])
    b_state = next(tmp_path / 'b' / n for n in os.listdir(tmp_path / 'b') if n.startswith('training-state-'))
    run_train(base + [f'--outdir={tmp_path / "c"}', f'--resume={b_state}'])
    a, c = state_at(tmp_path / 'a', 16), state_at(tmp_path / 'c', 16)
    assert a['step'] == c['step'] == 4
    for part in ('net', 'ema'):
        assert all(torch.equal(a[part][k], c[part][k]) for k in a[part])
    # Fine-tuning starts from the online weights ('net'), not the EMA: make them differ, then start a run from it.
    state = dict(a, ema={k: v + 1 for k, v in a['ema'].items()})
    torch.save(state, tmp_path / 'pre.pt')
    net = tiny_net(7)
    md.load_pretrained(net, str(tmp_path / 'pre.pt'))  # strict: no missing or unexpected keys (official: all load)
    assert all(torch.equal(v, a['net'][k]) for k, v in net.state_dict().items())
    capsys.readouterr()
    run_train(base + [f'--outdir={tmp_path / "ft"}', '--mask_type=none', '--train_steps=1', '--warmup_steps=5',
                      f'--pretrained_model_ckpt={tmp_path / "pre.pt"}', '--adam_betas=0.9,0.999'])
    ft = state_at(tmp_path / 'ft', 4)
    # The run says what it starts from (also in its log.txt): the file, its kimg and step, and which weights.
    said = f'fine-tuning from {tmp_path / "pre.pt"}: a masked_dm.py training state (kimg 0.016, step 4): its online ' \
           'weights "net", not its EMA'
    assert said in capsys.readouterr().out and said in (tmp_path / 'ft' / 'log.txt').read_text()
    # AdamW's betas: the official configs' (0.99, 0.99) unless --adam_betas says otherwise (the CPU demo's).
    assert a['optimizer']['param_groups'][0]['betas'] == (0.99, 0.99)
    assert ft['optimizer']['param_groups'][0]['betas'] == (0.9, 0.999)
    # The warm-up's first step has lr 0 (official LambdaLR): still the pre-trained online weights.
    assert all(torch.equal(ft['net'][k], a['net'][k]) for k in a['net'])
    assert ft['optimizer']['state'][0]['step'] == 1  # a fresh optimizer
    with pytest.raises(UserError, match='another architecture'):
        md.load_pretrained(tiny_net(embed_dim=64), str(tmp_path / 'pre.pt'))

#------------------------------------------------------------------------------
# Generation: per-seed images, the CLI under torchrun, official checkpoints.

def write_snapshot(path, net, **kw):
    kwargs = dict(TINY, beta_schedule='linear', **kw)
    torch.save(dict(method='masked_dm', net_kwargs=kwargs, ema=net.state_dict(), args={}, cur_nimg=0), path)

def read_pngs(folder):
    return {name: np.asarray(PIL.Image.open(os.path.join(folder, name))) for name in sorted(os.listdir(folder))}

def test_generation_identical_across_batch_sizes(tmp_path):
    write_snapshot(tmp_path / 'net.pt', tiny_net(4))
    for batch in (6, 4):
        md.generate(parse(['generate', f'--network={tmp_path / "net.pt"}', f'--outdir={tmp_path / str(batch)}',
                           '--seeds=0-5', f'--batch={batch}', '--steps=8']))
    a, b = read_pngs(tmp_path / '6'), read_pngs(tmp_path / '4')
    assert list(a) == [f'{i:06d}.png' for i in range(6)] and all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a['000000.png'], a['000001.png'])
    md.generate(parse(['generate', f'--network={tmp_path / "net.pt"}', f'--outdir={tmp_path / "ddpm"}', '--seeds=0-1',
                       '--sampler=ddpm']))
    assert read_pngs(tmp_path / 'ddpm')['000000.png'].shape == (8, 8, 3)

def test_torchrun_two_processes_train_and_generate(dataset_zip, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                str(ROOT / 'masked_dm.py')]
    subprocess.run(torchrun + ['train', f'--data={dataset_zip}', f'--outdir={tmp_path}', '--nosubdir',
                               '--train_steps=2', '--tick=0.1', '--snap=1', '--dump=1'] + TINY_FLAGS,
                   check=True, env=env, capture_output=True)
    snapshot = tmp_path / sorted(n for n in os.listdir(tmp_path) if n.startswith('network-snapshot-'))[-1]
    assert load_checkpoint(snapshot)['cur_nimg'] == 8
    subprocess.run(torchrun + ['generate', f'--network={snapshot}', f'--outdir={tmp_path / "two"}', '--seeds=0-4',
                               '--batch=2', '--steps=4'], check=True, env=env, capture_output=True)
    md.generate(parse(['generate', f'--network={snapshot}', f'--outdir={tmp_path / "one"}', '--seeds=0-4',
                       '--steps=4']))
    a, b = read_pngs(tmp_path / 'two'), read_pngs(tmp_path / 'one')
    assert list(a) == list(b) and len(a) == 5 and all(np.array_equal(a[k], b[k]) for k in a)

def official_checkpoint(path, net, schedule):
    """An official MaskDM .pt: {'step', 'model': GaussianDiffusion state, 'opt', 'ema': ema-pytorch state, 'scaler'}."""
    ab = md.make_alphas_cumprod(schedule).float()
    buffers = dict(alphas_cumprod=ab, betas=torch.rand(1000), posterior_variance=torch.rand(1000))
    online = {k: v + 0.01 for k, v in net.state_dict().items()}  # 'model.' + network keys
    ema = dict(initted=torch.tensor([1.0]), step=torch.tensor([123]))
    for prefix, weights in (('ema_model.', net.state_dict()), ('online_model.', online)):
        ema.update({prefix + k: v for k, v in (weights | buffers).items()})
    torch.save(dict(step=123, model=online | buffers, opt={}, ema=ema, scaler=None), path)
    return online

def test_official_checkpoint_layout_loads_and_samples(tmp_path):
    kw = md.preset_network_kwargs('demo_ft')
    assert kw['beta_schedule'] == 'cosine' and kw['img_size'] == 8
    kw['beta_schedule'] = 'linear'
    torch.manual_seed(5)
    net = md.GaussianDiffusion(**kw)
    online = official_checkpoint(tmp_path / 'model-20.pt', net, 'linear')
    loaded = md.load_network(str(tmp_path / 'model-20.pt'), 'demo_ft')
    assert loaded.beta_schedule == 'linear'  # read off the checkpoint's alphas_cumprod, not the preset's
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in loaded.state_dict().items())  # the EMA weights
    md.generate(parse(['generate', f'--network={tmp_path / "model-20.pt"}', '--preset=demo_ft',
                       f'--outdir={tmp_path / "o"}',
                       '--seeds=3', '--steps=6']))
    expected = md.sample_images(net.eval(), [3], torch.device('cpu'), num_steps=6)
    assert np.array_equal(read_pngs(tmp_path / 'o')['000003.png'], to_uint8(expected)[0].permute(1, 2, 0).numpy())
    ft = md.GaussianDiffusion(**kw)
    md.load_pretrained(ft, str(tmp_path / 'model-20.pt'))  # fine-tuning init: the 'model' (online) weights
    assert all(torch.equal(v, online[k]) for k, v in ft.state_dict().items())
    with pytest.raises(UserError, match='--preset'):
        md.load_network(str(tmp_path / 'model-20.pt'))

#------------------------------------------------------------------------------
# Command line: presets, dry run, errors.

def test_presets_dry_run_and_errors(tmp_path, capsys, dataset_zip):
    md.train(parse(['train', '--preset=celeba64_ft', '--data=demo-64', '-n']))
    out = capsys.readouterr().out
    assert '44,292,144 parameters, 257 tokens' in out
    assert json.loads(out[out.index('{'):out.rindex('}') + 1])['num_params'] == 44_292_144
    md.train(parse(['--preset=hq256l_dwt_pre70', '--data=demo-256', '-n', '--training_steps=7']))
    out = capsys.readouterr().out
    options = json.loads(out[out.index('{'):out.rindex('}') + 1])
    assert '233,399,488 parameters, 617 tokens' in out
    assert options['train_steps'] == 7 and options['mask_type'] == 'patch'
    args = parse(['--preset=celeba64_pre_block4_90', '--data=x', '--batch=64'])
    assert (args.mask_type, args.mask_ratio, args.block_size, args.batch, args.lr) == ('block', 0.9, 4, 64, 2e-4)
    names = [f'celeba64_pre_{m}_{p}' for m in ('patch', 'block2', 'block4', 'crop') for p in (10, 50, 90)] + [
        'celeba64_pre_block8_50', 'celeba64_ft', 'vgg256s_pre90', 'hq256s_pre90', 'hq256s_ft10pct', 'hq256b_pre90',
        'hq256b_pre50', 'hq256b_ft', 'church256b_ft', 'hq256l_dwt_pre70', 'hq256l_dwt_ft']  # every official config
    assert set(names) <= set(md.PRESETS)
    with pytest.raises(UserError, match='64x64'):
        md.train(parse(['--preset=celeba64_ft', '--data=demo-32', '-n']))
    with pytest.raises(UserError, match='block_size'):
        md.train(parse(TINY_FLAGS + [f'--data={dataset_zip}', '--block_size=3', '-n']))
    with pytest.raises(UserError, match='no such file'):
        md.load_network(str(tmp_path / 'missing.pt'))
    torch.save(dict(method='gdd', ema={}), tmp_path / 'other.pt')
    with pytest.raises(UserError, match='gdd'):
        md.load_network(str(tmp_path / 'other.pt'))

def test_dwt_variant_trains_and_samples_rgb(dataset_zip, tmp_path):
    flags = TINY_FLAGS + [f'--data={dataset_zip}', f'--outdir={tmp_path}', '--nosubdir', '--dwt=1', '--mask_type=patch',
                          '--mask_ratio=0.5', '--train_steps=2', '--tick=0.1', '--qkv_bias=1']
    run_train(flags)
    snapshot = tmp_path / sorted(n for n in os.listdir(tmp_path) if n.startswith('network-snapshot-'))[-1]
    kwargs = load_checkpoint(snapshot)['net_kwargs']
    assert (kwargs['img_size'], kwargs['in_chans'], kwargs['dwt']) == (4, 12, True)  # 8x8 RGB -> 4x4 x 12 wavelet bands
    net = md.load_network(str(snapshot))
    assert 'approx_to_output.weight' in dict(net.model.named_parameters())
    images = md.sample_images(net, [0, 1], torch.device('cpu'), num_steps=4)
    assert images.shape == (2, 3, 8, 8) and images.isfinite().all()  # back in pixel space after the inverse Haar

#------------------------------------------------------------------------------
# Class conditioning (official MaskedUViT num_classes / mlp_time_embed), classifier-free guidance, grey images.

COND = dict(TINY, num_classes=3, mlp_time_embed=True)

def seeded_weights(net, seed):
    """The weights of the recorded official runs: key i (sorted) ~ N(0, 1) * (1 for embeddings, else 0.2), seed + i."""
    keys = sorted(net.state_dict())
    return {k: torch.randn(net.state_dict()[k].shape, generator=torch.Generator().manual_seed(seed + i)) *
            (1 if 'emb' in k else 0.2) for i, k in enumerate(keys)}

def test_class_token_matches_official_maskeduvit():
    # Outputs of the official MaskedUViT (jiachenlei/maskdm models/mask_uvit.py, real timm layers) for the same
    # seeded weights and inputs: 3 classes + time MLP + q/v bias, and a 1-channel unconditional net; full and
    # masked forward (official mask = [0 for the label and time tokens, the patch mask]), with and without labels.
    ref = torch.load(ROOT / 'tests' / 'data' / 'masked_dm_cond_ref.pt', map_location='cpu', weights_only=True)
    for case in ref['cases']:
        net = md.MaskedUViT(img_size=8, in_chans=case['C'], patch_size=2, embed_dim=32, depth=3, heads=2,
                            qkv_bias=case['qkv_bias'], num_classes=case['num_classes'],
                            mlp_time_embed=case['mlp_time_embed']).eval()
        assert sorted(net.state_dict()) == case['keys']  # the official parameter names, no more, no fewer
        net.load_state_dict(seeded_weights(net, case['seed']))
        x, t, keep = case['x'], case['t'], [case['keep']]
        labels = torch.eye(case['num_classes'])[case['y']] if case['num_classes'] else None
        with torch.no_grad():
            for name in [k for k in ('full_cond', 'masked_cond', 'full_uncond', 'masked_uncond') if k in case]:
                y = labels if name.endswith('_cond') else None
                out = net(x, t, keep, y)[0] if name.startswith('masked') else net(x, t, None, y)
                torch.testing.assert_close(out, case[name], atol=1e-5, rtol=0, msg=f'{case["name"]} {name}')
        if labels is not None:
            assert (case['full_cond'] - case['full_uncond']).abs().max() > 1e-3  # the label token matters

def affine(x, layer):
    return x @ layer.weight.T + layer.bias

def test_conditional_forward_is_label_time_patch_composition():
    net = md.MaskedUViT(**COND).eval()
    net.load_state_dict(seeded_weights(net, 7))
    enc = net.encoder
    x, t = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 400, 999])
    classes = torch.tensor([2, 0, 1])
    labels = torch.eye(3)[classes]
    # By hand: tokens [label, time, 16 patches] + positions, the blocks with mirror skips, norm, head, drop 2 tokens.
    freqs = 10000 ** (-torch.arange(16) / 16)
    emb = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], 1)  # [B, D], cosines first
    time = affine(F.silu(affine(emb, enc.time_embed[0])), enc.time_embed[2])  # Linear-SiLU-Linear
    patches = F.conv2d(x, enc.patch_embed.proj.weight, enc.patch_embed.proj.bias, stride=2).flatten(2).transpose(1, 2)
    pos = enc.encoder_pos_embed[0]
    tokens = torch.cat([enc.label_emb.weight[classes][:, None], time[:, None], patches], 1) + pos  # [B, 18, D]

    def trunk(h):
        skips = [h := enc.in_blocks[0](h)]
        return net.encoder_to_output(enc.norm(enc.out_blocks[0](enc.mid_block(h), skips.pop())))[:, 2:]

    with torch.no_grad():
        full = trunk(tokens)  # [B, 16, p p C]
        assert torch.allclose(net(x, t, None, labels), md.unpatchify(full, 2, 3), atol=1e-5)
        keep = md.draw_keep(net, 3, np.random.default_rng(1), 'patch', 0.5)[0]
        kept = torch.stack([tokens[i, torch.cat([torch.tensor([0, 1]), 2 + k])] for i, k in enumerate(keep)])
        assert torch.allclose(net(x, t, [keep], labels)[0], trunk(kept), atol=1e-5)  # label and time tokens stay
        uncond = tokens.clone()
        uncond[:, 0] = enc.uncond_embed + pos[0]
        assert torch.allclose(net(x, t), md.unpatchify(trunk(uncond), 2, 3), atol=1e-5)  # no labels: uncond_embed
        assert torch.equal(net(x, t, None, torch.zeros(3, 3)), net(x, t))  # an all-zero row is the same token
    uncond_keys = set(md.MaskedUViT(**TINY).state_dict())
    extra = {'encoder.label_emb.weight', 'encoder.uncond_embed'} | {f'encoder.time_embed.{i}.{p}' for i in (0, 2)
                                                                    for p in ('weight', 'bias')}
    assert set(net.state_dict()) == uncond_keys | extra and enc.encoder_pos_embed.shape[1] == 2 + 16

def test_cfg_combines_conditional_and_unconditional():
    torch.manual_seed(0)
    net = md.GaussianDiffusion(**COND).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        x, t, labels = torch.randn(2, 3, 8, 8), torch.tensor([100, 800]), torch.eye(3)[[1, 2]]
        cond, uncond = net(x, t, labels=labels), net(x, t)
        assert (cond - uncond).abs().max() > 1e-3
        assert torch.allclose(md.guided_eps(net, x, t, labels, cfg=0), uncond, atol=1e-5)
        assert torch.allclose(md.guided_eps(net, x, t, labels, cfg=1), cond, atol=1e-5)
        assert torch.allclose(md.guided_eps(net, x, t, labels, cfg=2.5), uncond + 2.5 * (cond - uncond), atol=1e-5)

def snapshot_in(folder):
    return folder / sorted(n for n in os.listdir(folder) if n.startswith('network-snapshot-'))[-1]

def test_cond_cli_train_and_per_class_generation(dataset_zip, tmp_path):
    run_train(TINY_FLAGS + [f'--data={dataset_zip}', f'--outdir={tmp_path}', '--nosubdir', '--cond=1',
                            '--train_steps=2', '--tick=0.1', '--mlp_time_embed=1'])
    snapshot = snapshot_in(tmp_path)
    kwargs = load_checkpoint(snapshot)['net_kwargs']
    assert kwargs['num_classes'] == 2 and kwargs['mlp_time_embed']  # dataset.json: classes i % 2
    gen = lambda out, *flags: md.generate(parse(['generate', f'--network={snapshot}', f'--outdir={tmp_path / out}',
                                                 '--seeds=0-3', '--steps=5', *flags]))
    gen('random')
    gen('c0', '--class=0')
    gen('c1', '--class=1')
    rand, by_class = read_pngs(tmp_path / 'random'), [read_pngs(tmp_path / 'c0'), read_pngs(tmp_path / 'c1')]
    for seed in range(4):  # each seed's class is drawn from its own generator, after its latents
        g = torch.Generator().manual_seed(seed)
        torch.randn([3, 8, 8], generator=g, dtype=torch.float64)
        c = torch.randint(2, (), generator=g).item()
        name = f'{seed:06d}.png'
        assert np.array_equal(rand[name], by_class[c][name]) and not np.array_equal(rand[name], by_class[1 - c][name])
    gen('cfg', '--class=1', '--cfg=2')
    assert not np.array_equal(read_pngs(tmp_path / 'cfg')['000000.png'], by_class[1]['000000.png'])
    with pytest.raises(UserError, match='2 classes'):
        gen('bad', '--class=2')

@pytest.mark.parametrize('p', [1, 0])
def test_label_dropout_replaces_labels_by_unconditional_token(dataset_zip, tmp_path, p):
    # One AdamW step without weight decay leaves a parameter bitwise unchanged iff its gradient is zero. With
    # --label-dropout=1 every label is replaced by the unconditional token: label_emb is untouched, uncond_embed
    # learns; with 0 (official) the reverse.
    run_train(TINY_FLAGS + [f'--data={dataset_zip}', f'--outdir={tmp_path}', '--nosubdir', '--cond=1',
                            '--train_steps=1', '--tick=0.1', '--dump=1', '--weight_decay=0', f'--label-dropout={p}'])
    trained = state_at(tmp_path, 4)['net']
    torch.manual_seed(0)  # the run's init (--seed=0)
    init = md.GaussianDiffusion(**load_checkpoint(snapshot_in(tmp_path))['net_kwargs']).state_dict()
    label, uncond = 'model.encoder.label_emb.weight', 'model.encoder.uncond_embed'
    assert torch.equal(trained[label], init[label]) == (p == 1)
    assert torch.equal(trained[uncond], init[uncond]) == (p == 0)
    assert not torch.equal(trained['model.encoder_to_output.weight'], init['model.encoder_to_output.weight'])

def test_official_conditional_checkpoint_loads_and_samples(tmp_path):
    kw = dict(md.preset_network_kwargs('demo_ft'), num_classes=4, mlp_time_embed=True)
    torch.manual_seed(6)
    net = md.GaussianDiffusion(**kw)
    official_checkpoint(tmp_path / 'model-20.pt', net, kw['beta_schedule'])  # label_emb, uncond_embed, time_embed
    loaded = md.load_network(str(tmp_path / 'model-20.pt'), 'demo_ft')  # classes and time MLP read off the keys
    assert (loaded.num_classes, loaded.model.encoder.time_embed is not None) == (4, True)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in loaded.state_dict().items())
    md.generate(parse(['generate', f'--network={tmp_path / "model-20.pt"}', '--preset=demo_ft',
                       f'--outdir={tmp_path / "o"}', '--seeds=3', '--steps=4', '--class=2']))
    expected = md.sample_images(net.eval(), [3], torch.device('cpu'), num_steps=4, class_idx=2)
    assert np.array_equal(read_pngs(tmp_path / 'o')['000003.png'], to_uint8(expected)[0].permute(1, 2, 0).numpy())
    with pytest.raises(UserError, match='label-dropout'):
        md.train(parse(TINY_FLAGS + ['--data=demo-8', '--label-dropout=0.1', '-n']))
    with pytest.raises(UserError, match='pixel U-ViT'):
        md.train(parse(TINY_FLAGS + ['--data=demo-8', '--cond=1', '--dwt=1', '-n']))

@pytest.mark.parametrize('dwt', [False, True])
def test_grey_images_train_and_generate(tmp_path, dwt):
    import dataset_tool
    from conftest import write_images
    write_images(tmp_path / 'grey', channels=1)
    dataset_tool.main([f'--source={tmp_path / "grey"}', f'--dest={tmp_path / "grey.zip"}'])
    masks = ['--mask_type=patch'] if dwt else []
    run_train(TINY_FLAGS + masks + [f'--data={tmp_path / "grey.zip"}', f'--outdir={tmp_path / "run"}', '--nosubdir',
                                    '--train_steps=2', '--tick=0.1', f'--dwt={int(dwt)}'])
    snapshot = snapshot_in(tmp_path / 'run')
    kwargs = load_checkpoint(snapshot)['net_kwargs']
    assert kwargs['in_chans'] == (4 if dwt else 1)  # official `in_chans`; Haar: [LL, H, V, D] x 1
    md.generate(parse(['generate', f'--network={snapshot}', f'--outdir={tmp_path / "gen"}', '--seeds=0-1',
                       '--steps=4']))
    for name in ('000000.png', '000001.png'):
        with PIL.Image.open(tmp_path / 'gen' / name) as image:
            assert image.mode == 'L' and image.size == (8, 8)
    if not dwt:  # an official 1-channel checkpoint (config in_chans: 1): in_chans read off the patch embedding
        torch.manual_seed(2)
        net = md.GaussianDiffusion(**dict(md.preset_network_kwargs('demo_ft'), in_chans=1))
        official_checkpoint(tmp_path / 'grey.pt', net, 'linear')
        loaded = md.load_network(str(tmp_path / 'grey.pt'), 'demo_ft')
        assert loaded.in_chans == 1 and all(torch.equal(v, net.state_dict()[k]) for k, v in loaded.state_dict().items())

#------------------------------------------------------------------------------
# Checkpoints written before TrainingRun took explicit arguments still load.

def test_old_layout_snapshot_and_training_state_load(tmp_path, capsys):
    # The keys masked_dm.py wrote then: a snapshot {method, args, cur_nimg, net_kwargs, ema}; a training state adds
    # net, optimizer, scaler, step and data_pos (no tick). Its args had EDM's --ema and --lr-rampup, no --cond extras.
    args = {k: v for k, v in vars(parse(TINY_FLAGS + ['--data=demo-8', f'--outdir={tmp_path / "run"}', '--nosubdir',
                                                      '--tick=0.004', '--train_steps=2'])).items()
            if k not in ('label_dropout', 'mlp_time_embed')} | dict(ema=0.5, lr_rampup=10000)
    net = tiny_net(8)
    optimizer = torch.optim.AdamW(net.parameters(), betas=(0.99, 0.99), weight_decay=0.03)
    snapshot = dict(method='masked_dm', args=args, cur_nimg=4, net_kwargs=dict(TINY, beta_schedule='linear'),
                    ema=net.state_dict())
    torch.save(snapshot, tmp_path / 'old-snapshot.pt')
    loaded = md.load_network(str(tmp_path / 'old-snapshot.pt'))
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in loaded.state_dict().items())
    state = dict(snapshot, net=net.state_dict(), optimizer=optimizer.state_dict(),
                 scaler=torch.amp.GradScaler('cpu', enabled=False).state_dict(), step=1, data_pos=[4])
    torch.save(state, tmp_path / 'old-state.pt')
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in md.load_network(str(tmp_path / 'old-state.pt'))
               .state_dict().items())
    for changed, stored in (('--mask_ratio=0.25', '0.5'), ('--batch=8', '4')):  # a resume continues the same run
        with pytest.raises(SystemExit) as e:
            parse(['train', f'--resume={tmp_path / "old-state.pt"}', changed])
        assert e.value.code == 2 and f'{changed} given, {stored} in the training state' in capsys.readouterr().err
    run_train([f'--resume={tmp_path / "old-state.pt"}'])  # the stored options, one more step to 8 images
    resumed = state_at(tmp_path, 8)  # a resume continues in the state's folder
    assert resumed['step'] == 2 and not torch.equal(resumed['net']['model.encoder_to_output.weight'],
                                                    net.state_dict()['model.encoder_to_output.weight'])

#------------------------------------------------------------------------------
# Bad input: every case is one line on stderr naming the flag, exit 2 (usage), no run directory, no temp file.

TRAIN = ['train', '--data=demo-8', *TINY_FLAGS, '--outdir={tmp}/out', '--train_steps=2', '--nosubdir']
GENERATE = ['generate', '--network={snapshot}', '--outdir={tmp}/out', '--steps=2']
BAD = [  # (argv, exit code, a word of the one line)
    (TRAIN + ['--mask_ratio=-0.1'], 2, '--mask_ratio'),
    (TRAIN + ['--mask_ratio=1.5'], 2, '--mask_ratio'),
    (TRAIN + ['--mask_ratio=1'], 2, 'visible'),
    (TRAIN + ['--mask_type=patch', '--mask_ratio=1'], 2, 'visible'),
    (TRAIN + ['--train_steps=-1'], 2, '--train_steps'),
    (TRAIN + ['--train_steps=0'], 2, '--train_steps'),
    (TRAIN + ['--block_size=3'], 2, '--block_size'),
    (TRAIN + ['--mask_type=crop', '--crop_size=5'], 2, '--crop_size'),
    (TRAIN + ['--mask_type=crop'], 2, '--crop_size'),
    (TRAIN + ['--patch_size=3'], 2, '--patch_size'),
    (TRAIN + ['--embed_dim=30', '--heads=4'], 2, '--heads'),
    (TRAIN + ['--resolution=16'], 2, '16x16'),
    (TRAIN + ['--batch=0'], 2, '--batch'),
    (TRAIN + ['--batch=6', '--batch-gpu=4'], 2, '--batch'),
    (TRAIN + ['--lr=-1'], 2, '--lr'),
    (TRAIN + ['--dropout=0.1'], 2, '--dropout'),
    (TRAIN + ['--label-dropout=0.1'], 2, '--label-dropout'),
    (TRAIN + ['--cond=1', '--dwt=1'], 2, '--dwt'),
    (TRAIN + ['--fp16=1', '--bf16=1'], 2, '--bf16'),
    (TRAIN + ['--ema_decay=1.5'], 2, '--ema_decay'),
    (TRAIN + ['--ema_every=0'], 2, '--ema_every'),
    (TRAIN + ['--warmup_steps=-5'], 2, '--warmup_steps'),
    (TRAIN + ['--adam_betas=0.9'], 2, '--adam_betas'),
    (TRAIN + ['--adam_betas=0.9,1'], 2, '--adam_betas'),
    (TRAIN + ['--preset=bogus'], 2, '--preset'),
    (TRAIN + ['--outdir={file}'], 2, '--outdir'),
    (TRAIN + ['--pretrained_model_ckpt={other}'], 2, '--pretrained_model_ckpt'),
    (TRAIN + ['--pretrained_model_ckpt={tmp}/missing.pt'], 2, '--pretrained_model_ckpt'),
    (TRAIN + ['--pretrained_model_ckpt={junk}'], 2, '--pretrained_model_ckpt'),
    (TRAIN + ['--pretrained_model_ckpt={snapshot}', '--embed_dim=64'], 2, '--pretrained_model_ckpt'),
    (GENERATE + ['--steps=0'], 2, '--steps'),
    (GENERATE + ['--batch=0'], 2, '--batch'),
    (GENERATE + ['--seeds=5-1'], 2, '--seeds'),
    (GENERATE + ['--eta=2'], 2, '--eta'),
    (GENERATE + ['--outdir={file}'], 2, '--outdir'),
    (GENERATE + ['--network={other}'], 2, '--network'),
    (GENERATE + ['--network={tmp}/missing.pt'], 2, '--network'),
    (GENERATE + ['--network={junk}'], 2, '--network'),
    (GENERATE + ['--network={official}'], 2, '--preset'),
    (GENERATE + ['--class=1'], 2, '--class'),
    (GENERATE + ['--cfg=2'], 2, '--cfg'),
    # Hostile input, one row per class: non-finite and out-of-range numbers, paths that are no checkpoint of ours.
    (TRAIN + ['--weight_decay=inf'], 2, '--weight_decay'),
    (TRAIN + ['--clip_grad=nan'], 2, '--clip_grad'),
    (TRAIN + ['--mask_ratio=1e400'], 2, '--mask_ratio'),
    (TRAIN + ['--weight_decay=5', '--lr=0.5'], 2, 'product must be below 1'),
    (TRAIN + ['--embed_dim=99999999'], 2, '--embed_dim'),
    (TRAIN + ['--embed_dim=16384', '--depth=999', '--heads=1'], 2, 'GiB'),
    (TRAIN + ['--train_steps=99999999999'], 2, '--train_steps'),
    (TRAIN + ['--train_steps=900000000', '--batch=4096'], 2, '100,000 Mimg'),
    (TRAIN + ['--grid=100000'], 2, '--grid'),
    (TRAIN + ['--grid_steps=5000'], 2, '--grid_steps'),
    (TRAIN + ['--metrics=bogus'], 2, '--metrics'),
    (TRAIN + ['--metrics=fid10k_full'], 2, '--metrics-ref'),
    (TRAIN + ['--metrics=fid10k_full', '--metrics-ref={tmp}/missing.npz'], 2, 'missing.npz'),
    (TRAIN + ['--metrics-steps=0'], 2, '--metrics-steps'),
    (TRAIN + ['--resume={patch_state}'], 2, 'patch_diffusion.py training state'),
    (TRAIN + ['--pretrained_model_ckpt={patch_state}'], 2, 'a patch_diffusion.py training state'),
    (TRAIN + ['--pretrained_model_ckpt={pickle}'], 2, 'not a checkpoint of this project'),
    (TRAIN + ['--pretrained_model_ckpt={empty}'], 2, 'empty.pt'),
    (TRAIN + ['--pretrained_model_ckpt={tmp}'], 2, 'without training-state'),
    (TRAIN + ['--pretrained_model_ckpt={nan_state}'], 2, 'NaN or inf'),
    (GENERATE + ['--network={patch_snapshot}'], 2, 'a patch_diffusion.py network snapshot'),
    (GENERATE + ['--network={pickle}'], 2, 'not a checkpoint of this project'),
    (GENERATE + ['--network={empty}'], 2, 'empty.pt'),
    (GENERATE + ['--network={nan_snapshot}'], 2, 'NaN or inf'),
    (GENERATE + ['--steps=5000'], 2, '--steps'),
    (GENERATE + ['--eta=nan'], 2, '--eta'),
    (GENERATE + ['--cfg=inf'], 2, '--cfg'),
    (GENERATE + ['--class=-1'], 2, '--class'),
]

@pytest.fixture(scope='module')
def patch_run(tmp_path_factory):
    """Another method's training state and snapshot, from a tiny patch_diffusion.py run."""
    import patch_diffusion
    out = tmp_path_factory.mktemp('patch')
    patch_diffusion.train(parse_command_line(patch_diffusion.build_parser, [
        'train', '--data=demo-8', '--cbase=16', '--cres=1,2', '--batch=8', '--dropout=0', '--workers=0', '--grid=0',
        '--tick=0.008', '--duration=0.000008', f'--outdir={out}', '--nosubdir']))
    return dict(patch_state=next(out.glob('training-state-*.pt')), patch_snapshot=next(out.glob('network-snapshot-*')))

@pytest.mark.parametrize('argv, code, word', BAD,
                         ids=[' '.join(a[:1] + a[len(TRAIN if a[0] == 'train' else GENERATE):]) for a, _, _ in BAD])
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys, patch_run, argv, code, word):
    files = dict(snapshot=tmp_path / 'net.pt', other=tmp_path / 'gdd.pt', junk=tmp_path / 'junk.pt',
                 official=tmp_path / 'model-1.pt', file=tmp_path / 'a-file', pickle=tmp_path / 'raw.pkl',
                 empty=tmp_path / 'empty.pt', nan_snapshot=tmp_path / 'nan.pt', nan_state=tmp_path / 'nan-state.pt',
                 **patch_run)
    write_snapshot(files['snapshot'], tiny_net())
    snapshot = load_checkpoint(files['snapshot'])
    nan = {k: v * float('nan') for k, v in snapshot['ema'].items()}
    torch.save(dict(snapshot, ema=nan), files['nan_snapshot'])
    torch.save(dict(snapshot, net=nan, optimizer={}), files['nan_state'])
    files['pickle'].write_bytes(pickle.dumps({'ema': {'w': [1.0]}}))
    files['empty'].write_bytes(b'')
    torch.save(dict(method='gdd', net_kwargs={}, ema={}, args={}, cur_nimg=0), files['other'])
    files['junk'].write_text('not a checkpoint')
    files['file'].write_text('x')
    torch.manual_seed(0)
    official_checkpoint(files['official'], md.GaussianDiffusion(**md.preset_network_kwargs('demo_ft')), 'linear')
    before = sorted(os.listdir(tmp_path))
    monkeypatch.setattr(sys, 'argv', ['masked_dm.py'] + [a.format(tmp=tmp_path, **files) for a in argv])
    with pytest.raises(SystemExit) as e:
        md.main()
    err = capsys.readouterr().err
    assert e.value.code == code and word in err and err.count('\n') == 1 and 'Traceback' not in err, err
    assert sorted(os.listdir(tmp_path)) == before and files['file'].read_text() == 'x'  # no run dir, no temp file

#------------------------------------------------------------------------------
# train --metrics: the numbers of what generate makes from each snapshot.

def test_train_metrics_equal_generate_then_score(tmp_path, toy_cache, capsys, monkeypatch):
    """--metrics=toy_fd --snap=1: one StyleGAN-layout line per snapshot, whose value is what `generate --seeds=0-99`
    of that snapshot and `fid.py score --num=100` give (toy_fd's 500 images monkeypatched to 100, for time)."""
    import fid
    monkeypatch.setitem(common.TRAINING_METRICS, 'toy_fd', 100)
    run_train(TINY_FLAGS + ['--data=demo-8', f'--outdir={tmp_path / "run"}', '--nosubdir', '--train_steps=3',
                            '--tick=0.004', '--snap=1', '--dump=0', '--metrics=toy_fd', '--metrics-steps=2',
                            f'--metrics-cache={toy_cache}'])
    lines = [json.loads(line) for line in (tmp_path / 'run' / 'metric-toy_fd.jsonl').read_text().splitlines()]
    snapshots = sorted(n for n in os.listdir(tmp_path / 'run') if n.startswith('network-snapshot-'))
    assert [line['snapshot_pkl'] for line in lines] == snapshots and len(snapshots) == 2  # one line per snapshot
    for line in lines:  # StyleGAN2-ADA's metric-*.jsonl layout
        assert {'results', 'metric', 'total_time', 'num_gpus', 'snapshot_pkl', 'timestamp', 'kimg'} <= set(line)
        assert line['metric'] == 'toy_fd' and line['num_gpus'] == 1 and line['total_time'] > 0
    assert [line['kimg'] for line in lines] == [load_checkpoint(tmp_path / 'run' / n)['cur_nimg'] / 1000
                                                for n in snapshots]
    computed, toy_fd = [], fid.toy_fd  # score's unrounded numbers (it prints 6 digits)
    monkeypatch.setattr(fid, 'toy_fd', lambda *a: computed.append(toy_fd(*a)) or computed[-1])
    few_masks = functools.lru_cache(functools.partial(fid.demo_masks, draws=1000))
    monkeypatch.setattr(fid, 'demo_masks', few_masks)  # for score's demo_fit, not checked here: fewer draws, once
    for line in lines:  # the same number from generate's PNGs and fid.py score
        out = tmp_path / line['snapshot_pkl'][:-3]
        md.generate(parse(['generate', f'--network={tmp_path / "run" / line["snapshot_pkl"]}', f'--outdir={out}',
                           '--seeds=0-99', '--steps=2']))
        computed.clear()
        printed = fid_score(out, toy_cache, capsys, num=100)
        assert f'{line["results"]["toy_fd"]:.6g}' == f'{printed["toy_fd"]:.6g}'
        assert line['results']['toy_fd'] == pytest.approx(computed[0], rel=1e-6)  # the samples' toy_fd comes first
