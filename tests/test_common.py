"""common.py: EDM equations against independent formulas, the sampler against a closed-form ODE, training
plumbing, data, checkpoints and DDP. Parameter counts and layer checks live in test_networks.py."""
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TINY_UNET, write_images

import common
from common import (EDMLoss, EDMPrecond, ImageFolderDataset, InfiniteSampler, PerSeedRNG, UserError, edm_sampler,
                    edm_time_steps, ema_beta, learning_rate, load_checkpoint, open_dataset, parse_bool,
                    parse_int_list, save_checkpoint, seed_batches, split_batch, to_uint8)

SIGMAS = [0.002, 0.5, 1.0, 80.0]

def tiny_precond(**kwargs):
    torch.manual_seed(0)
    return EDMPrecond(img_resolution=8, img_channels=3, **(TINY_UNET | kwargs))

#------------------------------------------------------------------------------
# Preconditioning (EDM Table 1) and loss.

def test_edm_table1_preconditioning():
    net = tiny_precond()
    sigma = torch.tensor(SIGMAS).reshape(-1, 1, 1, 1)
    c_skip, c_out, c_in, c_noise = [c.flatten().double() for c in net.coefficients(sigma)]
    for k, s in enumerate(SIGMAS):  # independent float64 formulas, sigma_data = 0.5
        assert c_skip[k] == pytest.approx(0.25 / (s * s + 0.25), rel=1e-6)
        assert c_out[k] == pytest.approx(s * 0.5 / math.sqrt(s * s + 0.25), rel=1e-6)
        assert c_in[k] == pytest.approx(1 / math.sqrt(s * s + 0.25), rel=1e-6)
        assert c_noise[k] == pytest.approx(math.log(s) / 4, rel=1e-6, abs=1e-7)
    # EDM Table 1 evaluated by hand.
    assert c_skip[3] == pytest.approx(3.9061e-5, rel=1e-4) and c_out[0] == pytest.approx(0.001999984, rel=1e-6)
    assert c_noise[3] == pytest.approx(1.0955067, rel=1e-6) and c_in[1] == pytest.approx(1.4142136, rel=1e-6)

def test_edm_loss_weight_times_c_out_squared_is_one():
    loss, net = EDMLoss(), tiny_precond()
    torch.manual_seed(0)
    sigma, weight = loss.sigma_and_weight(1000, 'cpu')
    _, c_out, _, _ = net.coefficients(sigma)
    assert torch.allclose(weight * c_out ** 2, torch.ones_like(weight), rtol=1e-5)
    assert weight[sigma.flatten().argmax()].item() > 4  # lambda(80) = 4.00016, lambda grows as sigma falls
    # ln(sigma) ~ N(-1.2, 1.2^2)
    assert sigma.log().mean().item() == pytest.approx(-1.2, abs=0.1) and sigma.log().std().item() == pytest.approx(1.2, abs=0.1)

def test_edm_precond_denoiser_is_identity_as_sigma_goes_to_zero():
    net = tiny_precond().eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        err = [(net(x, torch.full([2], s)) - x).abs().max().item() for s in (1e-2, 1e-4, 1e-6)]
    assert err[1] < err[0] / 10 and err[2] < 1e-4

def test_edm_training_target_has_unit_variance():
    """(y - c_skip (y + n)) / c_out, the effective target of F, has unit std for data of std sigma_data."""
    net, g = tiny_precond(), torch.Generator().manual_seed(0)
    for s in SIGMAS:
        y = torch.randn(100_000, generator=g, dtype=torch.float64) * 0.5
        n = torch.randn(100_000, generator=g, dtype=torch.float64) * s
        c_skip, c_out, _, _ = net.coefficients(torch.tensor(s, dtype=torch.float64))
        assert ((y - c_skip * (y + n)) / c_out).std().item() == pytest.approx(1.0, abs=0.01)

def test_edm_loss_starts_near_one_with_a_zero_backbone():
    net = tiny_precond()
    net.model.dec['8x8_aux_conv'].weight.data.zero_()
    net.model.dec['8x8_aux_conv'].bias.data.zero_()
    torch.manual_seed(0)
    images = torch.randn(256, 3, 8, 8) * 0.5
    with torch.no_grad():
        loss = EDMLoss()(net, images)
    assert loss.shape == images.shape and loss.dtype == torch.float32
    assert loss.mean().item() == pytest.approx(1.0, abs=0.05)

def test_precond_under_bf16_autocast_returns_float32_close_to_fp32():
    net = tiny_precond().eval()
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 3.0])
    with torch.no_grad():
        ref = net(x, sigma)
        net.amp_dtype = torch.bfloat16
        low = net(x, sigma)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert (low - ref).abs().max().item() < 0.05 * ref.abs().max().item()

