"""gdd.py: fidelity checks against the official code (parameter counts and the frozen sets of --freeze=1/2/3
against upstream's name rule, the generator at init, feature shapes, grey images, loss reduction, R1, optimizer
settings, frozen/zero-weight invariants) and end-to-end properties (2-process DDP gradients, resume, per-seed
one-step generation, torchrun CLI, a table of bad inputs (one line, exit 2, nothing written), old-layout snapshots).
The real feature networks are checked on the meta device; training tests use a tiny stand-in trunk and narrow heads
(TinyTrunk, standin) and random weights.

This file is also the worker of the DDP test: `torchrun --nproc_per_node=2 tests/test_gdd.py ddp OUT` or
`... tests/test_gdd.py cli ARGS` (gdd.py's CLI with the stand-in registered)."""
import argparse
import contextlib
import copy
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import write_persistence_pickle  # noqa: E402

import common  # noqa: E402
import gdd  # noqa: E402
from common import EDMPrecond, UserError, load_checkpoint, reseed  # noqa: E402

# A tiny NCSN++ teacher (8x8, 16 channels), with augment_dim 9 like EDM's CIFAR-10 teachers.
TINY = dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
            channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=16, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[4], dropout=0)
# A tiny ADM teacher with attention: ADM has one head per 64 channels, so 64 channels at least.
TINY_ADM = dict(model_type='DhariwalUNet', model_channels=64, channel_mult=[1, 2], channel_mult_emb=1, num_blocks=1,
                attn_resolutions=[4], dropout=0)
ARGS = argparse.Namespace(gan_weight=1, r1_interval=2, r1_gamma=1e-4)
NO_SCALER = torch.amp.GradScaler('cpu', enabled=False)

class TinyTrunk(torch.nn.Module):
    """Stand-in feature network: maps at 1/4 .. 1/32 of the input, like the real trunks."""
    CHANNELS, UNUSED = (8, 8, 16, 16), ()

    def __init__(self):
        super().__init__()
        self.convs = torch.nn.ModuleList([torch.nn.Conv2d(3, 8, 4, 4), torch.nn.Conv2d(8, 8, 2, 2),
                                          torch.nn.Conv2d(8, 16, 2, 2), torch.nn.Conv2d(16, 16, 2, 2)])

    def forward(self, x):
        out = []
        for conv in self.convs:
            x = torch.tanh(conv(x))
            out.append(x)
        return out

def register_standin():
    gdd.TRUNKS['tiny'] = TinyTrunk
    gdd.Head.WIDTH = {k: 16 for k in gdd.Head.WIDTH}

@pytest.fixture
def standin(monkeypatch):
    monkeypatch.setitem(gdd.TRUNKS, 'tiny', TinyTrunk)
    monkeypatch.setattr(gdd.Head, 'WIDTH', {k: 16 for k in gdd.Head.WIDTH})

def tiny_teacher(label_dim=0, seed=0, arch=TINY, channels=3):
    torch.manual_seed(seed)
    kwargs = dict(img_resolution=8, img_channels=channels, label_dim=label_dim, augment_dim=9, **arch)
    net = EDMPrecond(**kwargs)
    with torch.no_grad():
        for p in net.parameters():  # EDM zero-initializes its output layers; make F(x) non-trivial
            p.normal_(0, 0.2)
    return net, kwargs

def write_teacher(path, label_dim=0, channels=3):
    net, kwargs = tiny_teacher(label_dim, channels=channels)
    common.save_checkpoint(dict(method='patch_diffusion', precond='EDMPrecond', net_kwargs=kwargs,
                                ema=net.state_dict()), path)
    return str(path)

def tiny_gan(freeze=1, label_dim=0, seed=0, arch=TINY):
    """Generator from the tiny teacher, stand-in discriminator, optimizers (requires the stand-in)."""
    teacher, kwargs = tiny_teacher(label_dim, arch=arch)
    G = gdd.GDDPrecond(**gdd.generator_kwargs(kwargs))
    gdd.init_from_teacher(G, teacher.state_dict(), 'teacher')
    frozen = gdd.frozen_names(G, freeze)
    for name, p in G.named_parameters():
        p.requires_grad_(name not in frozen)
    features, D = gdd.build_discriminator(['tiny'], seed, 32, label_dim, 'random')
    opt_G, opt_D = gdd.build_optimizers(G, D, frozen, 1e-3, 1e-3)
    return teacher, G, features, D.train(), opt_G, opt_D, frozen

class Local(torch.nn.Module):
    """A module used where the code expects DDP, without any communication."""
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args):
        return self.module(*args)

    def no_sync(self):
        return contextlib.nullcontext()

def iterate(G, features, D, opt_G, opt_D, batches, args=ARGS, start=0):
    for step, micro_batches in enumerate(batches, start):
        reseed(0, 0, step)
        gdd.gdd_iteration(G, Local(G), features, D, Local(D), opt_G, opt_D, micro_batches, step, 1e-3, 1e-3, NO_SCALER,
                          args.gan_weight, args.r1_gamma, args.r1_interval)

def real_batches(n, batch=2, label_dim=0, seed=1):
    g = torch.Generator().manual_seed(seed)
    labels = lambda: torch.eye(label_dim)[torch.randint(label_dim, (batch,), generator=g)] if label_dim else None
    return [[(torch.rand(batch, 3, 8, 8, generator=g) * 2 - 1, labels())] for _ in range(n)]

#------------------------------------------------------------------------------
# Parameter counts and the frozen set (official train.py freeze_layer and training_loop.py), on the meta device.

@pytest.mark.parametrize('arch, res, cres, label_dim, total, trainable', [
    ('ncsnpp', 32, None, 0, 56_395_523, 8_797_955),           # CIFAR-10 uncond
    ('ncsnpp', 32, None, 10, 56_398_339, 8_800_771),          # CIFAR-10 cond
    ('ddpmpp', 32, None, 0, 55_732_739, 8_135_171),           # DDPM++ reference
    ('ncsnpp', 64, [1, 2, 2, 2], 0, 62_758_787, 10_144_643),  # AFHQv2 / FFHQ 64
    ('adm', 64, None, 1000, 295_899_267, 62_833_347),         # ImageNet 64
])
def test_gddi_trainable_counts(arch, res, cres, label_dim, total, trainable):
    args = argparse.Namespace(arch=arch, cres=cres, dropout=0)
    with torch.device('meta'):
        net = gdd.GDDPrecond(**gdd.network_kwargs(args, res, 3, label_dim))
    frozen = gdd.frozen_names(net)
    assert gdd.parameter_counts(net, frozen) == dict(total=total, frozen=total - trainable, trainable=trainable)
    # Upstream's substring rule selects the same tensors; they are exactly conv0/conv1 of blocks and attention proj.
    rule = [k for k, _ in net.named_parameters() if any(s in k for s in ('block', 'up', 'down', 'in'))
            and any(s in k for s in ('conv', 'proj'))]
    assert sorted(rule) == sorted(frozen)
    assert {k.rsplit('.', 2)[-2] for k in frozen} == {'conv0', 'conv1', 'proj'}
    if arch == 'ncsnpp' and res == 32 and not label_dim:
        assert len(frozen) == 144 and len(list(net.parameters())) - 144 == 276

def official_frozen(net, level):
    """Upstream's rule, transcribed: training/training_loop.py leaves a parameter out of the optimizer if its name
    has "block", "up", "down" or "in" and one of the strings train.py lists for --freeze=level."""
    freeze_layer = {0: [], 1: ['conv', 'proj'], 2: ['conv', 'proj', 'qkv'], 3: ['conv', 'proj', 'qkv', 'skip']}[level]
    return sorted(k for k, _ in net.named_parameters()
                  if ('block' in k or 'up' in k or 'down' in k or 'in' in k) and any(s in k for s in freeze_layer))

@pytest.mark.parametrize('arch', [TINY, TINY_ADM], ids=['songunet', 'dhariwalunet'])
def test_freeze_levels_match_official_rule(arch):
    net = gdd.GDDPrecond(img_resolution=8, img_channels=3, label_dim=3, **arch)
    frozen = [set(gdd.frozen_names(net, level)) for level in range(4)]
    assert all(sorted(frozen[level]) == official_frozen(net, level) for level in range(4))
    qkv = {k for k, _ in net.named_parameters() if '.qkv.' in k}
    skip = {k for k, _ in net.named_parameters() if '.skip.' in k}
    assert qkv and skip and not frozen[0]  # the tiny nets have attention and 1x1 skip convs
    assert frozen[2] == frozen[1] | qkv and frozen[3] == frozen[2] | skip and not frozen[1] & (qkv | skip)

