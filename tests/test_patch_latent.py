"""patch_diffusion.py in latent space: the Stable Diffusion VAE (diffusers layout, both attention spellings, the
safetensors reader), pre-encoded latents against per-step encoding, the latent patch schedule, and a tiny latent
train + generate through the CLI with a tiny random VAE (random weights: the images mean nothing)."""
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

import patch_diffusion as pd
from common import UserError
from conftest import ROOT

#------------------------------------------------------------------------------
# The VAE: layout, loading, shapes.

def diffusers_layout(ch=(128, 256, 512, 512), layers=2, image_channels=3, latent=4):
    """{key: shape} of diffusers' AutoencoderKL, written from its source (autoencoders/vae.py Encoder/Decoder,
    unets/unet_2d_blocks.py DownEncoderBlock2D/UpDecoderBlock2D/UNetMidBlock2D, resnet.py ResnetBlock2D,
    attention_processor.py Attention with group_norm/to_q/to_k/to_v/to_out.0)."""
    keys = {}
    def conv(name, o, i, k):
        keys[f'{name}.weight'], keys[f'{name}.bias'] = (o, i, k, k), (o,)
    def norm(name, c):
        keys[f'{name}.weight'] = keys[f'{name}.bias'] = (c,)
    def resnet(name, i, o):
        norm(f'{name}.norm1', i), conv(f'{name}.conv1', o, i, 3), norm(f'{name}.norm2', o), conv(f'{name}.conv2', o, o, 3)
        if i != o:
            conv(f'{name}.conv_shortcut', o, i, 1)
    def mid(name, c):
        resnet(f'{name}.resnets.0', c, c), resnet(f'{name}.resnets.1', c, c), norm(f'{name}.attentions.0.group_norm', c)
        for proj in ('to_q', 'to_k', 'to_v', 'to_out.0'):
            keys[f'{name}.attentions.0.{proj}.weight'], keys[f'{name}.attentions.0.{proj}.bias'] = (c, c), (c,)
    conv('encoder.conv_in', ch[0], image_channels, 3)
    for b, c in enumerate(ch):
        for r in range(layers):
            resnet(f'encoder.down_blocks.{b}.resnets.{r}', ch[max(b - 1, 0)] if r == 0 else c, c)
        if b < len(ch) - 1:
            conv(f'encoder.down_blocks.{b}.downsamplers.0.conv', c, c, 3)
    mid('encoder.mid_block', ch[-1])
    norm('encoder.conv_norm_out', ch[-1]), conv('encoder.conv_out', 2 * latent, ch[-1], 3)
    conv('quant_conv', 2 * latent, 2 * latent, 1), conv('post_quant_conv', latent, latent, 1)
    conv('decoder.conv_in', ch[-1], latent, 3)
    mid('decoder.mid_block', ch[-1])
    rev = ch[::-1]
    for b, c in enumerate(rev):
        for r in range(layers + 1):
            resnet(f'decoder.up_blocks.{b}.resnets.{r}', rev[max(b - 1, 0)] if r == 0 else c, c)
        if b < len(ch) - 1:
            conv(f'decoder.up_blocks.{b}.upsamplers.0.conv', c, c, 3)
    norm('decoder.conv_norm_out', ch[0]), conv('decoder.conv_out', image_channels, ch[0], 3)
    return keys

def test_full_size_vae_layout_and_parameter_counts():
    with torch.device('meta'):
        vae = pd.AutoencoderKL()
        mean, logvar = vae.encode(torch.empty(1, 3, 256, 256))
        image = vae.decode(torch.empty(1, 4, 32, 32))
    assert {k: tuple(v.shape) for k, v in vae.state_dict().items()} == diffusers_layout()
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert (count(vae), count(vae.encoder), count(vae.decoder)) == (83_653_863, 34_163_592, 49_490_179)
    assert len(vae.state_dict()) == 248 and vae.factor == 8
    assert mean.shape == logvar.shape == (1, 4, 32, 32) and image.shape == (1, 3, 256, 256)  # kl-f8: 256 px -> 4x32x32
    # The spots that differ between VAE ports: shortcut only where the width changes, 'to_out.0', 'conv' resamplers.
    layout = diffusers_layout()
    assert layout['decoder.up_blocks.2.resnets.0.conv_shortcut.weight'] == (256, 512, 1, 1)
    assert 'decoder.up_blocks.1.resnets.0.conv_shortcut.weight' not in layout
    assert layout['encoder.mid_block.attentions.0.to_out.0.weight'] == (512, 512)

