"""patch_diffusion.py: the fidelity checks against the paper and the official code (coordinates, crops, schedule, multipliers, counter, loss
reduction, network I/O, sampler) and end-to-end properties (real_p=1 is EDM, resume, DDP, per-seed generation)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import ROOT, TINY_UNET, fid_score, run_main

import common
import patch_diffusion as pd
from common import EDMLoss, UserError, edm_time_steps, ema_beta, load_checkpoint, reseed, save_checkpoint

#------------------------------------------------------------------------------
# Coordinates and crops (official pos_embedding and random crops).

def coords(R, s, i, j):
    return pd.patch_coordinates(R, s, torch.tensor([i]), torch.tensor([j]))[0]

def test_full_image_coordinates():
    pos = coords(64, 64, 0, 0)
    x, y = pos[0], pos[1]
    assert x[5, :3].tolist() == pytest.approx([-1, -0.96825397, -0.93650794]) and x[5, 63].item() == 1
    assert torch.equal(y, x.T)                                                  # y runs down the rows as x along columns
    assert (x == x[:1]).all() and (y == y[:, :1]).all()                        # x constant down columns, y along rows
    assert coords(32, 32, 0, 0)[0, 0, [0, 1, 15, 16, 31]].tolist() == pytest.approx([-1, -0.935484, -0.032258, 0.032258, 1], abs=1e-6)

@pytest.mark.parametrize('i, j, s, x_range, y_range', [
    (0, 0, 16, (-1, -0.523810), (-1, -0.523810)),
    (48, 48, 16, (0.523810, 1), (0.523810, 1)),
    (10, 20, 32, (-0.365079, 0.619048), (-0.682540, 0.301587)),
    (32, 0, 32, (-1, -0.015873), (0.015873, 1)),
])
def test_patch_coordinate_ranges(i, j, s, x_range, y_range):
    pos = coords(64, s, i, j)
    assert (pos[0].min().item(), pos[0].max().item()) == pytest.approx(x_range, abs=1e-6)
    assert (pos[1].min().item(), pos[1].max().item()) == pytest.approx(y_range, abs=1e-6)
    assert torch.equal(pos, coords(64, 64, 0, 0)[:, i:i + s, j:j + s])  # a crop of the full-image grid

def test_random_patches_are_slices_with_uniform_offsets():
    torch.manual_seed(0)
    images = torch.randn(4000, 1, 64, 64)
    patches, pos = pd.random_patches(images, 16)
    assert patches.shape == (4000, 1, 16, 16) and pos.shape == (4000, 2, 16, 16)
    j = torch.round((pos[:, 0, 0, 0] + 1) * 63 / 2).long()
    i = torch.round((pos[:, 1, 0, 0] + 1) * 63 / 2).long()
    for n in range(0, 4000, 397):
        assert torch.equal(patches[n], images[n, :, i[n]:i[n] + 16, j[n]:j[n] + 16])
    assert set(i.tolist()) == set(range(49)) and set(j.tolist()) == set(range(49))  # every offset 0..R-s, no grid
    counts = torch.bincount(i, minlength=49).float()
    assert counts.std() / counts.mean() < 0.25                                      # about uniform (expect ~0.12)
    assert abs(np.corrcoef(i.numpy(), j.numpy())[0, 1]) < 0.05                       # rows and columns independent
    state = torch.get_rng_state()
    full, pos_full = pd.random_patches(images[:3], 64)
    assert torch.equal(full, images[:3]) and torch.equal(torch.get_rng_state(), state)  # s = R draws nothing
    assert torch.equal(pos_full[0], coords(64, 64, 0, 0))

def test_sampling_canvas_equals_training_grid_and_extrapolates():
    assert torch.equal(pd.coordinate_canvas(64, 64)[0], coords(64, 64, 0, 0))
    wide = pd.coordinate_canvas(64, 96, x_start=-16, y_start=-16)[0]
    assert (wide[0, 0, 0].item(), wide[0, 0, -1].item()) == pytest.approx((-1.507937, 1.507937), abs=1e-6)

#------------------------------------------------------------------------------
# Patch-size schedule, batch multipliers and the image counter (paper Eq. 5, official training loop).

def test_schedule_multipliers_and_counter():
    sizes, pmf, mul = pd.patch_schedule(64, 0.5)
    assert sizes == [16, 32, 64] and pmf == pytest.approx([0.2, 0.3, 0.5]) and mul == [4, 2, 1]
    assert np.dot(pmf, mul) == pytest.approx(1.9)
    assert [int(B * np.dot(pmf, mul)) for B in (256, 512)] == [486, 972]
    assert pd.patch_schedule(32, 0.5)[0] == [8, 16, 32] and pd.patch_schedule(32, 0.5)[2] == [4, 2, 1]  # CIFAR-sized data works
    avg = lambda p: np.dot(*pd.patch_schedule(64, p)[1:])
    assert [avg(p) for p in (0, 0.1, 0.25, 0.75, 1)] == pytest.approx([2.8, 2.62, 2.35, 1.45, 1.0])
    # Relative pixels per micro-batch: (0.2 * 4 * 16^2 + 0.3 * 2 * 32^2 + 0.5 * 64^2) / 64^2 = 0.70
    assert sum(p * m * s * s for s, p, m in zip(sizes, pmf, mul)) / 64 ** 2 == pytest.approx(0.70)

def test_stochastic_schedule_frequencies():
    _, pmf, _ = pd.patch_schedule(64, 0.5)
    rng = reseed(0, 0, 0)
    draws = np.array([rng.choice(3, p=pmf) for _ in range(100_000)])
    assert np.bincount(draws) / len(draws) == pytest.approx([0.2, 0.3, 0.5], abs=0.005)

def test_progressive_schedule_boundaries():
    _, pmf, _ = pd.patch_schedule(64, 0.5)
    sizes = [[16, 32, 64][pd.progressive_index(p, pmf)] for p in (0, 0.1, 0.2, 0.21, 0.5, 0.51, 0.99, 1.0)]
    assert sizes == [16, 16, 16, 32, 32, 64, 64, 64]

def test_ema_beta_with_patch_counter():
    assert ema_beta(10**9, 256 * 1.9, 500) == pytest.approx(0.99932593, abs=1e-8)

def test_50_step_sigmas():
    t = edm_time_steps(50).numpy()
    assert t[:4] == pytest.approx([80, 71.501, 63.788, 56.7995], rel=1e-4)
    assert t[-4:] == pytest.approx([0.00515, 0.00326, 0.002, 0], rel=1e-2)

#------------------------------------------------------------------------------
# Preconditioner, loss and reduction.

def tiny_patch_net(**kwargs):
    torch.manual_seed(0)
    return pd.PatchPrecond(**(dict(img_resolution=8, img_channels=3) | TINY_UNET | kwargs))

def test_coordinates_reach_the_unet_clean_and_image_channels_scaled():
    net = tiny_patch_net()
    seen = {}
    net.model.register_forward_pre_hook(lambda module, inputs: seen.update(x_in=inputs[0].clone()))
    torch.manual_seed(1)
    images = torch.randn(6, 3, 8, 8) * 0.5
    torch.manual_seed(2)
    pd.patch_loss(net, images, None, 4)
    torch.manual_seed(2)  # replay the same draws by hand: offsets (rows, columns), sigma, noise
    i, j = torch.randint(0, 5, (6,)), torch.randint(0, 5, (6,))
    sigma = (torch.randn([6, 1, 1, 1]) * 1.2 - 1.2).exp()
    patches = torch.stack([images[n, :, i[n]:i[n] + 4, j[n]:j[n] + 4] for n in range(6)])
    noisy = patches + torch.randn_like(patches) * sigma
    assert torch.equal(seen['x_in'][:, 3:], pd.patch_coordinates(8, 4, i, j))        # clean, unscaled, bit-identical
    assert torch.allclose(seen['x_in'][:, :3], noisy / (sigma ** 2 + 0.25).sqrt(), atol=1e-6)  # c_in (patch + n)

def test_patch_loss_shape_and_unit_level_at_init():
    net = tiny_patch_net(model_channels=16)
    torch.manual_seed(0)
    images = torch.randn(64, 3, 8, 8) * 0.5
    for s in (2, 4, 8):
        with torch.no_grad():
            loss = pd.patch_loss(net, images, None, s)
        assert loss.shape == (64, 3, s, s)
        assert loss.mean().item() == pytest.approx(1.0, abs=0.15)  # lambda c_out^2 = 1 and F ~ 0 at init

def test_reduction_gives_small_patches_a_sixteenth():
    """Four 16x16 patches per image with the same per-pixel error give 1/16 of the full-image gradient."""
    theta = torch.ones([], requires_grad=True)
    b = 8
    full = (theta * torch.ones(b, 3, 64, 64)) ** 2
    patches = (theta * torch.ones(b * 4, 3, 16, 16)) ** 2
    g_full, = torch.autograd.grad(pd.reduce_loss(full, b, 1), theta)
    g_patch, = torch.autograd.grad(pd.reduce_loss(patches, b, 4), theta)
    assert g_patch.item() == pytest.approx(g_full.item() / 16)

def test_real_p_1_is_plain_edm():
    args = pd.parse_args(['train', '--data=demo', '--real_p=1', '--cbase=16', '--cres=1,2'])
    precond, kwargs = pd.precond_class(args.real_p), pd.network_kwargs(args, 8, 3, 0)
    assert precond == 'EDMPrecond' and pd.patch_schedule(8, 1.0)[1] == [0, 0, 1]
    torch.manual_seed(0)
    net = pd.build_network(precond, kwargs)
    images = torch.randn(4, 3, 8, 8) * 0.5
    torch.manual_seed(5)
    ours = pd.patch_loss(net, images, None, 8, coords=False)
    torch.manual_seed(5)
    assert torch.equal(ours, EDMLoss()(net, images))

def test_overfits_one_batch_of_patches():
    net = tiny_patch_net()
    torch.manual_seed(0)
    images = torch.rand(4, 3, 8, 8) - 0.5
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    losses = []
    for _ in range(50):  # 0.05x after 25 steps, 0.001x after 50
        torch.manual_seed(3)  # the same crops, sigma and noise every step: a deterministic objective
        loss = pd.reduce_loss(pd.patch_loss(net, images, None, 4), 4, 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]

def test_cfg_weight_one_equals_conditional_and_zero_unconditional():
    net = tiny_patch_net(label_dim=3).eval()
    x, sigma, pos = torch.randn(2, 3, 8, 8), torch.tensor(1.5), pd.coordinate_canvas(8, 8)
    labels = torch.eye(3)[[0, 2]]
    with torch.no_grad():
        cond = net(x, sigma, pos, labels)
        uncond = net(x, sigma, pos, torch.zeros_like(labels))
        assert torch.allclose(pd.guided_denoiser(net, pos, 1.0)(x, sigma, labels), cond, atol=1e-6)
        assert torch.allclose(pd.guided_denoiser(net, pos, 0.0)(x, sigma, labels), uncond, atol=1e-6)
        guided = pd.guided_denoiser(net, pos, 1.3)(x, sigma, labels)
        assert torch.allclose(guided, uncond + 1.3 * (cond - uncond), atol=1e-5)

def test_network_io_sizes_and_parameter_count():
    args = pd.parse_args(['train', '--data=demo', '--preset=celeba64'])
    precond, kwargs = pd.precond_class(args.real_p), pd.network_kwargs(args, 64, 3, 0)
    with torch.device('meta'):
        net = pd.build_network(precond, kwargs)
    assert precond == 'PatchPrecond' and sum(p.numel() for p in net.parameters()) == 61_806_723
    assert net.model.enc['64x64_conv'].weight.shape == (128, 5, 3, 3) and net.model.dec['64x64_aux_conv'].weight.shape == (3, 128, 3, 3)
    small = tiny_patch_net(model_channels=8, channel_mult=[1, 2, 2, 2], img_resolution=64).eval()
    assert pd.size_multiple(small) == 8
    with torch.no_grad():
        for s in (8, 16, 32, 64, 96):
            out = small(torch.randn(1, 3, s, s), torch.tensor(1.0), pd.coordinate_canvas(64, s))
            assert out.shape == (1, 3, s, s)
        with pytest.raises(ValueError, match='12'):
            small(torch.randn(1, 3, 12, 12), torch.tensor(1.0), pd.coordinate_canvas(64, 12))

#------------------------------------------------------------------------------
# Command line: training, resume, DDP, generation.

TRAIN = ['train', '--data=demo-8', '--cbase=16', '--cres=1,2', '--batch=8', '--lr=1e-3', '--ema=0.0001',
         '--dropout=0', '--workers=0', '--tick=0.001', '--snap=1', '--dump=1', '--grid=0', '--nosubdir']

def run_train(outdir, *extra):
    pd.train(pd.parse_args(TRAIN + [f'--outdir={outdir}', *extra]))
    return sorted(Path(outdir).glob('training-state-*.pt'))[-1]

def test_counter_errors_and_dry_run(tmp_path, capsys):
    run_train(tmp_path / 'a', '--duration=0.00001')
    stats = [json.loads(line) for line in open(tmp_path / 'a' / 'stats.jsonl')]
    assert stats[0]['kimg'] == pytest.approx(int(8 * 1.9) / 1000) and stats[0]['step'] == 1
    with pytest.raises(UserError, match='no such VAE weights file'):  # latent training: tests/test_patch_latent.py
        pd.train(pd.parse_args(TRAIN + ['--train_on_latents=1', f'--vae={tmp_path}/missing.safetensors']))
    with pytest.raises(UserError, match='patch size 2 .* not a multiple of 4'):
        pd.train(pd.parse_args(TRAIN + ['--cres=1,2,2']))
    capsys.readouterr()
    pd.train(pd.parse_args(TRAIN + ['--dry-run']))
    out = capsys.readouterr().out  # the options as JSON, then the parameter count
    assert json.loads(out[out.index('{'):out.rindex('}') + 1])['batch_mul_avg'] == pytest.approx(1.9)
    # Progressive schedule: the first 20% of training uses the smallest patches, counted with their multiplier (4).
    run_train(tmp_path / 'p', '--duration=0.0001', '--progressive=1')
    stats = [json.loads(line) for line in open(tmp_path / 'p' / 'stats.jsonl')]
    assert [s['kimg'] for s in stats[:2]] == pytest.approx([0.032, 0.064])

def test_resume_equals_uninterrupted(tmp_path):
    full = load_checkpoint(run_train(tmp_path / 'full', '--duration=0.00006'))  # 4 steps of 15 patches
    half = run_train(tmp_path / 'half', '--duration=0.00003')                    # 2 steps, then resume for 2 more
    resumed = load_checkpoint(run_train(tmp_path / 'resumed', '--duration=0.00006', f'--resume={half}'))
    assert full['step'] == resumed['step'] == 4 and full['cur_nimg'] == resumed['cur_nimg']
    for key in ('net', 'ema'):
        assert all(torch.equal(full[key][k], resumed[key][k]) for k in full[key])
    assert full['data_pos'] == resumed['data_pos']

def torchrun(nproc, *args):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
           str(ROOT / 'patch_diffusion.py'), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert result.returncode == 0, result.stderr[-3000:]
    return result

def read_pngs(folder):
    return {p.name: np.array(PIL.Image.open(p)) for p in sorted(Path(folder).rglob('*.png'))}

def test_torchrun_two_processes_train_and_generate(tmp_path):
    torchrun(2, *TRAIN[:-1], f'--outdir={tmp_path}', '--duration=0.00003', '--desc=ddp')  # numbered run dir
    run_dir, = tmp_path.glob('00000-demo8-uncond-ddpmpp-pedm-gpus2-batch8-fp32-ddp')
    state = load_checkpoint(str(sorted(run_dir.glob('training-state-*.pt'))[-1]))
    assert len(state['data_pos']) == 2 and state['step'] == 2
    snapshot = str(sorted(run_dir.glob('network-snapshot-*.pt'))[-1])
    gen = ['generate', f'--network={snapshot}', '--seeds=0-5', '--steps=4', '--S_churn=5']
    torchrun(2, *gen, f'--outdir={tmp_path / "two"}', '--batch=2', '--subdirs')
    pd.generate(pd.parse_args(gen + [f'--outdir={tmp_path / "one"}', '--batch=6', '--subdirs']))
    pd.generate(pd.parse_args(gen + [f'--outdir={tmp_path / "four"}', '--batch=4']))
    one, two, four = (read_pngs(tmp_path / d) for d in ('one', 'two', 'four'))
    assert sorted(one) == [f'{s:06d}.png' for s in range(6)] and (tmp_path / 'one' / '000000' / '000005.png').exists()
    assert all(np.array_equal(one[k], two[k]) and np.array_equal(one[k], four[k]) for k in one)
    assert one['000000.png'].shape == (8, 8, 3) and not np.array_equal(one['000000.png'], one['000001.png'])

def test_generate_rejects_bad_canvas(tmp_path):
    snapshot = sorted(Path(run_train(tmp_path, '--duration=0.00001')).parent.glob('network-snapshot-*.pt'))[-1]
    with pytest.raises(UserError, match='multiple of 2'):
        pd.generate(pd.parse_args(['generate', f'--network={snapshot}', f'--outdir={tmp_path}', '--image_size=9']))
    # A canvas larger than training, coordinates extrapolated past [-1, 1] (official generate.py --image_size).
    pd.generate(pd.parse_args(['generate', f'--network={snapshot}', f'--outdir={tmp_path / "big"}', '--image_size=12',
                               '--x_start=-2', '--y_start=-2', '--seeds=0-1', '--steps=2']))
    assert [image.shape for image in read_pngs(tmp_path / 'big').values()] == [(12, 12, 3)] * 2

def test_official_pickles_load_and_sample(tmp_path):
    """EDM-format .pkl snapshots (EDMPrecond, and Patch_EDMPrecond with img_channels = C + 2) load through the
    restricted unpickler into our classes and give the same denoiser; generate samples from them."""
    import conftest
    model = dict(TINY_UNET)
    del model['model_type']
    x, sigma, pos = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 2.0]), pd.coordinate_canvas(8, 8)
    for official, kwargs in ((conftest.EDMPrecond, dict(img_channels=3)), (conftest.Patch_EDMPrecond, dict(img_channels=5, out_channels=None))):
        init_kwargs = dict(img_resolution=8, label_dim=0, use_fp16=False, model_type='SongUNet', **kwargs, **model)
        if official is conftest.Patch_EDMPrecond:
            init_kwargs['out_channels'] = 3
        torch.manual_seed(0)
        reference = official(**init_kwargs).eval()
        path = tmp_path / f'{official.__name__}.pkl'
        conftest.write_persistence_pickle(path, dict(ema=reference, loss_fn=None, augment_pipe=None), init_kwargs)
        net = pd.load_network(str(path)).eval()
        assert type(net) is (pd.PatchPrecond if official is conftest.Patch_EDMPrecond else pd.EDMPrecond)
        ours = pd.build_network(type(net).__name__, dict(img_resolution=8, img_channels=3, **model))
        ours.load_state_dict(reference.state_dict())
        with torch.no_grad():
            call = (lambda n: n(x, sigma, pos)) if type(net) is pd.PatchPrecond else (lambda n: n(x, sigma))
            assert torch.equal(call(net), call(ours))
        pd.generate(pd.parse_args(['generate', f'--network={path}', f'--outdir={tmp_path / official.__name__}', '--seeds=0-1', '--steps=2']))
        assert len(list((tmp_path / official.__name__).glob('*.png'))) == 2

def test_presets_and_cli_errors(tmp_path, monkeypatch, capsys):
    args = pd.parse_args(['--preset=demo', '--batch=8'])  # a bare command is `train`; flags override the preset
    assert args.command == 'train' and args.batch == 8 and args.lr_rampup == 1 and args.cres == [1, 2]
    code, err = run_main(pd, monkeypatch, capsys, ['train', f'--data={tmp_path}/missing.zip'])  # main(), in-process
    assert code == 2 and 'Traceback' not in err
    assert err.strip() == f'error: {tmp_path}/missing.zip: no such dataset (make one with dataset_tool.py, or use --data=demo)'

@pytest.mark.parametrize('flag', ['--bf16=1', '--fp16=1'])
def test_mixed_precision_training_steps(tmp_path, flag):
    """Autocast around the U-Net only (fp16 with a GradScaler): training runs, weights move and stay finite."""
    state = load_checkpoint(run_train(tmp_path, '--duration=0.00009', flag))  # 6 steps: fp16 skips overflowing ones
    torch.manual_seed(0)  # train() seeds with --seed=0 before building the network
    init = pd.build_network(state['precond'], state['net_kwargs'])
    assert state['step'] == 6 and all(torch.isfinite(v).all() for v in state['net'].values())
    assert any(not torch.equal(v, init.state_dict()[k]) for k, v in state['net'].items())
    assert (state['scaler'] != {}) == (flag == '--fp16=1')  # the GradScaler's state is saved only when it is on

def test_snapshots_of_the_earlier_layout_load(tmp_path):
    """Snapshots written before the shared layout kept a latent run's VAE in args['vae'] only: they still load."""
    net = tiny_patch_net()
    kwargs = dict(img_resolution=8, img_channels=3, label_dim=0, **TINY_UNET)
    old = dict(method='patch_diffusion', precond='PatchPrecond', net_kwargs=kwargs, ema=net.state_dict(), cur_nimg=15,
               args=dict(train_on_latents=True, vae='vae.safetensors', arch='ddpmpp'))
    save_checkpoint(old, str(tmp_path / 'old.pt'))
    loaded = pd.load_network(str(tmp_path / 'old.pt'))
    assert loaded.latent_vae == 'vae.safetensors' and all(torch.equal(a, b) for a, b in
                                                          zip(loaded.state_dict().values(), net.state_dict().values()))

