# Tests for the FID Inception-v3, the metrics and fid.py. Every detector here has random weights made by the test;
# nothing downloads. Inception runs at 299x299 whatever the input size, so the CLI tests use 8 images.

import errno
import json
import os
import pickle
import subprocess
import sys
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import InceptionV3, UserError, frechet_distance, resize_tf1  # noqa: E402
from conftest import save_stand_in_detector  # noqa: E402
from fid import FeatureStats, inception_score, load_detector, precision_recall  # noqa: E402

#------------------------------------------------------------------------------
# Helpers

# pytorch-fid's FID Inception (torchvision Inception3(num_classes=1008, aux_logits=False) with FIDInceptionA/C/E_1/E_2),
# written out from pytorch-fid's inception.py: block type of every top-level module and the branch names of each type, in order.
BRANCHES = dict(
    A=['branch1x1', 'branch5x5_1', 'branch5x5_2', 'branch3x3dbl_1', 'branch3x3dbl_2', 'branch3x3dbl_3', 'branch_pool'],
    B=['branch3x3', 'branch3x3dbl_1', 'branch3x3dbl_2', 'branch3x3dbl_3'],
    C=['branch1x1', 'branch7x7_1', 'branch7x7_2', 'branch7x7_3'] + [f'branch7x7dbl_{i}' for i in range(1, 6)] + ['branch_pool'],
    D=['branch3x3_1', 'branch3x3_2'] + [f'branch7x7x3_{i}' for i in range(1, 5)],
    E=['branch1x1', 'branch3x3_1', 'branch3x3_2a', 'branch3x3_2b', 'branch3x3dbl_1', 'branch3x3dbl_2', 'branch3x3dbl_3a',
       'branch3x3dbl_3b', 'branch_pool'],
)
LAYOUT = [('Conv2d_1a_3x3', None), ('Conv2d_2a_3x3', None), ('Conv2d_2b_3x3', None), ('Conv2d_3b_1x1', None),
          ('Conv2d_4a_3x3', None), ('Mixed_5b', 'A'), ('Mixed_5c', 'A'), ('Mixed_5d', 'A'), ('Mixed_6a', 'B'),
          ('Mixed_6b', 'C'), ('Mixed_6c', 'C'), ('Mixed_6d', 'C'), ('Mixed_6e', 'C'), ('Mixed_7a', 'D'),
          ('Mixed_7b', 'E'), ('Mixed_7c', 'E')]

def pytorch_fid_keys():
    units = [name if kind is None else f'{name}.{branch}' for name, kind in LAYOUT for branch in BRANCHES.get(kind, [None])]
    tensors = ['conv.weight', 'bn.weight', 'bn.bias', 'bn.running_mean', 'bn.running_var', 'bn.num_batches_tracked']
    return [f'{unit}.{t}' for unit in units for t in tensors] + ['fc.weight', 'fc.bias'], units

def random_detector(seed=0, preprocess='nvidia'):
    """InceptionV3 with He-initialized random convolutions (features stay O(1) through the 94 layers)."""
    torch.manual_seed(seed)
    net = InceptionV3(preprocess)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
    return net.requires_grad_(False)

def uint8_images(n, res, channels=3, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, channels, res, res), dtype=np.uint8))

