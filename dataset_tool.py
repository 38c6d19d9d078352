"""Convert an image collection into an EDM-format dataset (a folder or an uncompressed zip), or check one.

Input item i becomes `{i//1000:05d}/img{i:08d}.png` (PNG, compress_level 0); `dataset.json` at the root holds
`{"labels": [["00000/img00000000.png", 6], ...]}`, or `{"labels": null}` when any image lacks a label. This is
the layout of NVlabs/edm's dataset_tool.py, read by common.ImageFolderDataset. All outputs must be square, one
size, one channel count (1 = grey, 3 = RGB), with a power-of-two side.

Sources of `convert`, the default command (the kind is guessed from --source):
  FOLDER/                     images found recursively, sorted by path; labels from FOLDER/dataset.json, else
                              from the top-level sub-folder names when there are several (sorted -> 0, 1, ...)
  FILE.zip                    the images inside a zip; labels only from a dataset.json inside it
  cifar-10-python.tar.gz      CIFAR-10 python tarball: the 50,000 training images, with labels
  train-images-idx3-ubyte.gz  MNIST: 28x28 grey digits zero-padded to 32x32, labels from train-labels-idx1-ubyte.gz
LSUN lmdb folders are not read (that needs lmdb and OpenCV): export them to an image folder first.
The output is written under a hidden temporary name next to --dest and renamed at the end, so an error or Ctrl-C
leaves nothing behind.

`check` decodes every image of an EDM-format dataset, prints one line per bad file (cannot decode, truncated, size
or mode unlike the others, label missing or invalid in dataset.json) and a summary line.

`grid` writes a seeded choice of a dataset's images (or of the built-in demo data, `--data=demo-RES`) as one PNG
grid, the layout of the sample grids of the method files, to show real images beside a demo's samples.

Exit codes (the rule of every CLI of this project): 0 success (check: every image OK); 2 bad input found before the
work starts (a flag, a missing or unreadable source, a corrupt zip, no images, bad labels: nothing is written); 1 a
problem found while working (a bad image, a failed write; check: a bad file); 130 interrupted (Ctrl-C). Every error
is one line on stderr.

Examples:
  python dataset_tool.py --source=downloads/cifar10/cifar-10-python.tar.gz --dest=datasets/cifar10-32x32.zip
  python dataset_tool.py --source=downloads/mnist/train-images-idx3-ubyte.gz --dest=datasets/mnist-32x32.zip
  python dataset_tool.py --source=downloads/ffhq --dest=datasets/ffhq-64x64.zip --resolution=64x64
  python dataset_tool.py --source=downloads/celeba --dest=datasets/celeba-64x64.zip --resolution=64x64 \\
      --transform=center-crop
  python dataset_tool.py convert --source=downloads/imagenet/train --dest=datasets/imagenet-64x64.zip \\
      --resolution=64x64 --transform=center-crop
  python dataset_tool.py check --data=datasets/cifar10-32x32.zip
  python dataset_tool.py grid --data=demo-8 --dest=out/real-demo8.png --num=64
"""

import argparse
import collections
import contextlib
import gzip
import io
import itertools
import json
import math
import os
import pickle
import re
import shutil
import sys
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
from tqdm import tqdm

#------------------------------------------------------------------------------
# 1. Errors and image decoding

# The exit-code rule of every CLI of this project (common.py's `working` and `exit_code`, mirrored here so that
# converting needs no torch): an error found before the work starts means the input is wrong (flags, files, data):
# exit 2; one raised inside `working()` (the conversion or check loop, writing the grid) is a failure while working:
# exit 1; Ctrl-C: 130.

class UsageError(Exception):
    """A flag value or input that cannot work: one line on stderr; exit 2 before the work (nothing written)."""

class DataError(Exception):
    """Bad data (an image, an archive, labels): one line on stderr; exit 2 found before the work, 1 while working."""

@contextlib.contextmanager
def working():
    try:
        yield
    except (UsageError, DataError, OSError) as e:
        e.while_working = True
        raise

def exit_code(e):
    return 1 if getattr(e, 'while_working', False) else 2

MAX_SIDE = 16384        # --resolution: 805 MB per RGB image, 3.2 GB while it is resized
MAX_IMAGES = 2**31 - 1  # --max-images