def test_overfit_fixed_noise_and_sigma():
    """100 Adam steps on 4 images with fixed noise and sigma bring the loss below a tenth of its start (it is below a
    thousandth by then; 200 steps add nothing)."""
    net = tiny_precond()
    torch.manual_seed(0)
    images, noise = torch.rand(4, 3, 8, 8) - 0.5, torch.randn(4, 3, 8, 8)
    sigma = torch.full([4, 1, 1, 1], 0.5)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    losses = []
    for _ in range(100):
        loss = ((net(images + sigma * noise, sigma) - images) ** 2).mean() * 8  # lambda(0.5) = 8
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]

#------------------------------------------------------------------------------
# Sampler (EDM Eq. 5, Algorithm 2).

def test_edm_eq5_time_steps():
    t18 = [80, 57.586, 40.7856, 28.3746, 19.3525, 12.9101, 8.40094, 5.31519, 3.25682, 1.92334, 1.08817, 0.585348,
           0.296442, 0.139516, 0.0599473, 0.0229345, 0.00752802, 0.002, 0]
    assert np.allclose(edm_time_steps(18).numpy(), t18, rtol=1e-5)
    t40 = edm_time_steps(40).numpy()
    assert len(t40) == 41 and t40[1] == pytest.approx(69.4509, rel=1e-5) and t40[-3] == pytest.approx(0.00367659, rel=1e-5)
    assert edm_time_steps(18, sigma_min=0.02)[1].item() == pytest.approx(59.7503, rel=1e-5)  # VE range

