"""relay_diffusion.py: fidelity checks against the paper and the official code (block DCT, blur, block noise,
schedule, BlurLoss, blur sampler, parameter counts) and end-to-end properties (checkpoint loading, per-seed
generation with and without --indir,
resume, DDP, a two-stage torchrun run)."""
import glob
import json
import math
import os
import pickle
import socket
import subprocess
import sys
import types

import numpy as np
import PIL.Image
import PIL.ImageEnhance
import pytest
import scipy.stats
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ROOT, TINY_UNET, EDMPrecond as OfficialEDMPrecond, fid_score, run_main, write_persistence_pickle

import fid
import relay_diffusion as rd
from common import (TRAINING_METRICS, EDMPrecond, UsageError, UserError, edm_sampler, load_checkpoint,
                    parse_command_line, save_checkpoint)

TINY = ['--arch=ddpmpp', '--cbase=16', '--cres=1,2', '--blocks=1', '--dropout=0', '--lr-rampup=0', '--grid=0',
        '--workers=0']

def run(argv):
    args = parse_command_line(rd.build_parser, argv)
    (rd.train if args.command == 'train' else rd.generate)(args)

#------------------------------------------------------------------------------
# Block DCT and blur (paper Sec. 3; official blurring.dct_2d, get_alpha_t).

@pytest.mark.parametrize('s', [2, 4, 8])
def test_dct_matrix_is_orthonormal_and_block_dct_inverts(s):
    C = rd.dct_matrix(s)
    assert torch.allclose(C @ C.T, torch.eye(s, dtype=torch.float64), atol=1e-14)
    x = torch.randn(2, 3, 3 * s, 5 * s, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(s))  # not square: any size divisible by s
    assert (rd.block_idct(rd.block_dct(x, s), s) - x).abs().max() < 1e-12

def test_block_dct_equals_direct_per_patch_sum():
    s, x = 4, np.random.default_rng(0).standard_normal((8, 12))
    C = np.array([[math.sqrt((2 - (k == 0)) / s) * math.cos(math.pi * (2 * n + 1) * k / (2 * s)) for n in range(s)]
                  for k in range(s)])
    out = rd.block_dct(torch.from_numpy(x)[None, None], s)[0, 0].numpy()
    for bi in range(2):
        for bj in range(3):
            P = x[bi * s:(bi + 1) * s, bj * s:(bj + 1) * s]
            for k in range(s):
                for l in range(s):
                    X = sum(C[k, n] * P[n, m] * C[l, m] for n in range(s) for m in range(s))
                    assert abs(out[bi * s + k, bj * s + l] - X) < 1e-12

def test_blur_identity_fixed_points_and_symmetry():
    s, g = 4, torch.Generator().manual_seed(0)
    x, y = (torch.randn(2, 3, 12, 20, dtype=torch.float64, generator=g) for _ in range(2))
    patch_mean = lambda z: torch.nn.functional.avg_pool2d(z, s)
    assert (rd.blur(x, 0.0, s) - x).abs().max() < 1e-12                                 # A(0) = I
    const = torch.full_like(x, 0.3)
    low = torch.randn(2, 3, 3, 5, dtype=torch.float64, generator=g)
    patchwise = torch.nn.functional.interpolate(low, scale_factor=s)
    for B in (0.5, 3.0, 10.0):
        assert (rd.blur(const, B, s) - const).abs().max() < 1e-12
        assert (rd.blur(patchwise, B, s) - patchwise).abs().max() < 1e-12               # the relay start: fixed point
        assert (patch_mean(rd.blur(x, B, s)) - patch_mean(x)).abs().max() < 1e-12       # patch means kept
        assert abs((rd.blur(x, B, s) * y).sum() - (x * rd.blur(y, B, s)).sum()) < 1e-9  # symmetric
    impulse = torch.zeros(1, 1, 12, 20, dtype=torch.float64)
    impulse[0, 0, 5, 9] = 1
    spread = rd.blur(impulse, 1.5, s)[0, 0]
    outside = spread.clone()
    outside[4:8, 8:12] = 0
    assert outside.abs().max() < 1e-14 and spread[4:8, 8:12].abs().min() > 0             # stays in its patch
    ratio = lambda B: ((rd.blur(x, B, s) - patch_mean(x).repeat_interleave(s, -2).repeat_interleave(s, -1)).norm()
                       / (x - patch_mean(x).repeat_interleave(s, -2).repeat_interleave(s, -1)).norm()).item()
    assert ratio(20.0) == pytest.approx(rd.MIN_SCALE, rel=1e-6) and ratio(2.0) > ratio(3.0) > ratio(20.0)
    d = rd.blur_multipliers(torch.tensor([3.0], dtype=torch.float64), s, 4, 4)[0, 0]
    assert d[0, 1].item() == pytest.approx((1 - 1e-3) * math.exp(-(math.pi / 4) ** 2 * 9 / 2) + 1e-3)
    assert d[0, 1].item() == pytest.approx(0.06324, abs=1e-5)
    assert d[0, 0] == 1 and torch.equal(d, d.T)

#------------------------------------------------------------------------------
# Block noise (paper Sec. 3; official blurring.block_noise).

def test_block_noise_is_the_circular_window_sum_over_s():
    s, field = 4, torch.arange(2 * 6 * 8, dtype=torch.float64).reshape(1, 2, 6, 8) ** 1.5
    out = rd.block_noise(field, s, randn_like=lambda x: field)
    H, W = 6, 8
    for c in range(2):
        for i in range(H):
            for j in range(W):
                expect = sum(field[0, c, (i - a) % H, (j - b) % W] for a in range(s) for b in range(s)) / s
                assert abs(out[0, c, i, j] - expect) < 1e-9

def test_block_noise_variance_correlation_and_dc():
    s, g = 4, torch.Generator().manual_seed(0)
    b = rd.block_noise(torch.empty(256, 2, 32, 32), s, lambda x: torch.randn(x.shape, generator=g))
    assert b.var().item() == pytest.approx(1, abs=0.01)
    for dx, dy in [(1, 0), (0, 1), (1, 1), (2, 0), (3, 0), (3, 3), (2, 2), (4, 0), (0, 5), (4, 4)]:
        corr = (b * torch.roll(b, (dx, dy), (-2, -1))).mean().item()  # rolls include pairs across the wrap-around
        assert corr == pytest.approx(max(0, s - dx) * max(0, s - dy) / s ** 2, abs=0.01), (dx, dy)
    assert abs((b[:, 0] * b[:, 1]).mean().item()) < 0.01                                       # channels independent
    dc = rd.block_dct(b, s)[:, :, ::s, ::s]
    assert dc.var().item() == pytest.approx(121 / 16, rel=0.03)                                # 121/16 = 7.5625