TINY_VAE = dict(block_out_channels=(32, 32), layers_per_block=1)  # 2x downsampling, GroupNorm(32)

def tiny_vae(seed=0, **kwargs):
    torch.manual_seed(seed)
    vae = pd.AutoencoderKL(**(TINY_VAE | kwargs)).eval()
    with torch.no_grad():  # randomize norms and biases too, so every parameter matters
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return vae

def test_encoder_decoder_shapes_and_posterior():
    vae = tiny_vae(block_out_channels=(32, 32, 32), latent_channels=3)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mean, logvar = vae.encode(x)
        assert mean.shape == logvar.shape == (2, 3, 4, 4) and vae.factor == 4
        assert vae.decode(mean).shape == (2, 3, 16, 16)
        assert torch.allclose(vae.encode(x[1:])[0], mean[1:], atol=1e-5)  # per image: independent of the batch
        moments = vae.quant_conv(vae.encoder(x))
        assert torch.equal(mean, moments[:, :3]) and torch.equal(logvar, moments[:, 3:].clamp(-30, 20))

def test_vae_attention_is_one_head_softmax_attention():
    vae = tiny_vae()
    attn = vae.encoder.mid_block.attentions[0]
    x = torch.randn(2, 32, 3, 5)
    h = attn.group_norm(x).flatten(2).transpose(1, 2)                     # [2, 15, 32]
    q, k, v = attn.to_q(h), attn.to_k(h), attn.to_v(h)
    w = torch.softmax(q @ k.transpose(1, 2) / 32 ** 0.5, dim=-1)
    expected = x + attn.to_out[0](w @ v).transpose(1, 2).reshape(2, 32, 3, 5)
    assert torch.allclose(attn(x), expected, atol=1e-5)

# An independent safetensors writer: 8-byte little-endian header length, JSON header, raw little-endian bytes.
def write_safetensors(path, tensors, dtype_names=None):
    names = {torch.float32: 'F32', torch.float16: 'F16', torch.bfloat16: 'BF16', torch.int64: 'I64', torch.uint8: 'U8'}
    header, blobs, offset = {'__metadata__': {'format': 'pt'}}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b''
        header[name] = dict(dtype=names[t.dtype], shape=list(t.shape), data_offsets=[offset, offset + len(raw)])
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b' ' * (-len(text) % 8)
    with open(path, 'wb') as f:
        f.write(struct.pack('<Q', len(text)) + text + b''.join(blobs))

def test_safetensors_reader_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {'a.weight': torch.randn(3, 4, 1, 1, generator=g), 'b': torch.randn(5, generator=g).half(),
               'c': torch.randn(2, 3, generator=g).bfloat16(), 'd': torch.arange(-3, 4), 'e': torch.zeros(0, 2),
               'f': torch.tensor([0, 255], dtype=torch.uint8)}
    write_safetensors(tmp_path / 'x.safetensors', tensors)
    back = pd.read_safetensors(tmp_path / 'x.safetensors')
    assert back.keys() == tensors.keys()
    assert all(back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t) for k, t in tensors.items())
    # Bytes written by hand: little-endian float32 1.5, -2.0 and bfloat16 1.0 (0x3f80), after an unpadded header.
    header = json.dumps({'x': dict(dtype='F32', shape=[2], data_offsets=[0, 8]), 'y': dict(dtype='BF16', shape=[1, 1], data_offsets=[8, 10])}).encode()
    (tmp_path / 'y.safetensors').write_bytes(struct.pack('<Q', len(header)) + header + struct.pack('<2f', 1.5, -2.0) + b'\x80\x3f')
    back = pd.read_safetensors(tmp_path / 'y.safetensors')
    assert back['x'].tolist() == [1.5, -2.0] and back['y'].dtype == torch.bfloat16 and back['y'].tolist() == [[1.0]]

