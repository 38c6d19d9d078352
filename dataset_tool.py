"""Convert an image collection into an EDM-format dataset: a folder or an uncompressed zip.

Input item i becomes `{i//1000:05d}/img{i:08d}.png` (PNG, compress_level 0); `dataset.json` at the root holds
`{"labels": [["00000/img00000000.png", 6], ...]}`, or `{"labels": null}` when any image lacks a label. This is
the layout of NVlabs/edm's dataset_tool.py, read by common.ImageFolderDataset. All outputs must be square, one
size, one channel count (1 = grey, 3 = RGB), with a power-of-two side.

Sources (the kind is guessed from --source):
  FOLDER/                     images found recursively, sorted by path; labels from FOLDER/dataset.json, else
                              from the top-level sub-folder names when there are several (sorted -> 0, 1, ...)
  FILE.zip                    the images inside a zip; labels only from a dataset.json inside it
  cifar-10-python.tar.gz      CIFAR-10 python tarball: the 50,000 training images, with labels
  train-images-idx3-ubyte.gz  MNIST: 28x28 grey digits zero-padded to 32x32, labels from train-labels-idx1-ubyte.gz
LSUN lmdb folders are not read (that needs lmdb and OpenCV): export them to an image folder first.

Examples:
  python dataset_tool.py --source=downloads/cifar10/cifar-10-python.tar.gz --dest=datasets/cifar10-32x32.zip
  python dataset_tool.py --source=downloads/mnist/train-images-idx3-ubyte.gz --dest=datasets/mnist-32x32.zip
  python dataset_tool.py --source=downloads/ffhq --dest=datasets/ffhq-64x64.zip --resolution=64x64
  python dataset_tool.py --source=downloads/celeba --dest=datasets/celeba-64x64.zip --resolution=64x64 \\
      --transform=center-crop
  python dataset_tool.py --source=downloads/imagenet/train --dest=datasets/imagenet-64x64.zip --resolution=64x64 \\
      --transform=center-crop
"""

import argparse
import gzip
import io
import itertools
import json
import os
import pickle
import re
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
from tqdm import tqdm

#------------------------------------------------------------------------------
# 1. Helpers

# Every problem the user can fix ends the program with one line on stderr and exit code 1.
def fail(message):
    raise SystemExit(f'dataset_tool.py: error: {message}')

def is_image_name(name):
    return os.path.splitext(name)[1].lower() in PIL.Image.registered_extensions()

# Decode one image file; grey stays 1-channel ('L'), everything else (RGBA, palette, CMYK, ...) becomes 'RGB'.
def load_image(file, name):
    try:
        img = PIL.Image.open(file)
        img.load()
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as e:
        reason = 'unknown format or corrupt file' if isinstance(e, PIL.UnidentifiedImageError) else e
        fail(f"cannot read image '{name}': {reason}")
    if img.mode not in ('L', 'RGB'):
        img = img.convert('L' if img.mode in ('1', 'LA', 'La') else 'RGB')
    return img

# Labels from an EDM dataset.json as {name: label}, or None for `"labels": null`. A file that labels only some
# of the images is an error rather than a silent switch to an unlabelled dataset.
def read_labels(json_bytes, names, where):
    try:
        pairs = json.loads(json_bytes)['labels']
    except (ValueError, KeyError, TypeError) as e:
        fail(f'cannot parse {where}: {e}')
    if pairs is None:
        return None
    labels = {str(name).replace('\\', '/'): label for name, label in pairs}
    missing = [name for name in names if name not in labels]
    if missing:
        fail(f"{where} has no label for '{missing[0]}' ({len(missing)} of {len(names)} images unlabelled)")
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
                yield name, load_image(f, name), labels[name] if labels else None
    return len(paths), items()

def open_image_zip(source):
    try:
        with zipfile.ZipFile(source) as z:
            names = sorted(n for n in z.namelist() if is_image_name(n) and not n.endswith('/'))
            has_json = 'dataset.json' in z.namelist()
            labels = read_labels(z.read('dataset.json'), names, f'{source}:dataset.json') if has_json else None
    except (zipfile.BadZipFile, OSError) as e:
        fail(f"cannot read zip '{source}': {e}")
    def items():
        with zipfile.ZipFile(source) as z:
            for name in names:
                with z.open(name) as f:
                    yield name, load_image(f, name), labels[name] if labels else None
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
    except (KeyError, tarfile.TarError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        fail(f"cannot read CIFAR-10 tarball '{source}': {e}")
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
            fail(f"'{path}' is not an idx file with magic number {magic}")
        ndim = magic & 0xff
        shape = [int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], 'big') for k in range(ndim)]
        return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, EOFError, ValueError) as e:
        fail(f"cannot read idx file '{path}': {e}")

def open_mnist(source):
    labels_path = source.replace('-images-idx3-ubyte.gz', '-labels-idx1-ubyte.gz')
    images, labels = read_idx(source, 2051), read_idx(labels_path, 2049)
    if len(images) != len(labels):
        fail(f"'{source}' has {len(images)} images but '{labels_path}' has {len(labels)} labels")
    images = np.pad(images, [(0, 0), (2, 2), (2, 2)])  # [N, 28, 28] -> [N, 32, 32], black border of 2 px (EDM)
    def items():
        for i, (img, label) in enumerate(zip(images, labels)):
            yield f'{os.path.basename(source)}[{i}]', PIL.Image.fromarray(img, 'L'), int(label)
    return len(images), items()