def nvidia_resize(x, size=299):
    """NVIDIA's detector resize (its TorchScript graph, as EDM's fid.py uses it): affine_grid with translation 1/W - 1/299, border padding."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3).repeat(n, 1, 1)
    theta[:, 0, 2] += 1 / w - 1 / size
    theta[:, 1, 2] += 1 / h - 1 / size
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x.float(), grid, mode='bilinear', padding_mode='border', align_corners=False)

@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """4 random 16x16 RGB PNGs (enough for precision/recall with k = 3) and a random-weights detector saved as a state
    dict."""
    root = tmp_path_factory.mktemp('fid')
    (root / 'images').mkdir()
    for i, image in enumerate(uint8_images(4, 16, seed=1).permute(0, 2, 3, 1).numpy()):
        PIL.Image.fromarray(image).save(root / 'images' / f'{i:03d}.png')
    torch.save(random_detector().state_dict(), root / 'detector.pth')
    return root

#------------------------------------------------------------------------------
# Network: state dict, loading, pre-processing, outputs

def test_state_dict_keys_and_shapes_equal_pytorch_fid():
    sd = InceptionV3().state_dict()
    keys, units = pytorch_fid_keys()
    assert len(units) == 94 and len(keys) == 566
    assert list(sd.keys()) == keys
    examples = {'Conv2d_1a_3x3.conv.weight': (32, 3, 3, 3), 'Conv2d_2a_3x3.conv.weight': (32, 32, 3, 3),
                'Conv2d_2b_3x3.conv.weight': (64, 32, 3, 3), 'Conv2d_3b_1x1.conv.weight': (80, 64, 1, 1),
                'Conv2d_4a_3x3.conv.weight': (192, 80, 3, 3), 'Mixed_5b.branch_pool.conv.weight': (32, 192, 1, 1),
                'Mixed_6a.branch3x3.conv.weight': (384, 288, 3, 3), 'Mixed_6b.branch7x7_2.conv.weight': (128, 128, 1, 7),
                'Mixed_7b.branch3x3_2a.conv.weight': (384, 384, 1, 3), 'Mixed_7c.branch_pool.conv.weight': (192, 2048, 1, 1),
                'fc.weight': (1008, 2048), 'fc.bias': (1008,)}
    assert {k: tuple(sd[k].shape) for k in examples} == examples
    for unit in units:  # BN sized by its conv's output channels, no conv bias
        assert sd[f'{unit}.bn.weight'].shape == (sd[f'{unit}.conv.weight'].shape[0],) and f'{unit}.conv.bias' not in sd
    n_fc = sd['fc.weight'].numel() + sd['fc.bias'].numel()
    n_params = sum(v.numel() for k, v in sd.items() if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked')))
    assert (n_params - n_fc, n_fc) == (21_785_568, 2_065_392)  # measured on pytorch-fid's model

def test_detector_strict_load_round_trip(tmp_path):
    torch.manual_seed(3)
    net = InceptionV3().requires_grad_(False)
    for m in net.modules():  # non-trivial BN statistics and scales
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.uniform_(0.5, 2)
    torch.save(net.state_dict(), tmp_path / 'full.pth')
    legacy = {k: v for k, v in net.state_dict().items() if not k.endswith('num_batches_tracked')}  # older dicts
    torch.save(legacy, tmp_path / 'legacy.pth')
    for name in ('full.pth', 'legacy.pth'):
        loaded = load_detector(str(tmp_path / name))
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        for key, value in net.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
    bad = {k: v for k, v in legacy.items() if k != 'fc.bias'}
    torch.save(bad, tmp_path / 'bad.pth')
    with pytest.raises(UserError, match='Missing key.*fc.bias'):
        load_detector(str(tmp_path / 'bad.pth'))

def test_tf1_resize_equals_closed_form():
    x = torch.rand(2, 3, 3, 5, dtype=torch.float64) * 255
    for size in (7, 4, 2):
        out = np.zeros((2, 3, size, size))
        for i in range(size):
            for j in range(size):
                y, xx = i * 3 / size, j * 5 / size  # TF1: source coordinate j * in / out, no half-pixel shift
                y0, x0 = int(y), int(xx)
                y1, x1, fy, fx = min(y0 + 1, 2), min(x0 + 1, 4), y - y0, xx - x0
                v = x.numpy()
                out[:, :, i, j] = ((1 - fy) * ((1 - fx) * v[:, :, y0, x0] + fx * v[:, :, y0, x1])
                                   + fy * ((1 - fx) * v[:, :, y1, x0] + fx * v[:, :, y1, x1]))
        assert np.allclose(resize_tf1(x, size).numpy(), out, atol=1e-9)
    const = torch.full((1, 3, 8, 8), 77.0)
    assert torch.equal(resize_tf1(const), torch.full((1, 3, 299, 299), 77.0))
    x299 = torch.rand(1, 3, 299, 299)
    assert torch.equal(resize_tf1(x299), x299)

def test_nvidia_preprocessing_matches_affine_grid_resize():
    net = InceptionV3('nvidia')
    for res in (8, 32, 64):
        images = uint8_images(2, res, seed=res)
        expected = (nvidia_resize(images) - 128) / 128
        assert (net.preprocess_images(images) - expected).abs().max() < 1e-5  # equal up to float rounding

def test_pytorch_fid_preprocessing_is_interpolate_then_2x_minus_1():
    net = InceptionV3('pytorch_fid')
    images = uint8_images(2, 32)
    expected = 2 * F.interpolate(images.float() / 255, size=(299, 299), mode='bilinear', align_corners=False) - 1
    assert torch.allclose(net.preprocess_images(images), expected, atol=1e-6)
    grey = uint8_images(2, 32, channels=1)
    assert torch.equal(net.preprocess_images(grey), net.preprocess_images(grey.repeat(1, 3, 1, 1)))

def test_forward_outputs():
    net = random_detector()
    images = uint8_images(1, 8, channels=1)  # grey images are repeated to RGB
    with torch.no_grad():
        out = net(images, return_dict=True)
        pool = net(images)
    assert out['pool'].shape == (1, 2048) and out['logits'].shape == (1, 1008) and out['spatial'].shape == (1, 2023)
    assert torch.equal(out['pool'], pool) and (pool >= 0).all() and pool.std() > 0
    assert torch.allclose(out['logits'], pool @ net.fc.weight.t(), atol=1e-5)  # bias-free logits (original IS code)

def test_torchscript_detector(tmp_path):
    fake = save_stand_in_detector(tmp_path / 'inception.pt')
    net = load_detector(str(tmp_path / 'inception.pt'))
    images = uint8_images(3, 16)
    with torch.no_grad():
        out = net(images, return_dict=True)
        features = fake(images, return_features=True)
        assert torch.equal(net(images), features) and torch.equal(out['pool'], features)
        assert torch.allclose(out['logits'].softmax(1), fake(images, no_output_bias=True), atol=1e-6)
        h = fake.layers.pool0(fake.layers.conv((nvidia_resize(images) - 128) / 128))
        spatial = fake.layers.mixed_6.conv(h)[:, :7].permute(0, 2, 3, 1).flatten(1)  # NHWC order, as ADM's TF graph
    assert out['spatial'].shape == spatial.shape and torch.allclose(out['spatial'], spatial, atol=1e-4)
    with pytest.raises(UserError, match='--preprocess=nvidia'):
        load_detector(str(tmp_path / 'inception.pt'), preprocess='pytorch_fid')

def test_detector_errors_say_where_to_get_the_file(tmp_path, monkeypatch):
    with pytest.raises(UserError, match='--detector=PATH'):
        load_detector(str(tmp_path / 'missing.pth'))
    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError('no network')
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'cache'))
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    with pytest.raises(UserError, match=r'pt_inception-2015-12-05-6726825d\.pth.*--detector=PATH'):
        load_detector()
    (tmp_path / 'junk.pkl').write_bytes(b'not a state dict')
    with pytest.raises(UserError, match='neither a state dict of FID Inception-v3 weights nor NVIDIA.s TorchScript'):
        load_detector(str(tmp_path / 'junk.pkl'))

#------------------------------------------------------------------------------
# Metrics: closed forms

def random_stats(rng, d):
    a = rng.standard_normal((d, d))
    return rng.standard_normal(d), a @ a.T + 0.1 * np.eye(d)

def test_frechet_distance_zero_symmetric_and_diagonal_closed_form():
    rng = np.random.default_rng(0)
    (mu1, s1), (mu2, s2) = random_stats(rng, 16), random_stats(rng, 16)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-6
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)
    a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)  # diagonal covariances
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(np.zeros(64), np.eye(64), np.ones(64), np.eye(64)) == pytest.approx(64, rel=1e-12)
    with pytest.raises(ValueError):
        frechet_distance(mu1, s1, mu2[:8], s2[:8, :8])
    # singular statistics, as of a few images (4 here, rank 3), the same up to float rounding (summed in another
    # order): the distance is ~0, not the NaN or the error a singular matrix square root can give
    feats = rng.standard_normal((4, 256)) * rng.uniform(0.1, 3, 256)
    mu_a, mu_b = feats.mean(0), feats[::-1].mean(0)
    s_a, s_b = np.cov(feats, rowvar=False), np.cov(feats[::-1], rowvar=False)
    assert np.linalg.matrix_rank(s_a) == 3 and not np.array_equal(s_a, s_b)
    assert abs(frechet_distance(mu_a, s_a, mu_b, s_b)) < 1e-4 * np.trace(s_a)

def test_feature_stats_equal_numpy_mean_and_cov():
    feats = np.random.default_rng(0).standard_normal((37, 5)) * 3 + 1
    stats = FeatureStats(5)
    for part in np.split(feats, [10, 11, 30]):
        stats.update(part)
    mu, sigma = stats.mean_cov()
    assert np.allclose(mu, feats.mean(0), atol=1e-12) and np.allclose(sigma, np.cov(feats, rowvar=False), atol=1e-12)

def test_inception_score_closed_forms():
    assert inception_score(np.zeros((50, 1008))) == pytest.approx(1, abs=1e-12)  # p(y|x) = p(y): KL = 0
    labels = np.arange(40) % 8
    logits = 1e4 * np.eye(1008)[labels]  # confident and spread evenly over 8 classes: IS = 8
    assert inception_score(logits) == pytest.approx(8, rel=1e-9)
    # splits of 20 hold classes 0-3 three times and 4-7 twice: IS = exp(entropy of p(y)) per split
    p = np.array([3] * 4 + [2] * 4) / 20
    assert inception_score(logits, split_size=20) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-9)

def test_precision_recall():
    feats = np.random.default_rng(0).standard_normal((20, 2048))
    assert precision_recall(feats, feats) == (1.0, 1.0)
    # 1-D by hand, k=3: reference radii^2 (3rd neighbour) are 9, 4, 4, 9; only 1.5 lies inside a reference ball;
    # the generated point -3.5 has radius^2 103.5^2, which covers every reference point.
    ref, gen = np.array([[0.], [1.], [2.], [3.]]), np.array([[-3.5], [1.5], [6.5], [100.]])
    assert precision_recall(ref, gen) == (0.25, 1.0)
    assert precision_recall(ref, ref + 50) == (0.0, 0.0)
    with pytest.raises(ValueError):
        precision_recall(ref[:3], gen)

#------------------------------------------------------------------------------
# fid.py end to end

def start_cli(args, nproc=1, script=None, env=None):
    """fid.py (or `script ROOT ARGS`, a script that calls fid.main) started as a subprocess with one thread per process,
    also for numpy's BLAS (torch's CPU kernels and the matrix square root are bitwise reproducible only at equal
    threads)."""
    env = dict(os.environ, OMP_NUM_THREADS='1', **(env or {}))
    # `--` stops torchrun's argparse from reading fid.py's --num as an abbreviation of its own --numa-binding
    launcher = [sys.executable] if nproc == 1 else [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                                                    f'--nproc_per_node={nproc}', '--']
    program = [str(ROOT / 'fid.py')] if script is None else [str(script), str(ROOT)]
    return subprocess.Popen(launcher + program + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)

def finish_cli(process):
    """The stdout of a start_cli process, which must exit 0."""
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    return stdout

def metric_lines(stdout):
    return dict(line.split() for line in stdout.splitlines() if line.split()[:1] and line.split()[0] in
                ('fid', 'is', 'sfid', 'precision', 'recall'))

# fid.py commands, one after the other in one process (one start of Python and torch, or of torchrun, for ref and
# calc), with the Frechet distance swapped for a stand-in that saves its four inputs: the statistics of the images and
# of the reference, compared here directly. The distance itself (a 2048x2048 matrix square root, about 20 CPU s on
# one core, once for 1 and once for 2 processes) is checked in test_frechet_distance_* above, on the singular
# statistics of a few images too.
FID_COMMANDS = """
import json, os, sys
import numpy as np
import torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import fid
def recorded_distance(mu1, sigma1, mu2, sigma2):
    np.savez(os.environ['FID_INPUTS'], mu1=mu1, sigma1=sigma1, mu2=mu2, sigma2=sigma2)
    return float(np.square(mu1 - mu2).sum() + np.square(sigma1 - sigma2).sum() + np.square(sigma1).sum())