@pytest.mark.parametrize('arch, res, cres, label_dim, trainable2, trainable3', [
    ('ncsnpp', 32, None, 0, 7_613_699, 5_380_355),           # CIFAR-10 uncond
    ('ncsnpp', 32, None, 10, 7_616_515, 5_383_171),          # CIFAR-10 cond
    ('ncsnpp', 64, [1, 2, 2, 2], 0, 8_960_387, 6_463_875),   # AFHQv2 / FFHQ 64
    ('adm', 64, None, 1000, 38_575_107, 29_091_651),         # ImageNet 64
])
def test_freeze_2_3_counts(arch, res, cres, label_dim, trainable2, trainable3):
    with torch.device('meta'):
        args = argparse.Namespace(arch=arch, cres=cres, dropout=0)
        net = gdd.GDDPrecond(**gdd.network_kwargs(args, res, 3, label_dim))
    counts = {level: gdd.parameter_counts(net, gdd.frozen_names(net, level)) for level in (1, 2, 3)}
    assert (counts[2]['trainable'], counts[3]['trainable']) == (trainable2, trainable3)
    assert all(sorted(gdd.frozen_names(net, level)) == official_frozen(net, level) for level in (2, 3))
    if arch == 'ncsnpp' and res == 32 and not label_dim:  # CIFAR-10 NCSN++: qkv 1,184,256 and skip 2,233,344 parameters
        assert counts[2]['frozen'] - counts[1]['frozen'] == 1_184_256
        assert counts[3]['frozen'] - counts[2]['frozen'] == 2_233_344

