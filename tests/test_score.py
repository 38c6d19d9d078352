# Tests for the toy score of fid.py (section 3): a tiny classifier trained on the demo data scores held-out real
# images near its finite-sample floor, uniform noise far away, and damaged real images in between, worse with more
# damage; the demo-structure share (the generator's own model fitted to each image) is high for real images, zero for
# noise, and falls with damage. 8x8 demo data; one classifier serves every test: the session's (conftest.py's
# toy_cache, which train --metrics=toy_fd tests use too), trained once into a temporary cache.

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import fid  # noqa: E402
from common import save_image  # noqa: E402

RES, N = 8, 300  # image size, images per set

#------------------------------------------------------------------------------
# Damage: uint8 [N, C, H, W] -> uint8 [N, C, H, W], seeded.

def blur(images, sigma):
    """Gaussian blur of std `sigma` pixels (separable, reflected borders)."""
    r = int(np.ceil(3 * sigma))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float64) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).float()
    c = images.shape[1]
    x = F.pad(images.float(), [r, r, r, r], mode='reflect')
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    x = F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return x.round().clamp(0, 255).to(torch.uint8)

def shuffle_patches(images, fraction, patch, seed=0):
    """In every image, `fraction` of the patch x patch tiles trade places (a random permutation among them)."""
    n, c, h, w = images.shape
    g = torch.Generator().manual_seed(seed)
    tiles = images.reshape(n, c, h // patch, patch, w // patch, patch)  # [N, C, H/p, p, W/p, p]
    tiles = tiles.permute(0, 2, 4, 1, 3, 5).reshape(n, -1, c, patch, patch)  # -> [N, L, C, p, p]
    out, m = tiles.clone(), int(round(fraction * tiles.shape[1]))
    for i in range(n):
        chosen = torch.randperm(tiles.shape[1], generator=g)[:m]
        out[i, chosen] = tiles[i, chosen[torch.randperm(m, generator=g)]]
    out = out.reshape(n, h // patch, w // patch, c, patch, patch).permute(0, 3, 1, 4, 2, 5)  # -> [N, C, H/p, p, W/p, p]
    return out.reshape(n, c, h, w)

def colour_jitter(images, strength, seed=0):
    """Per image: contrast times 1 - strength * U(0, 1), then a per-channel offset of strength * 128 * U(-1, 1)."""
    n, c = images.shape[:2]
    g = torch.Generator().manual_seed(seed)
    contrast = 1 - strength * torch.rand(n, 1, 1, 1, generator=g)
    offset = strength * 128 * (2 * torch.rand(n, c, 1, 1, generator=g) - 1)
    return ((images.float() - 128) * contrast + 128 + offset).round().clamp(0, 255).to(torch.uint8)

def uniform_noise(shape, seed=0):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)

#------------------------------------------------------------------------------
# The classifier, trained once.

@pytest.fixture(scope='module')
def toy(toy_cache):
    cache = toy_cache
    dataset = fid.open_toy_data(f'demo-{RES}', 3)
    train_idx, ref_idx, floor_idx = fid.toy_splits(dataset, N)
    path = fid.toy_cache_path(str(cache), f'demo-{RES}', dataset)
    assert os.path.isfile(path)  # trained by toy_cache on the same demo images (toy_splits' training range)
    net = fid.toy_classifier(dataset, train_idx, path)
    (ref, ref_labels), other = fid.load_images(dataset, ref_idx), fid.load_images(dataset, floor_idx)[0]
    ref_features, ref_p = fid.toy_features(net, ref)
    score = lambda images: fid.toy_fd(fid.toy_features(net, images)[0], ref_features)
    return dict(net=net, cache=cache, path=path, ref_p=ref_p, ref_labels=ref_labels, other=other, score=score)

def test_demo_classifier_learns_the_shapes(toy):
    assert toy['net'].head.out_features == 3 and os.path.isfile(toy['path'])
    accuracy = (toy['ref_p'].argmax(1) == toy['ref_labels'].numpy()).mean()
    assert accuracy > 0.6  # 3 classes: chance is 1/3; at 8 px a small disc and a small square look alike

def test_real_scores_near_zero_noise_far(toy):
    real, noise = toy['score'](toy['other']), toy['score'](uniform_noise(toy['other'].shape))
    assert 0 <= real < noise / 20

@pytest.mark.parametrize('damage, strengths', [
    (blur, [0.5, 1, 2]),                                                   # std in pixels
    (lambda x, f: shuffle_patches(x, f, patch=2), [0.25, 0.5, 1]),        # fraction of 2x2 tiles moved
    (colour_jitter, [0.25, 0.5, 1]),
], ids=['blur', 'patch-shuffle', 'colour-jitter'])
def test_damage_scores_between_real_and_noise_ordered(toy, damage, strengths):
    real, noise = toy['score'](toy['other']), toy['score'](uniform_noise(toy['other'].shape))
    scores = [toy['score'](damage(toy['other'], s)) for s in strengths]
    assert real < scores[0] < scores[1] < scores[2] < noise, (real, scores, noise)

@pytest.fixture(scope='module')
def masks():
    return fid.demo_masks(RES)

def test_demo_fit_real_near_one_noise_zero_damage_ordered(toy, masks):
    """The demo-structure share: held-out real images fit the generator's model (those whose colours differ enough),
    noise never does, and damaged images fit less the more they are damaged."""
    fit = lambda images: fid.demo_fit(images, masks)
    real = fit(toy['other'])
    assert real > 0.75 and fit(uniform_noise(toy['other'].shape)) == 0
    noisy = lambda x, s: (x.float() + s * (uniform_noise(x.shape).float() - 127.5)).round().clamp(0, 255).byte()
    for damage, strengths in ((blur, [0.45, 0.5, 0.7]), (lambda x, f: shuffle_patches(x, f, patch=2), [0.1, 0.25, 0.5]),
                              (colour_jitter, [0.5, 0.75, 1]), (noisy, [0.11, 0.12, 0.16])):
        scores = [fit(damage(toy['other'], s)) for s in strengths]
        assert real > scores[0] > scores[1] > scores[2], (real, scores)

def test_demo_fit_equals_a_brute_force_fit(masks):
    """The vectorized least-squares fit against a loop over the masks for a few images (real, shifted, noisy)."""
    demo = fid.open_toy_data(f'demo-{RES}', 3)
    images = fid.load_images(demo, range(20000, 20006))[0]
    images = torch.cat([images, images.roll(3, dims=3), (images.float() + 30 * torch.randn(images.shape,
                        generator=torch.Generator().manual_seed(0))).clamp(0, 255).to(torch.uint8)])
    top, outcomes = fid.demo_top_half(RES).ravel(), set()
    for image in images:
        x = image.double().flatten(1).numpy()  # [C, P]
        best = min((sum(((x[:, r] - x[:, r].mean(1, keepdims=True)) ** 2).sum() for r in
                        (m, ~m & top, ~m & ~top) if r.any()), i) for i, m in enumerate(masks))
        m = masks[best[1]]
        col = [x[:, r].mean(1) if r.any() else np.zeros(3) for r in (m, ~m & top, ~m & ~top)]
        contrast = [abs(col[1] - col[2]).max()] + [abs(col[0] - col[h]).max() for h, half in ((1, top), (2, ~top))
                                                   if (m & half).any()]
        expect = np.sqrt(best[0] / x.size) <= fid.DEMO_FIT_RMS and m.any() and min(contrast) >= fid.DEMO_FIT_CONTRAST
        assert fid.demo_fit(image[None], masks) == float(expect)
        outcomes.add(bool(expect))
    assert outcomes == {True, False}  # both branches met

def test_classifier_deterministic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(fid, 'TOY_STEPS', 20)
    dataset = fid.open_toy_data(f'demo-{RES}', 3)
    nets = [fid.toy_classifier(dataset, range(256), str(tmp_path / f'{i}.pt')) for i in range(2)]
    cached = fid.toy_classifier(dataset, range(256, 512), str(tmp_path / '0.pt'))  # other images: only a load equals
    images = fid.load_images(dataset, range(256))[0]
    for net in nets[1:] + [cached]:
        for key, value in nets[0].state_dict().items():
            assert torch.equal(value, net.state_dict()[key]), key
    assert np.array_equal(fid.toy_features(nets[0], images)[0], fid.toy_features(cached, images)[0])

def test_unlabelled_dataset_learns_rotations(tmp_path, monkeypatch):
    monkeypatch.setattr(fid, 'TOY_STEPS', 300)  # enough to beat chance clearly; the default adds only a little
    demo = fid.open_toy_data(f'demo-{RES}', 3)
    folder = tmp_path / 'unlabelled'
    folder.mkdir()
    for i in range(64):
        save_image(demo[i][0], folder / f'{i:03d}.png')
    dataset = fid.open_toy_data(str(folder), 3)
    train_idx, ref_idx, floor_idx = fid.toy_splits(dataset, 1000)
    assert len(ref_idx) == len(floor_idx) == 16 and len(train_idx) == 32 and dataset.label_dim == 0
    assert sorted([*train_idx, *ref_idx, *floor_idx]) == list(range(64))
    net = fid.toy_classifier(dataset, train_idx)
    assert net.head.out_features == 4
    held_out = fid.load_images(demo, range(10000, 10400))[0]
    k = torch.arange(len(held_out)) % 4
    accuracy = (fid.toy_features(net, fid.rotate(held_out, k))[1].argmax(1) == k.numpy()).mean()
    assert accuracy > 0.35  # chance is 1/4 (std 0.022 over 400 images); the two-tone background shows whether an
                            # image was turned by 90 degrees, but only a triangle tells 0 from 180 degrees

#------------------------------------------------------------------------------
# Command line: `python fid.py score`

def write_pngs(folder, images):
    for i, image in enumerate(images):
        os.makedirs(folder / f'{i - i % 32:06d}', exist_ok=True)  # generate --subdirs layout
        save_image(image, folder / f'{i - i % 32:06d}' / f'{i:06d}.png')

def test_cli_score(toy, masks, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fid, 'demo_masks', lambda R: masks)  # demo_masks(8), computed once for the module (~5 s)
    write_pngs(tmp_path / 'samples', toy['other'][:64])
    fid.main(['score', f'--images={tmp_path / "samples"}', f'--data=demo-{RES}', f'--cache={toy["cache"]}'])
    out = capsys.readouterr().out
    values = {line.split()[0]: float(line.split()[1]) for line in out.splitlines() if len(line.split()) == 2}
    assert set(values) == {'toy_fd', 'toy_fd_real', 'toy_fd_noise', 'confident', 'confident_real', 'demo_fit',
                           'demo_fit_real'}, out
    assert 'Scoring 64 images' in out and '(training it, once)' not in out  # the fixture's classifier was reused
    assert values['toy_fd'] < values['toy_fd_noise'] / 5 and values['toy_fd_real'] < values['toy_fd_noise'] / 5
    assert 0 <= values['confident'] <= 1

def test_cli_bad_input_one_line_exit_2(toy, tmp_path, capsys):
    write_pngs(tmp_path / 'samples', toy['other'][:4])
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'a_file').write_text('not a folder')
    samples, demo = f'--images={tmp_path / "samples"}', f'--data=demo-{RES}'
    cases = [([f'--images={tmp_path / "missing"}', demo], 'no such file or folder'),
             ([f'--images={tmp_path / "empty"}', demo], 'no images found'),
             ([samples, '--data=demo-16'], 'holds 8x8x3 images, demo-16 16x16x3'),
             ([samples, f'--data={tmp_path / "missing.zip"}'], 'no such dataset'),
             ([samples, demo, '--num=0'], 'argument --num: 0 is out of range'),
             ([samples, demo, '--num=inf'], 'argument --num'),
             ([samples, demo, '--seed=-1'], 'argument --seed: -1 is out of range'),
             ([samples, demo, f'--cache={tmp_path / "a_file"}'], 'a_file: exists and is not a folder'),
             ([samples, demo, '--cache=/proc/toy-cache'], 'cannot write there')]  # before 40 s of training
    for flags, message in cases:
        with pytest.raises(SystemExit) as e:
            fid.main(['score', f'--cache={toy["cache"]}'] + flags)
        err = capsys.readouterr().err
        assert e.value.code == 2 and 'error: ' in err and err.count('\n') == 1 and message in err, err
        assert 'Traceback' not in err
    assert sorted(os.listdir(tmp_path)) == ['a_file', 'empty', 'samples']