def is_image_name(name):
    return os.path.splitext(name)[1].lower() in PIL.Image.registered_extensions()

# Decode every pixel: `load()` inflates the whole compressed stream, so garbled PNG data fails here even when its
# chunk CRCs were rewritten to match (PIL's `verify()` checks only the CRCs). A PNG must also end with its IEND chunk.
def decode_image(data):
    try:
        img = PIL.Image.open(io.BytesIO(data))
        img.load()
    except PIL.UnidentifiedImageError:
        raise DataError('cannot decode (not an image, or a format PIL does not read)') from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on bad data
        raise DataError(f"{'truncated' if 'truncated' in str(e) else 'cannot decode'} ({e})") from None
    if img.format == 'PNG' and data[-8:-4] != b'IEND':  # last 12 bytes: length 0, b'IEND', CRC
        raise DataError('truncated (the PNG does not end with its IEND chunk)')
    return img

# A source image as the dataset stores it: grey stays 1-channel ('L'), everything else (RGBA, palette, CMYK, ...)
# becomes 'RGB'. `path` names the file in the error.
def load_image(file, path):
    try:
        data = file.read()
    except Exception as e:  # OSError; from a zip member also BadZipFile (CRC mismatch), zlib.error, ...
        raise DataError(f'{path}: cannot read ({e})') from None
    try:
        img = decode_image(data)
    except DataError as e:
        raise DataError(f'{path}: {e}') from None
    if img.mode not in ('L', 'RGB'):
        img = img.convert('L' if img.mode in ('1', 'LA', 'La') else 'RGB')
    return img

# Labels from an EDM dataset.json as {name: label}, or None for `"labels": null`. A file that labels only some
# of the images is an error rather than a silent switch to an unlabelled dataset.
def read_labels(json_bytes, names, where):
    try:
        pairs = json.loads(json_bytes)['labels']
        labels = None if pairs is None else {str(name).replace('\\', '/'): label for name, label in pairs}
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f'{where}: cannot parse ({e})') from None
    if labels is None:
        return None
    missing = [name for name in names if name not in labels]
    if missing:
        raise DataError(f"{where}: no label for '{missing[0]}' ({len(missing)} of {len(names)} images unlabelled)")
    return labels

#------------------------------------------------------------------------------
# 2. Sources: each returns (count, generator of (name, PIL image, label or None)); names appear in errors.

def open_image_folder(source):
    root = Path(source)
    paths = sorted(p for p in root.rglob('*') if p.is_file() and is_image_name(p.name))  # by path components
    names = [p.relative_to(root).as_posix() for p in paths]
    labels = None
    if (root / 'dataset.json').is_file():
        labels = read_labels((root / 'dataset.json').read_bytes(), names, str(root / 'dataset.json'))
    if labels is None:  # class = rank of the top-level folder name; files directly in root form the group ''
        groups = [name.split('/')[0] if '/' in name else '' for name in names]
        classes = {group: c for c, group in enumerate(sorted(set(groups)))}
        labels = {name: classes[group] for name, group in zip(names, groups)} if len(classes) > 1 else None
    def items():
        for path, name in zip(paths, names):
            with open(path, 'rb') as f:
                yield name, load_image(f, str(path)), labels[name] if labels else None
    return len(paths), items()

def open_image_zip(source):
    try:
        with zipfile.ZipFile(source) as z:
            names = sorted(n for n in z.namelist() if is_image_name(n) and not n.endswith('/'))
            has_json = 'dataset.json' in z.namelist()
            labels = read_labels(z.read('dataset.json'), names, f'{source}/dataset.json') if has_json else None
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f'{source}: cannot read the zip ({e})') from None
    def items():
        with zipfile.ZipFile(source) as z:
            for name in names:
                with z.open(name) as f:
                    yield name, load_image(f, os.path.join(source, name)), labels[name] if labels else None
    return len(names), items()

# The CIFAR-10 batches are pickles; this unpickler rebuilds numpy arrays and nothing else, so no foreign code runs.
class ArrayUnpickler(pickle.Unpickler):
    allowed = {('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
               ('numpy', 'ndarray'), ('numpy', 'dtype'), ('_codecs', 'encode')}
    def find_class(self, module, name):
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f'refusing to load {module}.{name}')
        return super().find_class(module, name)

