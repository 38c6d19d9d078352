# Tests for dataset_tool.py: every source kind is built here in its real on-disk format (PNG/JPEG folders, zip,
# the CIFAR-10 python tarball, MNIST idx .gz files), converted, and read back with zipfile + PIL only.

import gzip
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import dataset_tool  # noqa: E402

#------------------------------------------------------------------------------
# Builders and readers

def rand_image(rng, w, h, mode='RGB'):
    shape = (h, w, 3) if mode == 'RGB' else (h, w)
    return PIL.Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode)

def make_class_folder(root, rng):
    """Two class folders (cat, dog; dog has a nested sub-folder and a JPEG) plus a non-image file."""
    files = {
        'cat/a.png': rand_image(rng, 8, 8), 'cat/b.png': rand_image(rng, 8, 8),
        'dog/c.jpg': rand_image(rng, 8, 8), 'dog/puppies/d.png': rand_image(rng, 8, 8),
        'dog/e.png': PIL.Image.new('RGB', (8, 8), (10, 200, 30)),
    }
    for name, img in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        img.save(root / name)
    (root / 'cat' / 'notes.txt').write_text('not an image')
    return sorted(files, key=lambda n: Path(n).parts)

def read_dataset(dest):
    """{name: bytes} of every file in an output folder or zip; asserts zips are stored uncompressed."""
    if str(dest).endswith('.zip'):
        with zipfile.ZipFile(dest) as z:
            assert all(info.compress_type == zipfile.ZIP_STORED for info in z.infolist())
            return {name: z.read(name) for name in z.namelist() if not name.endswith('/')}
    return {p.relative_to(dest).as_posix(): p.read_bytes() for p in Path(dest).rglob('*') if p.is_file()}

def pixels(data):
    return np.array(PIL.Image.open(io.BytesIO(data)))

def expected_names(indices):
    return [f'{i // 1000:05d}/img{i:08d}.png' for i in indices]

def convert(*args):
    dataset_tool.main([str(a) for a in args])

def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / 'dataset_tool.py'), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)

def make_cifar_tarball(path, rng, sizes=(2, 3, 1, 2, 2)):
    """A CIFAR-10 python tarball: 5 pickled batches {b'data': [N, 3072] uint8, b'labels': [N]} plus batches.meta.
    Batch 1 names numpy.core.multiarray as the original Python 2 pickles do."""
    all_data, all_labels = [], []
    with tarfile.open(path, 'w:gz') as tar:
        def add(name, obj, py2_module=False):
            raw = pickle.dumps(obj, protocol=2)
            if py2_module:
                raw = raw.replace(b'numpy._core.multiarray', b'numpy.core.multiarray')
            info = tarfile.TarInfo(f'cifar-10-batches-py/{name}')
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
        for b, n in enumerate(sizes, start=1):
            data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
            labels = [int(x) for x in rng.integers(0, 10, size=n)]
            add(f'data_batch_{b}', {b'batch_label': b'batch', b'data': data, b'labels': labels}, py2_module=(b == 1))
            all_data.append(data)
            all_labels += labels
        add('batches.meta', {b'label_names': [b'airplane'] * 10})
        add('test_batch', {b'data': np.zeros((1, 3072), np.uint8), b'labels': [0]})  # must be ignored
    return np.concatenate(all_data), all_labels

def make_mnist(folder, rng, n=3):
    digits = rng.integers(1, 256, size=(n, 28, 28), dtype=np.uint8)  # no zeros, so the padding is visible
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    images_path = folder / 'train-images-idx3-ubyte.gz'
    with gzip.open(images_path, 'wb') as f:
        f.write((2051).to_bytes(4, 'big') + b''.join(d.to_bytes(4, 'big') for d in (n, 28, 28)) + digits.tobytes())
    with gzip.open(folder / 'train-labels-idx1-ubyte.gz', 'wb') as f:
        f.write((2049).to_bytes(4, 'big') + n.to_bytes(4, 'big') + labels.tobytes())
    return images_path, digits, labels

#------------------------------------------------------------------------------
# Round trips, one per source kind, to a zip and to a folder

@pytest.mark.parametrize('dest_name', ['out.zip', 'out'])
def test_image_folder_round_trip(tmp_path, dest_name):
    src = tmp_path / 'src'
    names = make_class_folder(src, np.random.default_rng(0))
    convert('--source', src, '--dest', tmp_path / dest_name)
    files = read_dataset(tmp_path / dest_name)
    out = expected_names(range(len(names)))
    assert sorted(files) == sorted(out + ['dataset.json'])
    for name, out_name in zip(names, out):
        assert np.array_equal(pixels(files[out_name]), np.array(PIL.Image.open(src / name)))  # JPEG: its decoding
    labels = json.loads(files['dataset.json'])['labels']
    assert labels == [[o, 0 if n.startswith('cat/') else 1] for n, o in zip(names, out)]
    constant = files[out[names.index('dog/e.png')]]
    assert len(constant) > 8 * (8 * 3 + 1)  # a constant image, yet as big as its raw rows: PNG compress_level 0