#------------------------------------------------------------------------------
# Hostile input (issue 24): one line naming the flag or file, exit 2 before anything is written, 1 while working.

@pytest.fixture(scope='module')
def hostile_files(tmp_path_factory):
    """A tiny run's snapshot and training state, and files of the wrong kind: other methods' checkpoints (the
    layout their tiny runs write: method, precond, net_kwargs, ema, ...), a tampered precond, a raw pickle, an empty
    file, a folder without checkpoints."""
    out = tmp_path_factory.mktemp('hostile')
    state = run_train(out / 'run', '--duration=0.00001')
    snapshot = sorted((out / 'run').glob('network-snapshot-*.pt'))[-1]
    snap = load_checkpoint(str(snapshot))
    save_checkpoint(dict(snap, method='gdd', precond='GDDPrecond', freeze=1), str(out / 'gdd-snapshot.pt'))
    save_checkpoint(dict(snap, precond='GDDPrecond'), str(out / 'tampered.pt'))
    save_checkpoint(dict(load_checkpoint(str(state)), method='masked_dm'), str(out / 'masked-state.pt'))
    save_checkpoint(dict(snap, method='relay_diffusion', stage=1), str(out / 'relay-snapshot.pt'))
    import pickle
    for name in ('raw.pt', 'raw.pkl'):
        (out / name).write_bytes(pickle.dumps({'ema': {'w': 1}}))
    (out / 'empty.pt').write_bytes(b'')
    (out / 'empty.safetensors').write_bytes(b'')
    (out / 'folder').mkdir()
    (out / 'file').write_text('a file, not a folder')
    return dict(snapshot=snapshot, state=state, **{p.stem.replace('-', '_') + p.suffix.replace('.', '_'): p
                                                    for p in out.iterdir() if p.name != 'run'})

