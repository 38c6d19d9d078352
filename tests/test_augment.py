"""common.AugmentPipe, EDM's augmentation pipe (NVlabs/edm training/augment.py; ADA, Karras et al. 2020, App. B):
each transform checked against what its labels say was applied, using independent formulas (numpy flips,
rotations and reflect padding; linear ramps, which the resampling reproduces exactly), and the whole pipe against
outputs recorded from the official code (tests/data/augment_ref.pt)."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from common import AugmentPipe

TRAIN = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)   # EDM train.py --augment
COLOR = dict(brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)
BLIT = dict(rotate_int=1, translate_int=1)

def augment(images, seed=0, **kwargs):
    torch.manual_seed(seed)
    return AugmentPipe(**kwargs)(images)

def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))

#------------------------------------------------------------------------------
# The official code's own outputs.

def test_reproduces_official_edm_augment_pipe():
    ref = torch.load(Path(__file__).parent / 'data' / 'augment_ref.pt', map_location='cpu', weights_only=True)
    for case in ref['cases']:  # call as ref['call'] records it
        torch.manual_seed(case['seed'])
        images, labels = AugmentPipe(**case['kwargs'])(ref['inputs'][case['input']].clone())
        torch.testing.assert_close(images, case['images'], atol=1e-5, rtol=0, msg=case['name'])
        torch.testing.assert_close(labels, case['labels'], atol=1e-6, rtol=0, msg=case['name'])
        assert torch.equal(torch.rand(4), case['next_rand']), f"{case['name']}: not the official number of draws"

#------------------------------------------------------------------------------
# Identity, shapes, determinism, probabilities.

def test_p0_is_identity_with_zero_labels():
    x = randn(4, 3, 16, 16)
    images, labels = augment(x, p=0, **TRAIN, **BLIT, **COLOR)
    assert labels.shape == (4, 19) and torch.all(labels == 0)
    torch.testing.assert_close(images, x, atol=1e-5, rtol=0)   # 2x up/down with an orthogonal wavelet: identity

@pytest.mark.parametrize('channels, kwargs, width', [(3, TRAIN, 9), (1, TRAIN, 9), (3, COLOR, 6), (1, TRAIN | BLIT | COLOR, 19)])
def test_shapes_dtypes(channels, kwargs, width):
    images, labels = augment(randn(3, channels, 8, 8), p=0.7, **kwargs)
    assert images.shape == (3, channels, 8, 8) and images.dtype == torch.float32 and images.isfinite().all()
    assert labels.shape == (3, width) and labels.dtype == torch.float32

def test_same_seed_same_batch_other_seed_other_batch():
    x = randn(4, 3, 8, 8)
    a, b, c = (augment(x, seed=s, **TRAIN, **COLOR) for s in (5, 5, 6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.allclose(a[0], c[0]) and not torch.allclose(a[1], c[1])

def test_probabilities():
    _, labels = augment(torch.zeros(4000, 1, 4, 4), p=0.3, xflip=1e8, yflip=1)
    assert abs(labels[:, 0].mean() - 0.5) < 0.03            # xflip=1e8: a fair coin at any p > 0 (EDM train.py)
    assert abs(labels[:, 1].mean() - 0.3 / 2) < 0.03        # applied with probability p, then a coin
    _, labels = augment(torch.zeros(4000, 1, 4, 4), p=0.3, scale=1)
    assert abs((labels[:, 0] != 0).float().mean() - 0.3) < 0.03

#------------------------------------------------------------------------------
# Pixel blitting: exact, checked with numpy.

@pytest.mark.parametrize('name, axis', [('xflip', 3), ('yflip', 2)])
def test_flip_where_label_says(name, axis):
    x = randn(16, 3, 8, 8)
    images, labels = augment(x, **{name: 1})
    flipped = labels[:, 0] == 1
    assert 0 < flipped.sum() < 16
    expected = np.where(flipped.numpy()[:, None, None, None], np.flip(x.numpy(), axis), x.numpy())
    assert np.array_equal(images.numpy(), expected)

def test_rotate_int_quarter_turns():
    x = randn(16, 3, 8, 8)
    images, labels = augment(x, rotate_int=1)
    turns = {(0, 0): 0, (1, 0): 1, (1, 1): 2, (0, 1): 3}    # labels: the x- and y-flips the turn amounts to
    ks = [turns[tuple(row)] for row in labels.int().tolist()]
    assert len(set(ks)) == 4
    for image, source, k in zip(images.numpy(), x.numpy(), ks):
        assert np.array_equal(image, np.rot90(source, k, axes=(1, 2)))   # counter-clockwise, as np.rot90

def test_translate_int_moves_by_label():
    x, W, tmax = randn(16, 3, 16, 16), 16, 0.25
    images, labels = augment(x, translate_int=1, translate_int_max=tmax)
    shifts = (labels * W * tmax).round().int().tolist()      # labels are pixels / (size * translate_int_max)
    assert len({tuple(s) for s in shifts}) > 8
    padded = np.pad(x.numpy(), [(0, 0), (0, 0), (W, W), (W, W)], mode='reflect')
    for image, source, (tx, ty) in zip(images.numpy(), padded, shifts):
        assert np.array_equal(image, source[:, W + ty: 2 * W + ty, W - tx: 2 * W - tx])   # right by tx, up by ty

#------------------------------------------------------------------------------
# Geometric transforms: on images whose channels are the x and y pixel coordinates (origin at the center), the
# output at pixel q holds the input position it was read from, G q + t. Fitting that affine map recovers the
# transform, which must be the one the labels encode. The transforms pivot about one fixed point c near the center,
# t = (I - G) c (0.049 px up-left of the center, in the official code too: its alignment assumes a filter centered on
# tap 5 of 0..11, and the centroid of sym6 is 5.098).

def read_map(kwargs, N=8, R=32, radius=4):
    c = (R - 1) / 2
    y, x = torch.meshgrid(torch.arange(R) - c, torch.arange(R) - c, indexing='ij')
    images, labels = augment(torch.stack([x, y, torch.ones_like(x)]).expand(N, 3, R, R).clone(), **kwargs)
    inner = (x.abs() <= radius) & (y.abs() <= radius)         # far from the border: no reflected pixels
    q = torch.stack([x[inner], y[inner], torch.ones_like(x[inner])], 1).double()   # [P, 3]
    out = images[:, :2, inner].double().transpose(1, 2)       # [N, P, 2]
    maps = torch.linalg.lstsq(q.expand(N, -1, -1), out).solution.transpose(1, 2)   # [N, 2, 3] = [G | t]
    assert (q @ maps.transpose(1, 2) - out).abs().max() < 1e-3   # the resampling keeps linear ramps linear
    return maps[:, :, :2], maps[:, :, 2], labels.double()

def assert_fixed_pivot(G, t):
    I_G = torch.eye(2, dtype=G.dtype) - G                       # [N, 2, 2]
    c = torch.linalg.lstsq(I_G.reshape(-1, 2), t.reshape(-1, 1)).solution[:, 0]   # one pivot for the whole batch
    assert c.abs().max() < 0.1                                  # near the image center
    torch.testing.assert_close(t, I_G @ c, atol=1e-4, rtol=0)

def test_scale_by_label():
    G, t, labels = read_map(dict(scale=1))
    s = 2 ** (0.2 * labels[:, 0])                             # scale_std = 0.2 (log2)
    torch.testing.assert_close(G, torch.eye(2, dtype=G.dtype) / s[:, None, None], atol=1e-4, rtol=0)
    assert_fixed_pivot(G, t)
    assert labels.abs().min() > 0

def test_rotate_frac_by_label():
    G, t, labels = read_map(dict(rotate_frac=1))
    cos, sin = labels[:, 0] + 1, labels[:, 1]
    torch.testing.assert_close(cos ** 2 + sin ** 2, torch.ones_like(cos))
    rotation = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    torch.testing.assert_close(G, rotation, atol=1e-4, rtol=0)    # output pixel q reads input pixel R q
    assert_fixed_pivot(G, t)
    assert sin.abs().min() > 0

def test_aniso_by_label():
    G, t, labels = read_map(dict(aniso=1))
    w = labels.norm(dim=1)                                    # label = w (cos r, sin r), r measured with y up
    u = torch.stack([labels[:, 0], -labels[:, 1]], 1) / w[:, None]   # the stretch axis in pixels (y down)
    torch.testing.assert_close(G, G.transpose(1, 2), atol=1e-4, rtol=0)   # symmetric, determinant 1
    torch.testing.assert_close(torch.linalg.det(G), torch.ones_like(w), atol=1e-4, rtol=0)
    eig = torch.linalg.eigvalsh(G)
    torch.testing.assert_close(eig, torch.stack([2 ** (-0.2 * w), 2 ** (0.2 * w)], 1), atol=1e-4, rtol=0)
    Gu = (G @ u[:, :, None])[:, :, 0]
    assert (Gu[:, 0] * u[:, 1] - Gu[:, 1] * u[:, 0]).abs().max() < 1e-4   # u is an eigenvector
    assert_fixed_pivot(G, t)

def test_translate_frac_by_label():
    G, t, labels = read_map(dict(translate_frac=1, translate_frac_std=0.05))
    torch.testing.assert_close(G, torch.eye(2, dtype=G.dtype).expand_as(G), atol=1e-4, rtol=0)
    torch.testing.assert_close(t, -labels * 32 * 0.05, atol=1e-4, rtol=0)   # content moves by +label * size * std

#------------------------------------------------------------------------------
# Color transforms, per pixel, against their definitions on the luma axis (1, 1, 1) / sqrt(3).

def luma_chroma(x):  # [N, 3, H, W] -> mean of R, G, B [N, 1, H, W] and the rest [N, 3, H, W]
    luma = x.mean(1, keepdim=True)
    return luma, x - luma

def test_color_by_label():
    x = randn(8, 3, 4, 4)
    luma, chroma = luma_chroma(x)
    k = lambda v: v[:, None, None, None]
    out, w = augment(x, brightness=1)
    torch.testing.assert_close(out, x + 0.2 * k(w[:, 0]), atol=1e-5, rtol=0)
    out, w = augment(x, contrast=1)
    torch.testing.assert_close(out, x * 2 ** (0.5 * k(w[:, 0])), atol=1e-5, rtol=1e-5)
    out, w = augment(x, lumaflip=1)
    assert 0 < w.sum() < 8
    torch.testing.assert_close(out, x - 2 * luma * k(w[:, 0]), atol=1e-5, rtol=0)
    out, w = augment(x, saturation=1)
    torch.testing.assert_close(out, luma + chroma * 2 ** k(w[:, 0]), atol=1e-5, rtol=1e-5)
    out, w = augment(x, hue=1)                                # rotation about the luma axis by the labelled angle
    out_luma, out_chroma = luma_chroma(out)
    torch.testing.assert_close(out_luma, luma, atol=1e-5, rtol=0)
    cos = (out_chroma * chroma).sum(1) / (chroma.norm(dim=1) * out_chroma.norm(dim=1))
    torch.testing.assert_close(cos, (w[:, 0] + 1)[:, None, None].expand_as(cos), atol=1e-4, rtol=0)
    axis = torch.ones(3) / math.sqrt(3)
    sin = (torch.linalg.cross(chroma, out_chroma, dim=1) * axis[:, None, None]).sum(1) / chroma.norm(dim=1) ** 2
    torch.testing.assert_close(sin, w[:, 1, None, None].expand_as(sin), atol=1e-4, rtol=0)