def open_source(source):
    if os.path.isdir(source):
        return open_image_folder(source)
    if not os.path.isfile(source):
        fail(f"source '{source}' does not exist")
    if source.endswith(('.tar.gz', '.tgz')):
        return open_cifar10(source)
    if source.endswith('-images-idx3-ubyte.gz'):
        return open_mnist(source)
    if source.lower().endswith('.zip'):
        return open_image_zip(source)
    fail(f"unknown source format '{source}': expected an image folder, a .zip of images, "
         'cifar-10-python.tar.gz or *-images-idx3-ubyte.gz')

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
# 4. Writer: a new or empty folder, or a new zip without compression; abort() removes what was written.

class DatasetWriter:
    def __init__(self, dest):
        self.dest, self.zip, self.existed = dest, None, os.path.isdir(dest)
        if dest.lower().endswith('.zip'):
            if os.path.exists(dest):
                fail(f"destination '{dest}' already exists; delete it or choose another name")
            os.makedirs(os.path.dirname(dest) or '.', exist_ok=True)
            self.zip = zipfile.ZipFile(dest, 'w', compression=zipfile.ZIP_STORED)
        elif os.path.isfile(dest) or (self.existed and os.listdir(dest)):
            fail(f"destination '{dest}' is not an empty folder")
        else:
            os.makedirs(dest, exist_ok=True)

    def write(self, name, data):
        if self.zip is not None:
            return self.zip.writestr(name, data)
        path = os.path.join(self.dest, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'wb') as f:
            f.write(data)

    def close(self):
        if self.zip is not None:
            self.zip.close()

    def abort(self):
        self.close()
        if self.zip is not None:
            return os.remove(self.dest)
        shutil.rmtree(self.dest)
        if self.existed:
            os.makedirs(self.dest)

#------------------------------------------------------------------------------
# 5. Conversion and command line

def convert(source, dest, max_images=None, transform=None, resolution=None):
    if not dest:
        fail('--dest must not be empty')
    if transform is not None and resolution is None:
        fail(f'--transform={transform} needs --resolution=WxH')
    if transform == 'center-crop-wide' and resolution[1] > resolution[0]:
        fail(f'--transform=center-crop-wide needs H <= W, got --resolution={resolution[0]}x{resolution[1]}')
    if max_images is not None and max_images < 1:
        fail(f'--max-images must be at least 1, got {max_images}')
    count, items = open_source(source)
    if count == 0:
        fail(f"no images found in '{source}'")
    count = min(count, max_images or count)
    resolution = tuple(resolution) if resolution else None
    writer = DatasetWriter(dest)
    labels, first, skipped = [], None, 0  # first = (name, (W, H), mode) of the first image written
    try:
        for i, (name, img, label) in enumerate(tqdm(itertools.islice(items, count), total=count, unit='img')):
            img = transform_image(img, transform, resolution)
            if img is None:  # center-crop-wide: image too small; index i stays unused, as in EDM
                skipped += 1
                continue
            hint = '' if resolution else '; use --resolution=WxH'
            if first is None:
                first = (name, img.size, img.mode)
                w, h = img.size
                if w != h or w & (w - 1) != 0:
                    fail(f"output images must be square with a power-of-two side, got {w}x{h} from '{name}'{hint}")
            if img.mode == 'L' and first[2] == 'RGB':  # grey image in a colour dataset: R = G = B
                img = img.convert('RGB')
            if (img.size, img.mode) != first[1:]:
                fail(f"image '{name}' is {img.width}x{img.height} {img.mode} but the first image '{first[0]}' is "
                     f"{first[1][0]}x{first[1][1]} {first[2]}{hint if img.size != first[1] else ''}")
            archive_name = f'{i // 1000:05d}/img{i:08d}.png'
            png = io.BytesIO()
            img.save(png, format='png', compress_level=0, optimize=False)
            writer.write(archive_name, png.getvalue())
            labels.append([archive_name, label])
        if first is None:
            fail(f'all {count} images were skipped by --transform={transform}: narrower than W or too short')
        all_labelled = all(label is not None for _, label in labels)
        writer.write('dataset.json', json.dumps({'labels': labels if all_labelled else None}).encode())
        writer.close()
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

def parse_resolution(s):
    m = re.fullmatch(r'(\d+)[x,](\d+)', s)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise argparse.ArgumentTypeError(f"expected WxH with positive integers, e.g. 64x64, got '{s}'")
    return int(m.group(1)), int(m.group(2))

def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--source', required=True, metavar='PATH', help='input folder or archive (see above)')
    p.add_argument('--dest', required=True, metavar='PATH', help='output: new or empty folder, or new .zip file')
    p.add_argument('--max-images', type=int, default=None, metavar='INT',
                   help='convert at most INT input images (default: all)')
    p.add_argument('--transform', choices=['center-crop', 'center-crop-wide'], default=None, metavar='MODE',
                   help='center-crop: central square; center-crop-wide: central W:H band on a black WxW canvas; '
                        'both need --resolution (default: none, only resize)')
    p.add_argument('--resolution', type=parse_resolution, default=None, metavar='WxH',
                   help='output size in pixels, LANCZOS resampling (default: keep the input size)')
    return p

def main(argv=None):
    args = build_parser().parse_args(argv)
    convert(args.source, args.dest, max_images=args.max_images, transform=args.transform, resolution=args.resolution)

if __name__ == '__main__':
    main()