#------------------------------------------------------------------------------
# Truncated sigma schedule, shared u, BlurLoss (paper Sec. 3; official training/loss.py BlurLoss).

@pytest.mark.parametrize('L, B_max, sigma_max', [(0.93, 3.0, 1.769946), (0.89, 2.0, 1.312369)])
def test_schedule_matches_scipy_and_official_values(L, B_max, sigma_max):
    assert rd.sigma_of_u(1.0, L).item() == pytest.approx(math.exp(-1.2 + 1.2 * scipy.stats.norm.ppf(L)), rel=1e-12)
    assert rd.sigma_of_u(1.0, L).item() == pytest.approx(sigma_max, abs=1e-6)
    u = torch.linspace(0.01, 1, 50, dtype=torch.float64)
    assert (rd.u_of_sigma(rd.sigma_of_u(u, L), L) - u).abs().max() < 1e-12
    assert rd.blur_of_u(0.5, B_max).item() == pytest.approx(B_max / 2)
    assert rd.u_min(L) == pytest.approx(L * scipy.stats.norm.cdf((math.log(7.5e-3) + 1.2) / 1.2), rel=1e-12)
    torch.manual_seed(0)
    loss = rd.BlurLoss(prob_length=L, blur_sigma_max=B_max)
    u, sigma, B = loss.schedule(100000, 'cpu')
    sigma_min = rd.sigma_of_u(rd.u_min(L), L).item()
    assert sigma.min().item() == pytest.approx(sigma_min, rel=1e-6) and sigma.max().item() <= sigma_max
    assert (u == rd.u_min(L)).float().mean().item() == pytest.approx(rd.u_min(L), rel=0.35)     # the clamp's point mass
    B_of_sigma = rd.blur_of_u(rd.u_of_sigma(sigma.flatten().double(), L), B_max)
    assert torch.allclose(B.double(), B_of_sigma, atol=1e-5)  # one u drives both
    if L == 0.93:
        assert sigma_min == pytest.approx(0.007123, abs=1e-6)

def test_blur_loss_input_target_weight_and_noise(monkeypatch):
    s, L, B_max = 4, 0.93, 3.0
    torch.manual_seed(1)
    y = torch.rand(64, 3, 16, 16) * 2 - 1
    seen = {}
    def net(x, sigma, labels, augment_labels=None):
        seen.update(x=x, sigma=sigma)
        return x  # D = x: the loss compares the blurred input with the target
    with monkeypatch.context() as m:
        m.setattr(torch, 'randn_like', torch.zeros_like)
        loss = rd.BlurLoss(s, L, B_max)(net, y)
    sigma = seen['sigma']
    B = rd.blur_of_u(rd.u_of_sigma(sigma.flatten().double(), L), B_max)
    Ay = rd.blur(y, B.float(), s)
    assert (seen['x'] - Ay).abs().max() < 1e-4                                   # x_t = A(B(u)) y, same u as sigma
    lam = (sigma ** 2 + 0.25) / (0.5 * sigma) ** 2
    assert torch.allclose(loss, lam * (Ay - y) ** 2, rtol=1e-4, atol=1e-6)       # target: the sharp y, EDM's lambda
    assert loss.sum() > 0
    for norm, var in [(False, 1 + 0.15 ** 2), (True, 1.0)]:                           # code: 1.0225; paper: 1
        rd.BlurLoss(s, L, B_max, block_scale=0.15, paper_noise_norm=norm)(net, y)
        B_seen = rd.blur_of_u(rd.u_of_sigma(seen['sigma'].flatten().double(), L), B_max).float()
        xi = (seen['x'] - rd.blur(y, B_seen, s)) / seen['sigma']
        assert xi.var().item() == pytest.approx(var, abs=0.012)

#------------------------------------------------------------------------------
# Blur sampler (paper App. A.4 Algorithm 1; official generate.py blur_sampler).

@pytest.mark.parametrize('N, rho, trunc, K, first, last', [
    (200, 100, 0.9, 100, [0.869123, 0.829823, 0.792283], [0.008814, 0.008397, 0.008]),
    (150, 7, 0.95, 54, [0.921913, 0.863598, 0.808473], [0.010290, 0.009083, 0.008]),
    (18, 7, 0.9, 7, [0.897505, 0.494046, 0.257221, 0.125220, 0.056126, 0.022671, 0.008], [])])
def test_sampler_grid_truncation(N, rho, trunc, K, first, last):
    t = rd.relay_time_steps(N, 0.008, 80, rho, trunc)
    assert len(t) == K + 1 and t[-1] == 0
    assert t[:len(first)].tolist() == pytest.approx(first, abs=1e-6)
    assert t[K - len(last):K].tolist() == pytest.approx(last, abs=1e-6)