def old_spelling(state_dict, conv_shaped):
    """The pre-0.14 diffusers names (query/key/value/proj_attn), optionally with 1x1-conv-shaped weights."""
    old = {}
    for key, t in state_dict.items():
        for new, name in (('to_q', 'query'), ('to_k', 'key'), ('to_v', 'value'), ('to_out.0', 'proj_attn')):
            if f'.attentions.0.{new}.' in key:
                key, t = key.replace(f'.{new}.', f'.{name}.'), (t[:, :, None, None] if conv_shaped and t.ndim == 2 else t)
        old[key] = t.clone()
    return old

def test_both_attention_spellings_and_formats_load_the_same_module(tmp_path):
    vae = tiny_vae()
    sd = vae.state_dict()
    write_safetensors(tmp_path / 'new.safetensors', sd)
    write_safetensors(tmp_path / 'old.safetensors', old_spelling(sd, conv_shaped=False))
    torch.save(old_spelling(sd, conv_shaped=True), tmp_path / 'old_conv.bin')
    torch.save(sd, tmp_path / 'new.bin')
    write_safetensors(tmp_path / 'half.safetensors', {k: v.half() for k, v in sd.items()})
    assert 'encoder.mid_block.attentions.0.query.weight' in old_spelling(sd, True)
    z, x = torch.randn(2, 4, 4, 4), torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        reference = vae.decode(z), vae.encode(x)[0]
        for name in ('new.safetensors', 'old.safetensors', 'old_conv.bin', 'new.bin'):
            loaded = pd.load_vae(str(tmp_path / name))
            assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
            assert torch.equal(loaded.decode(z), reference[0]) and torch.equal(loaded.encode(x)[0], reference[1]), name
        half = pd.load_vae(str(tmp_path / 'half.safetensors'))  # F16 weights, computed in float32
        assert all(torch.equal(p, sd[k].half().float()) for k, p in half.state_dict().items())

def test_load_vae_errors(tmp_path, monkeypatch):
    torch.save(tiny_vae().state_dict(), tmp_path / 'local.bin')  # a URL goes through common.download (no network here)
    calls = []
    monkeypatch.setattr(pd, 'download', lambda url, flag: calls.append((url, flag)) or str(tmp_path / 'local.bin'))
    assert pd.load_vae('https://example.org/vae/diffusion_pytorch_model.bin').factor == 2
    assert calls == [('https://example.org/vae/diffusion_pytorch_model.bin', '--vae')]
    with pytest.raises(UserError, match='no such VAE weights file'):
        pd.load_vae(str(tmp_path / 'missing.safetensors'))
    (tmp_path / 'junk.safetensors').write_bytes(b'\x10\0\0\0\0\0\0\0{"a": not json}')
    with pytest.raises(UserError, match='junk.safetensors: not a readable'):
        pd.load_vae(str(tmp_path / 'junk.safetensors'))
    sd = tiny_vae().state_dict()
    torch.save({k: v for k, v in sd.items() if 'conv_out' not in k or 'decoder' not in k}, tmp_path / 'partial.bin')
    with pytest.raises(UserError, match='partial.bin'):
        pd.load_vae(str(tmp_path / 'partial.bin'))
    torch.save(dict(sd, **{'encoder.extra.weight': torch.zeros(1)}), tmp_path / 'extra.bin')
    with pytest.raises(UserError, match='unexpected encoder.extra.weight'):
        pd.load_vae(str(tmp_path / 'extra.bin'))
    sd['encoder.mid_block.attentions.0.to_q.weight'] = torch.zeros(32, 31)
    torch.save(sd, tmp_path / 'shape.bin')
    with pytest.raises(UserError, match=r'to_q.weight has shape \[32, 31\], expected \[32, 32\]'):
        pd.load_vae(str(tmp_path / 'shape.bin'))
    # Hostile files (issue 24): one line naming the file, never torch's unsafe-load advice.
    import pickle
    (tmp_path / 'empty.safetensors').write_bytes(b'')
    (tmp_path / 'raw.bin').write_bytes(pickle.dumps({'decoder.conv_out.weight': 1}))
    torch.save({'a': [1, 2]}, tmp_path / 'list.bin')
    sd = tiny_vae().state_dict()
    torch.save({k: v * float('nan') if k == 'decoder.conv_out.weight' else v for k, v in sd.items()},
               tmp_path / 'nan.bin')
    for name, words in [('empty.safetensors', 'empty or truncated: 0 bytes'),
                        ('raw.bin', 'neither safetensors nor a torch.save file of tensors'),
                        ('list.bin', 'no dict of tensors'), ('nan.bin', 'NaN or inf')]:
        with pytest.raises(UserError) as e:
            pd.load_vae(str(tmp_path / name))
        assert str(e.value).startswith(f'{tmp_path / name}: ') and words in str(e.value)
        assert 'weights_only' not in str(e.value) and '\n' not in str(e.value)