fid.frechet_distance = recorded_distance
*first, last = json.loads(sys.argv[2])
for argv in first:  # in the process group that the last command leaves (torchrun's gloo ranks cannot meet twice)
    args = fid.parse_args(argv)
    dict(ref=fid.ref, calc=fid.calc)[args.command](args)
    dist.barrier()  # the command has ended on every rank (rank 0 has written its file)
fid.main(last)
"""

def test_ref_then_calc_two_processes_equal_one(setup, tmp_path):
    """`fid.py ref`, then `fid.py calc` of the same images, in 1 process and under torchrun with 2: the 2-process
    reference file is the 1-process one, bitwise; calc hands the Frechet distance the same statistics, bitwise, and
    prints the same lines (IS, precision, recall); the calc statistics of the reference images are the reference's."""
    (tmp_path / 'fid_commands.py').write_text(FID_COMMANDS)
    flags = [f'--detector={setup / "detector.pth"}', '--batch=3', '--workers=0']
    refs, started, lines, inputs = {}, {}, {}, {}
    for nproc in (1, 2):  # both at once (3 single-threaded processes, for 2 cores)
        refs[nproc] = setup / f'ref{nproc}.npz'
        commands = [['ref', f'--data={setup / "images"}', f'--dest={refs[nproc]}', '--features=1'] + flags,
                    ['calc', f'--images={setup / "images"}', f'--ref={refs[nproc]}', '--num=4', '--metrics=fid,is,pr']
                    + flags]
        started[nproc] = start_cli([json.dumps(commands)], nproc, script=tmp_path / 'fid_commands.py',
                                   env=dict(FID_INPUTS=str(tmp_path / f'inputs{nproc}.npz')))
    try:
        for nproc in (1, 2):
            lines[nproc] = metric_lines(finish_cli(started[nproc]))
            inputs[nproc] = np.load(tmp_path / f'inputs{nproc}.npz')
    finally:
        for process in started.values():
            if process.poll() is None:  # the other one failed: stop this one
                process.kill()
                process.communicate()
    r1, r2 = np.load(refs[1]), np.load(refs[2])
    assert sorted(r1.files) == ['features', 'mu', 'mu_s', 'num_channels', 'preprocess', 'resolution', 'sigma',
                                'sigma_s']
    assert r1['resolution'] == 16 and r1['num_channels'] == 3
    assert r1['mu'].shape == (2048,) and r1['sigma'].shape == (2048, 2048) and r1['mu_s'].shape == (2023,)
    assert r1['mu'].dtype == np.float64 and r1['features'].shape == (4, 2048)
    assert np.allclose(r1['mu'], r1['features'].astype(np.float64).mean(0))
    assert np.allclose(r1['sigma'], np.cov(r1['features'].astype(np.float64), rowvar=False))
    for key in r1.files:
        assert np.array_equal(r1[key], r2[key]), key

    assert lines[1] == lines[2] and set(lines[1]) == {'fid', 'is', 'precision', 'recall'}
    for key in ('mu1', 'sigma1', 'mu2', 'sigma2'):
        assert np.array_equal(inputs[1][key], inputs[2][key]), key
    assert np.array_equal(inputs[1]['mu2'], r1['mu']) and np.array_equal(inputs[1]['sigma2'], r1['sigma'])
    # the reference images themselves: the reference's statistics up to float rounding
    assert np.allclose(inputs[1]['mu1'], r1['mu'], rtol=0, atol=1e-6 * np.abs(r1['mu']).max())
    assert np.allclose(inputs[1]['sigma1'], r1['sigma'], rtol=0, atol=1e-6 * np.abs(r1['sigma']).max())
    values = {k: float(v) for k, v in lines[1].items()}
    assert values['precision'] == 1 and values['recall'] == 1 and values['is'] >= 1