def test_folder_labels_from_dataset_json_and_null_labels(tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / 'src'
    names = make_class_folder(src, rng)
    (src / 'dataset.json').write_text(json.dumps({'labels': [[n, 7 + i] for i, n in enumerate(names)]}))
    convert('--source', src, '--dest', tmp_path / 'a.zip')
    labels = json.loads(read_dataset(tmp_path / 'a.zip')['dataset.json'])['labels']
    assert [label for _, label in labels] == [7 + i for i in range(len(names))]  # overrides the folder names
    flat = tmp_path / 'flat'
    flat.mkdir()
    for i in range(3):
        rand_image(rng, 4, 4).save(flat / f'{i}.png')
    convert('--source', flat, '--dest', tmp_path / 'b.zip')  # one folder: no classes
    assert json.loads(read_dataset(tmp_path / 'b.zip')['dataset.json']) == {'labels': None}

@pytest.mark.parametrize('dest_name', ['out.zip', 'out'])
@pytest.mark.parametrize('with_json', [True, False])
def test_zip_source_round_trip(tmp_path, with_json, dest_name):
    rng = np.random.default_rng(2)
    images = {f'sub/{i}.png': rand_image(rng, 4, 4) for i in (3, 1, 2)}
    src = tmp_path / 'images.zip'
    with zipfile.ZipFile(src, 'w', compression=zipfile.ZIP_DEFLATED) as z:
        for name, img in images.items():
            buf = io.BytesIO()
            img.save(buf, format='png')
            z.writestr(name, buf.getvalue())
        if with_json:
            z.writestr('dataset.json', json.dumps({'labels': [[n, int(n[4])] for n in images]}))
    convert('--source', src, '--dest', tmp_path / dest_name)
    files = read_dataset(tmp_path / dest_name)
    assert sorted(files) == expected_names(range(3)) + ['dataset.json']
    for i, name in enumerate(sorted(images)):
        assert np.array_equal(pixels(files[expected_names([i])[0]]), np.array(images[name]))
    labels = json.loads(files['dataset.json'])['labels']
    assert labels == ([[n, i + 1] for i, n in enumerate(expected_names(range(3)))] if with_json else None)

@pytest.mark.parametrize('dest_name', ['cifar.zip', 'cifar'])
def test_cifar10_round_trip(tmp_path, dest_name):
    tarball = tmp_path / 'cifar-10-python.tar.gz'
    data, labels = make_cifar_tarball(tarball, np.random.default_rng(3))
    convert('--source', tarball, '--dest', tmp_path / dest_name)
    files = read_dataset(tmp_path / dest_name)
    out = expected_names(range(len(data)))
    assert sorted(files) == out + ['dataset.json']
    for i, name in enumerate(out):
        img = pixels(files[name])
        assert img.shape == (32, 32, 3)
        assert np.array_equal(img[..., 0], data[i, :1024].reshape(32, 32))  # CIFAR rows: 1024 R, 1024 G, 1024 B
        assert np.array_equal(img[..., 2], data[i, 2048:].reshape(32, 32))
    assert json.loads(files['dataset.json']) == {'labels': [[n, label] for n, label in zip(out, labels)]}

@pytest.mark.parametrize('dest_name', ['mnist.zip', 'mnist'])
def test_mnist_round_trip(tmp_path, dest_name):
    images_path, digits, labels = make_mnist(tmp_path, np.random.default_rng(4))
    convert('--source', images_path, '--dest', tmp_path / dest_name)
    files = read_dataset(tmp_path / dest_name)
    assert sorted(files) == expected_names(range(len(digits))) + ['dataset.json']
    out = expected_names(range(len(digits)))
    for i, name in enumerate(out):
        img = PIL.Image.open(io.BytesIO(files[name]))
        assert img.mode == 'L' and img.size == (32, 32)
        a = np.array(img)
        assert np.array_equal(a[2:30, 2:30], digits[i])
        a[2:30, 2:30] = 0
        assert not a.any()  # zero border
    assert json.loads(files['dataset.json'])['labels'] == [[n, int(c)] for n, c in zip(out, labels)]

def test_image_modes(tmp_path):
    """Grey stays 1-channel; RGBA and palette become RGB; a grey image in an RGB dataset gets R = G = B."""
    rng = np.random.default_rng(5)
    grey = tmp_path / 'grey'
    grey.mkdir()
    rand_image(rng, 4, 4, 'L').save(grey / 'a.png')
    convert('--source', grey, '--dest', tmp_path / 'grey.zip')
    assert PIL.Image.open(io.BytesIO(read_dataset(tmp_path / 'grey.zip')[expected_names([0])[0]])).mode == 'L'
    mixed = tmp_path / 'mixed'
    mixed.mkdir()
    rgba = rand_image(rng, 4, 4).convert('RGBA')
    rgba.save(mixed / 'a.png')
    g = rand_image(rng, 4, 4, 'L')
    g.save(mixed / 'b.png')
    p = rand_image(rng, 4, 4).convert('P')
    p.save(mixed / 'c.png')
    convert('--source', mixed, '--dest', tmp_path / 'mixed.zip')
    files = read_dataset(tmp_path / 'mixed.zip')
    a, b, c = (pixels(files[n]) for n in expected_names(range(3)))
    assert np.array_equal(a, np.array(rgba)[..., :3])
    assert b.shape == (4, 4, 3) and all(np.array_equal(b[..., k], np.array(g)) for k in range(3))
    assert np.array_equal(c, np.array(p.convert('RGB')))

#------------------------------------------------------------------------------
# Resolution and transforms

def three_band_image(w, h, rows=False):
    """Outer quarters red and blue, middle half green (left/right, or top/bottom with rows=True)."""
    a = np.zeros((h, w, 3), np.uint8)
    n = h if rows else w
    idx = (slice(None, n // 4), slice(n // 4, n - n // 4), slice(n - n // 4, None))
    for sl, channel in zip(idx, (0, 1, 2)):
        (a[sl] if rows else a[:, sl])[..., channel] = 200
    return PIL.Image.fromarray(a)

def test_resize_to_resolution(tmp_path):
    src = tmp_path / 'src'
    src.mkdir()
    PIL.Image.new('RGB', (24, 16), (40, 90, 160)).save(src / 'a.png')  # mixed sizes are fine with --resolution
    quadrants = np.zeros((16, 16, 3), np.uint8)
    quadrants[:8, :8], quadrants[:8, 8:] = (200, 0, 0), (0, 200, 0)
    quadrants[8:, :8], quadrants[8:, 8:] = (0, 0, 200), 200
    PIL.Image.fromarray(quadrants).save(src / 'b.png')
    checker = np.indices((16, 16)).sum(0) % 2 * 255  # 1-pixel checkerboard
    PIL.Image.fromarray(np.repeat(checker[..., None], 3, axis=2).astype(np.uint8)).save(src / 'c.png')
    convert('--source', src, '--dest', tmp_path / 'out.zip', '--resolution', '8x8')
    files = read_dataset(tmp_path / 'out.zip')
    a, b, c = (pixels(files[n]) for n in expected_names(range(3)))
    assert np.abs(c[2:6, 2:6].astype(int) - 127.5).max() < 20  # a low-pass filter (LANCZOS) averages it to grey
    assert a.shape == b.shape == (8, 8, 3)
    assert np.abs(a.astype(int) - (40, 90, 160)).max() <= 1
    for y, x in [(0, 0), (0, 7), (7, 0), (7, 7)]:  # each quadrant shrinks into its own corner
        assert np.abs(b[y, x].astype(int) - quadrants[2 * y, 2 * x]).max() <= 2

def test_center_crop_takes_central_square(tmp_path):
    src = tmp_path / 'src'
    src.mkdir()
    img = three_band_image(32, 16)
    img.save(src / 'wide.png')
    convert('--source', src, '--dest', tmp_path / 'same.zip', '--transform', 'center-crop', '--resolution', '16x16')
    same = pixels(read_dataset(tmp_path / 'same.zip')[expected_names([0])[0]])
    assert np.array_equal(same, np.array(img)[:, 8:24])  # exactly the central 16x16
    convert('--source', src, '--dest', tmp_path / 'small.zip', '--transform', 'center-crop', '--resolution', '8x8')
    small = pixels(read_dataset(tmp_path / 'small.zip')[expected_names([0])[0]])
    assert small.shape == (8, 8, 3) and np.abs(small.astype(int) - (0, 200, 0)).max() <= 1  # no red/blue leaks in

def test_center_crop_wide_letterbox_and_skips(tmp_path):
    src = tmp_path / 'src'
    src.mkdir()
    three_band_image(32, 32, rows=True).save(src / 'a.png')  # keeps the central round(16*32/32)=16 rows: green
    three_band_image(8, 8, rows=True).save(src / 'b.png')    # narrower than W=16: skipped
    PIL.Image.new('RGB', (32, 8), (0, 200, 0)).save(src / 'c.png')  # keeps round(16*8/32)=4 rows < H=8: skipped
    three_band_image(64, 16, rows=True).save(src / 'd.png')  # keeps round(16*16/64)=4 rows < 8: skipped
    PIL.Image.new('RGB', (32, 16), (0, 200, 0)).save(src / 'e.png')  # keeps the central 8 of 16 rows
    convert('--source', src, '--dest', tmp_path / 'out', '--transform', 'center-crop-wide', '--resolution', '16x8')
    files = read_dataset(tmp_path / 'out')
    kept = expected_names([0, 4])  # skipped images leave index gaps
    assert sorted(files) == kept + ['dataset.json']
    assert json.loads(files['dataset.json']) == {'labels': None}
    for name in kept:
        a = pixels(files[name])
        assert a.shape == (16, 16, 3)
        assert not a[:4].any() and not a[12:].any()  # black outside the centred band of H=8 rows
        assert np.abs(a[4:12].astype(int) - (0, 200, 0)).max() <= 1  # band holds the green middle rows only

def test_max_images_truncates(tmp_path):
    tarball = tmp_path / 'cifar-10-python.tar.gz'
    data, labels = make_cifar_tarball(tarball, np.random.default_rng(6))
    convert('--source', tarball, '--dest', tmp_path / 'out.zip', '--max-images', '4')
    files = read_dataset(tmp_path / 'out.zip')
    assert sorted(files) == expected_names(range(4)) + ['dataset.json']
    assert [l for _, l in json.loads(files['dataset.json'])['labels']] == labels[:4]
    assert np.array_equal(pixels(files[expected_names([3])[0]])[..., 1], data[3, 1024:2048].reshape(32, 32))

#------------------------------------------------------------------------------
# The command line, in-process: dataset_tool.main(argv) with SystemExit caught and stderr captured.

def cli(capsys, *args):
    """(exit code, stdout, stderr) of the real CLI run in this process."""
    try:
        dataset_tool.main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err

def snapshot(root):
    """Every path under root, with the bytes of files: equal snapshots mean nothing was written or left behind."""
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in Path(root).rglob('*')}

def last_line(err):
    return err.replace('\r', '\n').strip().splitlines()[-1]  # after tqdm's bar, if one was drawn

def src(t, n=2, size=8, name='s'):
    """A folder of n plain size x size RGB PNGs a.png, b.png, ...; returns its path."""
    (t / name).mkdir(exist_ok=True)
    for i in range(n):
        PIL.Image.new('RGB', (size, size), (40 * i, 0, 0)).save(t / name / f'{chr(97 + i)}.png')
    return t / name

def png_bytes(img, **kwargs):
    buf = io.BytesIO()
    img.save(buf, format='png', **kwargs)
    return buf.getvalue()

def garble_idat(png):
    """Invert 4 bytes in the middle of the IDAT chunk's compressed stream and rewrite that chunk's CRC to match: the
    signature, every chunk CRC and IEND stay valid, so PIL's verify() passes and only decoding the pixels fails."""
    i = png.index(b'IDAT')
    n = int.from_bytes(png[i - 4:i], 'big')
    data = bytearray(png)
    mid = i + 4 + n // 2
    data[mid:mid + 4] = bytes(b ^ 0xff for b in data[mid:mid + 4])
    data[i + 4 + n:i + 8 + n] = zlib.crc32(bytes(data[i:i + 4 + n])).to_bytes(4, 'big')
    return bytes(data)

def bad_source(t, kind):
    """A source folder with good images a.png, b.png and a corrupt one sorted after them, so some output is
    written before the error."""
    damaged = {'garbled': ('z.png', garble_idat(png_bytes(rand_image(np.random.default_rng(8), 8, 8)))),
               'cut': ('z.png', png_bytes(PIL.Image.new('RGB', (8, 8)))[:60]),
               'notjpeg': ('z.jpg', b'\xff\xd8 not a jpeg'),
               'wider': ('z.png', png_bytes(PIL.Image.new('RGB', (16, 8))))}
    name, data = damaged[kind]
    (src(t, name=kind) / name).write_bytes(data)
    return t / kind

def zip_with_bad_crc(t):
    """A zip of two PNGs whose second member has one byte inverted: its zip CRC-32 no longer matches."""
    with zipfile.ZipFile(t / 'in.zip', 'w', compression=zipfile.ZIP_STORED) as z:
        for name in ('a.png', 'b.png'):
            z.writestr(name, png_bytes(PIL.Image.new('RGB', (8, 8))))
    data = bytearray((t / 'in.zip').read_bytes())
    offset = data.rindex(b'b.png', 0, data.index(b'PK\x01\x02')) + 5 + 40  # 40 bytes into b.png's data
    data[offset] ^= 0xff
    (t / 'in.zip').write_bytes(bytes(data))
    return t / 'in.zip'

def make_mnist_without_labels(t):
    make_mnist(t, np.random.default_rng(9))
    (t / 'train-labels-idx1-ubyte.gz').unlink()
    return t / 'train-images-idx3-ubyte.gz'

def make_file(t, name, text='x'):
    (t / name).write_text(text)
    return t / name

def zip_of(t, extra):
    """in.zip: one good PNG a.png plus the given {name: bytes}."""
    with zipfile.ZipFile(t / 'in.zip', 'w') as z:
        z.writestr('a.png', png_bytes(PIL.Image.new('RGB', (8, 8))))
        for name, data in extra.items():
            z.writestr(name, data)
    return t / 'in.zip'

def cifar_of_lists(t):
    """A CIFAR-10 tarball whose batches are pickled lists, not dicts of arrays."""
    with tarfile.open(t / 'cifar-10-python.tar.gz', 'w:gz') as tar:
        for b in range(1, 6):
            data = pickle.dumps([1, 2, 3])
            info = tarfile.TarInfo(f'cifar-10-batches-py/data_batch_{b}')
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return t / 'cifar-10-python.tar.gz'

def mnist_claiming(t, n):
    """MNIST idx files whose header claims n images but holds 100 bytes."""
    with gzip.open(t / 'train-images-idx3-ubyte.gz', 'wb') as f:
        f.write((2051).to_bytes(4, 'big') + n.to_bytes(4, 'big') + (28).to_bytes(4, 'big') * 2 + bytes(100))
    with gzip.open(t / 'train-labels-idx1-ubyte.gz', 'wb') as f:
        f.write((2049).to_bytes(4, 'big') + (1).to_bytes(4, 'big') + bytes(1))
    return t / 'train-images-idx3-ubyte.gz'

def src_with(t, name, data):
    s = src(t)
    (s / name).write_bytes(data)
    return s

def labels_missing_one(t):
    s = src(t)
    (s / 'dataset.json').write_text(json.dumps({'labels': [['a.png', 0]]}))
    return s

# One row per case: id, argv builder (given tmp_path), exit code, words the error line must contain.
# Exit code 2: a bad command line, found before anything is read or written; 1: found while running.
CLI_ERRORS = [
    ('missing_source',     lambda t: ['--source', t / 'nowhere', '--dest', t / 'o.zip'], 2,
                           ['--source=', 'nowhere', 'no such']),
    ('unknown_source',     lambda t: ['--source', make_file(t, 'a.csv'), '--dest', t / 'o.zip'], 2,
                           ['--source=', 'a.csv', 'unknown format', '.zip']),
    ('mnist_no_labels',    lambda t: ['--source', make_mnist_without_labels(t), '--dest', t / 'o.zip'], 2,
                           ['--source=', 'train-labels-idx1-ubyte.gz', 'does not exist']),
    ('missing_dest',       lambda t: ['--source', src(t)], 2, ['--dest', 'required']),
    ('empty_dest',         lambda t: ['--source', src(t), '--dest', ''], 2, ['--dest', 'empty']),
    ('dest_zip_exists',    lambda t: ['--source', src(t), '--dest', make_file(t, 'o.zip')], 2,
                           ['--dest=', 'o.zip', 'already exists']),
    ('dest_zip_is_folder', lambda t: ['--source', src(t), '--dest', src(t, name='d.zip')], 2,
                           ['--dest=', 'is a folder']),
    ('dest_is_a_file',     lambda t: ['--source', src(t), '--dest', make_file(t, 'o')], 2,
                           ['--dest=', 'is a file']),
    ('dest_not_empty',     lambda t: ['--source', src(t), '--dest', src(t, name='o')], 2, ['--dest=', 'not empty']),
    ('dest_under_a_file',  lambda t: ['--source', src(t), '--dest', make_file(t, 'f') / 'sub' / 'o.zip'], 2,
                           ['--dest=', 'is a file, not a folder']),
    ('resolution_format',  lambda t: ['--source', src(t), '--dest', t / 'o.zip', '--resolution', '64by64'], 2,
                           ['--resolution', '64by64', 'WxH']),
    ('resolution_zero',    lambda t: ['--source', src(t), '--dest', t / 'o.zip', '--resolution=0x0'], 2,
                           ['--resolution', '0x0', 'positive']),
    ('resolution_not_square', lambda t: ['--source', src(t), '--dest', t / 'o.zip', '--resolution=16x8'], 2,
                           ['--resolution=16x8', 'square']),
    ('resolution_not_pow2', lambda t: ['--source', src(t), '--dest', t / 'o', '--resolution=12x12'], 2,
                           ['--resolution=12x12', 'power-of-two']),
    ('wide_taller_than_wide', lambda t: ['--source', src(t), '--dest', t / 'o.zip', '--transform=center-crop-wide',
                                          '--resolution=8x16'], 2, ['--resolution=8x16', 'H <= W']),
    ('transform_needs_res', lambda t: ['--source', src(t), '--dest', t / 'o.zip', '--transform=center-crop'], 2,
                           ['--transform=center-crop', '--resolution']),
    ('transform_unknown',  lambda t: ['--source', src(t), '--dest', t / 'o.zip', '--transform=stretch'], 2,
                           ['--transform', 'stretch', 'center-crop-wide']),
    ('max_images_zero',    lambda t: ['--source', src(t), '--dest', t / 'o.zip', '--max-images=0'], 2,
                           ['--max-images=0', 'at least 1']),
    ('max_images_not_int', lambda t: ['--source', src(t), '--dest', t / 'o.zip', '--max-images=ten'], 2,
                           ['--max-images', 'ten', 'int']),
    ('misspelt_flag',      lambda t: ['--source', src(t), '--dest', t / 'o.zip', '--resolutoin=8x8'], 2,
                           ['unrecognized', '--resolutoin']),
    ('unknown_command',    lambda t: ['chek', '--data', t], 2, ['chek', 'convert', 'check']),
    ('check_missing_data', lambda t: ['check', '--data', t / 'nowhere.zip'], 2, ['--data=', 'no such']),
    ('check_not_a_dataset', lambda t: ['check', '--data', make_file(t, 'a.txt')], 2,
                           ['--data=', 'not a folder or a zip']),
    ('check_no_data_flag', lambda t: ['check'], 2, ['--data', 'required']),
    # found while running: exit code 1
    ('garbled_png',        lambda t: ['--source', bad_source(t, 'garbled'), '--dest', t / 'o.zip'], 1,
                           ['garbled/z.png', 'cannot decode']),
    ('truncated_png',      lambda t: ['--source', bad_source(t, 'cut'), '--dest', t / 'o'], 1,
                           ['cut/z.png', 'truncated']),
    ('not_a_jpeg',         lambda t: ['--source', bad_source(t, 'notjpeg'), '--dest', t / 'o'], 1,
                           ['notjpeg/z.jpg', 'cannot decode']),
    ('mixed_sizes',        lambda t: ['--source', bad_source(t, 'wider'), '--dest', t / 'o.zip'], 1,
                           ['z.png', '16x8', 'a.png', '8x8', '--resolution']),
    ('zip_member_bad_crc', lambda t: ['--source', zip_with_bad_crc(t), '--dest', t / 'o'], 1,
                           ['in.zip/b.png', 'cannot read', 'CRC']),
    ('source_not_pow2',    lambda t: ['--source', src(t, size=12), '--dest', t / 'o'], 1, ['12x12', 'power-of-two']),
    ('labels_miss_one',    lambda t: ['--source', labels_missing_one(t), '--dest', t / 'o.zip'], 2,
                           ['dataset.json', 'b.png']),
    ('corrupt_source_zip', lambda t: ['--source', make_file(t, 'in.zip', 'PK junk'), '--dest', t / 'o'], 2,
                           ['in.zip', 'cannot read the zip']),
    ('no_images',          lambda t: ['--source', src(t, 0), '--dest', t / 'o.zip'], 2, ['no images']),
    ('check_corrupt_zip',  lambda t: ['check', '--data', make_file(t, 'd.zip', 'PK junk')], 2,
                           ['d.zip', 'cannot read the zip']),
    ('check_no_images',    lambda t: ['check', '--data', src(t, 0)], 2, ['no images']),
    # issue 24, bad input round two: every numeric flag in a finite range, sizes that cannot fit, bad sources found
    # before the work (exit 2); bad images found while working (exit 1)
    ('resolution_huge',    lambda t: ['--source', src(t), '--dest', t / 'o.zip', '--resolution=65536x65536'], 2,
                           ['--resolution=65536x65536', 'GiB', 'at most 16384']),
    ('resolution_absurd',  lambda t: ['--source', src(t), '--dest', t / 'o', '--resolution', f'{10**30}x8'], 2,
                           ['--resolution=', 'too large']),
    ('wide_canvas_huge',   lambda t: ['--source', src(t), '--dest', t / 'o.zip', '--transform=center-crop-wide',
                                      '--resolution=32768x1'], 2, ['--resolution=32768x1', 'too large']),
    ('max_images_negative', lambda t: ['--source', src(t), '--dest', t / 'o.zip', '--max-images=-5'], 2,
                           ['--max-images=-5', 'at least 1']),
    ('max_images_huge',    lambda t: ['--source', src(t), '--dest', t / 'o.zip', f'--max-images={10**20}'], 2,
                           ['--max-images=', 'at most']),
    ('max_images_inf',     lambda t: ['--source', src(t), '--dest', t / 'o.zip', '--max-images=inf'], 2,
                           ['--max-images', 'inf']),
    ('dest_inside_source', lambda t: ['--source', src(t), '--dest', t / 's' / 'o.zip'], 2,
                           ['--dest=', 'inside --source=']),
    ('dest_deep_in_source', lambda t: ['--source', src(t), '--dest', t / 's' / 'new' / 'o'], 2,
                           ['--dest=', 'inside --source=']),
    ('dest_in_proc',       lambda t: ['--source', src(t), '--dest', '/proc/dataset-tool-test.zip'], 2,
                           ['--dest=/proc/dataset-tool-test.zip', 'not writable']),
    ('empty_source_zip',   lambda t: ['--source', make_file(t, 'in.zip', ''), '--dest', t / 'o'], 2,
                           ['in.zip', 'cannot read the zip']),
    ('zip_json_unparsable', lambda t: ['--source', zip_of(t, {'dataset.json': b'[1,'}), '--dest', t / 'o'], 2,
                           ['in.zip/dataset.json', 'cannot parse']),
    ('zip_json_not_a_list', lambda t: ['--source', zip_of(t, {'dataset.json': b'{"labels": 5}'}), '--dest', t / 'o'],
                           2, ['in.zip/dataset.json', 'cannot parse']),
    ('cifar_not_arrays',   lambda t: ['--source', cifar_of_lists(t), '--dest', t / 'o.zip'], 2,
                           ['cifar-10-python.tar.gz', 'cannot read the CIFAR-10 tarball']),
    ('cifar_not_gzip',     lambda t: ['--source', make_file(t, 'cifar-10-python.tar.gz', 'junk'), '--dest',
                                      t / 'o.zip'], 2, ['cifar-10-python.tar.gz', 'not a gzip']),
    ('mnist_bad_dims',     lambda t: ['--source', mnist_claiming(t, 10**9), '--dest', t / 'o.zip'], 2,
                           ['train-images-idx3-ubyte.gz', 'cannot read the idx file']),
    ('empty_png',          lambda t: ['--source', src_with(t, 'z.png', b''), '--dest', t / 'o'], 1,
                           ['z.png', 'cannot decode']),
    ('text_named_png',     lambda t: ['--source', src_with(t, 'z.png', b'hello'), '--dest', t / 'o.zip'], 1,
                           ['z.png', 'cannot decode']),
    ('grid_num_zero',      lambda t: ['grid', '--data=demo-8', '--dest', t / 'g.png', '--num=0'], 2,
                           ['--num', 'out of range']),
    ('grid_num_huge',      lambda t: ['grid', '--data=demo-8', '--dest', t / 'g.png', '--num=100000'], 2,
                           ['--num', 'out of range']),
    ('grid_more_than_data', lambda t: ['grid', '--data', src(t), '--dest', t / 'g.png', '--num=3'], 2,
                           ['--num=3', 'holds only 2 images']),
    ('grid_seed_negative', lambda t: ['grid', '--data=demo-8', '--dest', t / 'g.png', '--seed=-1'], 2,
                           ['--seed', 'out of range']),
    ('grid_demo_too_small', lambda t: ['grid', '--data=demo-2', '--dest', t / 'g.png'], 2, ['demo-2', '4 to 1024']),
    ('grid_too_large',     lambda t: ['grid', '--data=demo-1024', '--dest', t / 'g.png', '--num=4096'], 2,
                           ['grid of 4096 images', 'GiB']),
    ('grid_missing_data',  lambda t: ['grid', '--data', t / 'nowhere', '--dest', t / 'g.png'], 2,
                           ['--data=', 'nowhere', 'no such file']),
    ('grid_mixed_sizes',   lambda t: ['grid', '--data', bad_source(t, 'wider'), '--dest', t / 'g.png'], 2,
                           ['z.png', '16x8']),
    ('grid_dest_not_png',  lambda t: ['grid', '--data=demo-8', '--dest', t / 'g.jpg'], 2, ['--dest=', '.png']),
    ('grid_dest_folder',   lambda t: ['grid', '--data=demo-8', '--dest', src(t, name='d.png')], 2,
                           ['--dest=', 'is a folder']),
    ('grid_dest_in_proc',  lambda t: ['grid', '--data=demo-8', '--dest', '/proc/sub/g.png'], 2,
                           ['--dest=/proc/sub/g.png', 'not writable']),
    ('grid_garbled_image', lambda t: ['grid', '--data', bad_source(t, 'garbled'), '--dest', t / 'new' / 'g.png',
                                      '--num=3'], 1, ['garbled/z.png', 'cannot read image']),
]

@pytest.mark.parametrize('argv, code, words', [pytest.param(*row[1:], id=row[0]) for row in CLI_ERRORS])
def test_cli_errors(tmp_path, capsys, argv, code, words):
    args = argv(tmp_path)
    before = snapshot(tmp_path)
    got, out, err = cli(capsys, *args)
    assert got == code, err
    assert 'Traceback' not in err
    line = last_line(err)
    assert line.startswith('dataset_tool.py: error: ')
    if code == 2:  # a usage error is found before any work: the line is all there is
        assert err == line + '\n' and out == ''
    for word in words:
        assert word in line, (word, line)
    assert snapshot(tmp_path) == before  # no output, no temporary, no created folder left behind

def test_cli_error_dest_folder_not_writable(tmp_path, capsys):
    s = src(tmp_path)
    locked = tmp_path / 'locked'
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip('running as root: a read-only folder is writable anyway (see dest_under_a_file)')
        code, _, err = cli(capsys, '--source', s, '--dest', locked / 'o.zip')
        assert code == 2 and err.count('\n') == 1
        assert '--dest=' in err and 'not writable' in err
        assert not list(locked.iterdir())
    finally:
        locked.chmod(0o755)

@pytest.mark.parametrize('dest_name', ['new/sub/o.zip', 'new/sub/o', 'empty'])
def test_ctrl_c_leaves_nothing_behind(tmp_path, capsys, monkeypatch, dest_name):
    """KeyboardInterrupt on the third image: the temporary output, which exists by then, is removed, and so are the
    parent folders the run created; an empty --dest folder that existed stays."""
    s = src(tmp_path, n=4)
    (tmp_path / 'empty').mkdir()
    dest = tmp_path / dest_name
    before, seen, real = snapshot(tmp_path), [], dataset_tool.transform_image
    def transform_then_interrupt(*args):
        if len(seen) == 2:
            seen.append(sorted(p.name for p in dest.parent.iterdir()))
            raise KeyboardInterrupt
        seen.append(None)
        return real(*args)
    monkeypatch.setattr(dataset_tool, 'transform_image', transform_then_interrupt)
    code, out, err = cli(capsys, '--source', s, '--dest', dest)
    assert code == 130 and 'Traceback' not in err
    assert last_line(err) == 'dataset_tool.py: interrupted; nothing written'
    assert any(name.startswith(f'.{dest.name}.tmp') for name in seen[-1])  # there was something to clean up
    assert snapshot(tmp_path) == before

def test_write_failure_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    s = src(tmp_path, n=3)
    before = snapshot(tmp_path)
    real = dataset_tool.DatasetWriter.write
    def full_disk(self, name, data):
        if name == 'dataset.json':
            raise OSError(28, 'No space left on device')
        return real(self, name, data)
    monkeypatch.setattr(dataset_tool.DatasetWriter, 'write', full_disk)
    code, _, err = cli(capsys, '--source', s, '--dest', tmp_path / 'o')
    assert code == 1 and 'Traceback' not in err and 'No space left on device' in last_line(err)
    assert snapshot(tmp_path) == before

@pytest.mark.parametrize('dest_name', ['o.zip', 'o', 'empty', 'new/sub/o.zip'])
def test_success_leaves_only_dest(tmp_path, capsys, dest_name):
    s = src(tmp_path)
    (tmp_path / 'empty').mkdir()
    before = set(snapshot(tmp_path))
    code, out, _ = cli(capsys, '--source', s, '--dest', tmp_path / dest_name)
    assert code == 0 and out.startswith('Wrote 2 images (8x8 RGB, no labels)')
    added = {p for p in set(snapshot(tmp_path)) - before if not p.startswith(f'{dest_name}/')}  # beside the output
    created_parents = {'new', 'new/sub'} if dest_name.startswith('new/') else set()
    assert added == ({dest_name} | created_parents) - before
    assert not [p for p in snapshot(tmp_path) if '.tmp' in p]

def test_bare_form_is_convert(tmp_path, capsys):
    s = src(tmp_path, n=3)
    assert cli(capsys, '--source', s, '--dest', tmp_path / 'a.zip')[0] == 0
    assert cli(capsys, 'convert', f'--source={s}', f'--dest={tmp_path / "b.zip"}')[0] == 0
    assert read_dataset(tmp_path / 'a.zip') == read_dataset(tmp_path / 'b.zip')

def test_garbled_idat_passes_verify_but_not_load():
    """The premise of decode_image: PIL's verify() checks chunk CRCs only; load() inflates the stream."""
    png = garble_idat(png_bytes(rand_image(np.random.default_rng(10), 8, 8), compress_level=0))
    PIL.Image.open(io.BytesIO(png)).verify()
    with pytest.raises(OSError):
        PIL.Image.open(io.BytesIO(png)).load()
    with pytest.raises(dataset_tool.DataError, match='cannot decode'):
        dataset_tool.decode_image(png)

#------------------------------------------------------------------------------
# check: every image of an EDM-format dataset decoded, one line per bad file

def test_check_lists_images_as_common_does():
    import common
    assert dataset_tool.IMAGE_EXTENSIONS == common.IMAGE_EXTENSIONS

@pytest.mark.parametrize('dest_name', ['ds.zip', 'ds'])
def test_check_good_dataset(tmp_path, capsys, dest_name):
    s = tmp_path / 'src'
    make_class_folder(s, np.random.default_rng(11))
    assert cli(capsys, '--source', s, '--dest', tmp_path / dest_name)[0] == 0
    code, out, err = cli(capsys, 'check', f'--data={tmp_path / dest_name}')
    assert code == 0 and out == '5 images OK, 0 bad (8x8 RGB, 2 classes)\n'
    assert '5/5' in err  # the progress bar

# What is wrong with each file of the bad dataset, and the words its report line must contain.
BAD_FILES = {
    0: (lambda png: garble_idat(png), ['cannot decode']),
    1: (lambda png: png[:len(png) // 2], ['truncated']),
    2: (lambda png: png[:-12], ['truncated', 'IEND']),  # every pixel there, the IEND chunk gone
    3: (lambda png: b'not a png at all', ['cannot decode']),
    4: (lambda png: png_bytes(PIL.Image.new('RGB', (16, 16))), ['16x16 RGB', 'most images are 8x8 RGB']),
    5: (lambda png: png_bytes(PIL.Image.new('L', (8, 8))), ['8x8 L', 'most images are 8x8 RGB']),
    6: (lambda png: png_bytes(PIL.Image.new('RGB', (8, 8)).convert('P')), ['mode P', '8x8 P']),
}
BAD_LABELS = {7: (None, ['no label']), 8: (-1, ['label -1', 'out of range']),
              9: ('cat', ['label "cat"', 'neither a class index']), 10: ([0, 1], ['label [0, 1]', 'class indices'])}

@pytest.mark.parametrize('form', ['zip', 'folder'])
def test_check_reports_each_bad_file(tmp_path, capsys, form):
    rng = np.random.default_rng(12)
    s = tmp_path / 'src'
    s.mkdir()
    for i in range(13):
        rand_image(rng, 8, 8).save(s / f'{i:02d}.png')
    (s / 'dataset.json').write_text(json.dumps({'labels': [[f'{i:02d}.png', i % 3] for i in range(13)]}))
    assert cli(capsys, '--source', s, '--dest', tmp_path / 'ds')[0] == 0
    files = read_dataset(tmp_path / 'ds')
    names = expected_names(range(13))
    for i, (damage, _) in BAD_FILES.items():
        files[names[i]] = damage(files[names[i]])
    labels = dict(json.loads(files['dataset.json'])['labels'])
    for i, (label, _) in BAD_LABELS.items():
        labels.pop(names[i]) if label is None else labels.update({names[i]: label})
    labels['99999/img99999999.png'] = 0  # names no image: a problem with dataset.json itself
    files['dataset.json'] = json.dumps({'labels': [[n, l] for n, l in labels.items()]}).encode()
    data = tmp_path / ('bad.zip' if form == 'zip' else 'bad')
    for name, content in files.items():
        if form == 'zip':
            with zipfile.ZipFile(data, 'a', compression=zipfile.ZIP_STORED) as z:
                z.writestr(name, content)  # a fresh, correct zip CRC: only decoding can find the damage
        else:
            (data / name).parent.mkdir(parents=True, exist_ok=True)
            (data / name).write_bytes(content)
    code, out, err = cli(capsys, 'check', '--data', data)
    assert code == 1 and 'Traceback' not in err
    lines = out.splitlines()
    assert lines[-1] == '2 images OK, 11 bad, 1 dataset.json problems (8x8 RGB, 3 classes)'
    assert len(lines) == 11 + 1 + 1
    for i, (_, words) in {**BAD_FILES, **BAD_LABELS}.items():
        [line] = [line for line in lines if line.startswith(os.path.join(str(data), names[i]) + ':')]
        for word in words:
            assert word in line, (word, line)
    assert any('99999/img99999999.png' in line and 'dataset.json' in line for line in lines)
    assert not any(names[i] in out for i in (11, 12))

#------------------------------------------------------------------------------
# As real processes: exit codes and output seen by a shell

def test_cli_success_prints_summary(tmp_path):
    images_path, digits, _ = make_mnist(tmp_path, np.random.default_rng(7))
    r = run_cli('--source', images_path, '--dest', tmp_path / 'm.zip')
    assert r.returncode == 0, r.stderr
    assert f'Wrote {len(digits)} images (32x32 L' in r.stdout
    r = run_cli('check', f'--data={tmp_path / "m.zip"}')
    assert r.returncode == 0 and r.stdout == f'{len(digits)} images OK, 0 bad (32x32 L, {len(set(_))} classes)\n'

def test_cli_exit_codes_as_a_process(tmp_path):
    r = run_cli('--source', tmp_path / 'nowhere', '--dest', tmp_path / 'o.zip')
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and '--source=' in r.stderr
    (tmp_path / 'ds').mkdir()
    (tmp_path / 'ds' / 'a.png').write_bytes(b'junk')
    r = run_cli('check', '--data', tmp_path / 'ds')
    assert r.returncode == 1 and 'Traceback' not in r.stderr
    assert r.stdout.splitlines() == [f'{tmp_path / "ds" / "a.png"}: cannot decode (not an image, or a format PIL '
                                     'does not read)', '0 images OK, 1 bad']

def test_check_zip_member_with_bad_crc(tmp_path, capsys):
    data = zip_with_bad_crc(tmp_path)
    code, out, _ = cli(capsys, 'check', '--data', data)
    assert code == 1
    [line, summary] = out.splitlines()
    assert line.startswith(f'{data}/b.png: cannot read (') and 'CRC' in line
    assert summary == '1 images OK, 1 bad (8x8 RGB, no labels)'

def test_real_sigint_leaves_nothing_behind(tmp_path):
    """Ctrl-C as a shell sends it: SIGINT to the process once its temporary output exists."""
    images_path, _, _ = make_mnist(tmp_path, np.random.default_rng(13), n=5000)
    before = snapshot(tmp_path)
    p = subprocess.Popen([sys.executable, str(ROOT / 'dataset_tool.py'), f'--source={images_path}',
                          f'--dest={tmp_path / "m.zip"}'], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a shell in front
    deadline = time.time() + 30
    while not (tmp_path / f'.m.zip.tmp{p.pid}').exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, (out, err)
    assert 'Traceback' not in err and last_line(err) == 'dataset_tool.py: interrupted; nothing written'
    assert snapshot(tmp_path) == before

@pytest.mark.parametrize('labels, bad, words', [
    ([[0.5, 1, 0], [0, 0, 1], [1, 0]], ['c.png'], ['label [1, 0]', 'vectors of 3 numbers']),
    (['x', 'y', 'z'], ['a.png', 'b.png', 'c.png'], ['neither a class index']),  # no valid label to compare with
    ([True, 1, 2], ['a.png'], ['label true', 'neither a class index']),
], ids=['vector_of_other_length', 'none_valid', 'bool_is_not_a_class'])
def test_check_label_kinds(tmp_path, capsys, labels, bad, words):
    s = src(tmp_path, n=3)
    names = ['a.png', 'b.png', 'c.png']
    (s / 'dataset.json').write_text(json.dumps({'labels': [[name, label] for name, label in zip(names, labels)]}))
    code, out, _ = cli(capsys, 'check', '--data', s)
    assert code == 1
    lines = out.splitlines()
    assert [line.split(':')[0] for line in lines[:-1]] == [str(s / n) for n in bad]
    assert all(word in line for line in lines[:-1] for word in words)
    assert lines[-1].startswith(f'{3 - len(bad)} images OK, {len(bad)} bad (8x8 RGB')

def test_check_unparseable_dataset_json(tmp_path, capsys):
    s = src(tmp_path, n=2)
    (s / 'dataset.json').write_text('{"labels": [["a.png", 0], ')
    code, out, _ = cli(capsys, 'check', '--data', s)
    assert code == 1
    assert out.splitlines()[0].startswith(f'{s / "dataset.json"}: cannot parse (')
    assert out.splitlines()[-1] == '2 images OK, 0 bad, 1 dataset.json problems (8x8 RGB, no labels)'

#------------------------------------------------------------------------------
# grid: real training images for the README, in the layout of common.save_image_grid

def tiles(path, res):
    """[rows*cols, H, W, C] uint8 cells of a grid PNG, row by row."""
    grid = np.array(PIL.Image.open(path).convert('RGB'))
    rows, cols = grid.shape[0] // res, grid.shape[1] // res
    return grid.reshape(rows, res, cols, res, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, res, res, 3)

def test_grid_of_demo_images_is_seeded_and_its_tiles_are_dataset_images(tmp_path, capsys):
    from common import DemoDataset
    demo = np.stack([DemoDataset(8)[i][0].transpose(1, 2, 0) for i in range(4096)])   # the 4096 training images
    code, out, _ = cli(capsys, 'grid', '--data=demo-8', '--dest', tmp_path / 'new' / 'g.png', '--num=10')
    assert code == 0 and out == ('Wrote a grid of 10 images of demo-8 (4 columns, 8x8, seed 0) to '
                                 f'{tmp_path / "new" / "g.png"}\n')
    assert PIL.Image.open(tmp_path / 'new' / 'g.png').size == (4 * 8, 3 * 8)  # ceil(sqrt(10)) = 4 columns, 3 rows
    cells = tiles(tmp_path / 'new' / 'g.png', 8)
    found = [int(np.flatnonzero((demo == cell).all(axis=(1, 2, 3)))[0]) for cell in cells[:10]]
    assert found == sorted(set(found)) and len(found) == 10       # ten distinct training images, in index order
    assert not cells[10:].any()                                   # the two cells after them are black
    assert sorted(os.listdir(tmp_path / 'new')) == ['g.png']      # no temporary file left
    cli(capsys, 'grid', '--data=demo-8', '--dest', tmp_path / 'again.png', '--num=10')
    cli(capsys, 'grid', '--data=demo-8', '--dest', tmp_path / 'seed1.png', '--num=10', '--seed=1')
    assert (tmp_path / 'again.png').read_bytes() == (tmp_path / 'new' / 'g.png').read_bytes()
    assert (tmp_path / 'seed1.png').read_bytes() != (tmp_path / 'new' / 'g.png').read_bytes()

@pytest.mark.parametrize('form', ['zip', 'folder'])
def test_grid_of_an_edm_dataset(tmp_path, capsys, form):
    rng = np.random.default_rng(3)
    (tmp_path / 'in').mkdir()
    images = [rand_image(rng, 8, 8, mode) for mode in ('L', 'L', 'L', 'L')]
    for i, img in enumerate(images):
        img.save(tmp_path / 'in' / f'{i}.png')
    dest = tmp_path / ('ds.zip' if form == 'zip' else 'ds')
    assert cli(capsys, '--source', tmp_path / 'in', '--dest', dest)[0] == 0
    code, _, _ = cli(capsys, 'grid', '--data', dest, '--dest', tmp_path / 'g.png', '--num=4')
    grid = np.array(PIL.Image.open(tmp_path / 'g.png'))
    assert code == 0 and grid.shape == (16, 16)  # grey stays grey; 2 x 2 cells
    cells = grid.reshape(2, 8, 2, 8).transpose(0, 2, 1, 3).reshape(4, 8, 8)
    assert all(np.array_equal(cell, np.array(img)) for cell, img in zip(cells, images))