def open_cifar10(source):
    names, images, labels = [], [], []
    try:
        with tarfile.open(source, 'r:gz') as tar:
            for b in range(1, 6):
                member = f'cifar-10-batches-py/data_batch_{b}'
                batch = ArrayUnpickler(tar.extractfile(member), encoding='bytes').load()
                data = np.asarray(batch[b'data'], dtype=np.uint8).reshape(-1, 3, 32, 32)  # [N, 3072] -> [N, 3, 32, 32]
                images.append(data.transpose(0, 2, 3, 1))                                  # -> [N, 32, 32, 3]
                labels += [int(label) for label in batch[b'labels']]
                names += [f'{member}[{j}]' for j in range(len(data))]
    except (KeyError, IndexError, TypeError, AttributeError, tarfile.TarError, OSError, EOFError, ValueError,
            zlib.error, pickle.UnpicklingError) as e:
        raise DataError(f'{source}: cannot read the CIFAR-10 tarball ({e})') from None
    if len(labels) != sum(map(len, images)):
        raise DataError(f'{source}: {sum(map(len, images))} images but {len(labels)} labels')
    images = np.concatenate(images)
    def items():
        for name, img, label in zip(names, images, labels):
            yield name, PIL.Image.fromarray(img, 'RGB'), label
    return len(images), items()

# An MNIST idx file: big-endian magic number (2051 images, 2049 labels; its low byte is the number of
# dimensions), one big-endian uint32 per dimension, then the uint8 data.
def read_idx(path, magic):
    try:
        with gzip.open(path, 'rb') as f:
            raw = f.read()
        if int.from_bytes(raw[:4], 'big') != magic:
            raise DataError(f'{path}: not an idx file with magic number {magic}')
        ndim = magic & 0xff
        shape = [int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], 'big') for k in range(ndim)]
        return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise DataError(f'{path}: cannot read the idx file ({e})') from None

def mnist_labels_path(source):
    return source.replace('-images-idx3-ubyte.gz', '-labels-idx1-ubyte.gz')

def open_mnist(source):
    labels_path = mnist_labels_path(source)
    images, labels = read_idx(source, 2051), read_idx(labels_path, 2049)
    if len(images) != len(labels):
        raise DataError(f'{source} has {len(images)} images but {labels_path} has {len(labels)} labels')
    images = np.pad(images, [(0, 0), (2, 2), (2, 2)])  # [N, 28, 28] -> [N, 32, 32], black border of 2 px (EDM)
    def items():
        for i, (img, label) in enumerate(zip(images, labels)):
            yield f'{os.path.basename(source)}[{i}]', PIL.Image.fromarray(img, 'L'), int(label)
    return len(images), items()

# The reader for --source, chosen by its name; a path that cannot be a source is a usage error.
def source_reader(source):
    if os.path.isdir(source):
        return open_image_folder
    if not os.path.exists(source):
        raise UsageError(f'--source={source}: no such file or folder')
    if source.endswith(('.tar.gz', '.tgz')):
        return open_cifar10
    if source.endswith('-images-idx3-ubyte.gz'):
        if not os.path.isfile(mnist_labels_path(source)):
            raise UsageError(f'--source={source}: its labels file {mnist_labels_path(source)} does not exist')
        return open_mnist
    if source.lower().endswith('.zip'):
        return open_image_zip
    raise UsageError(f'--source={source}: unknown format; allowed: an image folder, a .zip of images, '
                     'cifar-10-python.tar.gz, *-images-idx3-ubyte.gz')

#------------------------------------------------------------------------------
# 3. Transform: crop and resize one image to resolution (W, H); None means "skip this image".
# NOTE: EDM's center-crop and center-crop-wide turn grey images into RGB; we keep grey 1-channel, so a grey
# dataset stays grey (a grey image inside an RGB dataset is still promoted to RGB, see convert()).