CHUNK_CHECK = """
import sys
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
import fid
from common import init_distributed
init_distributed()
dataset = [(np.full((3, 4, 4), i, np.uint8), np.zeros([0], np.float32)) for i in range(11)]
detector = lambda images, return_dict=False: images.float().mean((1, 2, 3))[:, None] * torch.linspace(-1, 2, 2048)
expected = np.arange(11)[:, None] * np.linspace(-1, 2, 2048, dtype=np.float32)
for chunk in (1, 2, 100):  # chunks of 1 and 2 batches do not divide among 3 ranks
    for batch in (1, 3):
        stats, features = fid.compute_features(dataset, detector, 'cpu', batch=batch, workers=0, keep=('pool',), chunk=chunk)
        mu, sigma = stats['pool'].mean_cov()
        assert np.allclose(features['pool'], expected, rtol=1e-6), (chunk, batch)
        assert np.allclose(mu, expected.mean(0)) and np.allclose(sigma, np.cov(expected, rowvar=False)), (chunk, batch)
torch.distributed.destroy_process_group()
print('ok')
"""

def test_compute_features_three_ranks_keep_dataset_order(tmp_path):
    (tmp_path / 'check.py').write_text(CHUNK_CHECK)
    out = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=3',
                          str(tmp_path / 'check.py'), str(ROOT)], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert out.returncode == 0 and out.stdout.count('ok') == 3, out.stderr[-3000:]