def test_discriminator_counts_and_feature_shapes_at_224():
    # official feature_networks/ and pg_modules/ at 224 px; DeiT: 85,798,656 pretrained + 6,711,744 random readout
    # + 1,539,536 final norm and unused heads
    trunks = {'vgg16_bn': 14_723_136, 'tf_efficientnet_lite0': 2_958_848, 'deit_base_distilled_patch16_224': 94_049_936}
    projections = {'vgg16_bn': 611_776, 'tf_efficientnet_lite0': 376_768, 'deit_base_distilled_patch16_224': 699_840}
    trunk_maps = {'vgg16_bn': [(128, 112), (256, 56), (512, 28), (512, 14)],
                  'tf_efficientnet_lite0': [(24, 56), (40, 28), (112, 14), (320, 7)],
                  'deit_base_distilled_patch16_224': [(96, 56), (192, 28), (384, 14), (768, 7)]}
    with torch.device('meta'):
        for name in trunks:
            f = gdd.FeatureNetwork(name, 0)
            assert sum(p.numel() for p in f.trunk.parameters()) == trunks[name]
            assert sum(p.numel() for m in (f.ccm, f.csm) for p in m.parameters()) == projections[name]
            assert [(t.shape[1], t.shape[2]) for t in f.trunk(torch.zeros(2, 3, 224, 224))] == trunk_maps[name]
            maps = f(torch.zeros(2, 3, 32, 32))  # resized to 224 inside
            size = 224 if name == 'vgg16_bn' else 112
            assert [tuple(t.shape[1:]) for t in maps] == [(64, size, size), (64, size // 2, size // 2),
                                                          (128, size // 4, size // 4), (256, size // 8, size // 8)]
            for label_dim, head_params in ((0, 10_331_328), (10, 13_757_888)):
                D = gdd.Discriminator({name: f.maps}, label_dim)
                assert sum(p.numel() for p in D.parameters()) == head_params
                logits, = D({name: maps}, torch.zeros(2, 10))
                assert tuple(logits.shape) == (2, 484 if name == 'vgg16_bn' else 64)
        f = gdd.FeatureNetwork('deit_base_distilled_patch16_224', 0)
        assert sum(p.numel() for p in f.trunk.readout.parameters()) == 6_711_744  # random readout convs
    assert gdd.head_sizes(224) == ([128, 64, 32, 16], 8)  # nominal 256-px sizes, as upstream

def test_trunk_weight_files_load_strict(tmp_path):
    trunk = gdd.EfficientNetLite0()
    state = dict(trunk.state_dict(), **{'classifier.weight': torch.zeros(1000, 1280),
                                        'conv_head.weight': torch.zeros(1280, 320, 1, 1)})
    torch.save(state, tmp_path / 'w.pth')
    other = gdd.EfficientNetLite0()
    gdd.load_trunk(other, 'tf_efficientnet_lite0', str(tmp_path / 'w.pth'))
    assert all(torch.equal(a, b) for a, b in zip(trunk.state_dict().values(), other.state_dict().values()))
    del state['blocks.3.1.conv_dw.weight']
    torch.save(state, tmp_path / 'bad.pth')
    with pytest.raises(UserError, match='not the tf_efficientnet_lite0 weights.*blocks.3.1.conv_dw.weight'):
        gdd.load_trunk(other, 'tf_efficientnet_lite0', str(tmp_path / 'bad.pth'))
    torch.save(gdd.VGG16BN().state_dict(), tmp_path / 'vgg.pth')
    with pytest.raises(UserError, match='tf_efficientnet_lite0-0aa007d2.pth'):
        gdd.load_trunk(other, 'tf_efficientnet_lite0', str(tmp_path / 'vgg.pth'))

def test_grey_images_are_repeated_to_rgb(standin):
    torch.manual_seed(0)
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    for name in ('tiny', 'tf_efficientnet_lite0'):  # ImageNet and EfficientNet (0.5, 0.5) normalization
        f = gdd.FeatureNetwork(name, 0, 32).eval()
        grey, rgb = f(x), f(x.repeat(1, 3, 1, 1))  # [N, 1, H, W] and the same images as R = G = B
        assert all(torch.equal(a, b) for a, b in zip(grey, rgb))
        for channels in (2, 4):
            with pytest.raises(ValueError, match=f'RGB or grey images, not {channels} channels'):
                f(torch.zeros(2, channels, 8, 8))

def test_grey_training_and_other_channel_counts(tmp_path, standin, monkeypatch):
    def demo_data(channels):  # --data=demo-8 with `channels` channels
        monkeypatch.setattr(gdd, 'open_dataset', lambda data, **kw: common.DemoDataset(8, num_channels=channels, **kw))
    demo_data(1)
    teacher = write_teacher(tmp_path / 'grey.pt', channels=1)
    state = load_checkpoint(str(run_train(tmp_path / 'grey', teacher, '--duration=0.000008')))  # 2 steps of 4
    assert state['step'] == 2 and state['net_kwargs']['img_channels'] == 1
    assert any(not torch.equal(v, load_checkpoint(teacher)['ema'][k]) for k, v in state['net'].items())
    for channels in (2, 4):
        demo_data(channels)
        with pytest.raises(UserError, match=f'{channels}-channel images.*RGB or grey'):
            gdd.train(parse(TRAIN + [f'--outdir={tmp_path}/x', '-n']))

def test_tf_same_padding():
    conv = gdd.Conv2dSame(1, 1, 3, 2)
    with torch.no_grad():
        conv.weight.fill_(1)
    x = torch.arange(16.).reshape(1, 1, 4, 4)
    # TF "SAME" for k=3, s=2 on 4 px pads 0 before and 1 after: windows start at rows/cols 0 and 2.
    expect = F.conv2d(F.pad(x, [0, 1, 0, 1]), torch.ones(1, 1, 3, 3), stride=2)
    assert torch.equal(conv(x), expect) and conv(torch.zeros(1, 1, 7, 7)).shape[-1] == 4

#------------------------------------------------------------------------------
# Generator (official training/networks.py, GDDPrecond; generate.py, one_step_sampler).

@pytest.mark.parametrize('label_dim', [0, 3])
def test_generator_at_init_is_teachers_one_step_denoise(label_dim, tmp_path):
    teacher, kwargs = tiny_teacher(label_dim)
    G = gdd.GDDPrecond(**gdd.generator_kwargs(kwargs))
    gdd.init_from_teacher(G, teacher.state_dict(), 'teacher')
    assert G.model.map_augment is None and teacher.model.map_augment is not None
    torch.manual_seed(1)
    z = torch.randn(4, 3, 8, 8)
    labels = torch.eye(label_dim)[torch.tensor([0, 1, 2, 1])] if label_dim else None
    with torch.no_grad():
        D_x, G_x = teacher(80 * z, 80, labels), G(80 * z, 80, labels)
        F_x = teacher.model(80 * z / math.sqrt(80 ** 2 + 0.25), torch.full([4], math.log(80) / 4), labels)
    d_skip = 0.25 / (79.998 ** 2 + 0.25) - 0.25 / (80 ** 2 + 0.25)                 # GDD minus EDM coefficients
    d_out = 0.5 * 79.998 / math.sqrt(80 ** 2 + 0.25) - 0.5 * 80 / math.sqrt(80 ** 2 + 0.25)
    assert d_skip == pytest.approx(1.95e-9, rel=0.01) and d_out == pytest.approx(-1.25e-5, rel=0.01)  # GDDPrecond
    assert torch.allclose(G_x - D_x, d_skip * 80 * z + d_out * F_x, atol=2e-6)
    assert (G_x - D_x).abs().max() <= 1e-4 and F_x.abs().max() > 1  # the difference is small but F is not trivial
    # one network evaluation: the sampler gives G(80 z; 80); a snapshot round trip keeps it
    calls = []
    G.register_forward_hook(lambda *_: calls.append(1))
    assert torch.allclose(gdd.one_step_sampler(G, z, labels).float(), G_x, atol=1e-6) and len(calls) == 1
    common.save_checkpoint(dict(method='gdd', net_kwargs=gdd.generator_kwargs(kwargs), ema=G.state_dict()),
                           tmp_path / 's.pt')
    H = gdd.load_network(str(tmp_path / 's.pt'))
    assert torch.equal(H(80 * z, 80, labels), G(80 * z, 80, labels))

def test_official_gdd_pickle_loads(tmp_path):
    class GDDPrecond(torch.nn.Module):  # stand-in for upstream's class: its name, structure and state matter
        def __init__(self):
            super().__init__()
            self.model = common.SongUNet(img_resolution=8, in_channels=3, out_channels=3,
                                         **{k: v for k, v in TINY.items() if k != 'model_type'})
    net = GDDPrecond()
    init_kwargs = dict(img_resolution=8, img_channels=3, label_dim=0, use_fp16=True, **TINY)
    write_persistence_pickle(tmp_path / 'gdd.pkl', dict(ema=net, net=net), init_kwargs)
    G = gdd.load_network(str(tmp_path / 'gdd.pkl'))
    assert all(torch.equal(a, b) for a, b in zip(G.model.state_dict().values(), net.model.state_dict().values()))
    teacher, _ = tiny_teacher()
    write_persistence_pickle(tmp_path / 'edm.pkl', dict(ema=teacher), dict(img_resolution=8, img_channels=3, **TINY))
    with pytest.raises(UserError, match='not a one-step GDD generator'):
        gdd.load_network(str(tmp_path / 'edm.pkl'))
    with torch.no_grad():  # non-finite official weights: one line naming the file, generator and teacher alike
        net.model.enc['8x8_conv'].weight[0] = math.nan
        teacher.model.enc['8x8_conv'].weight[0] = math.inf
    write_persistence_pickle(tmp_path / 'nan.pkl', dict(ema=net), init_kwargs)
    write_persistence_pickle(tmp_path / 'inf.pkl', dict(ema=teacher), dict(img_resolution=8, img_channels=3, **TINY))
    with pytest.raises(UserError, match=r'--network=.*nan.pkl: its weights hold NaN or inf \(model.enc.8x8_conv'):
        gdd.load_network(str(tmp_path / 'nan.pkl'))
    with pytest.raises(UserError, match=r'--transfer=.*inf.pkl: its weights hold NaN or inf'):
        gdd.load_teacher(str(tmp_path / 'inf.pkl'))

#------------------------------------------------------------------------------
# Losses (official training/loss.py, GDDLoss) and optimizers (training_loop.py).

def test_loss_is_sum_over_samples_of_per_sample_means():
    torch.manual_seed(0)
    logits = [torch.randn(5, 64) * 3, torch.randn(5, 484) * 3]
    B = 5
    expect_G = B * sum(torch.log1p(torch.exp(-l)).mean() for l in logits)  # B x sum_k mean_{b,l} softplus(-l)
    expect_D = B * sum(torch.log1p(torch.exp(l)).mean() for l in logits)
    assert gdd.gan_loss(logits, True).sum().item() == pytest.approx(expect_G.item(), rel=1e-6)
    assert gdd.gan_loss(logits, False).sum().item() == pytest.approx(expect_D.item(), rel=1e-6)
    assert gdd.gan_loss(logits, True).shape == (5,)

def test_r1_penalty_matches_finite_differences(standin):
    torch.manual_seed(0)
    features, D = gdd.build_discriminator(['tiny'], 0, 32, 0, 'random')
    features, D = features.double(), D.double().eval()  # eval: no power iteration, so S(x) is a fixed function
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 2 - 1
    S = lambda x: sum(l.sum() for l in D(features(x)))
    penalty = gdd.r1_penalty(features, D, x, None)
    grad, = torch.autograd.grad(S(x.requires_grad_(True)), x)
    assert torch.allclose(penalty, grad.square().sum(dim=[1, 2, 3])) and penalty.min() > 0
    with torch.no_grad():
        for _ in range(3):  # central differences along random directions give <grad S, d>
            d, h = torch.randn_like(x), 1e-5
            assert ((S(x + h * d) - S(x - h * d)) / (2 * h)).item() == pytest.approx((grad * d).sum().item(), rel=1e-6)

def test_optimizer_settings_and_presets(standin):
    _, G, _, D, opt_G, opt_D, frozen = tiny_gan(freeze=1)
    (g,), (d,) = opt_G.param_groups, opt_D.param_groups
    assert g['betas'] == (0, 0.99) and g['eps'] == 1e-8 and g['lr'] == 1e-3
    assert d['lr'] == pytest.approx(1e-3 * 16 / 17) and d['betas'][0] == 0
    assert d['betas'][1] == pytest.approx(0.990585, abs=1e-6)
    assert {id(p) for p in g['params']} == {id(p) for n, p in G.named_parameters() if n not in frozen}
    assert {id(p) for p in d['params']} == {id(p) for p in D.parameters()}  # heads (and embeddings) only
    # train.sh: batch / G lr / D lr / Mimg / EMA / feature networks
    p = gdd.PRESETS
    pick = lambda name, *keys: [p[name][k] for k in keys]  # noqa: E731
    assert pick('cifar10_gddi', 'batch', 'lr', 'dlr', 'duration', 'ema', 'freeze', 'arch') == [
        256, 1e-4, 1e-4, 5, 0.5, 1, 'ncsnpp']
    assert pick('ffhq64_gdd', 'batch', 'lr', 'dlr', 'duration', 'cres', 'freeze') == [
        256, 2e-5, 4e-5, 10, [1, 2, 2, 2], 0]
    assert pick('imagenet64_gddi', 'batch', 'lr', 'dlr', 'ema', 'arch', 'cond') == [512, 8e-6, 4e-5, 50, 'adm', True]
    assert gdd.parse_feature_networks(p['afhqv264_gddi']['backbone']) == ['deit_base_distilled_patch16_224',
                                                                   'tf_efficientnet_lite0']
    assert gdd.parse_feature_networks(p['cifar10_cond_gdd']['backbone']) == ['vgg16_bn', 'tf_efficientnet_lite0']
    names = ('cifar10', 'cifar10_cond', 'afhqv264', 'ffhq64', 'imagenet64')  # GDD and GDD-I differ only in --freeze
    assert p['cifar10_cond_gdd']['cond'] and all(p[f'{n}_gdd'] == dict(p[f'{n}_gddi'], freeze=0) for n in names)
    assert sorted(k for k in p if k != 'demo') == sorted(f'{n}_{v}' for n in names for v in ('gdd', 'gddi'))

#------------------------------------------------------------------------------
# Training invariants (GDD-I frozen set, R1 schedule, GAN-only generator loss).

def test_gddi_frozen_bitwise_trainable_changed_r1_schedule(standin):
    teacher, G, features, D, opt_G, opt_D, frozen = tiny_gan(freeze=1)
    before_features = copy.deepcopy(features.state_dict())
    iterate(G, features, D, opt_G, opt_D, real_batches(5))  # r1_interval 2: R1 steps at iterations 2 and 4
    params, ref = dict(G.named_parameters()), teacher.state_dict()
    assert all(torch.equal(params[n], ref[n]) and params[n].grad is None for n in frozen)
    changed = [not torch.equal(p, ref[n]) for n, p in params.items() if n not in frozen]
    assert sum(changed) >= 0.95 * len(changed)
    assert all(torch.equal(v, before_features[k]) for k, v in features.state_dict().items())  # trunks, CCM, CSM
    assert opt_G.state[opt_G.param_groups[0]['params'][0]]['step'] == 5
    assert opt_D.state[next(D.parameters())]['step'] == 5 + 2

@pytest.mark.parametrize('arch, freeze', [(TINY, 2), (TINY, 3), (TINY_ADM, 2), (TINY_ADM, 3)],
                         ids=['songunet-2', 'songunet-3', 'dhariwalunet-2', 'dhariwalunet-3'])
def test_freeze_2_3_frozen_bitwise_trainable_changed(standin, arch, freeze):
    teacher, G, features, D, opt_G, opt_D, frozen = tiny_gan(freeze=freeze, arch=arch)
    trainable = [p for n, p in G.named_parameters() if n not in frozen]
    assert {id(p) for p in opt_G.param_groups[0]['params']} == {id(p) for p in trainable}
    iterate(G, features, D, opt_G, opt_D, real_batches(2))
    params, ref = dict(G.named_parameters()), teacher.state_dict()
    assert any('.qkv.' in n for n in frozen) and any('.skip.' in n for n in frozen) == (freeze == 3)
    assert all(torch.equal(params[n], ref[n]) and params[n].grad is None for n in frozen)
    changed = [not torch.equal(p, ref[n]) for n, p in params.items() if n not in frozen]
    assert sum(changed) >= 0.95 * len(changed)

def test_zero_gan_weight_leaves_generator_unchanged(standin):
    teacher, G, features, D, opt_G, opt_D, _ = tiny_gan(freeze=0)
    D0 = copy.deepcopy(D.state_dict())
    iterate(G, features, D, opt_G, opt_D, real_batches(3), argparse.Namespace(**dict(vars(ARGS), gan_weight=0)))
    assert all(torch.equal(p, teacher.state_dict()[n]) for n, p in G.named_parameters())
    assert not all(torch.equal(v, D0[k]) for k, v in D.state_dict().items())  # D did train

def test_generator_step_ignores_real_images(standin):
    results = []
    for noise in (False, True):
        _, G, features, D, opt_G, opt_D, _ = tiny_gan(freeze=0, label_dim=3)
        (images, labels), = real_batches(1, label_dim=3)[0]
        images = torch.rand_like(images) * 2 - 1 if noise else images  # same labels, other "real" images
        reseed(0, 0, 0)
        opt_G.zero_grad()
        gdd.g_step(Local(G), features, D, [(images, labels)])
        results.append([p.grad.clone() for p in G.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))

def test_joint_d_pass_shares_batchnorm_statistics(standin):
    """--d-pass=joint: with the heads' BatchNorm on running statistics (eval) the joint and the separate passes give
    the same G and D gradients (to float rounding); in training mode they differ, and the G step then depends on the
    real images (they share the batch statistics)."""
    def grads(joint, train, images=None):
        _, G, features, D, _, _, _ = tiny_gan(freeze=0, label_dim=3)
        D.train(train)
        (reals, labels), = real_batches(1, label_dim=3)[0]
        batches = [(reals if images is None else images, labels)]
        out = []
        for stage in (lambda: gdd.g_step(Local(G), features, D, batches, joint=joint),
                      lambda: gdd.d_step(G, features, Local(D), batches, joint=joint)):
            reseed(0, 0, 0)
            for p in list(G.parameters()) + list(D.parameters()):
                p.grad = None
            stage()
            out += [p.grad.clone() for p in list(G.parameters()) + list(D.parameters()) if p.grad is not None]
        return out
    close = lambda a, b: len(a) == len(b) > 0 and all((x - y).norm() <= 1e-5 * x.norm() for x, y in zip(a, b))  # noqa
    assert close(grads(False, False), grads(True, False))
    assert not close(grads(False, True), grads(True, True))
    noise = torch.rand(2, 3, 8, 8) * 2 - 1
    assert not close(grads(True, True), grads(True, True, noise))

def test_loss_scaling_scales_every_gradient(standin):
    """--ls multiplies the G, D and R1 losses (EDM's loss scaling): by 2, every gradient doubles exactly."""
    grads = []
    for ls in (1, 2):
        _, G, features, D, _, _, _ = tiny_gan(freeze=0)
        batches = real_batches(1)[0]
        out = []
        for stage in (lambda: gdd.g_step(Local(G), features, D, batches, ls=ls),
                      lambda: gdd.d_step(G, features, Local(D), batches, ls=ls),
                      lambda: gdd.r1_step(features, Local(D), batches, 1e-4, 2, ls=ls)):
            reseed(0, 0, 0)
            for p in list(G.parameters()) + list(D.parameters()):
                p.grad = None
            stage()
            out += [p.grad.clone() for p in list(G.parameters()) + list(D.parameters()) if p.grad is not None]
        grads.append(out)
    assert len(grads[0]) == len(grads[1]) > 0 and all(torch.equal(2 * a, b) for a, b in zip(*grads))

#------------------------------------------------------------------------------
# CLI: train, resume, generate, errors.

TRAIN = ['train', '--data=demo-8', '--batch=4', '--feature-weights=random', '--backbone=tiny', '--feature-res=32',
         '--freeze=1', '--r1-interval=2', '--lr=1e-3', '--dlr=1e-3', '--workers=0', '--tick=0.001', '--snap=1',
         '--dump=1', '--grid=4', '--nosubdir']

def same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b

def parse(argv):
    return common.parse_command_line(gdd.build_parser, argv)

def run_train(outdir, teacher, *extra):
    gdd.train(parse(TRAIN + [f'--outdir={outdir}', f'--transfer={teacher}', *extra]))
    return sorted(Path(outdir).glob('training-state-*.pt'))[-1]

def test_resume_equals_uninterrupted_and_frozen_teacher_weights(tmp_path, standin):
    teacher = write_teacher(tmp_path / 'teacher.pt')
    full = load_checkpoint(str(run_train(tmp_path / 'full', teacher, '--duration=0.000016')))  # 4 steps of 4
    half = run_train(tmp_path / 'half', teacher, '--duration=0.000008')
    resumed = load_checkpoint(str(run_train(tmp_path / 'resumed', teacher, '--duration=0.000016', f'--resume={half}')))
    assert full['step'] == resumed['step'] == 4 and full['data_pos'] == resumed['data_pos']
    for key in ('net', 'ema', 'D', 'optimizer_G', 'optimizer_D'):
        assert same(full[key], resumed[key]), key
    ref = load_checkpoint(teacher)['ema']
    frozen = gdd.frozen_names(gdd.GDDPrecond(**full['net_kwargs']))
    assert all(torch.equal(full['net'][k], ref[k]) and torch.equal(full['ema'][k], ref[k]) for k in frozen)
    assert full['feature_weights'].startswith('RANDOM') and (tmp_path / 'full' / 'samples-000000_016.png').exists()
    assert 'feature networks are RANDOM' in (tmp_path / 'full' / 'log.txt').read_text()

def numel(obj):
    """Elements of all tensors in a nested checkpoint structure."""
    if torch.is_tensor(obj):
        return obj.numel()
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else []
    return sum(numel(v) for v in values)

def test_state_holds_no_feature_networks_and_resume_is_bitwise(tmp_path, standin):
    """The training state holds G, its EMA, D's heads and the optimizers: no tensor of the frozen feature networks
    (trunks, random projections), which come back from --seed (random, random-he) or their weight files. Resume is
    bitwise, also from a state that carries the frozen feature networks (extra entries are not read)."""
    teacher = write_teacher(tmp_path / 'teacher.pt')
    he = ['--feature-weights=random-he', '--head-width=8']
    full = load_checkpoint(str(run_train(tmp_path / 'full', teacher, '--duration=0.000016', *he)))
    half = run_train(tmp_path / 'half', teacher, '--duration=0.000008', *he)
    features, D = gdd.build_discriminator(['tiny'], 0, 32, 0, 'random-he', head_width=8)
    state = load_checkpoint(str(half))
    assert all(not any(s in k for s in ('trunk', 'ccm', 'csm')) for part in ('net', 'ema', 'D') for k in state[part])
    assert state['D'].keys() == D.state_dict().keys()
    trained = ('net', 'ema', 'D', 'optimizer_G', 'optimizer_D')
    assert numel(state) == numel({k: state[k] for k in trained})  # no other tensor anywhere in the state
    old = tmp_path / 'old-state.pt'  # an older layout that also stored the frozen feature networks
    common.save_checkpoint(dict(state, features=features.state_dict()), old)
    for i, path in enumerate([half, old]):
        resumed = load_checkpoint(str(run_train(tmp_path / f'resumed{i}', teacher, '--duration=0.000016', *he,
                                                f'--resume={path}')))
        assert full['step'] == resumed['step'] == 4 and full['data_pos'] == resumed['data_pos']
        for key in ('net', 'ema', 'D', 'optimizer_G', 'optimizer_D'):
            assert same(full[key], resumed[key]), key
    assert full['feature_weights'] == 'RANDOM-HE (demo only)'

def test_random_he_features_keep_the_signal():
    """--feature-weights=random: PyTorch's default conv init, EfficientNet-lite0's deepest map carries ~1e-9 of the
    image; random-he (He-normal fan-out convs, as timm/torchvision draw them) keeps it at order 1e-2..1. Seeded:
    the same seed gives the same trunk, biases zero."""
    torch.manual_seed(0)
    x = torch.rand(8, 3, 8, 8) * 2 - 1
    spread = {}
    for weights in ('random', 'random-he'):
        features, _ = gdd.build_discriminator(['tf_efficientnet_lite0'], 3, 32, 0, weights, head_width=8)
        net = features.nets['tf_efficientnet_lite0']
        with torch.no_grad():
            maps = net.trunk(F.interpolate(((x + 1) / 2 - net.mean) / net.std, 32, mode='bilinear'))
        spread[weights] = [m.std(0).mean().item() for m in maps]
    assert spread['random'][-1] < 1e-6 and min(spread['random-he']) > 1e-2
    a, b, c = (gdd.he_init(gdd.EfficientNetLite0(), seed) for seed in (1, 1, 2))
    assert same(a.state_dict(), b.state_dict()) and not same(a.state_dict(), c.state_dict())
    conv = a.blocks[1][0].conv_dw  # depthwise 3x3 over 96 channels: fan_out = 9
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 9), rel=0.1)

def test_head_width_caps_the_heads():
    """--head-width caps every head's channel width; None builds upstream's heads, bit for bit."""
    names, channels = ['tf_efficientnet_lite0'], [64, 64, 128, 256]
    sizes, end = gdd.head_sizes(32)
    maps = {names[0]: [(c, s, end) for c, s in zip(channels, sizes)]}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        default = gdd.Discriminator(maps)
        torch.manual_seed(0)
        none = gdd.Discriminator(maps, 0, None)
        capped = gdd.Discriminator(maps, 0, 32)
    assert same(default.state_dict(), none.state_dict())
    widths = [m.out_channels for m in capped.modules() if isinstance(m, torch.nn.Conv2d)]
    assert max(widths) == 32 and max(m.out_channels for m in default.modules() if isinstance(m, torch.nn.Conv2d)) > 32
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(capped) < count(default) / 100
    x = {names[0]: [torch.randn(2, c, s, s) for c, s in zip(channels, (16, 8, 4, 2))]}
    assert [l.shape for l in capped(x)] == [l.shape for l in default(x)]

def test_teacher_features_are_the_unets_maps_of_the_noised_image():
    """--backbone=teacher (ours, after LADD): the maps are the outputs of the last U-Net block per resolution, encoder
    then decoder, of c_in (x + sigma n) at c_noise, from the teacher's EMA weights (its map_augment dropped). The
    last decoder map gives the teacher's own denoised image through its output layers (EDM Eq. 7); the heads halve
    every map to half the smallest side; nothing in it trains and the images get gradients; no hook is left."""
    teacher, kwargs = tiny_teacher()
    net_kwargs = gdd.generator_kwargs(kwargs)
    features = gdd.FeatureNetworks(['teacher'], 0, 32, (net_kwargs, 0.5))
    gdd.init_from_teacher(features.nets['teacher'].net, teacher.state_dict(), 'teacher')
    t = features.nets['teacher']
    assert t.maps == [(16, 8, 2), (32, 4, 2), (32, 4, 2), (16, 8, 2)]  # TINY: 16 channels at 8x8, 32 at 4x4
    x = (torch.rand(3, 3, 8, 8) * 2 - 1).requires_grad_(True)
    torch.manual_seed(7)
    maps = features(x)['teacher']
    torch.manual_seed(7)
    noisy = x + torch.randn_like(x) * 0.5
    assert [tuple(m.shape[1:]) for m in maps] == [(c, s, s) for c, s, _ in t.maps]
    unet = t.net.model
    F_x = unet.dec['8x8_aux_conv'](F.silu(unet.dec['8x8_aux_norm'](maps[-1])))
    s_d = 0.5
    denoised = s_d ** 2 / (0.5 ** 2 + s_d ** 2) * noisy + 0.5 * s_d / (0.5 ** 2 + s_d ** 2) ** 0.5 * F_x
    torch.testing.assert_close(denoised, teacher(noisy, torch.tensor(0.5)), rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in features.parameters())
    sum(m.sum() for m in maps).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not block._forward_hooks for block in t.blocks)
    D = gdd.Discriminator(features.maps)
    assert [tuple(l.shape) for l in D(features(x.detach()))] == [(3, 4 * 4)]  # four heads, 2x2 logits each