def transform_image(img, transform, resolution):
    if transform == 'center-crop':  # central square of side min(H, W)
        s = min(img.size)
        left, top = (img.width - s) // 2, (img.height - s) // 2
        img = img.crop((left, top, left + s, top + s))
    if transform == 'center-crop-wide':  # central band of aspect W:H, letterboxed on a black W x W canvas
        W, H = resolution
        rows = round(W * img.height / img.width)
        if img.width < W or rows < H:
            return None
        top = (img.height - rows) // 2
        band = img.crop((0, top, img.width, top + rows)).resize((W, H), PIL.Image.Resampling.LANCZOS)
        canvas = PIL.Image.new(img.mode, (W, W))  # black
        canvas.paste(band, (0, (W - H) // 2))
        return canvas
    if resolution is not None and img.size != resolution:
        img = img.resize(resolution, PIL.Image.Resampling.LANCZOS)
    return img

#------------------------------------------------------------------------------
# 4. Writer: everything goes to a hidden temporary sibling of dest (`.NAME.tmpPID`), renamed to dest by finish();
# abort() deletes the temporary and the parent folders this run created.

class DatasetWriter:
    def __init__(self, dest):
        self.dest, self.zip, self.new_dirs = os.path.abspath(dest), None, []
        parent = os.path.dirname(self.dest)
        self.tmp = os.path.join(parent, f'.{os.path.basename(self.dest)}.tmp{os.getpid()}')
        try:
            p = parent
            while not os.path.exists(p):  # deepest first, the order abort() removes them in
                self.new_dirs.append(p)
                p = os.path.dirname(p)
            os.makedirs(parent, exist_ok=True)
            if self.dest.lower().endswith('.zip'):
                self.zip = zipfile.ZipFile(self.tmp, 'x', compression=zipfile.ZIP_STORED)
            else:
                os.mkdir(self.tmp)
        except BaseException:
            self.abort()
            raise

    def write(self, name, data):
        if self.zip is not None:
            return self.zip.writestr(name, data)
        path = os.path.join(self.tmp, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'wb') as f:
            f.write(data)

    def finish(self):
        if self.zip is not None:
            self.zip.close()
        elif os.path.isdir(self.dest):
            os.rmdir(self.dest)  # the empty folder given as --dest; it fails if something was put there meanwhile
        if os.path.lexists(self.dest):
            raise DataError(f'{self.dest} was created by someone else while converting; nothing written')
        os.rename(self.tmp, self.dest)

    def abort(self):
        with contextlib.suppress(Exception):
            if self.zip is not None:
                self.zip.close()
        if os.path.isdir(self.tmp):
            shutil.rmtree(self.tmp, ignore_errors=True)
        elif os.path.lexists(self.tmp):
            os.remove(self.tmp)
        for d in self.new_dirs:
            with contextlib.suppress(OSError):
                os.rmdir(d)

#------------------------------------------------------------------------------
# 5. Conversion

def is_power_of_two(n):
    return n > 0 and n & (n - 1) == 0

def writable(folder):
    """Whether a file can be made in `folder`: a probe file made and removed (permission bits do not stop root; a
    read-only mount does)."""
    try:
        fd, probe = tempfile.mkstemp(prefix='.write-check-', dir=folder)
        os.close(fd)
        os.remove(probe)
        return True
    except OSError:
        return False

def is_inside(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)

def memory_bytes():
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')

def check_image_size(W, H, what):
    """Refuse images larger than MAX_SIDE or than this machine's memory holds 4 RGB copies of (a resize needs them)."""
    need = 4 * W * H * 3
    if max(W, H) > MAX_SIDE or need > memory_bytes():
        size = f'{need / 2**30:,.1f} GiB' if need < 2**60 else f'{need:.1e} bytes'
        raise UsageError(f'{what}: too large; {W}x{H} pixels need {size} of memory (this machine has '
                         f'{memory_bytes() / 2**30:,.1f} GiB); at most {MAX_SIDE} pixels a side')

# Every flag, before anything is read or written. Raises UsageError naming the flag, its value and what is allowed.
def check_convert_flags(source, dest, max_images, transform, resolution):
    reader = source_reader(source)
    if not dest:
        raise UsageError('--dest is empty; allowed: a new .zip file, or a new or empty folder')
    if dest.lower().endswith('.zip') and os.path.isdir(dest):
        raise UsageError(f'--dest={dest}: is a folder; allowed for a name ending in .zip: a new file')
    if dest.lower().endswith('.zip') and os.path.lexists(dest):
        raise UsageError(f'--dest={dest}: already exists; delete it or choose another name')
    if not dest.lower().endswith('.zip') and os.path.lexists(dest) and not os.path.isdir(dest):
        raise UsageError(f'--dest={dest}: is a file; allowed: a name ending in .zip, or a new or empty folder')
    if os.path.isdir(dest) and os.listdir(dest):
        raise UsageError(f'--dest={dest}: folder is not empty; allowed: a new or empty folder, or a new .zip')
    parent = os.path.dirname(os.path.normpath(dest)) or '.'
    while not os.path.lexists(parent):  # the nearest folder that exists, where the first new entry would go
        parent = os.path.dirname(parent) or '.'
    if not os.path.isdir(parent):
        raise UsageError(f'--dest={dest}: {parent} is a file, not a folder')
    if not writable(parent):
        raise UsageError(f'--dest={dest}: folder {parent} is not writable')
    if os.path.isdir(source) and is_inside(dest, source):
        raise UsageError(f'--dest={dest} is inside --source={source}: the output would be read as input by the next '
                         'conversion; write it elsewhere')
    if max_images is not None and not 1 <= max_images <= MAX_IMAGES:
        raise UsageError(f'--max-images={max_images}: must be at least 1 and at most {MAX_IMAGES}')
    if transform is not None and resolution is None:
        raise UsageError(f'--transform={transform}: needs --resolution=WxH')
    if resolution is not None:
        W, H = resolution
        check_image_size(W, max(W, H) if transform == 'center-crop-wide' else H, f'--resolution={W}x{H}')
        if transform == 'center-crop-wide' and (not is_power_of_two(W) or H > W):
            raise UsageError(f'--resolution={W}x{H}: with --transform=center-crop-wide, W must be a power of two '
                             'and H <= W (the band is letterboxed on a WxW canvas)')
        if transform != 'center-crop-wide' and (W != H or not is_power_of_two(W)):
            raise UsageError(f'--resolution={W}x{H}: must be square with a power-of-two side, e.g. 64x64 '
                             '(H < W only with --transform=center-crop-wide)')
    return reader

def convert(source, dest, max_images=None, transform=None, resolution=None):
    source, dest = str(source), str(dest)
    reader = check_convert_flags(source, dest, max_images, transform, resolution)
    count, items = reader(source)
    if count == 0:
        raise DataError(f'{source}: no images found')
    count = min(count, max_images or count)
    resolution = tuple(resolution) if resolution else None
    hint = '' if resolution else '; use --resolution=WxH'
    labels, first, skipped = [], None, 0  # first = (name, (W, H), mode) of the first image written
    try:
        with working():
            writer = DatasetWriter(dest)
            try:
                with tqdm(total=count, unit='img') as bar:
                    for i, (name, img, label) in enumerate(itertools.islice(items, count)):
                        bar.update()
                        img = transform_image(img, transform, resolution)
                        if img is None:  # center-crop-wide: image too small; index i stays unused, as in EDM
                            skipped += 1
                            continue
                        if first is None:
                            first = (name, img.size, img.mode)
                            w, h = img.size
                            if w != h or not is_power_of_two(w):
                                raise DataError(f"output images must be square with a power-of-two side, got {w}x{h} "
                                                f"from '{name}'{hint}")
                        if img.mode == 'L' and first[2] == 'RGB':  # grey image in a colour dataset: R = G = B
                            img = img.convert('RGB')
                        if (img.size, img.mode) != first[1:]:
                            raise DataError(f"image '{name}' is {img.width}x{img.height} {img.mode} but the first "
                                            f"image '{first[0]}' is {first[1][0]}x{first[1][1]} {first[2]}"
                                            f"{hint if img.size != first[1] else ''}")
                        archive_name = f'{i // 1000:05d}/img{i:08d}.png'
                        png = io.BytesIO()
                        img.save(png, format='png', compress_level=0, optimize=False)
                        writer.write(archive_name, png.getvalue())
                        labels.append([archive_name, label])
                if first is None:
                    raise DataError(f'all {count} images were skipped by --transform={transform}: narrower than W or '
                                    'too short')
                all_labelled = all(label is not None for _, label in labels)
                writer.write('dataset.json', json.dumps({'labels': labels if all_labelled else None}).encode())
                writer.finish()
            except BaseException:
                writer.abort()
                raise
    finally:
        items.close()
    num_classes = len({json.dumps(label) for _, label in labels}) if all_labelled else 0
    print(f"Wrote {len(labels)} images ({first[1][0]}x{first[1][1]} {first[2]}, "
          f"{f'{num_classes} classes' if num_classes else 'no labels'}{f', {skipped} skipped' if skipped else ''}) "
          f'to {dest}')
    return dict(num_images=len(labels), resolution=first[1][0], channels={'L': 1, 'RGB': 3}[first[2]], skipped=skipped)

#------------------------------------------------------------------------------
# 6. Check: decode every image of an EDM-format dataset as common.ImageFolderDataset lists it; one line per bad file.

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.tif', '.tiff', '.ppm', '.pgm')  # common.py's list

# () for a class index, (n,) for a label vector of n numbers, None for anything else.
def label_shape(label):
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    if isinstance(label, int) and not isinstance(label, bool):
        return ()
    if isinstance(label, list) and label and all(number(v) for v in label):
        return (len(label),)
    return None

# What is wrong with one label of dataset.json, or None; `usual` is the most common label_shape.
def label_problem(label, usual):
    shape = label_shape(label)
    if shape is None:
        return f'label {json.dumps(label)} in dataset.json is neither a class index nor a list of numbers'
    if shape == () and label < 0:
        return f'label {label} in dataset.json is out of range (class indices start at 0)'
    if shape != usual:
        kind = 'class indices' if usual == () else f'vectors of {usual[0]} numbers'
        return f'label {json.dumps(label)} in dataset.json, but most labels are {kind}'
    return None

# What is wrong with one decoded image, as a list; `usual` is the most common ((W, H), mode) of the dataset.
def image_problems(size_mode, usual):
    (w, h), mode = size_mode
    what = []
    if mode not in ('L', 'RGB'):
        what.append(f'mode {mode}; dataset_tool writes L (grey) or RGB')
    if w != h:
        what.append(f'{w}x{h} is not square')
    if size_mode != usual:
        what.append(f'{w}x{h} {mode} but most images are {usual[0][0]}x{usual[0][1]} {usual[1]}')
    return what

# The labels of dataset.json as {name: label}, or None when it is absent or `"labels": null`; problems with the
# file as a whole go to `problems`.
def read_check_labels(raw, image_names, where, problems):
    if raw is None:
        return None
    try:
        pairs = json.loads(raw)['labels']
        labels = None if pairs is None else {str(name).replace('\\', '/'): label for name, label in pairs}
    except (ValueError, KeyError, TypeError) as e:
        problems.append(f'{where}: cannot parse ({e}); labels not checked')
        return None
    extra = sorted(set(labels or ()) - set(image_names))
    if extra:
        problems.append(f"{where}: {len(extra)} labels name no image of the dataset, e.g. '{extra[0]}'")
    return labels

def check(data):
    data = str(data)
    if not os.path.exists(data):
        raise UsageError(f'--data={data}: no such file or folder')
    if not os.path.isdir(data) and not data.lower().endswith('.zip'):
        raise UsageError(f'--data={data}: not a folder or a zip file (an EDM-format dataset, see dataset_tool.py)')
    if not os.path.isdir(data) and not zipfile.is_zipfile(data):
        raise DataError(f'{data}: cannot read the zip (no zip directory found; the file is truncated or corrupt)')
    problems, bad, found = [], {}, {}  # bad: {name: [what, ...]}; found: {name: ((W, H), mode)}
    try:
        z = None if os.path.isdir(data) else zipfile.ZipFile(data)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise DataError(f'{data}: cannot read the zip ({e})') from None
    with z or contextlib.nullcontext():
        if z is None:
            names = [os.path.relpath(os.path.join(root, f), data).replace('\\', '/')
                     for root, _, files in os.walk(data) for f in files]
            read = lambda name: Path(data, name).read_bytes()
        else:
            names, read = z.namelist(), z.read
        try:
            raw_json = read('dataset.json') if 'dataset.json' in names else None
        except Exception as e:  # OSError; from a zip member also BadZipFile (CRC mismatch), zlib.error, ...
            raise DataError(f'{os.path.join(data, "dataset.json")}: cannot read ({e})') from None
        names = sorted(n for n in names if n.lower().endswith(IMAGE_EXTENSIONS))
        if not names:
            raise DataError(f'{data}: no images found')
        labels = read_check_labels(raw_json, names, os.path.join(data, 'dataset.json'), problems)
        with working():
            for name in tqdm(names, unit='img'):
                try:
                    img = decode_image(read(name))
                    found[name] = (img.size, img.mode)
                except DataError as e:
                    bad[name] = [str(e)]
                except Exception as e:  # OSError; from a zip member also BadZipFile (CRC mismatch), zlib.error, ...
                    bad[name] = [f'cannot read ({e})']
    usual = collections.Counter(found.values()).most_common(1)[0][0] if found else None  # ((W, H), mode)
    for name, size_mode in found.items():
        what = image_problems(size_mode, usual)
        if what:
            bad[name] = what
    classes = set()  # the distinct valid labels
    if labels is not None:
        shapes = collections.Counter(label_shape(labels[name]) for name in names if name in labels)
        usual_shape = max((s for s in shapes if s is not None), key=shapes.get, default=None)
        for name in names:
            what = label_problem(labels[name], usual_shape) if name in labels else 'no label in dataset.json'
            if what:
                bad.setdefault(name, []).append(what)
            else:
                classes.add(json.dumps(labels[name]))
    for name in sorted(bad):
        print(f"{os.path.join(data, name)}: {'; '.join(bad[name])}")
    for line in problems:
        print(line)
    summary = f'{len(names) - len(bad)} images OK, {len(bad)} bad'
    if problems:
        summary += f', {len(problems)} dataset.json problems'
    if found:
        summary += f" ({usual[0][0]}x{usual[0][1]} {usual[1]}, {f'{len(classes)} classes' if classes else 'no labels'})"
    print(summary)
    return not bad and not problems

#------------------------------------------------------------------------------
# 7. Grid: real training images in the layout of common.save_image_grid, for the README beside a demo's samples.

def grid(data, dest, num=64, seed=0):
    """A seeded choice of `num` images of `data` (demo[-RES] or an EDM-format zip/folder; common.open_dataset), in
    index order, written as one PNG grid (common.save_image_grid: about square, black cells pad the last row)."""
    data, dest = str(data), str(dest)
    if not dest.lower().endswith('.png'):
        raise UsageError(f'--dest={dest}: must end with .png')
    if os.path.isdir(dest):
        raise UsageError(f'--dest={dest}: is a folder; allowed: a .png file name')
    parent = os.path.dirname(os.path.abspath(dest))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f'--dest={dest}: {parent} is a file, not a folder')
    if not writable(parent):
        raise UsageError(f'--dest={dest}: folder {parent} is not writable')
    if not re.fullmatch(r'demo(-[0-9]+)?', data) and not os.path.exists(data):
        raise UsageError(f'--data={data}: no such file or folder (or use --data=demo-RES)')
    import common  # torch; only this command needs it
    import torch
    try:
        dataset = common.open_dataset(data)
    except common.UserError as e:
        raise UsageError(str(e)) from None
    if num > len(dataset):
        raise UsageError(f'--num={num}: {data} holds only {len(dataset)} images')
    cols = math.ceil(math.sqrt(num))
    side = max(cols, math.ceil(num / cols)) * dataset.resolution
    check_image_size(side, side, f'a grid of {num} images of {dataset.resolution}x{dataset.resolution}')
    indices = np.sort(np.random.default_rng(seed).choice(len(dataset), num, replace=False))
    folder, name = os.path.split(os.path.abspath(dest))
    tmp = os.path.join(folder, f'.{name[:-4]}.tmp{os.getpid()}.png')
    made = [p for p in itertools.accumulate(Path(folder).parts, os.path.join) if not os.path.exists(p)]
    with working():
        try:
            try:
                images = np.stack([dataset[int(i)][0] for i in indices])  # uint8 [N, C, H, W]
            except common.UserError as e:
                raise DataError(str(e)) from None
            os.makedirs(folder, exist_ok=True)
            common.save_image_grid(torch.from_numpy(images).double() / 127.5 - 1, tmp)  # to_uint8 gives them back
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            for p in reversed(made):
                with contextlib.suppress(OSError):
                    os.rmdir(p)
            raise
    print(f'Wrote a grid of {num} images of {data} ({cols} columns, {dataset.resolution}x{dataset.resolution}, '
          f'seed {seed}) to {dest}')
    return indices

#------------------------------------------------------------------------------
# 8. Command line

def parse_resolution(s):
    m = re.fullmatch(r'([0-9]+)[x,]([0-9]+)', s)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise argparse.ArgumentTypeError(f"expected WxH with positive integers, e.g. 64x64, got '{s}'")
    return int(m.group(1)), int(m.group(2))

def ranged_int(low, high):
    """argparse type: an integer in [low, high]."""
    def parse(s):
        try:
            value = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got '{s}'") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f'{s} is out of range: must be >= {low} and <= {high}')
        return value
    parse.__name__ = 'int'
    return parse

class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own complaints become one line and exit code 2, like ours
        raise UsageError(message)

def build_parser():
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True, metavar='{convert,check,grid}')
    c = sub.add_parser('convert', help='make an EDM-format dataset (the default: `dataset_tool.py --source=...`)')
    c.add_argument('--source', required=True, metavar='PATH', help='input folder or archive (see above)')
    c.add_argument('--dest', required=True, metavar='PATH', help='output: new or empty folder, or new .zip file')
    c.add_argument('--max-images', type=int, default=None, metavar='INT',  # range checked with the other flags
                   help='convert at most INT input images (default: all)')
    c.add_argument('--transform', choices=['center-crop', 'center-crop-wide'], default=None, metavar='MODE',
                   help='center-crop: central square; center-crop-wide: central W:H band on a black WxW canvas; '
                        'both need --resolution (default: none, only resize)')
    c.add_argument('--resolution', type=parse_resolution, default=None, metavar='WxH',
                   help='output size in pixels, LANCZOS resampling (default: keep the input size)')
    k = sub.add_parser('check', help='decode every image of an EDM-format dataset and report each bad file')
    k.add_argument('--data', required=True, metavar='ZIP|DIR', help='EDM-format zip or folder')
    g = sub.add_parser('grid', help='a PNG grid of a seeded choice of real images (for the README beside samples)')
    g.add_argument('--data', required=True, metavar='demo[-RES]|ZIP|DIR',
                   help='the built-in demo data (its 4096 training images) or an EDM-format zip or folder')
    g.add_argument('--dest', required=True, metavar='PNG', help='output file (.png)')
    g.add_argument('--num', type=ranged_int(1, 4096), default=64, metavar='INT', help='images in the grid')
    g.add_argument('--seed', type=ranged_int(0, 2**32 - 1), default=0, metavar='INT', help='seed of the choice')
    return p

def main(argv=None):
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    warnings.simplefilter('ignore', PIL.Image.DecompressionBombWarning)  # too large images fail with one line
    if not argv or (argv[0].startswith('-') and argv[0] not in ('-h', '--help')):
        argv.insert(0, 'convert')  # the original form, `dataset_tool.py --source=... --dest=...`
    try:
        args = build_parser().parse_args(argv)
        if args.command == 'check':
            all_ok = check(args.data)
        elif args.command == 'grid':
            grid(args.data, args.dest, num=args.num, seed=args.seed)
            all_ok = True
        else:
            convert(args.source, args.dest, max_images=args.max_images, transform=args.transform,
                    resolution=args.resolution)
            all_ok = True
    except (UsageError, DataError, OSError) as e:  # 2 before the work, 1 while working (see `working`)
        print(f'dataset_tool.py: error: {e}', file=sys.stderr)
        sys.exit(exit_code(e))
    except KeyboardInterrupt:
        print('dataset_tool.py: interrupted; nothing written', file=sys.stderr)
        sys.exit(130)
    if not all_ok:
        sys.exit(1)

if __name__ == '__main__':
    main()