def call_in_process(args, code):
    """fid.main in this process as a world of one; asserts the exit code of the expected error."""
    import fid
    with pytest.raises(SystemExit) as e:
        fid.main([str(a) for a in args])
    assert e.value.code == code

def test_calc_errors(setup, tmp_path, capsys):
    detector = f'--detector={setup / "detector.pth"}'
    np.savez(tmp_path / 'stats.npz', mu=np.zeros(2048), sigma=np.eye(2048), preprocess=np.array('nvidia'))
    calc = ['calc', f'--images={setup / "images"}', f'--ref={tmp_path / "stats.npz"}', '--workers=0', detector]
    call_in_process(calc + ['--num=100'], 2)
    assert 'found 4 images, but --num=100' in capsys.readouterr().err
    call_in_process(calc + ['--num=4', '--metrics=fid,pr'], 2)
    err = capsys.readouterr().err
    assert 'has no features' in err and '--features=1' in err
    call_in_process(calc + ['--num=4', '--preprocess=pytorch_fid'], 2)
    assert 'was made with --preprocess=nvidia' in capsys.readouterr().err
    np.savez(tmp_path / 'other.npz', mu=np.zeros(64), sigma=np.eye(64))
    call_in_process(calc[:2] + [f'--ref={tmp_path / "other.npz"}', '--num=4'] + calc[3:], 2)
    assert 'mu has shape (64,)' in capsys.readouterr().err

    bad = tmp_path / 'bad'
    bad.mkdir()
    for name in sorted(os.listdir(setup / 'images')):
        (bad / name).write_bytes((setup / 'images' / name).read_bytes())
    (bad / 'zz_broken.png').write_bytes(b'this is not a png')
    call_in_process(['calc', f'--images={bad}', f'--ref={tmp_path / "stats.npz"}', '--num=9', '--workers=0', detector], 2)
    err = capsys.readouterr().err
    assert 'zz_broken.png' in err and 'cannot read image' in err