def test_teacher_features_train_and_resume_bitwise(tmp_path, standin):
    """--backbone=teacher through the CLI: the feature network is the teacher read from --transfer (not in the
    training state), and resume is bitwise."""
    teacher = write_teacher(tmp_path / 'teacher.pt')
    flags = ['--backbone=teacher', '--feature-sigma=0.3', '--head-width=8']
    full = load_checkpoint(str(run_train(tmp_path / 'full', teacher, '--duration=0.000016', *flags)))
    half = run_train(tmp_path / 'half', teacher, '--duration=0.000008', *flags)
    resumed = load_checkpoint(str(run_train(tmp_path / 'resumed', teacher, '--duration=0.000016', *flags,
                                            f'--resume={half}')))
    assert full['step'] == resumed['step'] == 4
    for key in ('net', 'ema', 'D', 'optimizer_G', 'optimizer_D'):
        assert same(full[key], resumed[key]), key
    assert not any(k.startswith('model.') for k in full['D'])  # heads only
    assert full['feature_networks'] == ['teacher']

@pytest.mark.parametrize('freeze, tag', [(2, 'gddi-qkv'), (3, 'gddi-qkv-skip')])
def test_cli_freeze_2_3(tmp_path, standin, freeze, tag):
    teacher = write_teacher(tmp_path / 'teacher.pt')
    argv = [a for a in TRAIN if a != '--nosubdir'] + [f'--outdir={tmp_path}', f'--transfer={teacher}',
                                                      '--duration=0.000008', f'--freeze={freeze}']
    gdd.train(parse(argv))  # 2 steps of 4 images
    run_dir, = tmp_path.glob(f'00000-demo8-uncond-{tag}-gpus1-batch4-fp32')
    state = load_checkpoint(str(sorted(run_dir.glob('training-state-*.pt'))[-1]))
    ref = load_checkpoint(teacher)['ema']
    frozen = gdd.frozen_names(gdd.GDDPrecond(**state['net_kwargs']), freeze)
    assert state['step'] == 2 and official_frozen(gdd.GDDPrecond(**state['net_kwargs']), freeze) == sorted(frozen)
    assert all(torch.equal(state['net'][k], ref[k]) and torch.equal(state['ema'][k], ref[k]) for k in frozen)
    assert any(not torch.equal(v, ref[k]) for k, v in state['net'].items() if k not in frozen)  # the rest trains
    options = json.loads((run_dir / 'training_options.json').read_text())
    assert options['freeze'] == freeze and options['parameters']['frozen'] == sum(ref[k].numel() for k in frozen)
    with pytest.raises(SystemExit):
        parse(TRAIN + ['--freeze=4'])