#------------------------------------------------------------------------------
# Latent training: the patch schedule, the seed's commands, pre-encoding, CLI train + generate.

def test_latent_patch_schedule_and_counter():
    sizes, pmf, mul = pd.patch_schedule(32, 0.5, latent=True)   # 256 px -> 32x32 latents: {R/2, R}
    assert sizes == [16, 32] and pmf == pytest.approx([0.5, 0.5]) and mul == [2, 1]
    assert np.dot(pmf, mul) == pytest.approx(1.5)
    assert [int(B * np.dot(pmf, mul)) for B in (1024, 4096)] == [1536, 6144]   # counter per step (official training loop)
    assert [np.dot(*pd.patch_schedule(32, p, latent=True)[1:]) for p in (0, 0.25, 1)] == pytest.approx([2, 1.75, 1])
    assert sum(p * m * s * s for s, p, m in zip(sizes, pmf, mul)) / 32 ** 2 == pytest.approx(0.75)  # pixels per micro-batch

SEED_COMMANDS = {  # the seed README's LSUN-256 and ImageNet-256 commands (torchrun prefix and --outdir dropped)
    279_631_108: '--data=datasets/lsun-bedroom-256x256.zip --cond=0 --arch=adm --train_on_latents=1 --duration=200 '
                 '--batch-gpu=32 --batch=1024 --lr=1e-4 --ema=50 --dropout=0.10 --fp16=1 --ls=100 --augment=0 --real_p=0.5',
    280_399_108: '--data=datasets/imagenet-256x256.zip --cond=1 --arch=adm --train_on_latents=1 --duration=2500 '
                 '--batch-gpu=32 --batch=4096 --lr=1e-4 --ema=50 --dropout=0.10 --fp16=1 --ls=100 --augment=0 '
                 '--real_p=0.5 --tick=200',
}

@pytest.mark.parametrize('num_params', sorted(SEED_COMMANDS))
def test_seed_commands_dry_run_without_data_or_weights(num_params, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pd, 'download', lambda *a: pytest.fail('a dry run must not download'))
    monkeypatch.chdir(tmp_path)                                   # the datasets are not there
    pd.train(pd.parse_args(['train', *SEED_COMMANDS[num_params].split(), '-n']))
    out = capsys.readouterr().out  # the options as JSON, then the parameter count
    options = json.loads(out[out.index('{'):out.rindex('}') + 1])
    assert options['num_params'] == num_params and options['net_kwargs']['img_channels'] == 4
    assert options['latent_shape'] == [4, 32, 32] and options['patch_sizes'] == [16, 32] and options['batch_mul_avg'] == 1.5
    assert options['vae_params'] == dict(total=83_653_863, encoder=34_163_592, decoder=49_490_179)
    assert options['vae'] == pd.SD_VAE_URL and not list(tmp_path.iterdir())

def write_tiny_vae(path, seed=0):
    vae = tiny_vae(seed)
    write_safetensors(path, vae.state_dict())
    return vae