#------------------------------------------------------------------------------
# Hostile input (issue 24): one line on stderr naming the file or flag, no traceback, exit 2 before any work
# (nothing written), exit 1 for a failure while working (nothing written either).

def bad_refs(folder):
    """name -> a reference npz that calc must refuse before any work, with a word of the expected message."""
    ok = dict(mu=np.zeros(2048), sigma=np.eye(2048), preprocess=np.array('nvidia'))
    refs = dict(objects=(ok | dict(mu=np.array([None] * 2048, dtype=object)), 'holds Python objects'),
                nan=(ok | dict(sigma=np.diag(np.r_[np.nan, np.ones(2047)])), 'NaN or inf'),
                inf=(ok | dict(mu=np.full(2048, np.inf)), 'NaN or inf'),
                strings=(ok | dict(mu=np.array(['0'] * 2048)), 'not numbers'),
                resolution=(ok | dict(resolution=np.array(32), num_channels=np.array(3)), 'resolution=32'),
                channels=(ok | dict(resolution=np.array(16), num_channels=np.array(1)), 'num_channels=1'),
                res_float=(ok | dict(resolution=np.array(16.5)), 'not one integer'))
    for name, (arrays, _) in refs.items():
        np.savez(folder / f'{name}.npz', **arrays)
    with zipfile.ZipFile(folder / 'damaged.npz', 'w') as z:  # a zip whose member is no .npy
        z.writestr('mu.npy', b'garbage')
        z.writestr('sigma.npy', b'garbage')
    return {folder / f'{name}.npz': word for name, (_, word) in refs.items()} | {folder / 'damaged.npz': 'not a .npy'}