@pytest.mark.parametrize('cfg', [1, 3.5])
def test_sampler_evaluations(cfg):
    calls = []
    def net(x, sigma, labels):
        calls.append(labels)
        return x * 0.25 / (sigma ** 2 + 0.25)
    rd.blur_sampler(net, torch.zeros(1, 3, 8, 8), torch.eye(2)[[1]], torch.zeros_like, num_steps=18, cfg_scale=cfg)
    assert len(calls) == (2 * 7 - 1) * (2 if cfg > 1 else 1)                   # 2K - 1 evaluations, twice with CFG
    assert (sum(c is None for c in calls) == len(calls) // 2) if cfg > 1 else all(c is not None for c in calls)

def test_sde_sampler_without_noise_is_edm_heun_and_its_noise_keeps_the_marginal():
    denoise = lambda x, sigma, labels=None: x * 0.25 / (sigma ** 2 + 0.25)  # exact D for data N(0, 0.5^2)
    z = torch.randn(4096, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    heun = edm_sampler(denoise, z, None, torch.zeros_like, num_steps=12)
    assert (rd.sde_sampler(denoise, z, None, torch.zeros_like, num_steps=12, sde_scale=0) - heun).abs().max() < 1e-12
    g = torch.Generator().manual_seed(1)
    out = rd.sde_sampler(denoise, z, None, lambda x: torch.randn(x.shape, dtype=x.dtype, generator=g), num_steps=64,
                         sde_scale=0.5)  # large, so that a wrong noise term shows (dropping the fresh draw: std 0.05)
    assert not torch.allclose(out, heun) and out.std().item() == pytest.approx(0.5, rel=0.05)  # still N(0, 0.5^2)

class Stop(Exception):
    pass

def test_sampler_euler_proposal_is_exact_for_an_oracle_and_keeps_the_variance():
    s, L, B_max, g = 4, 0.93, 3.0, torch.Generator().manual_seed(0)
    x0 = torch.rand(16, 3, 16, 16, dtype=torch.float64, generator=g) * 2 - 1
    t = rd.relay_time_steps(18, 0.008, 80, 7, 0.9)
    A = lambda sigma, z: rd.blur(z, rd.blur_of_u(rd.u_of_sigma(sigma, L), B_max), s)
    for eta in (0.0, 0.5):
        seen, z = [], torch.randn(x0.shape, dtype=torch.float64, generator=g)
        draws = iter([z, torch.randn(x0.shape, dtype=torch.float64, generator=g)])
        def oracle(x, sigma, labels):  # D(x) = x0; stop at the second call (the Euler proposal)
            seen.append(x)
            if len(seen) == 2:
                raise Stop
            return x0
        with pytest.raises(Stop):
            rd.blur_sampler(oracle, A(t[0], x0), None, lambda x: next(draws), num_steps=18, s_block=0, s_noise=eta,
                            truncation_t=L, blur_sigma_max=B_max)
        assert (seen[0] - (A(t[0], x0) + t[0] * z)).abs().max() < 1e-12
        residual = seen[1] - A(t[1], x0)              # Euler proposal: A(B_1) x0 + a Gaussian part
        if eta == 0:
            assert (residual - t[1] * z).abs().max() < 1e-10
        else:                                         # gamma^2 sigma_0^2 + eta^2 sigma_1^2 = sigma_1^2
            assert (residual / t[1]).var().item() == pytest.approx(1, abs=0.05)

def test_sampler_patch_constant_input_scales_with_a_linear_denoiser():
    low = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x_up = torch.nn.functional.interpolate(low, scale_factor=4)
    denoise = lambda x, sigma, labels: x * 0.25 / (sigma ** 2 + 0.25)  # noqa: E731
    out = rd.blur_sampler(denoise, x_up, None, torch.zeros_like, num_steps=18)
    ratio = out / x_up
    assert (ratio - ratio.mean()).abs().max() < 1e-10 and 0 < ratio.mean() < 1

#------------------------------------------------------------------------------
# Parameter counts of the official networks (official train.py configs) and the dry run.

@pytest.mark.parametrize('flags, count', [
    (['--preset=celebahq256', '--data=demo-256'], 552_809_475),
    (['--preset=imagenet256', '--data=datasets/imagenet-256x256.zip'], 553_833_475),
    (['--preset=celebahq64', '--data=demo-64'], 295_132_995)])
def test_parameter_counts_of_the_official_configs(flags, count, tmp_path, capsys):
    run(['train', '-n', f'--outdir={tmp_path}'] + flags)
    assert f'{count:,} parameters' in capsys.readouterr().out
    assert not os.listdir(tmp_path)

#------------------------------------------------------------------------------
# Checkpoints: our snapshots, patch_diffusion.py --real_p=1, official EDM .pkl and RDM .pt files.

def tiny_net(seed, img_resolution=8, **kwargs):
    torch.manual_seed(seed)
    net = EDMPrecond(img_resolution, 3, **(TINY_UNET | kwargs))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # the zero-initialized output layers would make D = c_skip x
    return net.eval()

def snapshot(path, net, method='relay_diffusion', stage='edm', precond='EDMPrecond'):
    kwargs = dict(img_resolution=net.img_resolution, img_channels=3, label_dim=net.label_dim) | TINY_UNET
    save_checkpoint(dict(method=method, precond=precond, net_kwargs=kwargs, ema=net.state_dict(),
                         stage=dict(precond=stage)), path)
    return str(path)

# torch.save of dict(ema=<official EDMPrecond>, ...) as the official training loop writes it: network modules are
# pickled through torch_utils.persistence, tensors as torch storages.
def write_rdm_pt(path, module, init_kwargs):
    persistence = types.ModuleType('torch_utils.persistence')
    def _reconstruct_persistent_obj(meta):
        raise AssertionError('never called')
    _reconstruct_persistent_obj.__module__ = persistence.__name__
    _reconstruct_persistent_obj.__qualname__ = '_reconstruct_persistent_obj'
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            if not isinstance(obj, torch.nn.Module) or isinstance(obj, torch.nn.ModuleDict):
                return NotImplemented
            state = dict(obj.__dict__, _init_args=(), _init_kwargs=init_kwargs if obj is module else {})
            meta = dict(type='class', version=6, module_src='', class_name=type(obj).__name__, state=state)
            return _reconstruct_persistent_obj, (meta,)
    fakes = {'torch_utils': types.ModuleType('torch_utils'), 'torch_utils.persistence': persistence}
    sys.modules.update(fakes)
    try:
        torch.save(dict(optimizer_state={}, step=0, ema=module, net=module), path,
                   pickle_module=types.SimpleNamespace(Pickler=Pickler, __name__='pickle'))
    finally:
        for name in fakes:
            del sys.modules[name]

def test_official_and_our_checkpoints_load_with_the_same_weights(tmp_path):
    ours = tiny_net(0)
    kwargs = dict(img_resolution=8, img_channels=3, label_dim=0, use_fp16=True, model_type='SongUNet') | \
             {k: v for k, v in TINY_UNET.items() if k != 'model_type'}
    official = OfficialEDMPrecond(**kwargs)
    official.load_state_dict(ours.state_dict())
    write_rdm_pt(tmp_path / 'celebahq_second_stage.pt', official, dict(kwargs, eff_attn=True))
    write_persistence_pickle(tmp_path / 'edm.pkl', dict(ema=official), kwargs)
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 2.0])
    for path, flag, stage in [(tmp_path / 'celebahq_second_stage.pt', '--network_second', 'blur'),
                              (tmp_path / 'edm.pkl', '--network_first', 'edm'),
                              (snapshot(tmp_path / 'pd.pt', ours, method='patch_diffusion'), '--network_first', 'edm'),
                              (snapshot(tmp_path / 'rd.pt', ours, stage='blur'), '--network_second', 'blur')]:
        net = rd.load_network(str(path), flag, stage).eval()
        assert torch.equal(net(x, sigma), ours(x, sigma)), path
    with pytest.raises(UserError, match='stage-two'):
        rd.load_network(snapshot(tmp_path / 'one.pt', ours), '--network_second', 'blur')
    with pytest.raises(UserError, match='coordinate channels'):
        rd.load_network(snapshot(tmp_path / 'pd2.pt', ours, method='patch_diffusion', precond='PatchPrecond'),
                        '--network_first', 'edm')
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(UserError, match='junk.pt'):
        rd.load_network(str(tmp_path / 'junk.pt'), '--network_first', 'edm')