TRAIN_ERRORS = [  # (argv, words the one line must contain); all exit 2, nothing written
    (['--cres=0,2'], ['--cres', '1 to 64']),                                  # was ZeroDivisionError
    (['--cres=1,100000'], ['--cres', '1 to 64']),                             # was a 92 TB allocation
    (['--cbase=100000000'], ['--cbase', '<= 4096']),
    (['--cbase=4096', '--cres=64,64'], ['parameters', 'GiB', 'has']),         # cannot fit in memory
    (['--label-dropout=0.5'], ['--label-dropout=0.5', '--cond=1']),           # was accepted without labels
    (['--grid=1000000000'], ['--grid', '<= 1024']),
    (['--batch=1', '--duration=100000'], ['optimizer steps', 'never end']),
    (['--real_p=nan'], ['--real_p', 'not a finite number']),
    (['--data={folder}'], ['folder']),
    (['--resume={masked_state_pt}'], ['masked_dm.py training state', 'patch_diffusion.py continues']),
    (['--resume={raw_pt}'], ['--resume', 'raw.pt']),
    (['--train_on_latents=1', '--vae={empty_safetensors}'], ['empty.safetensors']),
    (['--metrics=bogus'], ['--metrics', 'bogus']),
    (['--metrics=fid10k_full'], ['--metrics-ref']),
    (['--metrics=fid10k_full', '--metrics-ref=missing.npz'], ['missing.npz']),
]