def test_edm_sampler_matches_gaussian_ode():
    sigma_data, sigma_max = 0.5, 80.0
    denoise = lambda x, sigma, labels=None: x * sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    z = torch.randn(64, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = z * sigma_max * sigma_data / (sigma_max ** 2 + sigma_data ** 2) ** 0.5
    err = [(edm_sampler(denoise, z, num_steps=n) - exact).abs().max().item() for n in (16, 32, 64)]
    assert err[1] < err[0] / 3 and err[2] < err[1] / 3 and err[2] < 2e-2
    # Ratios x_N / z for the deterministic sampler (computed once with EDM's own sampler).
    ones = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    assert edm_sampler(denoise, ones, num_steps=18).item() == pytest.approx(0.5276246370, rel=1e-8)
    assert edm_sampler(denoise, ones, num_steps=40).item() == pytest.approx(0.5048768647, rel=1e-8)

def test_edm_sampler_nfe_and_churn():
    calls = []
    def denoise(x, sigma, labels=None):
        calls.append(float(sigma))
        return x * 0.25 / (sigma ** 2 + 0.25)
    z = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    edm_sampler(denoise, z, num_steps=18)
    assert len(calls) == 35
    calls.clear()
    edm_sampler(denoise, z, num_steps=256, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)
    t = edm_time_steps(256).numpy()
    assert len(calls) == 511
    t_hat = np.array(calls[0::2])  # the first evaluation of each step is at t_hat
    churned = (t[:-1] >= 0.05) & (t[:-1] <= 50)
    assert churned.sum() == 191
    assert np.allclose(t_hat[churned] / t[:-1][churned], 1.15625) and np.allclose(t_hat[~churned], t[:-1][~churned])

def test_per_seed_images_do_not_depend_on_batching():
    net = tiny_precond(label_dim=0).eval()
    def sample(seeds):
        rng = PerSeedRNG(seeds, 'cpu')
        return edm_sampler(net, rng.randn([3, 8, 8]), None, rng.randn_like, num_steps=4, S_churn=10)
    together = sample(range(6))
    split = torch.cat([sample(range(4)), sample(range(4, 6))])
    assert torch.equal(together, split)
    # EDM's convention: the latent of seed s is torch.randn with a generator seeded with s.
    assert torch.equal(PerSeedRNG([0], 'cpu').randn([3, 2, 2])[0], torch.randn([3, 2, 2], generator=torch.Generator().manual_seed(0)))

def test_seed_batches_cover_every_seed_once():
    seeds = list(range(103))
    for world in (1, 2, 3):
        batches = [b for r in range(world) for b in seed_batches(seeds, 10, r, world)]
        assert sorted(s for b in batches for s in b) == seeds and max(len(b) for b in batches) <= 10

#------------------------------------------------------------------------------
# Training plumbing.

def test_ema_and_lr_ramp_values():
    expected = {0: 0.0, 100_000: 0.93148213, 1_000_000: 0.99292730, 10_000_000: 0.99929047, 50_000_000: 0.99929047}
    for n, beta in expected.items():
        assert ema_beta(n, 512, 500, 0.05) == pytest.approx(beta, abs=1e-8)
    assert ema_beta(10**9, 512, 500, 0.05) == pytest.approx(0.5 ** (512 / 500_000))  # independent: half-life formula
    assert learning_rate(1.0, 0) == 0 and learning_rate(1.0, 1_000_000) == pytest.approx(0.1)
    assert learning_rate(1.0, 10_000_000) == 1 and learning_rate(1.0, 30_000_000) == 1
    assert learning_rate(1.0, 0, rampup_kimg=0) == 1  # no ramp-up: the full lr from the first step

def test_update_ema_is_lerp():
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    before = [p.clone() for p in a.parameters()]
    common.update_ema(a, b, 0.9)
    for p_old, p_new, p_net in zip(before, a.parameters(), b.parameters()):
        assert torch.allclose(p_new, 0.9 * p_old + 0.1 * p_net)

def test_gradient_scrub_without_scaler():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([float('nan'), float('inf'), -float('inf')])
    opt = torch.optim.SGD([p], lr=1.0)
    common.optimizer_step(opt, torch.amp.GradScaler('cpu', enabled=False), lr=1e-5)
    assert torch.allclose(p.detach(), torch.tensor([0.0, -1.0, 1.0]))  # grads became 0, 1e5, -1e5

def test_split_batch_and_accumulation_equals_one_pass():
    assert split_batch(512, 32, 8) == (32, 2) and split_batch(64, None, 2) == (32, 1)
    with pytest.raises(UserError, match='--batch=100'):
        split_batch(100, 30, 2)
    net = tiny_precond()
    images = torch.randn(8, 3, 8, 8)
    sigma = torch.rand(8) + 0.1
    def grads(rounds):
        net.zero_grad()
        for chunk, s in zip(images.chunk(rounds), sigma.chunk(rounds)):
            (((net(chunk, s) - chunk) ** 2).sum() / 8).backward()
        return torch.cat([p.grad.flatten() for p in net.parameters()])
    assert torch.allclose(grads(1), grads(4), atol=1e-5, rtol=1e-4)

def test_parsers():
    assert parse_int_list('0-3,7') == [0, 1, 2, 3, 7] and parse_int_list('5') == [5]
    assert parse_bool('1') and parse_bool('True') and not parse_bool('0') and not parse_bool('false')

def test_to_uint8_matches_edm_rounding():
    assert to_uint8(torch.tensor([-1.0, 0.0, 1.0, 0.996, -2.0, 2.0])).tolist() == [0, 128, 255, 254, 0, 255]

#------------------------------------------------------------------------------
# Data.

def test_image_folder_dataset_zip_and_folder(image_folder, dataset_zip):
    raw = write_images(image_folder.parent / 'again')  # same seed: the same pixels as the fixture
    for path in (image_folder, dataset_zip):
        ds = ImageFolderDataset(str(path), use_labels=True, xflip=True)
        assert (len(ds), ds.resolution, ds.num_channels, ds.label_dim) == (32, 8, 3, 2)
        image, label = ds[3]
        assert image.dtype == np.uint8 and image.shape == (3, 8, 8) and label.tolist() == [0, 1]
        assert np.array_equal(image, raw[3].transpose(2, 0, 1))
        assert np.array_equal(ds[16 + 3][0], image[:, :, ::-1])  # flipped copy
    sub = ImageFolderDataset(str(dataset_zip), max_size=5, random_seed=1)
    assert len(sub) == 5 and list(sub.indices) == sorted(sub.indices)
    assert list(sub.indices) == list(ImageFolderDataset(str(dataset_zip), max_size=5, random_seed=1).indices)

def test_dataset_errors_name_the_problem(tmp_path, image_folder):
    with pytest.raises(UserError, match='no such dataset'):
        ImageFolderDataset(str(tmp_path / 'missing.zip'))
    with pytest.raises(UserError, match='images are 8x8, but resolution 64'):
        ImageFolderDataset(str(image_folder), resolution=64)
    (image_folder / 'img005.png').write_bytes(b'not a png')
    with pytest.raises(UserError, match='img005.png: cannot read image'):
        ImageFolderDataset(str(image_folder))                      # found when the dataset opens
    with pytest.raises(UserError, match='img005.png: cannot read image'):
        ImageFolderDataset(str(image_folder), check=False)[5]     # or, unchecked, when read
    write_images(tmp_path / 'nolabels', labels=False)
    with pytest.raises(UserError, match='no labels'):
        ImageFolderDataset(str(tmp_path / 'nolabels'), use_labels=True)
    (image_folder / 'dataset.json').write_text('{"labels": [["img000.png", 1]]}')
    with pytest.raises(UserError, match='no label for img001.png'):
        ImageFolderDataset(str(image_folder), use_labels=True)
    big = write_images(tmp_path / 'mixed', n=2)
    write_images(tmp_path / 'mixed2', n=1, res=16)
    os.replace(tmp_path / 'mixed2' / 'img000.png', tmp_path / 'mixed' / 'img999.png')
    with pytest.raises(UserError, match=r'img999.png: image is 16x16 RGB, the first is 8x8 RGB'):
        ImageFolderDataset(str(tmp_path / 'mixed'))
    with pytest.raises(UserError, match=r'img999.png: image is \(3, 16, 16\)'):
        ImageFolderDataset(str(tmp_path / 'mixed'), check=False)[2]
    assert big.shape[0] == 2

def test_demo_dataset_is_deterministic_at_any_resolution():
    for res in (8, 32, 64):
        ds = open_dataset(f'demo-{res}', use_labels=True)
        image, label = ds[7]
        assert image.shape == (3, res, res) and image.dtype == np.uint8 and label.sum() == 1
        assert np.array_equal(image, open_dataset(f'demo-{res}', use_labels=True)[7][0])
    ds = open_dataset('demo')
    assert ds.resolution == 32 and ds.label_dim == 0 and not np.array_equal(ds[0][0], ds[1][0])

def test_infinite_sampler_partitions_epochs_and_resumes():
    streams = [iter(InfiniteSampler(10, rank, 2, seed=3)) for rank in range(2)]
    epoch = [next(streams[r]) for _ in range(5) for r in range(2)]
    assert sorted(epoch) == list(range(10))  # the two ranks split each epoch
    full = [x for _, x in zip(range(23), InfiniteSampler(10, 1, 2, seed=3))]
    resumed = [x for _, x in zip(range(16), InfiniteSampler(10, 1, 2, seed=3, start=7))]
    assert resumed == full[7:]
    assert full != [x for _, x in zip(range(23), InfiniteSampler(10, 1, 2, seed=4))]

#------------------------------------------------------------------------------
# Checkpoints.

def test_checkpoint_round_trip_and_atomic_write(tmp_path, monkeypatch):
    net = tiny_precond()
    path = str(tmp_path / 'snap.pt')
    save_checkpoint(dict(ema=net.state_dict(), cur_nimg=5, args={'lr': 1e-3}), path)
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    assert ckpt['cur_nimg'] == 5 and all(torch.equal(v, net.state_dict()[k]) for k, v in ckpt['ema'].items())
    def broken_save(obj, f):
        open(f, 'wb').write(b'partial')
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, 'save', broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(dict(cur_nimg=6), path)
    assert load_checkpoint(path)['cur_nimg'] == 5  # the interrupted write left the old file intact
    with pytest.raises(UserError, match='no such checkpoint'):
        load_checkpoint(str(tmp_path / 'nope.pt'))

#------------------------------------------------------------------------------
# DDP: two gloo processes on halves of a batch give the one-process gradient on the whole batch.

def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

def _ddp_worker(rank, world_size, port, images, sigma, out_dir):
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world_size)
    net = tiny_precond()
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    half = images.shape[0] // world_size
    mine = slice(rank * half, (rank + 1) * half)
    (((ddp(images[mine], sigma[mine]) - images[mine]) ** 2).sum() / half).backward()
    torch.save([p.grad for p in net.parameters()], os.path.join(out_dir, f'grad{rank}.pt'))
    torch.optim.Adam(net.parameters(), lr=1e-3).step()
    torch.save(net.state_dict(), os.path.join(out_dir, f'weights{rank}.pt'))
    dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown, which torch 2.13's gloo threads can abort (docs/testing.md)

