# Tests for dataset_tool.py: every source kind is built here in its real on-disk format (PNG/JPEG folders, zip,
# the CIFAR-10 python tarball, MNIST idx .gz files), converted, and read back with zipfile + PIL only.

import gzip
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import zipfile
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
# Errors: the real CLI exits non-zero with one clear line and no traceback, and leaves no partial output.

def case_missing_source(t):
    return ['--source', t / 'nowhere', '--dest', t / 'o.zip'], ['nowhere', 'does not exist']

def case_mixed_sizes(t):
    (t / 's').mkdir()
    PIL.Image.new('RGB', (8, 8)).save(t / 's' / 'a.png')
    PIL.Image.new('RGB', (16, 8)).save(t / 's' / 'b.png')
    return ['--source', t / 's', '--dest', t / 'o.zip'], ['b.png', '16x8', 'a.png', '8x8', '--resolution']

def case_corrupt_image(t):
    (t / 's').mkdir()
    PIL.Image.new('RGB', (8, 8)).save(t / 's' / 'a.png')
    (t / 's' / 'broken.jpg').write_bytes(b'\xff\xd8 definitely not a jpeg')
    return ['--source', t / 's', '--dest', t / 'o'], ['broken.jpg', 'cannot read']

def case_unknown_format(t):
    (t / 'data.csv').write_text('1,2,3')
    return ['--source', t / 'data.csv', '--dest', t / 'o.zip'], ['data.csv', 'unknown source format']

def case_dest_folder_not_empty(t):
    (t / 's').mkdir()
    PIL.Image.new('RGB', (8, 8)).save(t / 's' / 'a.png')
    (t / 'o').mkdir()
    (t / 'o' / 'keep.txt').write_text('x')
    return ['--source', t / 's', '--dest', t / 'o'], ['not an empty folder']

def case_dest_zip_exists(t):
    (t / 's').mkdir()
    PIL.Image.new('RGB', (8, 8)).save(t / 's' / 'a.png')
    (t / 'o.zip').write_bytes(b'old')
    return ['--source', t / 's', '--dest', t / 'o.zip'], ['o.zip', 'already exists']

def case_not_square(t):
    (t / 's').mkdir()
    PIL.Image.new('RGB', (8, 8)).save(t / 's' / 'a.png')
    return ['--source', t / 's', '--dest', t / 'o.zip', '--resolution', '16x8'], ['square', '16x8']

def case_not_power_of_two(t):
    (t / 's').mkdir()
    PIL.Image.new('RGB', (12, 12)).save(t / 's' / 'a.png')
    return ['--source', t / 's', '--dest', t / 'o'], ['power-of-two', '12x12']

def case_bad_resolution(t):
    return ['--source', t, '--dest', t / 'o.zip', '--resolution', '64by64'], ['--resolution', '64by64']

def case_labels_miss_an_image(t):
    (t / 's').mkdir()
    for n in ('a.png', 'b.png'):
        PIL.Image.new('RGB', (8, 8)).save(t / 's' / n)
    (t / 's' / 'dataset.json').write_text(json.dumps({'labels': [['a.png', 0]]}))
    return ['--source', t / 's', '--dest', t / 'o.zip'], ['dataset.json', 'b.png']

ERROR_CASES = [v for k, v in list(globals().items()) if k.startswith('case_')]

@pytest.mark.parametrize('case', ERROR_CASES, ids=[c.__name__[5:] for c in ERROR_CASES])
def test_cli_errors(tmp_path, case):
    args, fragments = case(tmp_path)
    dest = Path(args[args.index('--dest') + 1])
    before = dest.read_bytes() if dest.is_file() else read_dataset(dest) if dest.is_dir() else None
    r = run_cli(*args)
    assert r.returncode != 0
    assert 'Traceback' not in r.stderr
    assert len(r.stderr.strip().splitlines()[-1]) > 0
    for fragment in fragments:
        assert fragment in r.stderr, (fragment, r.stderr)
    if before is None:  # partial output removed
        assert not dest.exists() or not os.listdir(dest)
    else:               # a pre-existing destination is left alone
        assert (dest.read_bytes() if dest.is_file() else read_dataset(dest)) == before

def test_cli_success_prints_summary(tmp_path):
    images_path, digits, _ = make_mnist(tmp_path, np.random.default_rng(7))
    r = run_cli('--source', images_path, '--dest', tmp_path / 'm.zip')
    assert r.returncode == 0, r.stderr
    assert f'Wrote {len(digits)} images (32x32 L' in r.stdout