@pytest.mark.parametrize('argv, words', TRAIN_ERRORS, ids=[' '.join(c[0]) for c in TRAIN_ERRORS])
def test_train_hostile_input_one_line_exit_2_nothing_written(tmp_path, monkeypatch, capsys, hostile_files, argv,
                                                             words):
    argv = [a.format(**hostile_files) for a in argv]
    monkeypatch.chdir(tmp_path)
    code, err = run_main(pd, monkeypatch, capsys, TRAIN[:-1] + [f'--outdir={tmp_path / "runs"}', *argv])
    assert code == 2 and err.count('\n') == 1 and 'Traceback' not in err and 'weights_only' not in err, err
    assert all(w in err for w in words), err
    assert not list(tmp_path.iterdir())

GENERATE_ERRORS = [
    (['--network={gdd_snapshot_pt}'], ['gdd-snapshot.pt', 'a gdd.py checkpoint']),  # was KeyError: 'GDDPrecond'
    (['--network={relay_snapshot_pt}'], ['relay-snapshot.pt', 'a relay_diffusion.py checkpoint']),
    (['--network={tampered_pt}'], ['tampered.pt', 'a GDDPrecond network']),
    (['--network={raw_pkl}'], ['raw.pkl']),
    (['--network={raw_pt}'], ['raw.pt']),
    (['--network={empty_pt}'], ['empty.pt']),
    (['--network={folder}'], ['folder', 'network-snapshot']),
    (['--image_size=200000'], ['--image_size', '<= 16384']),                 # was MemoryError
    (['--image_size=16384'], ['--image_size=16384', 'GiB']),                 # cannot fit in memory
    (['--resolution=1'], ['--resolution', '>= 2']),                          # coordinates would divide by 0
    (['--cfg=nan'], ['--cfg', 'not a finite number']),
    (['--x_start=1000000000000000000000000'], ['--x_start', 'out of range']),
    (['--class=-1'], ['--class', '>= 0']),
]