def test_snapshots_of_the_old_layout_load(tmp_path):
    """The keys relay_diffusion.py snapshots and training states had before the shared snapshot loader (method,
    args, cur_nimg, precond, net_kwargs, stage, ema; a state adds net, optimizer, scaler, step, data_pos), and
    older files without 'stage' (stage one)."""
    net = tiny_net(3)
    kwargs = dict(img_resolution=8, img_channels=3, label_dim=0) | TINY_UNET
    stage = dict(precond='blur', up_scale=2, prob_length=0.93, blur_sigma_max=3.0, block_scale=0.15,
                 paper_noise_norm=False)
    old = dict(method='relay_diffusion', args=dict(precond='blur', up_scale=2), cur_nimg=12, precond='EDMPrecond',
               net_kwargs=kwargs, stage=stage, ema=net.state_dict())
    save_checkpoint(old, tmp_path / 'snapshot.pt')
    save_checkpoint(dict(old, net=net.state_dict(), optimizer={}, scaler={}, step=3, data_pos=[12]),
                    tmp_path / 'state.pt')
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 2.0])
    for name in ('snapshot.pt', 'state.pt'):
        loaded = rd.load_network(str(tmp_path / name), '--network_second', 'blur')
        assert loaded.stage == stage and torch.equal(loaded.eval()(x, sigma), net(x, sigma))
    save_checkpoint({k: v for k, v in old.items() if k != 'stage'}, tmp_path / 'older.pt')
    assert rd.load_network(str(tmp_path / 'older.pt'), '--network_first', 'edm').stage == dict(precond='edm')
    with pytest.raises(UsageError, match='--network_second=.*older.pt: a --precond=edm network'):
        rd.load_network(str(tmp_path / 'older.pt'), '--network_second', 'blur')

#------------------------------------------------------------------------------
# Generation: per-seed images independent of batching, through both stages and from --indir (check 8).

def pngs(folder):
    return {os.path.basename(p): np.array(PIL.Image.open(p)) for p in sorted(glob.glob(f'{folder}/*.png'))}

def test_generation_is_per_seed_in_both_stages_and_with_indir(tmp_path):
    first = snapshot(tmp_path / 'a.pt', tiny_net(1, 4))
    second = snapshot(tmp_path / 'b.pt', tiny_net(2, 8), stage='blur')
    common = ['generate', '--seeds=0-3', f'--network_first={first}', f'--network_second={second}',
              '--up_scale_second=2', '--num_steps_first=6', '--num_steps_second=12']
    out = {}
    for stages, batch, extra in [('both', 4, []), ('both', 3, []), ('first', 4, []),
                                 ('second', 4, [f'--indir={tmp_path}/first-4']),
                                 ('second', 1, [f'--indir={tmp_path}/first-4'])]:
        name = f'{stages}-{batch}'
        run(common + [f'--sampler_stages={stages}', f'--batch={batch}', f'--outdir={tmp_path}/{name}'] + extra)
        out[name] = pngs(tmp_path / name)
    assert len(out['both-4']) == 4 and all(im.shape == (8, 8, 3) for im in out['both-4'].values())
    for a, b in [('both-4', 'both-3'), ('second-4', 'second-1')]:
        assert all(np.array_equal(out[a][k], out[b][k]) for k in out[a]), (a, b)
    assert not np.array_equal(out['both-4']['000000.png'], out['both-4']['000001.png'])
    with pytest.raises(UserError, match='--indir'):
        run(common + ['--sampler_stages=second', f'--outdir={tmp_path}/x', f'--indir={tmp_path}/nowhere'])
    run(common + ['--sampler_stages=first', '--enhance=imagenet', f'--outdir={tmp_path}/enhanced'])  # brightened
    bright = lambda im: np.array(PIL.ImageEnhance.Brightness(PIL.Image.fromarray(im)).enhance(1.06))
    assert all(np.array_equal(pngs(tmp_path / 'enhanced')[k], bright(out['first-4'][k])) for k in out['first-4'])

def test_presets_are_the_official_runs_and_flags_win():
    """One name, one official run: `train --preset` its README command, `generate --preset` its generate_*.py."""
    a = parse_command_line(rd.build_parser, ['generate', '--preset=imagenet256', '--outdir=x', '--rho_second=50'])
    assert (a.num_steps_first, a.S_churn, a.S_noise, a.num_steps_second, a.rho_second,
            a.cfg_scale_second) == (256, 40, 1.003, 200, 50, 3.5)
    assert a.seeds[0] == 10000 and len(a.seeds) == 50000 and a.enhance == 'none' and a.batch == 64
    c = parse_command_line(rd.build_parser, ['generate', '--preset=celebahq256', '--outdir=x'])
    assert (c.num_steps_first, c.sde_scale_first, c.num_steps_second, c.truncation_sigma_second, c.truncation_t_second,
            c.blur_sigma_max_second, len(c.seeds)) == (120, 0.05, 150, 0.95, 1.05, 2.0, 30000)
    t = parse_command_line(rd.build_parser, ['train', '--preset=imagenet256', '--data=demo', '--batch=64'])
    assert (t.precond, t.prob_length, t.blur_sigma_max, t.label_dropout, t.batch) == ('blur', 0.93, 3.0, 0.1, 64)
    assert not hasattr(t, 'num_steps_second') and not hasattr(a, 'prob_length')

