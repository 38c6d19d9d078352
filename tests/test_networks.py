"""EDM U-Nets (DDPM++/NCSN++ SongUNet, ADM DhariwalUNet) and the official-checkpoint loader.
Checked against EDM's training/networks.py. Big networks are only counted (on the meta device);
forward passes use tiny configs."""

import math
import pickle
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import EDMPrecond, write_persistence_pickle  # noqa: E402
from common import (Conv2d, DhariwalUNet, GroupNorm, PositionalEmbedding, SongUNet, UNetBlock, UserError,
                    load_official)

# Paper configs as EDM's train.py builds them.
DDPMPP_CIFAR = dict(img_resolution=32, in_channels=3, out_channels=3, model_channels=128, channel_mult=[2, 2, 2],
                    embedding_type='positional', channel_mult_noise=1, encoder_type='standard',
                    decoder_type='standard', resample_filter=[1, 1])
NCSNPP_CIFAR = dict(DDPMPP_CIFAR, embedding_type='fourier', channel_mult_noise=2, encoder_type='residual',
                    resample_filter=[1, 3, 3, 1])
DDPMPP_64 = dict(DDPMPP_CIFAR, img_resolution=64, channel_mult=[1, 2, 2, 2])
ADM_64 = dict(img_resolution=64, in_channels=3, out_channels=3)

# Tiny configs for forward passes; dropout 0 so that train mode is deterministic.
TINY_DDPMPP = dict(img_resolution=16, in_channels=3, out_channels=3, model_channels=16, channel_mult=[1, 2, 2],
                   num_blocks=1, attn_resolutions=[8], dropout=0.0, embedding_type='positional',
                   channel_mult_noise=1, encoder_type='standard', decoder_type='standard', resample_filter=[1, 1])
TINY_NCSNPP = dict(TINY_DDPMPP, embedding_type='fourier', channel_mult_noise=2, encoder_type='residual',
                   resample_filter=[1, 3, 3, 1])
TINY_ADM = dict(img_resolution=16, in_channels=3, out_channels=3, model_channels=32, channel_mult=[2, 2],
                num_blocks=1, attn_resolutions=[8], dropout=0.0)
TINY = {'ddpmpp': (SongUNet, TINY_DDPMPP), 'ncsnpp': (SongUNet, TINY_NCSNPP), 'adm': (DhariwalUNet, TINY_ADM)}

# SongUNet block settings (EDM networks.py, SongUNet), for block-level counts.
SONG_BLOCK = dict(emb_channels=512, num_heads=1, skip_scale=math.sqrt(0.5), eps=1e-6, resample_proj=True,
                  adaptive_scale=False)

def num_params(module):
    return sum(p.numel() for p in module.parameters())

def num_buffer_elements(module):
    return sum(b.numel() for b in module.buffers())

def on_meta(cls, **kwargs):
    with torch.device('meta'):
        return cls(**kwargs)