def test_cli_errors(tmp_path, standin):
    teacher = write_teacher(tmp_path / 'teacher.pt')
    argv = [a for a in TRAIN if not a.startswith(('--feature-weights', '--backbone', '--feature-res'))]
    with pytest.raises(UserError, match='vgg16_bn ImageNet weights.*vgg16_bn-6c64b313.pth'):
        gdd.train(parse(argv + [f'--outdir={tmp_path}/x', f'--transfer={teacher}']))
    assert not (tmp_path / 'x').exists()
    with pytest.raises(UserError, match='--transfer is required'):
        gdd.train(parse(TRAIN + [f'--outdir={tmp_path}/x']))
    with pytest.raises(UserError, match='a PatchPrecond network'):
        common.save_checkpoint(dict(method='patch_diffusion', precond='PatchPrecond', net_kwargs={}, ema={}),
                               tmp_path / 'p.pt')
        gdd.train(parse(TRAIN + [f'--outdir={tmp_path}/x', f'--transfer={tmp_path}/p.pt']))

@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """Checkpoints of every kind the CLI may be handed, written once (read-only in the tests)."""
    d = tmp_path_factory.mktemp('files')
    net, kwargs = tiny_teacher()
    save = lambda name, **ckpt: common.save_checkpoint(ckpt, d / name) or str(d / name)  # noqa: E731
    G = gdd.GDDPrecond(**gdd.generator_kwargs(kwargs))
    return dict(
        teacher=save('teacher.pt', method='patch_diffusion', precond='EDMPrecond', net_kwargs=kwargs,
                     ema=net.state_dict()),
        teacher_cond=save('teacher3.pt', method='patch_diffusion', precond='EDMPrecond',
                          net_kwargs=tiny_teacher(label_dim=3)[1], ema=tiny_teacher(label_dim=3)[0].state_dict()),
        patch=save('patch.pt', method='patch_diffusion', precond='PatchPrecond', net_kwargs=kwargs, ema={}),
        relay_one=save('relay1.pt', method='relay_diffusion', precond='EDMPrecond', net_kwargs=kwargs,
                       stage=dict(precond='edm'), ema=net.state_dict()),
        relay_two=save('relay2.pt', method='relay_diffusion', precond='EDMPrecond', net_kwargs=kwargs,
                       stage=dict(precond='blur', up_scale=2), ema=net.state_dict()),
        masked=save('masked.pt', method='masked_dm', net_kwargs=dict(img_size=8, in_chans=3), ema={}),
        gdd=save('gdd.pt', method='gdd', precond='GDDPrecond', net_kwargs=gdd.generator_kwargs(kwargs),
                 ema=G.state_dict(), args=dict(data='demo-8')),
        text=str(d / 'notes.txt') if (d / 'notes.txt').write_text('not a checkpoint') else None,
        empty=str(d / 'empty.pt') if (d / 'empty.pt').write_bytes(b'') == 0 else None,
        raw_pickle=str(d / 'raw.pt') if (d / 'raw.pt').write_bytes(pickle.dumps(dict(ema={}))) else None,
        folder=str(d / 'folder') if (d / 'folder').mkdir() is None else None,
        gdd_nan=save('gdd-nan.pt', method='gdd', precond='GDDPrecond', net_kwargs=gdd.generator_kwargs(kwargs),
                     ema={k: v * math.nan if v.is_floating_point() else v for k, v in G.state_dict().items()}),
        teacher_nan=save('teacher-nan.pt', method='patch_diffusion', precond='EDMPrecond', net_kwargs=kwargs,
                         ema={k: v * math.inf for k, v in net.state_dict().items()}),
        relay_state=save('relay-state.pt', method='relay_diffusion', args=dict(data='demo-8'), net_kwargs=kwargs,
                         ema=net.state_dict(), net=net.state_dict(), optimizer={}))