def assert_one_line(err, code, expected_code, *words):
    """Exit code, one line of error; for a failure while working the progress bar (stderr) comes before it."""
    if expected_code == 1:
        err = '\n'.join(line for line in err.split('\n') if 'img/s]' not in line)
    assert code == expected_code and err.count('\n') == 1 and 'error: ' in err, err
    assert 'Traceback' not in err and 'weights_only' not in err and 'Warning' not in err, err
    assert all(w in err for w in words), (words, err)

def test_hostile_input_one_line_exit_2_nothing_written(setup, tmp_path, capsys):
    import fid
    refs, work = tmp_path / 'refs', tmp_path / 'work'
    refs.mkdir(), work.mkdir()
    detector, images = f'--detector={setup / "detector.pth"}', f'--images={setup / "images"}'
    good_ref = refs / 'good.npz'
    np.savez(good_ref, mu=np.zeros(2048), sigma=np.eye(2048), resolution=np.array(16), num_channels=np.array(3))
    pickled = tmp_path / 'detector.pkl'
    pickled.write_bytes(pickle.dumps({'conv': np.zeros(3)}))
    calc = ['calc', images, '--num=4', '--workers=0', detector]
    ref = ['ref', f'--data={setup / "images"}', '--workers=0', detector]
    cases = [(calc[:2] + [f'--ref={good_ref}', '--num=0'] + calc[3:], ['--num']),
             (calc[:2] + [f'--ref={good_ref}', '--num=-1'] + calc[3:], ['--num']),
             (calc + [f'--ref={good_ref}', '--batch=0'], ['--batch']),
             (calc + [f'--ref={good_ref}', '--workers=-1'], ['--workers']),
             (calc + [f'--ref={good_ref}', '--seed=-1'], ['--seed']),
             (calc + [f'--ref={good_ref}', '--batch=inf'], ['--batch']),
             (calc + [f'--ref={refs}'], [str(refs), 'folder']),
             (calc + [f'--ref={good_ref}', f'--detector={pickled}'], [str(pickled), 'neither a state dict']),
             (calc + [f'--ref={good_ref}', f'--detector={tmp_path}'], [str(tmp_path), 'folder']),
             (['calc', f'--images={tmp_path / "missing"}', f'--ref={good_ref}'], ['missing', 'no such file']),
             (ref + [f'--dest={work}'], [str(work)]),
             (ref + [f'--dest={work / "noext"}'], ['noext', '.npz']),
             (ref + [f'--dest={work / "dir.npz"}', '--batch=0'], ['--batch']),
             (ref + ['--dest=/proc/fid-test/ref.npz'], ['/proc/fid-test/ref.npz', 'cannot write']),
             (ref + [f'--dest={good_ref}/ref.npz'], [str(good_ref), 'cannot write']),
             (['ref', f'--data={tmp_path / "missing"}', f'--dest={work / "r.npz"}'], ['missing', 'no such file']),
             (['ref', '--data=demo-2', f'--dest={work / "r.npz"}'], ['demo-2', '4 to 1024']),
             (['ref', '--data=demo-8', '--num=1', f'--dest={work / "r.npz"}'], ['--num']),
             (['ref', '--data=demo-8', '--num=100000000', '--features=1', f'--dest={work / "r.npz"}'],
              ['100,000,000 images', 'GiB'])]
    cases += [(calc + [f'--ref={path}'], [str(path), word]) for path, word in bad_refs(refs).items()]
    (work / 'dir.npz').mkdir()
    cases += [(ref + [f'--dest={work / "dir.npz"}'], ['dir.npz', 'is a folder'])]
    for args, words in cases:
        with pytest.raises(SystemExit) as e:
            fid.main([str(a) for a in args])
        assert_one_line(capsys.readouterr().err, e.value.code, 2, *words)
        assert sorted(os.listdir(work)) == ['dir.npz'] or not os.listdir(work), (args, os.listdir(work))