def test_pre_encoded_latents_match_per_step_encoding(dataset_zip, tmp_path):
    vae = write_tiny_vae(tmp_path / 'vae.safetensors')
    pd.encode(pd.parse_args(['encode', f'--data={dataset_zip}', f'--dest={tmp_path / "lat"}', f'--vae={tmp_path / "vae.safetensors"}',
                             '--batch=5', '--workers=0']))
    from common import open_dataset
    images = open_dataset(str(dataset_zip), use_labels=True)
    moments = np.load(tmp_path / 'lat' / 'moments.npy')
    pixels = torch.stack([torch.from_numpy(images[i][0]) for i in range(16)])
    with torch.no_grad():
        mean, logvar = vae.encode(pixels.float() / 127.5 - 1)
    assert moments.shape == (16, 8, 4, 4) and moments.dtype == np.float32                     # (mean, std), 2x down
    assert np.allclose(moments[:, :4], mean.numpy(), atol=1e-5) and np.allclose(moments[:, 4:], (0.5 * logvar).exp().numpy(), atol=1e-5)
    assert np.array_equal(np.load(tmp_path / 'lat' / 'labels.npy'), np.stack([images[i][1] for i in range(16)]))
    assert json.loads((tmp_path / 'lat' / 'dataset.json').read_text())['vae'] == str(tmp_path / 'vae.safetensors')
    # Distribution: many posterior samples of image 3 both ways have mean 0.18215 mean and std 0.18215 std.
    n = 4000
    torch.manual_seed(1)
    per_step = pd.latents_from(pixels[3:4].expand(n, -1, -1, -1), vae)
    pre = pd.latents_from(torch.from_numpy(moments[3:4]).expand(n, -1, -1, -1))
    std = 0.18215 * (0.5 * logvar[3]).exp()
    for z in (per_step, pre):
        assert ((z.mean(0) - 0.18215 * mean[3]).abs() / std).max() < 4.5 / n ** 0.5 * 1.2
        assert ((z.std(0) / std) - 1).abs().max() < 4.5 / (2 * n) ** 0.5 * 1.2
    assert (per_step.std(0) / std).mean() == pytest.approx(1, abs=0.01)
    torch.manual_seed(2)
    a = pd.latents_from(pixels, vae)
    torch.manual_seed(2)
    assert torch.allclose(pd.latents_from(torch.from_numpy(moments)), a, atol=1e-5)  # same draws: same latents
    # Two processes (torchrun, gloo) write interleaved rows of the same files: the same result.
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(ROOT / 'patch_diffusion.py'),
           'encode', f'--data={dataset_zip}', f'--dest={tmp_path / "lat2"}', f'--vae={tmp_path / "vae.safetensors"}', '--batch=3', '--workers=0']
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert result.returncode == 0, result.stderr[-3000:]
    assert np.allclose(np.load(tmp_path / 'lat2' / 'moments.npy'), moments, atol=1e-6)
    assert np.array_equal(np.load(tmp_path / 'lat2' / 'labels.npy'), np.load(tmp_path / 'lat' / 'labels.npy'))
    dataset = pd.LatentDataset(str(tmp_path / 'lat'), use_labels=True)
    assert (len(dataset), dataset.resolution, dataset.num_channels, dataset.label_dim) == (16, 4, 4, 2)
    with pytest.raises(UserError, match='cannot be x-flipped'):
        pd.LatentDataset(str(tmp_path / 'lat'), xflip=True)
    with pytest.raises(UserError, match='not a readable folder of pre-encoded latents'):
        pd.LatentDataset(str(tmp_path))

LATENT_TRAIN = ['train', '--arch=adm', '--cbase=16', '--cres=1,2', '--train_on_latents=1', '--batch=4', '--lr=1e-3', '--lr-rampup=0.001',
                '--ema=0.0001', '--dropout=0', '--workers=0', '--tick=0.001', '--snap=2', '--dump=2', '--nosubdir',
                '--cond=1', '--label-dropout=0.1', '--duration=0.000018']   # 3 steps of 6 patches (batch_mul_avg 1.5)