#------------------------------------------------------------------------------
# Training: resume equals the uninterrupted run; 2-process DDP gradient equals 1 process; torchrun two-stage run.

def final_weights(folder):
    last = max(glob.glob(f'{folder}/training-state-*.pt'), key=lambda p: load_checkpoint(p)['cur_nimg'])
    state = load_checkpoint(last)
    return state['cur_nimg'], state['net'], state['ema']

def run_cli(monkeypatch, capsys, argv):
    return run_main(rd, monkeypatch, capsys, argv)

def test_resume_of_stage_two_without_its_flags_continues_stage_two(tmp_path, monkeypatch, capsys):
    """`--resume` of a stage-two state with --precond=blur (and its settings) left out: the state's options, so the
    resumed run is still stage two and ends with the uninterrupted run's weights."""
    flags = ['train', '--data=demo-8', '--precond=blur', '--up-scale=2', '--batch=4', '--duration=0.000016',
             '--tick=0.004', '--snap=0', '--dump=2', '--nosubdir'] + TINY
    run(flags + [f'--outdir={tmp_path}/full'])
    states = sorted(glob.glob(f'{tmp_path}/full/training-state-*.pt'), key=lambda p: load_checkpoint(p)['cur_nimg'])
    middle = [p for p in states if load_checkpoint(p)['cur_nimg'] == 12]
    assert middle, [load_checkpoint(p)['cur_nimg'] for p in states]
    code, err = run_cli(monkeypatch, capsys, ['train', f'--resume={middle[0]}', f'--outdir={tmp_path}/resumed'])
    assert code == 0, err
    resumed, = (tmp_path / 'resumed').iterdir()  # --outdir branches: a new numbered run directory in it
    (n1, net1, ema1), (n2, net2, ema2) = final_weights(tmp_path / 'full'), final_weights(resumed)
    assert n1 == n2 == 16
    assert all(torch.equal(net1[k], net2[k]) and torch.equal(ema1[k], ema2[k]) for k in net1)
    snapshot = load_checkpoint(max(glob.glob(f'{resumed}/network-snapshot-*.pt')))
    assert snapshot['stage'] == dict(precond='blur', up_scale=2, prob_length=0.93, blur_sigma_max=3.0,
                                     block_scale=0.15, paper_noise_norm=False)
    assert rd.load_network(max(glob.glob(f'{resumed}/network-snapshot-*.pt')), '--network_second',
                           'blur').stage['precond'] == 'blur'

def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

def _blur_loss_grad(net, model, images, seed, per_gpu):
    torch.manual_seed(seed)  # the per-rank randomness of one training step
    loss = rd.BlurLoss(up_scale=2)(model, images)
    (loss.sum() / per_gpu).backward()
    return [p.grad.clone() for p in net.parameters()]

def _ddp_worker(rank, world_size, port, images, out):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world_size)
    net = tiny_net(0).train()
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    half = images.shape[0] // world_size
    grads = _blur_loss_grad(net, ddp, images[rank * half:(rank + 1) * half], 10 + rank, half)
    torch.save(grads, f'{out}/grad{rank}.pt')
    dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown, which torch 2.13's gloo threads can abort (docs/testing.md)

def test_ddp_two_processes_equal_one(tmp_path):
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mp.start_processes(_ddp_worker, args=(2, _free_port(), images, str(tmp_path)), nprocs=2, start_method='spawn')
    net = tiny_net(0).train()
    halves = [_blur_loss_grad(net, net, images[2 * r:2 * r + 2], 10 + r, 2) for r in range(2)]
    whole = [g / 2 for g in halves[1]]  # .grad accumulated g0 + g1 over both halves; DDP averages them
    scale = max(g.abs().max().item() for g in whole)
    for rank in range(2):
        grads = torch.load(tmp_path / f'grad{rank}.pt')
        assert all(torch.allclose(g, w, atol=1e-5 * scale, rtol=1e-4) for g, w in zip(grads, whole))

# relay_diffusion.py commands one after the other in one torchrun launch (one start of its ranks for train and
# generate): all but the last in the process group that the last one, through main(), leaves (gloo ranks cannot meet
# twice).
RELAY_COMMANDS = """
import json, sys
import torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import relay_diffusion as rd
from common import parse_command_line
*first, last = json.loads(sys.argv[2])
for argv in first:
    args = parse_command_line(rd.build_parser, argv)
    (rd.train if args.command == 'train' else rd.generate)(args)
    dist.barrier()  # the command has ended on every rank (rank 0 has written its files)
sys.argv = ['relay_diffusion.py'] + last
rd.main()
"""

def test_two_stage_cli_under_torchrun(tmp_path):
    """Stage one (EDM, with augmentation) in one process, stage two (blur, labels, label dropout) and two-stage
    generation with CFG under torchrun with 2 ranks; 2-rank generation writes the same files as 1 rank."""
    flags = ['train', '--batch=4', '--duration=0.000008', '--tick=0.004', '--snap=1', '--dump=0', '--nosubdir'] + TINY
    run(flags + ['--data=demo-4', '--cond=1', '--augment=0.2', f'--outdir={tmp_path}/one'])
    first = max(glob.glob(f'{tmp_path}/one/network-snapshot-*.pt'))
    two = ['--data=demo-8', '--cond=1', '--precond=blur', '--up-scale=2', '--label-dropout=0.5',
           f'--outdir={tmp_path}/two']
    second = f'{tmp_path}/two/network-snapshot-000000_008.pt'  # the last tick's: kimg 0.008
    gen = ['generate', '--seeds=0-4', '--batch=2', f'--network_first={first}', f'--network_second={second}',
           '--up_scale_second=2', '--num_steps_first=4', '--num_steps_second=10', '--cfg_scale_second=2']
    (tmp_path / 'commands.py').write_text(RELAY_COMMANDS)
    commands = [flags + two, gen + [f'--outdir={tmp_path}/gen2']]
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        str(tmp_path / 'commands.py'), str(ROOT), json.dumps(commands)],
                       env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert second == max(glob.glob(f'{tmp_path}/two/network-snapshot-*.pt'))
    assert load_checkpoint(first)['net_kwargs']['augment_dim'] == 9
    assert load_checkpoint(second)['stage']['precond'] == 'blur'
    run(gen + [f'--outdir={tmp_path}/gen1'])
    two, one = pngs(tmp_path / 'gen2'), pngs(tmp_path / 'gen1')
    assert len(one) == 5 and one.keys() == two.keys() and all(np.array_equal(one[k], two[k]) for k in one)