BASE = ['train', '--data=demo-8', '--batch=4', '--feature-weights=random', '--backbone=tiny', '--feature-res=32',
        '--workers=0', '--nosubdir']
def train_argv(t, f, *extra, transfer='teacher'):
    return BASE + [f'--outdir={t / "run"}'] + ([f'--transfer={f[transfer]}'] if transfer else []) + list(extra)
def gen_argv(t, f, *extra, network='gdd'):
    return ['generate', f'--network={f[network]}', f'--outdir={t / "out"}', '--seeds=0-1'] + list(extra)

# (id, argv(tmp_path, files), exit code, words the one line on stderr must contain). Nothing may be left behind.
CLI_ERRORS = [
    ('transfer_relay_stage_two', lambda t, f: train_argv(t, f, transfer='relay_two'), 2, ['--transfer=', 'stage-two']),
    ('transfer_masked_dm', lambda t, f: train_argv(t, f, transfer='masked'), 2, ['--transfer=', 'masked_dm.py']),
    ('transfer_gdd_snapshot', lambda t, f: train_argv(t, f, transfer='gdd'), 2, ['--transfer=', 'gdd.py']),
    ('transfer_patch_precond', lambda t, f: train_argv(t, f, transfer='patch'), 2, ['--transfer=', 'PatchPrecond']),
    ('transfer_missing', lambda t, f: train_argv(t, f, f'--transfer={t / "none.pt"}', transfer=None), 2,
     ['--transfer=', 'no such']),
    ('transfer_not_a_checkpoint', lambda t, f: train_argv(t, f, transfer='text'), 2,
     ['--transfer=', 'not a checkpoint']),
    ('transfer_absent', lambda t, f: train_argv(t, f, transfer=None), 2, ['--transfer is required']),
    ('transfer_wrong_labels', lambda t, f: train_argv(t, f, '--cond=1'), 2, ['--transfer=', '0 classes', '--cond']),
    ('feature_res_7', lambda t, f: train_argv(t, f, '--backbone=tf_efficientnet_lite0', '--feature-res=7'), 2,
     ['--feature-res', '7', '>= 32']),
    ('feature_res_48', lambda t, f: train_argv(t, f, '--backbone=tf_efficientnet_lite0', '--feature-res=48'), 2,
     ['--feature-res=48', 'tf_efficientnet_lite0']),
    ('feature_res_deit', lambda t, f: train_argv(t, f, '--backbone=0'), 2, ['--feature-res=32', 'DeiT']),
    ('feature_weights_count', lambda t, f: train_argv(t, f, '--feature-weights=a.pth,b.pth'), 2,
     ['--feature-weights', '2 file(s) for 1']),
    ('feature_weights_missing', lambda t, f: train_argv(t, f, f'--feature-weights={t / "w.pth"}'), 2,
     ['--feature-weights=', 'no such']),
    ('backbone_unknown', lambda t, f: train_argv(t, f, '--backbone=foo'), 2, ['--backbone', "'foo'"]),
    ('lr_negative', lambda t, f: train_argv(t, f, '--lr=-1'), 2, ['--lr', '-1']),
    ('dlr_zero', lambda t, f: train_argv(t, f, '--dlr=0'), 2, ['--dlr', '0']),
    ('r1_interval_zero', lambda t, f: train_argv(t, f, '--r1-interval=0'), 2, ['--r1-interval', '0']),
    ('r1_gamma_negative', lambda t, f: train_argv(t, f, '--r1-gamma=-1'), 2, ['--r1-gamma', '-1']),
    ('batch_zero', lambda t, f: train_argv(t, f, '--batch=0'), 2, ['--batch', '0']),
    ('batch_indivisible', lambda t, f: train_argv(t, f, '--batch=6', '--batch-gpu=4'), 2, ['--batch=6']),
    ('freeze_4', lambda t, f: train_argv(t, f, '--freeze=4'), 2, ['--freeze', '4']),
    ('fp16', lambda t, f: train_argv(t, f, '--fp16=1'), 2, ['--fp16', '--bf16']),
    ('ls_zero', lambda t, f: train_argv(t, f, '--ls=0'), 2, ['--ls', '0']),
    ('grid_negative', lambda t, f: train_argv(t, f, '--grid=-1'), 2, ['--grid', '-1']),
    ('preset_bogus', lambda t, f: train_argv(t, f, '--preset=bogus'), 2, ['--preset', 'bogus', 'cifar10_gddi']),
    ('train_outdir_is_file', lambda t, f: train_argv(t, f, f'--outdir={f["text"]}'), 2, ['--outdir=', 'not a folder']),
    ('generate_batch_negative', lambda t, f: gen_argv(t, f, '--batch=-1'), 2, ['--batch', '-1']),
    ('generate_seeds_empty', lambda t, f: gen_argv(t, f, '--seeds=5-1'), 2, ['--seeds', 'empty']),
    ('generate_outdir_is_file', lambda t, f: gen_argv(t, f, f'--outdir={f["text"]}'), 2, ['--outdir=', 'not a folder']),
    ('generate_network_teacher', lambda t, f: gen_argv(t, f, network='teacher'), 2,
     ['--network=', 'patch_diffusion.py']),
    ('generate_network_missing', lambda t, f: gen_argv(t, f, f'--network={t / "none.pt"}'), 2,
     ['--network=', 'no such']),
    ('generate_network_text', lambda t, f: gen_argv(t, f, network='text'), 2, ['--network=', 'not a checkpoint']),
    ('generate_class_uncond', lambda t, f: gen_argv(t, f, '--class=3'), 2, ['--class=3', '0 classes']),
    ('generate_sigma_max_zero', lambda t, f: gen_argv(t, f, '--sigma_max=0'), 2, ['--sigma_max', '0']),
    # train --metrics: a bad metric flag is one line before anything is written (issue 22)
    # hostile input (issue 24): every number finite and within a range that means something; any file of the wrong
    # kind named in one line
    ('dlr_inf', lambda t, f: train_argv(t, f, '--dlr=inf'), 2, ['--dlr', 'not a finite number']),
    ('dlr_huge', lambda t, f: train_argv(t, f, '--dlr=1e9'), 2, ['--dlr', '<= 1']),
    ('r1_gamma_huge', lambda t, f: train_argv(t, f, '--r1-gamma=1e300'), 2, ['--r1-gamma', 'out of range']),
    ('r1_interval_huge', lambda t, f: train_argv(t, f, '--r1-interval=99999999999'), 2, ['--r1-interval', 'range']),
    ('gan_weight_nan', lambda t, f: train_argv(t, f, '--gan-weight=nan'), 2, ['--gan-weight', 'not a finite']),
    ('head_width_huge', lambda t, f: train_argv(t, f, '--head-width=99999999'), 2, ['--head-width', '<= 2048']),
    ('feature_res_huge', lambda t, f: train_argv(t, f, '--feature-res=100000'), 2, ['--feature-res', '<= 1024']),
    ('grid_huge', lambda t, f: train_argv(t, f, '--grid=100000000'), 2, ['--grid', '<= 1024']),
    ('cres_zero', lambda t, f: train_argv(t, f, '--cres=0', '-n'), 2, ['--cres', 'channel multipliers']),
    ('cres_too_deep', lambda t, f: train_argv(t, f, '--cres=1,2,2,2,2', '-n'), 2, ['--cres=1,2,2,2,2', '8x8']),
    ('transfer_folder', lambda t, f: train_argv(t, f, transfer='folder'), 2, ['--transfer=', 'folder without']),
    ('transfer_empty', lambda t, f: train_argv(t, f, transfer='empty'), 2, ['--transfer=', 'empty.pt', 'truncated']),
    ('transfer_raw_pickle', lambda t, f: train_argv(t, f, transfer='raw_pickle'), 2, ['--transfer=', 'raw.pt']),
    ('transfer_nan', lambda t, f: train_argv(t, f, transfer='teacher_nan'), 2, ['--transfer=', 'NaN or inf']),
    ('feature_weights_empty', lambda t, f: train_argv(t, f, f'--feature-weights={f["empty"]}'), 2,
     ['--feature-weights=', 'empty.pt']),
    ('resume_relay_state', lambda t, f: train_argv(t, f, f'--resume={f["relay_state"]}'), 2,
     ['--resume', 'relay_diffusion.py training state']),
    ('resume_gdd_snapshot', lambda t, f: train_argv(t, f, f'--resume={f["gdd"]}'), 2,
     ['--resume', 'network snapshot, not a training state']),
    ('resume_raw_pickle', lambda t, f: train_argv(t, f, f'--resume={f["raw_pickle"]}'), 2, ['--resume', 'raw.pt']),
    ('generate_network_folder', lambda t, f: gen_argv(t, f, network='folder'), 2, ['--network=', 'folder without']),
    ('generate_network_empty', lambda t, f: gen_argv(t, f, network='empty'), 2, ['--network=', 'empty.pt']),
    ('generate_network_raw_pickle', lambda t, f: gen_argv(t, f, network='raw_pickle'), 2, ['--network=', 'raw.pt']),
    ('generate_network_nan', lambda t, f: gen_argv(t, f, network='gdd_nan'), 2, ['--network=', 'NaN or inf']),
    ('generate_network_masked_dm', lambda t, f: gen_argv(t, f, network='masked'), 2, ['--network=', 'masked_dm.py']),
    ('generate_network_relay_state', lambda t, f: gen_argv(t, f, network='relay_state'), 2,
     ['--network=', 'relay_diffusion.py']),
    ('generate_sigma_max_huge', lambda t, f: gen_argv(t, f, '--sigma_max=1e300'), 2, ['--sigma_max', '<= 1000']),
    ('generate_sigma_max_nan', lambda t, f: gen_argv(t, f, '--sigma_max=nan'), 2, ['--sigma_max', 'not a finite']),
    ('metrics_bogus', lambda t, f: train_argv(t, f, '--metrics=bogus'), 2, ['--metrics', 'bogus']),
    ('backbone_twice', lambda t, f: train_argv(t, f, '--backbone=teacher,teacher'), 2, ['--backbone', 'twice']),
    ('backbone_teacher_cond', lambda t, f: train_argv(t, f, '--cond=1', '--backbone=teacher', transfer='teacher_cond'),
     2, ['--backbone=teacher', 'unconditional']),
    ('feature_sigma_zero', lambda t, f: train_argv(t, f, '--feature-sigma=0'), 2, ['--feature-sigma', '>= 0.002']),
    ('metrics_fid_without_ref', lambda t, f: train_argv(t, f, '--metrics=fid10k_full'), 2, ['--metrics-ref']),
    ('metrics_ref_missing', lambda t, f: train_argv(t, f, '--metrics=fid10k_full', f'--metrics-ref={t}/missing.npz'),
     2, ['missing.npz']),
    ('metrics_cache_is_file', lambda t, f: train_argv(t, f, '--metrics=toy_fd', f'--metrics-cache={f["text"]}'), 2,
     ['--metrics-cache=', 'not a folder']),
]