def test_latent_cli_train_and_generate(dataset_zip, tmp_path):
    """Per-step encoding and pre-encoded moments train the same network (same draws); a snapshot generates images
    that are the VAE decoding of the sampled latents / 0.18215, identical for any --batch."""
    from common import PerSeedRNG, edm_sampler, load_checkpoint, to_uint8
    vae_path = tmp_path / 'vae.safetensors'
    vae = write_tiny_vae(vae_path)
    pd.encode(pd.parse_args(['encode', f'--data={dataset_zip}', f'--dest={tmp_path / "lat"}', f'--vae={vae_path}', '--workers=0']))
    pd.train(pd.parse_args(LATENT_TRAIN + [f'--data={dataset_zip}', f'--vae={vae_path}', f'--outdir={tmp_path / "a"}', '--grid=2']))
    pd.train(pd.parse_args(LATENT_TRAIN + [f'--data={tmp_path / "lat"}', f'--outdir={tmp_path / "b"}', '--grid=0']))
    a, b = (load_checkpoint(str(sorted((tmp_path / d).glob('training-state-*.pt'))[-1])) for d in 'ab')
    assert a['step'] == b['step'] == 3 and a['cur_nimg'] == b['cur_nimg'] == 18 and a['vae'] == b['vae'] == str(vae_path)
    assert all(torch.allclose(a['net'][k], b['net'][k], atol=1e-5) for k in a['net'])
    torch.manual_seed(0)                                                                     # train's initialization
    init = pd.build_network(a['precond'], a['net_kwargs']).state_dict()
    changed = [k for k in init if not torch.equal(a['net'][k], init[k])]    # and it trained: zero-init layers first
    assert 'model.out_conv.weight' in changed and 'model.enc.4x4_block0.conv1.weight' in changed
    assert list((tmp_path / 'a').glob('samples-*.png')) and a['net_kwargs']['img_channels'] == 4
    snapshot = str(sorted((tmp_path / 'a').glob('network-snapshot-*.pt'))[-1])
    gen = ['generate', f'--network={snapshot}', '--seeds=0-2', '--steps=3', '--S_churn=40', '--S_min=0.05', '--S_max=50', '--S_noise=1.003', '--cfg=1.3']
    pd.generate(pd.parse_args(gen + [f'--outdir={tmp_path / "g3"}', '--batch=3']))   # --on_latents and --vae from the run
    pd.generate(pd.parse_args(gen + [f'--outdir={tmp_path / "g2"}', '--batch=2', '--on_latents=1', f'--vae={vae_path}']))
    g3, g2 = ({p.name: np.array(__import__('PIL.Image').Image.open(p)) for p in sorted((tmp_path / d).glob('*.png'))} for d in ('g3', 'g2'))
    assert sorted(g3) == ['000000.png', '000001.png', '000002.png'] and all(np.array_equal(g3[k], g2[k]) for k in g3)
    assert g3['000000.png'].shape == (8, 8, 3)                                             # 4x4 latents, decoded 2x
    net = pd.load_network(snapshot).eval()
    rng = PerSeedRNG([1], 'cpu')
    noise = rng.randn([4, 4, 4])
    labels = torch.eye(2)[rng.randint(2)]
    with torch.no_grad():
        x = edm_sampler(pd.guided_denoiser(net, pd.coordinate_canvas(4, 4), 1.3), noise, labels, rng.randn_like,
                        num_steps=3, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)
        image = to_uint8(vae.decode(x.float() / 0.18215))[0].permute(1, 2, 0).numpy()
    assert np.abs(image.astype(int) - g3['000001.png']).max() <= 1 and (image == g3['000001.png']).mean() > 0.95