def test_cli_full_disk_exit_1_no_temp_file(tmp_path, monkeypatch, capsys):
    """The classifier is written to a temp file renamed at the end: a full disk names the file and leaves nothing."""
    monkeypatch.setattr(fid, 'TOY_STEPS', 2)  # the plumbing, not the quality
    write_pngs(tmp_path / 'samples', fid.load_images(fid.open_toy_data(f'demo-{RES}', 3), range(8))[0])
    def full_disk(obj, path, *args, **kwargs):
        with open(path, 'wb') as f:
            f.write(b'x' * 100)
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(torch, 'save', full_disk)
    (tmp_path / 'cache').mkdir()
    with pytest.raises(SystemExit) as e:
        fid.main(['score', f'--images={tmp_path / "samples"}', f'--data=demo-{RES}', f'--cache={tmp_path / "cache"}'])
    err = capsys.readouterr().err.split('\r')[-1]  # after the progress bar, which clears itself
    assert e.value.code == 1 and err.count('\n') == 1 and err.startswith('error: '), err
    assert 'No space left on device' in err and str(tmp_path / 'cache' / 'toy-classifier-') in err
    assert os.listdir(tmp_path / 'cache') == []

def test_cli_score_labelled_dataset(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fid, 'TOY_STEPS', 50)  # the plumbing, not the quality
    demo = fid.open_toy_data(f'demo-{RES}', 3)
    images, labels = fid.load_images(demo, range(64))
    write_pngs(tmp_path / 'data', images)
    names = [f'{i - i % 32:06d}/{i:06d}.png' for i in range(64)]
    labels = {'labels': [[name, int(k)] for name, k in zip(names, labels)]}
    (tmp_path / 'data' / 'dataset.json').write_text(json.dumps(labels))
    write_pngs(tmp_path / 'samples', fid.load_images(demo, range(100, 116))[0])
    flags = ['score', f'--images={tmp_path / "samples"}', f'--data={tmp_path / "data"}', f'--cache={tmp_path / "c"}']
    fid.main(flags)
    out = capsys.readouterr().out
    assert '(training it, once)' in out and 'accuracy on 16 held-out real images' in out, out
    assert len(os.listdir(tmp_path / 'c')) == 1
    fid.main(flags)
    assert capsys.readouterr().out == out.replace(' (training it, once)', '')  # loaded from the cache: same numbers