def tree(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob('*'))

@pytest.mark.parametrize('argv, code, words', [pytest.param(*row[1:], id=row[0]) for row in CLI_ERRORS])
def test_cli_errors_table(tmp_path, files, standin, monkeypatch, capsys, argv, code, words):
    monkeypatch.setattr(sys, 'argv', ['gdd.py'] + [str(a) for a in argv(tmp_path, files)])
    before, files_before = tree(tmp_path), tree(Path(files['teacher']).parent)
    with pytest.raises(SystemExit) as exit:
        gdd.main()
    out, err = capsys.readouterr()
    assert exit.value.code == code, err
    assert 'Traceback' not in err and len(err.strip().splitlines()) == 1 and out == '', (out, err)
    for word in words:
        assert word in err, (word, err)
    assert tree(tmp_path) == before and tree(Path(files['teacher']).parent) == files_before  # nothing left behind

#------------------------------------------------------------------------------
# train --metrics (issue 22): the numbers of generate + fid.py score of every snapshot, in StyleGAN's
# metric-<name>.jsonl.

def test_train_metrics_equal_generate_then_score(tmp_path, files, toy_cache, standin, capsys, monkeypatch):
    """--metrics=toy_fd --snap=1: one line per snapshot (StyleGAN2-ADA's layout), whose value is, to float
    precision, what `generate --seeds=0-99` of that snapshot and `fid.py score --num=100` give (toy_fd's 500 images
    monkeypatched to 100, for time)."""
    import fid
    monkeypatch.setitem(common.TRAINING_METRICS, 'toy_fd', 100)
    demo_masks = fid.demo_masks  # score's demo_fit, not compared here: 1,000 shape draws, not 100,000 (~5 s each)
    monkeypatch.setattr(fid, 'demo_masks', lambda R: demo_masks(R, draws=1000))
    run = tmp_path / 'run'
    gdd.train(parse(TRAIN + [f'--outdir={run}', f'--transfer={files["teacher"]}', '--duration=0.000012', '--dump=0',
                             '--grid=0', '--metrics=toy_fd', f'--metrics-cache={toy_cache}']))  # 3 steps: 2 snapshots
    lines = [json.loads(line) for line in (run / 'metric-toy_fd.jsonl').read_text().splitlines()]
    snapshots = sorted(p.name for p in run.glob('network-snapshot-*.pt'))
    assert [line['snapshot_pkl'] for line in lines] == snapshots and len(snapshots) == 2
    for line in lines:
        assert {'results', 'metric', 'total_time', 'num_gpus', 'snapshot_pkl', 'timestamp', 'kimg'} <= set(line)
        assert line['metric'] == 'toy_fd' and line['num_gpus'] == 1 and line['total_time'] > 0
    assert [line['kimg'] for line in lines] == [load_checkpoint(str(run / n))['cur_nimg'] / 1000 for n in snapshots]
    assert lines[0]['results'] != lines[1]['results']  # the generator trained between them
    computed, toy_fd = [], fid.toy_fd  # score's unrounded numbers (it prints 6 digits)
    monkeypatch.setattr(fid, 'toy_fd', lambda *a: computed.append(toy_fd(*a)) or computed[-1])
    for line in lines:
        out = tmp_path / line['snapshot_pkl'][:-3]
        gdd.generate(parse(['generate', f'--network={run / line["snapshot_pkl"]}', f'--outdir={out}',
                            '--seeds=0-99', '--batch=250']))
        capsys.readouterr()
        computed.clear()
        fid.main(['score', f'--images={out}', '--data=demo-8', '--num=100', f'--cache={toy_cache}'])
        printed = dict(row.split() for row in capsys.readouterr().out.splitlines() if row.startswith('toy_fd '))
        assert f'{line["results"]["toy_fd"]:.6g}' == printed['toy_fd']
        assert line['results']['toy_fd'] == pytest.approx(computed[0], rel=1e-6)  # the samples' toy_fd comes first

def test_relay_stage_one_is_a_teacher(files):
    kwargs, state = gdd.load_teacher(files['relay_one'])
    assert kwargs['img_resolution'] == 8 and state.keys() == load_checkpoint(files['teacher'])['ema'].keys()

def test_old_layout_snapshot_loads(tmp_path):
    """A snapshot with exactly the keys gdd.py wrote before the shared TrainingRun (commit 8eab695) still loads."""
    teacher, kwargs = tiny_teacher()
    G = gdd.init_from_teacher(gdd.GDDPrecond(**gdd.generator_kwargs(kwargs)), teacher.state_dict(), 'teacher')
    old = dict(method='gdd', args=dict(transfer='/gone/teacher.pt', freeze=1, backbone='1', preset='cifar10-gddi'),
               cur_nimg=12, precond='GDDPrecond', net_kwargs=gdd.generator_kwargs(kwargs), ema=G.state_dict(), freeze=1,
               feature_networks=['tf_efficientnet_lite0'], feature_weights='RANDOM (demo only)')
    common.save_checkpoint(old, tmp_path / 'network-snapshot-000000.pt')
    net = gdd.load_network(str(tmp_path / 'network-snapshot-000000.pt'))
    assert same(net.state_dict(), G.state_dict()) and isinstance(net, gdd.GDDPrecond) and net.eps == 0.002
    assert torch.equal(gdd.sample_images(net, [0, 1], 'cpu'), gdd.sample_images(G, [0, 1], 'cpu'))