#------------------------------------------------------------------------------
# train --metrics (issue 22): the numbers of generate + fid.py score for every snapshot, in StyleGAN's
# metric-<name>.jsonl; stage two relays the samples of --metrics-first.

METRIC_NET = ['--arch=ddpmpp', '--cbase=8', '--cres=1', '--blocks=1', '--dropout=0', '--lr-rampup=0', '--grid=0',
              '--workers=0', '--batch=4', '--tick=0.004', '--snap=1', '--dump=0', '--nosubdir']

def printed(value):
    """`fid.py score` prints 6 significant digits: equal to float precision is equal as printed."""
    return float(f'{value:.6g}')

def metric_lines(run, count):
    lines = [json.loads(line) for line in open(run / 'metric-toy_fd.jsonl')]
    snapshots = sorted(p.name for p in run.glob('network-snapshot-*.pt'))
    assert [line['snapshot_pkl'] for line in lines] == snapshots and len(snapshots) == count
    assert all(set(line) >= {'results', 'metric', 'total_time', 'num_gpus', 'snapshot_pkl', 'timestamp', 'kimg'}
               and line['metric'] == 'toy_fd' and line['num_gpus'] == 1 for line in lines)
    return lines

def few_demo_masks(monkeypatch):
    """fid.py score's demo_fit, not compared here: 1,000 shape draws, not 100,000 (~5 CPU s a score)."""
    demo_masks = fid.demo_masks
    monkeypatch.setattr(fid, 'demo_masks', lambda R: demo_masks(R, draws=1000))

def test_stage_one_metrics_equal_generate_then_fid_score(tmp_path, toy_cache, capsys, monkeypatch):
    """--metrics=toy_fd --snap=1: one line per snapshot, whose value is what `generate --sampler_stages=first
    --seeds=0-99` of that snapshot and `fid.py score --num=100` print (toy_fd's 500 images monkeypatched to 100, for
    time: the code path is the same for any number)."""
    monkeypatch.setitem(TRAINING_METRICS, 'toy_fd', 100)
    few_demo_masks(monkeypatch)
    folder = tmp_path / 'run'
    train_run(['--data=demo-8', '--duration=0.000012', '--metrics=toy_fd', f'--metrics-cache={toy_cache}',
               f'--outdir={folder}'])
    lines = metric_lines(folder, 2)  # ticks 1 and 2
    assert [line['kimg'] for line in lines] == [0.008, 0.012]
    gen = tmp_path / 'gen'
    generate_run(['--sampler_stages=first', f'--network_first={folder / lines[-1]["snapshot_pkl"]}',
                  f'--outdir={gen}', '--seeds=0-99', '--batch=250'])
    assert fid_score(gen, toy_cache, capsys, num=100)['toy_fd'] == printed(lines[-1]['results']['toy_fd'])
    best = min(lines, key=lambda line: line['results']['toy_fd'])
    assert f'best so far {best["results"]["toy_fd"]:.4g} at {best["snapshot_pkl"]}' in (folder / 'log.txt').read_text()

def test_stage_two_metrics_relay_metrics_first_as_generate_does(tmp_path, toy_cache, capsys, monkeypatch):
    """Stage two's toy_fd is that of generate's two-stage samples (its default settings, --up_scale_second =
    --up-scale) with --metrics-first as the first stage: a snapshot, or a run directory (its newest snapshot).
    toy_fd on 100 images, as above."""
    monkeypatch.setitem(TRAINING_METRICS, 'toy_fd', 100)
    few_demo_masks(monkeypatch)
    first = tmp_path / 'first'
    first.mkdir()
    snapshot(first / 'network-snapshot-000001.pt', tiny_net(1, 4))
    folder = tmp_path / 'run'
    train_run(['--data=demo-8', '--precond=blur', '--up-scale=2', '--duration=0.000008', '--metrics=toy_fd',
               f'--metrics-first={first}', f'--metrics-cache={toy_cache}', f'--outdir={folder}'])
    lines = metric_lines(folder, 1)
    gen = tmp_path / 'gen'
    generate_run([f'--network_first={first}', f'--network_second={folder / lines[-1]["snapshot_pkl"]}',
                  '--up_scale_second=2', f'--outdir={gen}', '--seeds=0-99', '--batch=250'])
    assert fid_score(gen, toy_cache, capsys, num=100)['toy_fd'] == printed(lines[-1]['results']['toy_fd'])

def train_run(argv):
    run(['train'] + METRIC_NET + argv)

def generate_run(argv):
    run(['generate'] + argv)