def test_official_latent_pickle_loads_and_samples(tmp_path):
    """A Patch_EDMPrecond latent ADM in the official .pkl format (img_channels = 4 + 2, out_channels = 4, use_fp16)
    loads through common's restricted unpickler and samples with --on_latents=1."""
    import conftest
    from common import DhariwalUNet

    class Patch_EDMPrecond(torch.nn.Module):  # stand-in for the official class: only names and state matter
        def __init__(self, img_resolution, img_channels, out_channels, label_dim=0, use_fp16=False, model_type='DhariwalUNet', **kwargs):
            super().__init__()
            self.model = DhariwalUNet(img_resolution=img_resolution, in_channels=img_channels, out_channels=out_channels,
                                      label_dim=label_dim, **kwargs)

    init_kwargs = dict(img_resolution=4, img_channels=6, out_channels=4, label_dim=0, use_fp16=True, model_type='DhariwalUNet',
                       model_channels=16, channel_mult=[1, 2], dropout=0.1)
    torch.manual_seed(0)
    official = Patch_EDMPrecond(**init_kwargs).eval()
    with torch.no_grad():
        for p in official.parameters():
            p.add_(torch.randn_like(p) * 0.01)                                 # the zero-initialized output layer too
    conftest.write_persistence_pickle(tmp_path / 'latent.pkl', dict(ema=official, loss_fn=None, augment_pipe=None), init_kwargs)
    net = pd.load_network(str(tmp_path / 'latent.pkl')).eval()
    assert type(net) is pd.PatchPrecond and (net.img_channels, net.img_resolution) == (4, 4)
    assert all(torch.equal(v, official.state_dict()[k]) for k, v in net.state_dict().items())
    write_tiny_vae(tmp_path / 'vae.safetensors')
    gen = ['generate', f'--network={tmp_path / "latent.pkl"}', '--seeds=0-1', '--steps=2']
    with pytest.raises(UserError, match='4-channel .* --on_latents=1'):
        pd.generate(pd.parse_args(gen + [f'--outdir={tmp_path / "x"}']))
    pd.generate(pd.parse_args(gen + [f'--outdir={tmp_path / "out"}', '--on_latents=1', f'--vae={tmp_path / "vae.safetensors"}']))
    assert len(list((tmp_path / 'out').glob('*.png'))) == 2

def test_latent_metrics_score_decoded_images_against_the_source(tmp_path, monkeypatch, capsys, toy_cache):
    """train --metrics=toy_fd on pre-encoded latents scores the VAE-decoded samples against the images the latents
    were encoded from (dataset.json's source: demo-8): what `generate` of the snapshot (decoded by the run's VAE) and
    `fid.py score --data=demo-8` print (toy_fd's 500 images monkeypatched to 100, for time); if that source is gone,
    one line, exit 2, nothing written."""
    import common
    import fid
    from conftest import fid_score, run_main
    monkeypatch.setitem(common.TRAINING_METRICS, 'toy_fd', 100)
    demo_masks = fid.demo_masks  # fid.py score's demo_fit, not compared here: 1,000 shape draws, not 100,000 (~10 s)
    monkeypatch.setattr(fid, 'demo_masks', lambda R: demo_masks(R, draws=1000))
    vae_path = tmp_path / 'vae.safetensors'
    write_tiny_vae(vae_path)
    pd.encode(pd.parse_args(['encode', '--data=demo-8', f'--dest={tmp_path / "lat"}', f'--vae={vae_path}',
                             '--workers=0', '--batch=512']))
    train = [a for a in LATENT_TRAIN if not a.startswith(('--cond', '--label-dropout', '--duration', '--snap'))]
    train += [f'--data={tmp_path / "lat"}', '--duration=0.000006', '--grid=0', '--metrics=toy_fd',
              f'--metrics-cache={toy_cache}']
    pd.train(pd.parse_args(train + [f'--outdir={tmp_path / "run"}']))
    line, = [json.loads(s) for s in open(tmp_path / 'run' / 'metric-toy_fd.jsonl')]
    assert line['snapshot_pkl'] == 'network-snapshot-000000_006.pt' and line['results']['toy_fd'] > 0
    gen = tmp_path / 'gen'
    pd.generate(pd.parse_args(['generate', f'--network={tmp_path / "run" / line["snapshot_pkl"]}', f'--outdir={gen}',
                               '--seeds=0-99', '--batch=100']))
    assert fid_score(gen, toy_cache, capsys, num=100)['toy_fd'] == pytest.approx(line['results']['toy_fd'], rel=1e-5)
    info = json.loads((tmp_path / 'lat' / 'dataset.json').read_text())
    (tmp_path / 'lat' / 'dataset.json').write_text(json.dumps(dict(info, source=str(tmp_path / 'gone.zip'))))
    before = sorted(tmp_path.rglob('*'))
    capsys.readouterr()
    code, err = run_main(pd, monkeypatch, capsys, train + [f'--outdir={tmp_path / "run2"}'])
    assert code == 2 and err.count('\n') == 1 and 'gone.zip' in err and '--metrics=toy_fd' in err, err
    assert sorted(tmp_path.rglob('*')) == before