def test_ddp_two_processes_equal_one(tmp_path):
    torch.manual_seed(1)
    images, sigma = torch.randn(4, 3, 8, 8), torch.rand(4) + 0.2
    mp.spawn(_ddp_worker, args=(2, _free_port(), images, sigma, str(tmp_path)), nprocs=2)
    net = tiny_precond()
    (((net(images, sigma) - images) ** 2).sum() / 4).backward()
    for rank in range(2):
        grads = torch.load(tmp_path / f'grad{rank}.pt')
        assert all(torch.allclose(g, p.grad, atol=1e-6, rtol=1e-4) for g, p in zip(grads, net.parameters()))
    w0, w1 = torch.load(tmp_path / 'weights0.pt'), torch.load(tmp_path / 'weights1.pt')
    assert all(torch.equal(w0[k], w1[k]) for k in w0)

def test_imports_without_unix_only_modules():
    """common.py imports on any OS: without `resource` and `os.getloadavg` (Windows) it imports and reports 0 memory."""
    import subprocess
    import sys
    code = ('import sys, os; sys.modules["resource"] = None; del os.getloadavg; sys.path.insert(0, sys.argv[1]); '
            'import common; print(common.peak_cpu_memory_gib()); common.init_distributed()')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    env.pop('OMP_NUM_THREADS')  # the thread rule would call os.getloadavg
    out = subprocess.run([sys.executable, '-c', code, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.split()[0] == '0.0', out.stderr