def test_dry_run_counts_without_teacher(capsys):
    gdd.train(parse(['train', '--preset=cifar10_gddi', '--data=demo-32', '-n']))
    options = json.loads(capsys.readouterr().out)
    assert options['parameters'] == dict(total=56_395_523, frozen=47_597_568, trainable=8_797_955,
                                         discriminator_heads=2 * 10_331_328,
                                         feature_networks=14_723_136 + 611_776 + 2_958_848 + 376_768)
    assert options['lr'] == 1e-4 and options['seed'] == 42 and options['bf16'] and options['dropout'] == 0
    assert options['lr_rampup'] == 0
    gdd.train(parse(['train', '--data=demo-32', '-n']))  # no preset: still no warm-up
    assert json.loads(capsys.readouterr().out)['lr_rampup'] == 0

def test_dry_run_of_a_preset_reads_no_dataset(tmp_path, capsys, monkeypatch):
    """`train --preset=cifar10_gddi --data=datasets/cifar10-32x32.zip -n` (README) without the dataset: the
    preset's teacher data (32x32 RGB, 10 classes with --cond) gives the counts; nothing is read or written."""
    monkeypatch.chdir(tmp_path)
    gdd.train(parse(['train', '--preset=cifar10_gddi', '--data=datasets/cifar10-32x32.zip', '-n']))
    options = json.loads(capsys.readouterr().out)
    assert options['parameters']['total'] == 56_395_523 and options['net_kwargs']['img_resolution'] == 32
    gdd.train(parse(['train', '--preset=cifar10_cond_gddi', '--data=datasets/cifar10-32x32.zip', '-n']))
    assert json.loads(capsys.readouterr().out)['parameters']['total'] == 56_398_339  # label_dim 10
    gdd.train(parse(['train', '--preset=imagenet64_gddi', '--data=datasets/imagenet-64x64.zip', '-n']))
    assert json.loads(capsys.readouterr().out)['parameters']['trainable'] == 62_833_347  # ADM, 1000 classes
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match='no such dataset'):  # without a preset the data must be there
        gdd.train(parse(['train', '--data=datasets/cifar10-32x32.zip', '-n']))

def read_pngs(folder):
    return {p.name: np.array(PIL.Image.open(p)) for p in sorted(Path(folder).rglob('*.png'))}

def torchrun(nproc, *args):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', __file__, *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert result.returncode == 0, result.stderr[-3000:]
    return result

def test_torchrun_train_and_generate_per_seed(tmp_path, standin):
    teacher = write_teacher(tmp_path / 'teacher.pt', label_dim=3)
    torchrun(2, 'cli', *[a for a in TRAIN if a != '--nosubdir'], f'--outdir={tmp_path}', f'--transfer={teacher}',
             '--duration=0.000008', '--cond=1', '--desc=ddp')
    run_dir, = tmp_path.glob('00000-demo8-cond-gddi-gpus2-batch4-fp32-ddp')
    state = load_checkpoint(str(sorted(run_dir.glob('training-state-*.pt'))[-1]))
    assert len(state['data_pos']) == 2 and state['step'] == 2
    snapshot = str(sorted(run_dir.glob('network-snapshot-*.pt'))[-1])
    gen = ['generate', f'--network={snapshot}', '--seeds=0-5']
    torchrun(2, 'cli', *gen, f'--outdir={tmp_path / "two"}', '--batch=2', '--subdirs')
    gdd.generate(parse(gen + [f'--outdir={tmp_path / "one"}', '--batch=6', '--subdirs']))
    gdd.generate(parse(gen + [f'--outdir={tmp_path / "four"}', '--batch=4']))
    gdd.generate(parse(gen + [f'--outdir={tmp_path / "cls"}', '--class=2']))
    one, two, four, cls = (read_pngs(tmp_path / d) for d in ('one', 'two', 'four', 'cls'))
    assert sorted(one) == [f'{s:06d}.png' for s in range(6)] and (tmp_path / 'one' / '000000' / '000005.png').exists()
    assert all(np.array_equal(one[k], two[k]) and np.array_equal(one[k], four[k]) for k in one)
    assert not np.array_equal(one['000000.png'], one['000001.png'])
    # the image is G(80 z_seed; 80, c_seed), quantized as floor(clip(127.5 x + 128)); --class fixes c
    net = gdd.load_network(snapshot)
    rng = common.PerSeedRNG([3], 'cpu')
    z = rng.randn([3, 8, 8])
    rng.randint(3)  # the seed's class draw, overridden by --class
    with torch.no_grad():
        x = net(z * 80, 80, torch.eye(3)[[2]])
    assert np.array_equal(cls['000003.png'], (x[0] * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())

#------------------------------------------------------------------------------
# 2-process DDP: the synced gradient of each stage equals the mean of the ranks' own gradients, and after full
# iterations the replicas (G, EMA-free nets, D heads' parameters) are identical on both ranks.

def ddp_worker(out):
    register_standin()
    device = common.init_distributed()
    rank, world = common.get_rank(), common.get_world_size()
    _, G, features, D, opt_G, opt_D, frozen = tiny_gan(freeze=1, label_dim=3)
    micro_batches = real_batches(1, batch=4, label_dim=3)[0]
    micro_batches = [(x[2 * rank:2 * rank + 2], c[2 * rank:2 * rank + 2]) for x, c in micro_batches]  # this rank's half
    G_local, D_local = copy.deepcopy(G), copy.deepcopy(D)
    ddp_G = common.distributed_model(G, device, broadcast_buffers=False)
    ddp_D = common.distributed_model(D, device, broadcast_buffers=False)
    errors = {}
    stages = [('G', lambda g, d, dd: gdd.g_step(g, features, d, micro_batches),
               lambda: [p for p in G.parameters() if p.requires_grad],
               lambda: [p for p in G_local.parameters() if p.requires_grad]),
              ('D', lambda g, d, dd: gdd.d_step(g.module, features, dd, micro_batches), lambda: list(D.parameters()),
               lambda: list(D_local.parameters())),
              ('R1', lambda g, d, dd: gdd.r1_step(features, dd, micro_batches, 1e-4, 16), lambda: list(D.parameters()),
               lambda: list(D_local.parameters()))]
    for name, run_stage, synced, local in stages:
        for p in synced() + local():
            p.grad = None
        reseed(0, rank, 0)
        run_stage(Local(G_local), D_local, Local(D_local))
        reseed(0, rank, 0)
        run_stage(ddp_G, D, ddp_D)
        worst = 0
        for a, b in zip(synced(), local()):
            mean = b.grad.clone()
            torch.distributed.all_reduce(mean)
            scale = (mean / world).abs().max().clamp(min=1e-12)
            worst = max(worst, ((a.grad - mean / world).abs().max() / scale).item())
        errors[name] = worst
    for step in range(3):
        reseed(0, rank, step)
        gdd.gdd_iteration(G, ddp_G, features, D, ddp_D, opt_G, opt_D, micro_batches, step + 1, 1e-3, 1e-3,
                          NO_SCALER, ARGS.gan_weight, ARGS.r1_gamma, ARGS.r1_interval)
    flat = torch.cat([p.detach().flatten() for p in list(G.parameters()) + list(D.parameters())])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    torch.distributed.all_gather(gathered, flat)
    if rank == 0:
        changed = sum(not torch.equal(p, q) for p, q in zip(G.parameters(), G_local.parameters()))
        Path(out).write_text(json.dumps(dict(errors=errors, changed=changed,
                                             replicas_equal=all(torch.equal(gathered[0], g) for g in gathered))))

def test_ddp_two_processes_equal_mean_of_local_gradients(tmp_path):
    torchrun(2, 'ddp', str(tmp_path / 'ddp.json'))
    result = json.loads((tmp_path / 'ddp.json').read_text())
    assert all(err < 1e-5 for err in result['errors'].values()), result
    assert result['replicas_equal'] and result['changed'] > 0

if __name__ == '__main__':
    if sys.argv[1] == 'ddp':
        ddp_worker(sys.argv[2])
        torch.distributed.destroy_process_group()
        os._exit(0)  # skip interpreter teardown, which torch 2.13's gloo threads can abort (docs/testing.md)
    else:
        register_standin()
        sys.argv = [sys.argv[0]] + sys.argv[2:]
        gdd.main()