def test_generate_grid_goes_beside_outdir_with_up_to_64_pairs(tmp_path, monkeypatch, relay_files):
    """--grid=NAME.png: beside --outdir (fid.py reads --outdir), never the working directory; 8 samples per row,
    each row of upsampled stage-one images above its relayed row, black cells after the last sample."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / 'out' / 'gen'
    generate_run([f'--network_first={relay_files["first"]}', f'--network_second={relay_files["second"]}',
                  '--up_scale_second=2', '--num_steps_first=2', '--num_steps_second=6', '--seeds=0-9',
                  f'--outdir={out}', '--grid=relay_grid.png'])
    assert sorted(os.listdir(tmp_path)) == ['out'] and sorted(os.listdir(tmp_path / 'out')) == ['gen', 'relay_grid.png']
    grid = np.array(PIL.Image.open(tmp_path / 'out' / 'relay_grid.png'))
    assert grid.shape == (4 * 8, 8 * 8, 3)  # 10 samples: 2 rows of pairs
    first_up = np.array(PIL.Image.open(out / '000000.png'))
    assert np.array_equal(grid[8:16, :8], first_up) and grid[24:, 16:].max() == 0

#------------------------------------------------------------------------------
# Bad input through the real command line: one line on stderr naming the flag, exit 2 for usage errors and 1 for
# run-time failures, no traceback, nothing written.

TRAIN = ['train', '--data=demo-8', '--batch=4', '--duration=0.000008', '--tick=0.004', '--nosubdir'] + TINY

@pytest.fixture(scope='module')
def relay_files(tmp_path_factory):
    """A stage-two training state and snapshot, stage-one / stage-two / masked_dm / gdd snapshots."""
    out = tmp_path_factory.mktemp('relay_files')
    run(TRAIN + ['--precond=blur', '--up-scale=2', f'--outdir={out / "two"}'])
    state = max(glob.glob(f'{out}/two/training-state-*.pt'))
    save_checkpoint(dict(load_checkpoint(state), method='masked_dm'), out / 'masked-state.pt')
    return dict(state=state, masked_state=str(out / 'masked-state.pt'),
                snap=max(glob.glob(f'{out}/two/network-snapshot-*.pt')),
                first=snapshot(out / 'first.pt', tiny_net(1, 4)),
                second=snapshot(out / 'second.pt', tiny_net(2, 8), stage='blur'),
                masked=snapshot(out / 'masked.pt', tiny_net(1, 4), method='masked_dm'),
                gdd=snapshot(out / 'gdd.pt', tiny_net(1, 4), method='gdd'), **hostile_files(out))

def hostile_files(out):
    """A raw pickle (.pkl and .pt), a truncated snapshot, an empty file, a snapshot with NaN weights."""
    for name in ('raw.pkl', 'raw.pt'):
        with open(out / name, 'wb') as f:
            pickle.dump({'a': [1, 2], 'z': complex(1, 2)}, f)
    whole = open(snapshot(out / 'whole.pt', tiny_net(1, 4)), 'rb').read()
    (out / 'truncated.pt').write_bytes(whole[:len(whole) // 2])
    (out / 'empty.pt').write_bytes(b'')
    nan = tiny_net(1, 4)
    with torch.no_grad():
        next(nan.parameters()).fill_(float('nan'))
    return dict(raw_pkl=str(out / 'raw.pkl'), raw_pt=str(out / 'raw.pt'), truncated=str(out / 'truncated.pt'),
                empty=str(out / 'empty.pt'), nan=snapshot(out / 'nan.pt', nan))

TRAIN_CASES = [  # (argv after TRAIN, exit code, words the one line must contain)
    (['--batch=-4'], 2, ['--batch', '-4', '>= 1']),
    (['--batch=6', '--batch-gpu=4'], 2, ['--batch=6', 'multiple']),
    (['--preset=bogus'], 2, ['--preset', 'bogus', 'celebahq256']),
    (['--lr=-1'], 2, ['--lr', '-1', '> 0']),
    (['--augment=1.5'], 2, ['--augment', '1.5', '<= 1']),
    (['--label-dropout=0.5'], 2, ['--label-dropout', '--cond=1']),
    (['--eff-attn=maybe'], 2, ['--eff-attn', 'maybe']),
    (['--precond=blur', '--up-scale=3'], 2, ['--up-scale=3', '8x8']),
    (['--up-scale=0'], 2, ['--up-scale', '>= 1']),
    (['--prob-length=1.5'], 2, ['--prob-length', '<= 1']),
    (['--prob-length=0'], 2, ['--prob-length', '> 0']),
    (['--block-scale=-0.1'], 2, ['--block-scale', '>= 0']),
    (['--blocks=0'], 2, ['--blocks', '>= 1']),
    (['--cres=1,2,2,2,2'], 2, ['--cres=1,2,2,2,2', 'divisible by 16']),
    (['--data=missing.zip'], 2, ['missing.zip']),
    (['--outdir={file}'], 2, ['--outdir', 'not a folder']),
    (['--resume=missing.pt'], 2, ['--resume', 'missing.pt']),
    (['--resume={state}', '--cbase=32'], 2, ['--cbase=32 given, 16 in the training state']),
    (['--resume={state}', '--precond=edm'], 2, ['--precond=edm given, blur in the training state']),
    (['--resume={snap}'], 2, ['network snapshot, not a training state']),
    # hostile numbers (issue 24): non-finite, out of range, sizes that cannot fit, a run that means nothing
    (['--block-scale=inf'], 2, ['--block-scale', 'not a finite number']),
    (['--block-scale=1e30'], 2, ['--block-scale', '<= 10']),
    (['--blur-sigma-max=0'], 2, ['--blur-sigma-max', '> 0']),
    (['--blur-sigma-max=nan'], 2, ['--blur-sigma-max', 'not a finite number']),
    (['--precond=blur', '--up-scale=1'], 2, ['--up-scale=1', 'neither blurs nor relays']),
    (['--up-scale=99999999999'], 2, ['--up-scale', '<= 256']),
    (['--cres=0,2'], 2, ['--cres', '1 to 64']),
    (['--blocks=100000'], 2, ['--blocks', '<= 64']),
    (['--cbase=4096', '--cres=64,64'], 2, ['parameters', 'GiB', '--cbase']),
    (['--grid=1e9'], 2, ['--grid', 'expected an integer']),
    # hostile paths: another method's state, a raw pickle, an empty file
    (['--resume={masked_state}'], 2, ['--resume', 'a masked_dm.py training state']),
    (['--resume={raw_pt}'], 2, ['--resume', 'raw.pt', 'not a checkpoint']),
    (['--resume={empty}'], 2, ['--resume', 'empty.pt', 'not a checkpoint']),
    # train --metrics (issue 22): refused before anything is written
    (['--metrics=bogus'], 2, ['--metrics', 'bogus']),
    (['--metrics=fid10k_full'], 2, ['--metrics-ref']),
    (['--metrics=fid10k_full', '--metrics-ref=missing.npz'], 2, ['missing.npz']),
    (['--precond=blur', '--up-scale=2', '--metrics=toy_fd'], 2, ['--metrics=toy_fd', '--metrics-first']),
    (['--metrics-first={first}'], 2, ['--metrics-first', 'only stage two']),
    (['--precond=blur', '--up-scale=2', '--metrics=toy_fd', '--metrics-first={second}'], 2,
     ['--metrics-first', 'stage-one']),
    (['--precond=blur', '--up-scale=4', '--metrics=toy_fd', '--metrics-first={first}'], 2,
     ['--metrics-first', '4x4x3', 'x4 = 16', 'trains 8x8x3']),
    (['--precond=blur', '--up-scale=2', '--metrics=toy_fd', '--metrics-first={gdd}'], 2, ['--metrics-first', 'gdd.py']),
    (['--precond=blur', '--up-scale=2', '--metrics=toy_fd', '--metrics-first={raw_pkl}'], 2,
     ['--metrics-first', 'raw.pkl', 'official network']),
    (['--precond=blur', '--up-scale=2', '--metrics=toy_fd', '--metrics-first={nan}'], 2,
     ['--metrics-first', 'nan.pt', 'NaN']),
]

@pytest.mark.parametrize('argv, code, words', TRAIN_CASES, ids=[' '.join(c[0]) for c in TRAIN_CASES])
def test_train_errors_are_one_line_and_leave_nothing(tmp_path, monkeypatch, capsys, relay_files, argv, code, words):
    (tmp_path / 'file').write_text('a file, not a folder')
    argv = [a.format(file=tmp_path / 'file', **relay_files) for a in argv]
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob('*'))
    out = [] if any(a.startswith('--outdir') for a in argv) else [f'--outdir={tmp_path / "runs"}']
    got, err = run_cli(monkeypatch, capsys, TRAIN + out + argv)
    assert got == code and err.count('\n') == 1 and 'Traceback' not in err, err
    assert all(w in err for w in words), err
    assert sorted(p.name for p in tmp_path.rglob('*')) == before  # no run directory, no temp file

GENERATE_CASES = [  # (argv after the base command, exit code, words the one line must contain)
    (['--num_steps_second=-3'], 2, ['--num_steps_second', '-3', '>= 1']),
    (['--num_steps_first=0'], 2, ['--num_steps_first', '>= 1']),
    (['--truncation_sigma_second=0.001'], 2, ['--truncation_sigma_second=0.001']),
    (['--seeds=5-1'], 2, ['--seeds', 'empty range']),
    (['--batch=0'], 2, ['--batch', '>= 1']),
    (['--class=5'], 2, ['--class=5', '0 classes']),
    (['--cfg_scale_second=2'], 2, ['--cfg_scale_second=2', 'class-conditional']),
    (['--s_noise_second=1.5'], 2, ['--s_noise_second', '<= 1']),
    (['--sde_scale_first=2'], 2, ['--sde_scale_first', '<= 1']),
    (['--preset=celebahq64'], 2, ['--preset', 'celebahq64']),
    (['--up_scale_second=4'], 2, ['--up_scale_second=4', 'trained at 8']),
    (['--outdir={file}'], 2, ['--outdir', 'not a folder']),
    (['--grid={tmp}/grid.jpg'], 2, ['--grid', '.png']),
    (['--network_first={second}'], 2, ['--network_first', 'stage-one']),
    (['--network_first={snap}'], 2, ['--network_first', 'stage-one']),
    (['--network_second={first}'], 2, ['--network_second', 'stage-two']),
    (['--network_first={masked}'], 2, ['--network_first', 'masked_dm.py']),
    (['--network_second={gdd}'], 2, ['--network_second', 'gdd.py']),
    (['--network_first={file}'], 2, ['--network_first', 'neither one of our snapshots']),
    (['--network_second=missing.pt'], 2, ['--network_second', 'missing.pt', 'no such']),
    (['--sampler_stages=second'], 2, ['--indir']),
    (['--sampler_stages=second', '--indir={file}'], 2, ['--indir', 'not a folder']),
    (['--sampler_stages=second', '--indir={tmp}'], 2, ['--indir', 'no image for seed 0']),
    (['--sampler_stages=second', '--indir={tmp}', '--seeds=7'], 2, ['--indir', '000007.png is 3x3', 'takes 4x4']),
    # hostile numbers (issue 24)
    (['--truncation_t_second=1.5'], 2, ['--truncation_t_second', '<= 1.1']),
    (['--num_steps_second=18', '--truncation_t_second=0.5'], 2, ['--truncation_t_second=0.5', 'u = 1.637 > 1']),
    (['--sigma_max_second=1e400'], 2, ['--sigma_max_second', 'not a finite number']),
    (['--sigma_min_first=100'], 2, ['--sigma_min_first=100', 'below --sigma_max_first=80']),
    (['--S_min=5', '--S_max=1'], 2, ['--S_min=5', 'below --S_max=1']),
    (['--blur_sigma_max_second=0'], 2, ['--blur_sigma_max_second', '> 0']),
    (['--cfg_scale_first=inf'], 2, ['--cfg_scale_first', 'not a finite number']),
    (['--num_steps_first=99999999'], 2, ['--num_steps_first', '<= 100000']),
    # hostile paths: truncated (one line), raw pickles, empty, NaN weights, a folder, the wrong grid path
    (['--network_first={truncated}'], 2, ['--network_first', 'truncated.pt', 'neither']),
    (['--network_first={raw_pkl}'], 2, ['--network_first', 'raw.pkl', 'official network']),
    (['--network_second={raw_pt}'], 2, ['--network_second', 'raw.pt']),
    (['--network_first={empty}'], 2, ['--network_first', 'empty.pt']),
    (['--network_first={nan}'], 2, ['--network_first', 'nan.pt', 'NaN']),
    (['--network_second={tmp}'], 2, ['--network_second', 'a folder without network-snapshot']),
    (['--grid={file}/grid.png'], 2, ['--grid', 'not a folder']),
]

@pytest.mark.parametrize('argv, code, words', GENERATE_CASES, ids=[' '.join(c[0]) for c in GENERATE_CASES])
def test_generate_errors_are_one_line_and_leave_nothing(tmp_path, monkeypatch, capsys, relay_files, argv, code, words):
    (tmp_path / 'file').write_text('a file, not a folder')
    PIL.Image.new('RGB', (3, 3)).save(tmp_path / '000007.png')  # a stage-one image of the wrong size
    argv = [a.format(file=tmp_path / 'file', tmp=tmp_path, **relay_files) for a in argv]
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob('*'))
    base = ['generate', f'--network_first={relay_files["first"]}', f'--network_second={relay_files["second"]}',
            '--up_scale_second=2', '--num_steps_first=2', '--num_steps_second=6', '--seeds=0-1']
    out = [] if any(a.startswith('--outdir') for a in argv) else [f'--outdir={tmp_path / "gen"}']
    got, err = run_cli(monkeypatch, capsys, base + out + argv)
    assert got == code and err.count('\n') == 1 and 'Traceback' not in err, err
    assert all(w in err for w in words), err
    assert sorted(p.name for p in tmp_path.rglob('*')) == before