@pytest.mark.parametrize('argv, words', GENERATE_ERRORS, ids=[' '.join(c[0]) for c in GENERATE_ERRORS])
def test_generate_hostile_input_one_line_exit_2_nothing_written(tmp_path, monkeypatch, capsys, hostile_files, argv,
                                                                words):
    argv = [a.format(**hostile_files) for a in argv]
    monkeypatch.chdir(tmp_path)
    base = ['generate', f'--network={hostile_files["snapshot"]}', f'--outdir={tmp_path / "gen"}', '--steps=2']
    code, err = run_main(pd, monkeypatch, capsys, base + argv)
    assert code == 2 and err.count('\n') == 1 and 'Traceback' not in err and 'weights_only' not in err, err
    assert all(w in err for w in words), err
    assert not list(tmp_path.iterdir())

@pytest.mark.parametrize('argv, words', [(['generate', '--network={raw_pt}'], 'raw.pt: not a checkpoint of this project'),
                                         (['train', '--data=demo-8', '--train_on_latents=1', '--vae={raw_pt}'],
                                          'raw.pt: not a readable diffusers AutoencoderKL weights file')])
def test_raw_pickle_is_one_line_without_torch_warning(hostile_files, tmp_path, argv, words):
    """torch warns (pickle protocol) before its weights-only loader refuses a raw pickle; the command line prints only
    its own line (in-process, pytest would capture the warning: hence a subprocess)."""
    argv = [a.format(**hostile_files) for a in argv] + [f'--outdir={tmp_path / "out"}']
    result = subprocess.run([sys.executable, str(ROOT / 'patch_diffusion.py'), *argv], capture_output=True, text=True,
                            timeout=120, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert result.returncode == 2 and result.stderr.startswith('error: ') and result.stderr.count('\n') == 1, \
        result.stderr
    assert words in result.stderr and not (tmp_path / 'out').exists()

@pytest.mark.parametrize('fault', [OSError(28, 'No space left on device', 'gen/000000.png'),
                                   RuntimeError('DefaultCPUAllocator: can\'t allocate memory: you tried to allocate 1')])
def test_generate_failure_while_working_exits_1(tmp_path, monkeypatch, capsys, hostile_files, fault):
    """A full disk or a failed allocation during generation: one line, exit 1 (bad input before it is exit 2)."""
    def fail(*args, **kwargs):
        raise fault
    monkeypatch.setattr(pd, 'save_seed_images' if isinstance(fault, OSError) else 'sample_images', fail)
    base = ['generate', f'--network={hostile_files["snapshot"]}', f'--outdir={tmp_path / "gen"}', '--steps=2']
    code, err = run_main(pd, monkeypatch, capsys, base)
    lines = [line for line in err.split('\n') if line.strip() and '%|' not in line]  # tqdm's bar aside
    assert code == 1 and len(lines) == 1 and lines[0].startswith('error: ') and 'Traceback' not in err, err
    assert ('No space left' in err) if isinstance(fault, OSError) else ('out of memory' in err)

#------------------------------------------------------------------------------
# train --metrics (issue 22): the numbers of generate + fid.py for every snapshot, in StyleGAN's metric-<name>.jsonl.

METRIC_NET = ['--cbase=8', '--cres=1']  # 22k parameters: 500 samples in about 4 CPU seconds

def test_train_metrics_equal_generate_then_fid_score(tmp_path, toy_cache, capsys, monkeypatch):
    """--metrics=toy_fd --snap=1: one StyleGAN-layout line per snapshot, whose value is what `generate --seeds=0-99`
    of that snapshot and `fid.py score --num=100` print (toy_fd's 500 images monkeypatched to 100, for time)."""
    import fid
    monkeypatch.setitem(common.TRAINING_METRICS, 'toy_fd', 100)
    demo_masks = fid.demo_masks  # fid.py score's demo_fit, not compared here: 1,000 shape draws, not 100,000 (~10 s)
    monkeypatch.setattr(fid, 'demo_masks', lambda R: demo_masks(R, draws=1000))
    run = tmp_path / 'run'
    run_train(run, *METRIC_NET, '--duration=0.000045', '--metrics=toy_fd', f'--metrics-cache={toy_cache}')
    lines = [json.loads(line) for line in open(run / 'metric-toy_fd.jsonl')]
    snapshots = sorted(p.name for p in run.glob('network-snapshot-*.pt'))
    assert [line['snapshot_pkl'] for line in lines] == snapshots and len(snapshots) == 2  # ticks 1 and 2
    assert all(set(line) >= {'results', 'metric', 'total_time', 'num_gpus', 'snapshot_pkl', 'timestamp', 'kimg'}
               and line['metric'] == 'toy_fd' and line['num_gpus'] == 1 for line in lines)
    assert [line['kimg'] for line in lines] == [0.03, 0.045]
    gen = tmp_path / 'gen'
    pd.generate(pd.parse_args(['generate', f'--network={run / snapshots[-1]}', f'--outdir={gen}', '--seeds=0-99',
                               '--batch=250']))
    assert fid_score(gen, toy_cache, capsys, num=100)['toy_fd'] == pytest.approx(lines[-1]['results']['toy_fd'], rel=1e-6)
    log = (run / 'log.txt').read_text()
    best = min(lines, key=lambda line: line['results']['toy_fd'])
    assert f'best so far {best["results"]["toy_fd"]:.4g} at {best["snapshot_pkl"]}' in log
