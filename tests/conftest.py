"""Small data built on the fly: 16 random 8x8 RGB PNGs with labels, as a folder and as a zip made by dataset_tool."""
import json
import pickle
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

@pytest.fixture(autouse=True, scope='session')
def one_thread():
    """The tests' tensors are tiny: one thread is faster than two, and a loaded machine does not stall the suite."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# A U-Net small enough for CPU tests: 8x8 images, 16 channels, one block per level, attention at 4x4.
TINY_UNET = dict(model_type='SongUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0)

@pytest.fixture(scope='session')
def toy_cache(tmp_path_factory):
    """The session's toy classifier cache for train --metrics=toy_fd and fid.py score on demo-8: trained once."""
    import fid
    cache = tmp_path_factory.getbasetemp() / 'toy-cache'
    dataset = fid.open_toy_data('demo-8', 3)
    fid.toy_classifier(dataset, fid.toy_splits(dataset, 500)[0], fid.toy_cache_path(str(cache), 'demo-8', dataset))
    return cache

def fid_score(images, cache, capsys, num=500):
    """`python fid.py score --images=... --data=demo-8 --num=NUM`, in this process: its printed numbers."""
    import fid
    capsys.readouterr()
    fid.main(['score', f'--images={images}', '--data=demo-8', f'--num={num}', f'--cache={cache}'])
    return {line.split()[0]: float(line.split()[1]) for line in capsys.readouterr().out.splitlines()
            if len(line.split()) == 2 and line.split()[0].startswith(('toy_fd', 'demo_fit', 'confident'))}

class _Mixed6(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 2048, 1)

    def forward(self, x):
        return self.conv(x)

class StandInNvidiaDetector(torch.nn.Module):
    """The interface of NVIDIA's TorchScript Inception (call flags, layers.mixed_6.conv, output) around a tiny random
    net: the 299x299 resize, a conv, a max pool to mixed_6's 17x17 (the spatial features) and 2048 pooled features."""
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(OrderedDict(conv=torch.nn.Conv2d(3, 8, 3, stride=2),
            pool0=torch.nn.AdaptiveMaxPool2d(17), mixed_6=_Mixed6(), pool2=torch.nn.AdaptiveAvgPool2d(1)))
        self.output = torch.nn.Linear(2048, 1008)

    def forward(self, img, return_features: bool = False, use_fp16: bool = False, no_output_bias: bool = False):
        n, c, h, w = img.shape
        theta = torch.eye(2, 3).repeat(n, 1, 1)
        theta[:, 0, 2] += 1 / w - 1 / 299
        theta[:, 1, 2] += 1 / h - 1 / 299
        grid = F.affine_grid(theta, [n, c, 299, 299], align_corners=False)
        x = F.grid_sample(img.float(), grid, mode='bilinear', padding_mode='border', align_corners=False)
        features = self.layers((x - 128) / 128).reshape(n, 2048)
        if return_features:
            return features
        logits = features @ self.output.weight.t() if no_output_bias else self.output(features)
        return logits.softmax(dim=1)

def save_stand_in_detector(path, seed=0):
    """A StandInNvidiaDetector with seeded random weights, saved as TorchScript (what fid.py --detector reads)."""
    torch.manual_seed(seed)
    net = StandInNvidiaDetector().eval()
    torch.jit.save(torch.jit.script(net), str(path))
    return net

def write_images(folder, n=16, res=8, channels=3, seed=0, labels=True):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    images = rng.integers(0, 256, (n, res, res, channels), dtype=np.uint8)
    names = []
    for i, image in enumerate(images):
        names.append(f'img{i:03d}.png')
        PIL.Image.fromarray(image[:, :, 0] if channels == 1 else image).save(folder / names[-1])
    if labels:
        (folder / 'dataset.json').write_text(json.dumps({'labels': [[name, i % 2] for i, name in enumerate(names)]}))
    return images

def run_main(module, monkeypatch, capsys, argv):
    """A method file's main() in this process, as its command line: (exit code, stderr)."""
    monkeypatch.setattr(sys, 'argv', [f'{module.__name__}.py', *argv])
    with pytest.raises(SystemExit) as e:
        module.main()
        raise SystemExit(0)
    return e.value.code, capsys.readouterr().err

@pytest.fixture
def image_folder(tmp_path):
    write_images(tmp_path / 'images')
    return tmp_path / 'images'

@pytest.fixture
def dataset_zip(image_folder, tmp_path):
    import dataset_tool
    dataset_tool.main([f'--source={image_folder}', f'--dest={tmp_path / "data.zip"}'])
    return tmp_path / 'data.zip'

# Stand-ins for the official preconditioners: only their class names, structure and pickled state matter.
class EDMPrecond(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_data=0.5, model_type='SongUNet', **model_kwargs):
        super().__init__()
        self.sigma_data = sigma_data
        self.model = common.SongUNet(img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels,
                              label_dim=label_dim, **model_kwargs)

class Patch_EDMPrecond(torch.nn.Module):  # upstream: img_channels = network input (C + 2), out_channels = C
    def __init__(self, img_resolution, img_channels, out_channels=None, label_dim=0, use_fp16=False, model_type='SongUNet', **model_kwargs):
        super().__init__()
        self.model = common.SongUNet(img_resolution=img_resolution, in_channels=img_channels, out_channels=out_channels,
                              label_dim=label_dim, **model_kwargs)

# Writes `data` in NVIDIA's torch_utils.persistence format: each network module reduces to
# torch_utils.persistence._reconstruct_persistent_obj(meta) with meta = dict(type, version, module_src,
# class_name, state), state being the module's __dict__ plus _init_args/_init_kwargs; torch.nn containers,
# tensors and numpy scalars pickle normally. The fake modules exist only while pickling.
def write_persistence_pickle(path, data, init_kwargs):
    persistence = types.ModuleType('torch_utils.persistence')
    util = types.ModuleType('dnnlib.util')

    def _reconstruct_persistent_obj(meta):
        raise AssertionError('never called: the loader must not use it')

    class EasyDict(dict):
        pass

    _reconstruct_persistent_obj.__module__ = persistence.__name__
    _reconstruct_persistent_obj.__qualname__ = '_reconstruct_persistent_obj'
    EasyDict.__module__, EasyDict.__qualname__ = util.__name__, 'EasyDict'
    persistence._reconstruct_persistent_obj, util.EasyDict = _reconstruct_persistent_obj, EasyDict
    fakes = {'torch_utils': types.ModuleType('torch_utils'), 'torch_utils.persistence': persistence,
             'dnnlib': types.ModuleType('dnnlib'), 'dnnlib.util': util}

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            if not isinstance(obj, torch.nn.Module) or isinstance(obj, torch.nn.ModuleDict):
                return NotImplemented
            kwargs = init_kwargs if obj is data['ema'] else {}
            state = dict(obj.__dict__, _init_args=(), _init_kwargs=kwargs)
            meta = dict(type='class', version=6, module_src='# (module source)', class_name=type(obj).__name__, state=state)
            return _reconstruct_persistent_obj, (meta,), None

    assert not set(fakes) & set(sys.modules)
    sys.modules.update(fakes)
    try:
        data = dict(data, dataset_kwargs=EasyDict(path='datasets/x.zip', use_labels=True))
        with open(path, 'wb') as f:
            Pickler(f, protocol=4).dump(data)
    finally:
        for name in fakes:
            del sys.modules[name]