def inputs(n, c, h, w, label_dim=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    sigma = torch.randn(n, generator=g)
    labels = F.one_hot(torch.arange(n) % label_dim, label_dim).float() if label_dim else None
    return x, sigma, labels

def randomize(net, seed=0):  # perturb every weight so that zero-initialized output layers do not hide bugs
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net

#------------------------------------------------------------------------------
# Parameter counts and names (EDM's released models)

@pytest.mark.parametrize('cls, kwargs, params, buffer_elements', [
    (SongUNet, DDPMPP_CIFAR, 55_732_739, 32),
    (SongUNet, dict(DDPMPP_CIFAR, augment_dim=9), 55_733_891, 32),
    (SongUNet, dict(DDPMPP_CIFAR, label_dim=10), 55_734_147, 32),
    (SongUNet, dict(DDPMPP_CIFAR, label_dim=10, augment_dim=9), 55_735_299, 32),
    (SongUNet, NCSNPP_CIFAR, 56_395_523, 288),
    (SongUNet, dict(NCSNPP_CIFAR, label_dim=10, augment_dim=9), 56_400_643, 288),
    (SongUNet, DDPMPP_64, 61_804_419, 48),
    (SongUNet, dict(DDPMPP_64, augment_dim=9), 61_805_571, 48),
    (SongUNet, dict(DDPMPP_64, in_channels=5), 61_806_723, 48),
    (SongUNet, dict(NCSNPP_CIFAR, img_resolution=64, channel_mult=[1, 2, 2, 2]), 62_758_787, 368),
    (SongUNet, dict(img_resolution=64, in_channels=3, out_channels=3), 61_804_419, 48),
    (DhariwalUNet, ADM_64, 295_131_267, 48),
    (DhariwalUNet, dict(ADM_64, label_dim=1000), 295_899_267, 48),
])
def test_param_counts_match_official(cls, kwargs, params, buffer_elements):
    net = on_meta(cls, **kwargs)
    assert num_params(net) == params
    assert num_buffer_elements(net) == buffer_elements

def test_param_breakdowns_match_official():
    song = on_meta(SongUNet, **DDPMPP_CIFAR)
    mapping = sum(num_params(m) for n, m in song.named_children() if n.startswith('map_') and m is not None)
    assert (mapping, num_params(song.enc), num_params(song.dec)) == (328_704, 19_302_912, 36_101_123)
    adm = on_meta(DhariwalUNet, **ADM_64, label_dim=1000)
    mapping = sum(num_params(m) for n, m in adm.named_children() if n.startswith('map_') and m is not None)
    assert mapping - num_params(adm.map_label) == 738_816 and num_params(adm.map_label) == 768_000
    assert num_params(adm.enc) == 90_298_560 and num_params(adm.dec) == 204_088_320
    assert num_params(adm.out_norm) + num_params(adm.out_conv) == 5_571

def test_block_param_counts():
    with torch.device('meta'):
        assert num_params(UNetBlock(256, 256, **SONG_BLOCK)) == 1_312_512
        assert num_params(UNetBlock(256, 256, attention=True, **SONG_BLOCK)) == 1_576_192
        assert num_params(UNetBlock(256, 256, down=True, **SONG_BLOCK)) == 1_378_304
        assert num_params(UNetBlock(512, 256, **SONG_BLOCK)) == 2_034_176

def test_ddpmpp_cifar_layout_matches_official():
    net = on_meta(SongUNet, **DDPMPP_CIFAR)
    level = lambda r, n, first: [f'{r}x{r}_{first}'] + [f'{r}x{r}_block{i}' for i in range(n)]
    assert list(net.enc) == level(32, 4, 'conv') + level(16, 4, 'down') + level(8, 4, 'down')
    assert list(net.dec) == (['8x8_in0'] + level(8, 5, 'in1') + level(16, 5, 'up') + level(32, 5, 'up')
                             + ['32x32_aux_norm', '32x32_aux_conv'])
    with_attention = {n for n, m in net.named_modules() if isinstance(m, UNetBlock) and m.num_heads}
    assert with_attention == {f'enc.16x16_block{i}' for i in range(4)} | {'dec.8x8_in0', 'dec.16x16_block4'}
    assert (net.dec['32x32_block0'].in_channels, net.dec['32x32_block4'].in_channels) == (512, 384)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes['enc.16x16_block0.qkv.weight'] == (768, 256, 1, 1)
    assert shapes['dec.32x32_aux_conv.weight'] == (3, 256, 3, 3)
    assert shapes['map_layer0.weight'] == (512, 128)
    assert shapes['enc.16x16_down.skip.resample_filter'] == (1, 1, 2, 2)
    assert 'enc.32x32_block1.skip.weight' not in shapes and 'map_label.weight' not in shapes

def test_ncsnpp_and_adm_layout_match_official():
    shapes = {k: tuple(v.shape) for k, v in on_meta(SongUNet, **NCSNPP_CIFAR).state_dict().items()}
    assert shapes['map_noise.freqs'] == (128,) and shapes['map_layer0.weight'] == (512, 256)
    assert shapes['enc.16x16_aux_residual.weight'] == (256, 3, 3, 3)
    assert shapes['enc.8x8_aux_residual.weight'] == (256, 256, 3, 3)
    assert shapes['enc.8x8_aux_residual.resample_filter'] == (1, 1, 4, 4)
    adm = on_meta(DhariwalUNet, **ADM_64, label_dim=1000)
    shapes = {k: tuple(v.shape) for k, v in adm.state_dict().items()}
    assert shapes['map_label.weight'] == (768, 1000) and 'map_label.bias' not in shapes
    assert shapes['enc.64x64_conv.weight'] == (192, 3, 3, 3) and shapes['out_conv.weight'] == (3, 192, 3, 3)
    assert shapes['enc.16x16_block0.affine.weight'] == (2 * 576, 768)
    assert 'enc.32x32_down.skip.weight' not in shapes and 'enc.32x32_down.skip.resample_filter' in shapes
    heads = {r: adm.enc[f'{r}x{r}_block1'].num_heads for r in (64, 32, 16, 8)}
    assert heads == {64: 0, 32: 6, 16: 9, 8: 12}

#------------------------------------------------------------------------------
# Layers (EDM networks.py: Linear, Conv2d, GroupNorm)

def test_resample_filter_values_and_meaning():
    f = Conv2d(2, 2, 0, down=True, resample_filter=[1, 3, 3, 1]).resample_filter
    assert torch.allclose(f[0, 0, 0], torch.tensor([1, 3, 3, 1]) / 64) and abs(f.sum().item() - 1) < 1e-6
    assert torch.equal(Conv2d(2, 2, 0, up=True).resample_filter, torch.full((1, 1, 2, 2), 0.25))
    assert 'resample_filter' not in Conv2d(2, 2, 3).state_dict()
    x = torch.randn(2, 3, 6, 10)
    assert torch.allclose(Conv2d(3, 3, 0, down=True)(x), F.avg_pool2d(x, 2), atol=1e-6)
    assert torch.allclose(Conv2d(3, 3, 0, up=True)(x), F.interpolate(x, scale_factor=2, mode='nearest'), atol=1e-6)
    y = Conv2d(3, 3, 0, down=True, resample_filter=[1, 3, 3, 1])(torch.ones(1, 3, 8, 8))
    assert y.shape == (1, 3, 4, 4) and torch.allclose(y[..., 1:-1, 1:-1], torch.ones(1, 3, 2, 2))  # zero padding shows at the border only

def test_group_norm_groups():
    assert [GroupNorm(c).num_groups for c in (8, 16, 128, 256)] == [2, 4, 32, 32]

def test_positional_embedding_values():
    emb = PositionalEmbedding(128, endpoint=True)(torch.tensor([1.0]))[0]
    assert torch.allclose(emb[:4], torch.tensor([0.5403023, 0.6494097, 0.7340864, 0.7991318]), atol=1e-6)
    assert torch.allclose(emb[64:68], torch.tensor([0.8414710, 0.7604387, 0.6790561, 0.6011558]), atol=1e-6)
    c = torch.tensor([0.3, -2.0])
    for channels, endpoint in [(128, True), (192, False)]:
        f = 1e-4 ** (torch.arange(channels // 2, dtype=torch.float64) / (channels // 2 - endpoint))
        expected = torch.cat([torch.cos(c[:, None] * f), torch.sin(c[:, None] * f)], dim=1)
        assert torch.allclose(PositionalEmbedding(channels, endpoint=endpoint)(c).double(), expected, atol=1e-6)
    assert abs(1e-4 ** (1 / 63) - 0.86398845) < 1e-8 and abs(1e-4 ** (1 / 96) - 0.90851758) < 1e-8

def test_songunet_feeds_sin_then_cos():
    net = SongUNet(**TINY_DDPMPP).eval()
    seen = []
    net.map_layer0.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x, sigma, _ = inputs(2, 3, 8, 8)
    net(x, sigma, None)
    f = 1e-4 ** (torch.arange(8) / 7.0)
    assert torch.allclose(seen[0], torch.cat([torch.sin(sigma[:, None] * f), torch.cos(sigma[:, None] * f)], 1), atol=1e-6)

def test_attention_equals_einsum_softmax():
    torch.manual_seed(0)
    block = randomize(UNetBlock(8, 8, 16, attention=True, num_heads=2, skip_scale=0.7)).double()
    with torch.no_grad():
        block.conv1.weight.zero_()                              # residual branch -> identity
        block.conv1.bias.zero_()
    x, e = torch.randn(3, 8, 4, 5, dtype=torch.float64), torch.randn(3, 16, dtype=torch.float64)
    h = x * 0.7
    heads, d, L = 2, 4, 20
    t = block.qkv(block.norm2(h)).reshape(3 * heads, d, 3, L)   # EDM layout: channel = (head*d + c)*3 + s
    q, k, v = t[:, :, 0], t[:, :, 1], t[:, :, 2]
    w = torch.softmax(torch.einsum('ncq,nck->nqk', q, k) / math.sqrt(d), dim=2)
    a = torch.einsum('nqk,nck->ncq', w, v).reshape(h.shape)
    assert torch.allclose(block(x, e), (block.proj(a) + h) * 0.7, atol=1e-12)

#------------------------------------------------------------------------------
# Whole networks on tiny configs

@pytest.mark.parametrize('name', list(TINY))
@pytest.mark.parametrize('size', [(16, 16), (8, 8), (4, 12), (24, 40)])
def test_output_shape_any_divisible_size(name, size):
    cls, kwargs = TINY[name]
    net = cls(**dict(kwargs, in_channels=5, label_dim=4, augment_dim=2)).eval()
    x, sigma, labels = inputs(2, 5, *size, label_dim=4)
    with torch.no_grad():
        y = net(x, sigma, labels, augment_labels=torch.randn(2, 2))
    assert y.shape == (2, 3, *size) and y.dtype == torch.float32 and torch.isfinite(y).all()

def test_64px_ddpmpp_takes_smaller_and_larger_inputs():
    net = SongUNet(**dict(TINY_DDPMPP, img_resolution=64, channel_mult=[1, 1, 1, 1], model_channels=8)).eval()
    for size in [16, 32, 96]:
        x, sigma, _ = inputs(1, 3, size, size)
        with torch.no_grad():
            assert net(x, sigma, None).shape == (1, 3, size, size)

@pytest.mark.parametrize('name', list(TINY))
def test_bad_input_size_raises(name):
    cls, kwargs = TINY[name]
    net = cls(**kwargs)
    divisor = 2 ** (len(kwargs['channel_mult']) - 1)
    x, sigma, _ = inputs(1, 3, 2 * divisor, divisor * 3 // 2)
    with pytest.raises(ValueError, match=f'{2 * divisor}x{divisor * 3 // 2}.*divisible by {divisor}'):
        net(x, sigma, None)

def test_adm_zero_init_output_and_songunet_small_init_output():
    torch.manual_seed(0)
    x, sigma, _ = inputs(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.count_nonzero(DhariwalUNet(**TINY_ADM)(x, sigma, None)) == 0
        y = SongUNet(**TINY_DDPMPP)(x, sigma, None)
    assert 0 < y.abs().max() < 1e-3   # EDM's SongUNet output conv is xavier * 1e-5, not exactly zero

@pytest.mark.parametrize('name', ['ddpmpp', 'adm'])
def test_label_dropout_in_train_mode_only(name):
    cls, kwargs = TINY[name]
    torch.manual_seed(0)
    net = randomize(cls(**dict(kwargs, label_dim=4, label_dropout=0.5)))
    x, sigma, _ = inputs(1, 3, 8, 8)
    x, sigma = x.expand(64, -1, -1, -1), sigma.expand(64)
    labels = F.one_hot(torch.full((64,), 2), 4).float()
    with torch.no_grad():
        net.eval()
        kept, dropped = net(x, sigma, labels), net(x, sigma, torch.zeros_like(labels))
        assert torch.allclose(net(x, sigma, labels), kept) and not torch.allclose(kept[0], dropped[0], atol=1e-4)
        net.train()
        torch.manual_seed(1)
        y = net(x, sigma, labels)
    is_dropped = [torch.allclose(y[i], dropped[i], atol=1e-5) for i in range(64)]
    is_kept = [torch.allclose(y[i], kept[i], atol=1e-5) for i in range(64)]
    assert all(a != b for a, b in zip(is_dropped, is_kept)) and 16 < sum(is_dropped) < 48

@pytest.mark.parametrize('name', list(TINY))
def test_bitwise_equal_after_state_dict_transfer(name):
    cls, kwargs = TINY[name]
    torch.manual_seed(0)
    a = randomize(cls(**dict(kwargs, label_dim=3))).eval()
    torch.manual_seed(1)
    b = cls(**dict(kwargs, label_dim=3)).eval()
    b.load_state_dict(a.state_dict(), strict=True)
    x, sigma, labels = inputs(2, 3, 8, 16, label_dim=3)
    with torch.no_grad():
        assert torch.equal(a(x, sigma, labels), b(x, sigma, labels))

@pytest.mark.parametrize('name', list(TINY))
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast_cpu_close_to_fp32_and_backward(name, dtype):
    cls, kwargs = TINY[name]
    torch.manual_seed(0)
    net = randomize(cls(**kwargs))
    x, sigma, _ = inputs(2, 3, 8, 8)
    with torch.no_grad():
        ref = net(x, sigma, None)
    with torch.autocast('cpu', dtype=dtype):
        y = net(x, sigma, None)
    y.float().square().mean().backward()
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert (y.float() - ref).abs().max() < 0.05 * ref.abs().max()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())

#------------------------------------------------------------------------------
# Official checkpoints (EDM-format pickles)

def test_load_official_pickle_round_trip(tmp_path):
    model_kwargs = {k: v for k, v in TINY_NCSNPP.items() if k not in ('img_resolution', 'in_channels', 'out_channels')}
    init_kwargs = dict(img_resolution=16, img_channels=3, label_dim=4, use_fp16=True, sigma_data=np.float64(0.5),
                       model_type='SongUNet', augment_dim=9, **model_kwargs)
    torch.manual_seed(0)
    net = EDMPrecond(**init_kwargs).eval().requires_grad_(False)
    randomize(net.model)
    net.skip_scale = np.float64(0.7)   # numpy scalars occur in official module states
    path = tmp_path / 'network-snapshot-000000.pkl'
    write_persistence_pickle(path, dict(ema=net, loss_fn=None, augment_pipe=None), init_kwargs)
    assert 'torch_utils' not in sys.modules and 'dnnlib' not in sys.modules

    r = load_official(path)
    assert (r['class_name'], r['precond']) == ('SongUNet', 'EDMPrecond')
    expected = {k: v for k, v in init_kwargs.items() if k != 'use_fp16'}
    assert r['init_kwargs'] == expected and type(r['init_kwargs']['sigma_data']) is float
    assert list(r['state_dict']) == list(net.state_dict())
    assert all(torch.equal(r['state_dict'][k], v) for k, v in net.state_dict().items())
    rebuilt = EDMPrecond(**r['init_kwargs']).eval()
    rebuilt.load_state_dict(r['state_dict'], strict=True)
    x, sigma, labels = inputs(2, 3, 8, 8, label_dim=4)
    with torch.no_grad():
        assert torch.equal(rebuilt.model(x, sigma, labels), net.model(x, sigma, labels))

def test_load_official_refuses_a_torch_zip(tmp_path):
    torch.save(SongUNet(**TINY_DDPMPP).state_dict(), tmp_path / 'raw.pt')  # .pt files go through load_checkpoint
    with pytest.raises(UserError, match='raw.pt'):
        load_official(tmp_path / 'raw.pt')

def test_load_official_rejects_bad_files_without_running_code(tmp_path):
    (tmp_path / 'garbage.pkl').write_bytes(b'not a pickle at all')
    with pytest.raises(UserError, match='garbage.pkl'):
        load_official(tmp_path / 'garbage.pkl')
    marker = tmp_path / 'marker'

    class Evil:
        def __reduce__(self):
            return Path.touch, (marker,)

    (tmp_path / 'evil.pkl').write_bytes(pickle.dumps({'ema': Evil()}))
    with pytest.raises(UserError, match='evil.pkl.*refusing global'):
        load_official(tmp_path / 'evil.pkl')
    assert not marker.exists()
    (tmp_path / 'empty.pkl').write_bytes(pickle.dumps({'loss_fn': None}))
    with pytest.raises(UserError, match="empty.pkl.*'ema'"):
        load_official(tmp_path / 'empty.pkl')
    with pytest.raises(UserError, match='missing.pkl'):
        load_official(tmp_path / 'missing.pkl')