def test_load_ref_checks_resolution_and_channels(tmp_path):
    import fid
    edm = tmp_path / 'edm.npz'  # EDM's published references store neither
    np.savez(edm, mu=np.zeros(2048), sigma=np.eye(2048))
    assert set(fid.load_ref(str(edm), ['fid'], 'nvidia', resolution=64, num_channels=3)) == {'mu', 'sigma'}
    ours = tmp_path / 'ours.npz'
    np.savez(ours, mu=np.zeros(2048), sigma=np.eye(2048), resolution=np.array(8), num_channels=np.array(3))
    assert fid.load_ref(str(ours), ['fid'], 'nvidia', resolution=8, num_channels=3)['resolution'] == 8
    assert fid.load_ref(str(ours), ['fid'], 'nvidia')['num_channels'] == 3
    for kwargs in (dict(resolution=16, num_channels=3), dict(resolution=8, num_channels=1)):
        with pytest.raises(UserError, match='ours.npz was made from images with'):
            fid.load_ref(str(ours), ['fid'], 'nvidia', **kwargs)

def test_ref_demo_data_full_disk_and_non_finite_features(setup, tmp_path, monkeypatch, capsys):
    """ref of demo data stores its resolution and channels; a full disk and non-finite statistics fail while working
    (exit 1): one line naming the file, no temp file, no reference."""
    import fid
    dest = tmp_path / 'out' / 'demo8.npz'
    flags = ['ref', '--data=demo-8', '--num=2', '--batch=2', '--workers=0', f'--dest={dest}']
    def full_disk(file, **arrays):
        file.write(b'x' * 1000)
        raise OSError(errno.ENOSPC, 'No space left on device')
    with monkeypatch.context() as m:
        m.setattr(np, 'savez', full_disk)
        call_in_process(flags + [f'--detector={setup / "detector.pth"}'], 1)
    assert_one_line(capsys.readouterr().err, 1, 1, str(dest), 'No space left')
    assert not os.listdir(tmp_path / 'out')
    net = random_detector()
    net.Mixed_7c.branch_pool.conv.weight.fill_(3e38)  # finite weights, features overflow to inf
    torch.save(net.state_dict(), tmp_path / 'overflow.pth')
    call_in_process(flags + [f'--detector={tmp_path / "overflow.pth"}'], 1)
    assert_one_line(capsys.readouterr().err, 1, 1, 'demo-8', 'NaN or inf', 'nothing written')
    assert not os.listdir(tmp_path / 'out')
    np.savez(tmp_path / 'ref.npz', mu=np.zeros(2048), sigma=np.eye(2048))
    call_in_process(['calc', f'--images={setup / "images"}', f'--ref={tmp_path / "ref.npz"}', '--num=2', '--batch=2',
                     '--workers=0', '--metrics=is', f'--detector={tmp_path / "overflow.pth"}'], 1)
    assert_one_line(capsys.readouterr().err, 1, 1, str(setup / 'images'), 'NaN or inf')
    fid.main(flags + [f'--detector={setup / "detector.pth"}'])
    assert f'Saved {dest}' in capsys.readouterr().out
    with np.load(dest) as f:
        assert f['resolution'] == 8 and f['num_channels'] == 3 and f['mu'].shape == (2048,)
