"""Sample quality of an image folder: FID with EDM's protocol, Inception Score, sFID, improved precision/recall;
and `score`, a toy score for small images that needs no download (section 3).

FID: Heusel et al., NeurIPS 2017, arXiv:1706.08500. IS: Salimans et al., NeurIPS 2016, arXiv:1606.03498.
sFID: Nash et al., ICML 2021, arXiv:2103.03841. Precision/recall: Kynkaanniemi et al., NeurIPS 2019, arXiv:1904.06991.
Protocol, commands and npz layout follow NVlabs/edm fid.py; IS, sFID and precision/recall follow ADM's evaluator
(openai/guided-diffusion evaluations/evaluator.py). Nothing is copied from either.

The detector is the FID Inception-v3 (common.InceptionV3) with pytorch-fid's weights, downloaded once and cached,
or `--detector=PATH` (pytorch-fid's .pth, or StyleGAN2-ADA's TorchScript inception-2015-12-05.pt).
`--preprocess=nvidia` (default) resizes and normalizes like NVIDIA's detector and ADM's TF graph: numbers are
comparable with EDM's fid-refs/*.npz and with papers using EDM/StyleGAN/ADM tooling. `--preprocess=pytorch_fid`
reproduces `python -m pytorch_fid`. A reference must be made with the same mode as the images it is compared to.
Under torchrun put `--` before fid.py when passing --num: torchrun otherwise reads it as its own --numa-binding.
Exit codes (common.run_main): 2 for bad input found before the work (a flag, a reference, a destination), 1 for a
failure while working (a full disk, non-finite features), 130 for Ctrl-C; every error is one line naming the file.

  # reference statistics of a dataset (all of its images), with the raw features precision/recall needs
  python fid.py ref --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz --features=1
  # reference statistics of the built-in demo data: its first 4096 images, those the demos train on
  python fid.py ref --data=demo-16 --dest=fid-refs/demo-16.npz
  # FID of 50,000 generated images against EDM's published reference, 8 GPUs
  torchrun --standalone --nproc_per_node=8 fid.py calc --images=fid-tmp \\
      --ref=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz
  # all metrics of 10,000 images, against a reference made by `ref --features=1`
  torchrun --standalone --nproc_per_node=8 -- fid.py calc --images=fid-tmp --ref=fid-refs/cifar10-32x32.npz \\
      --num=10000 --metrics=fid,is,sfid,pr
  # toy score of 16x16 samples of a model trained on --data=demo-16 (CPU, seconds; first call trains a classifier)
  python fid.py score --images=out --data=demo-16
"""

import argparse
import contextlib
import hashlib
import os
import re
import tempfile
import warnings
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from common import (TRAINING_METRICS, DemoDataset, ImageFolderDataset, InceptionV3, Parser, UsageError, UserError,
                    check_memory, demo_shape, demo_top_half, download, frechet_distance, get_rank, get_world_size,
                    init_distributed, number, open_dataset, parse_bool, print0, resize_tf1, run_main, save_checkpoint,
                    seed_batches, to_uint8, working)

METRICS = ('fid', 'is', 'sfid', 'pr')
MAX_IMAGES = 10**8  # --num: 80 times ImageNet's 1.28M images
FEATURE_DIMS = dict(pool=2048, logits=1008, spatial=2023)  # InceptionV3(return_dict=True) outputs

#------------------------------------------------------------------------------
# 0. The detector (FID Inception-v3 weights or NVIDIA's TorchScript file) and the metrics other than FID.

FID_WEIGHTS_URL = 'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth'
NVIDIA_DETECTOR_URL = 'https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt'

class _TorchScriptInception(torch.nn.Module):
    """NVIDIA's TorchScript detector (StyleGAN2-ADA inception-2015-12-05.pt) behind InceptionV3's interface. It resizes
    and normalizes internally; sFID features re-run its layers up to mixed_6.conv after our identical pre-processing."""
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.preprocess = 'nvidia'

    def forward(self, images, return_dict=False):
        x = images.to(torch.float32)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        pool = self.net(x, return_features=True)
        if not return_dict:
            return pool
        h = (resize_tf1(x, 299) - 128) / 128
        for name, layer in self.net.layers.named_children():
            if name == 'mixed_6':
                h = layer.conv(h)[:, :7]
                break
            h = layer(h)
        return dict(pool=pool, logits=pool @ self.net.output.weight.t(), spatial=h.permute(0, 2, 3, 1).flatten(1))

def load_detector(path_or_url=FID_WEIGHTS_URL, preprocess='nvidia', device='cpu'):
    """InceptionV3 or NVIDIA's TorchScript detector from a file or URL: a state dict with pytorch-fid's names (.pth,
    the default URL) or StyleGAN2-ADA's inception-2015-12-05.pt; eval mode, no gradients."""
    path = download(path_or_url, '--detector') if '://' in path_or_url else path_or_url
    if os.path.isdir(path):
        raise UsageError(f'--detector={path} is a folder; give the weights file')
    if not os.path.isfile(path):
        raise UserError(f'Detector weights {path!r} not found. Get {FID_WEIGHTS_URL} (or NVIDIA\'s '
            f'{NVIDIA_DETECTOR_URL}) and pass it with --detector=PATH.')
    not_a_detector = (f'{path}: neither a state dict of FID Inception-v3 weights nor NVIDIA\'s TorchScript detector '
                      f'(NVIDIA\'s .pkl detector needs NVIDIA\'s code; use {NVIDIA_DETECTOR_URL} or {FID_WEIGHTS_URL})')
    if zipfile.is_zipfile(path) and any(n.endswith('/constants.pkl') for n in zipfile.ZipFile(path).namelist()):
        if preprocess != 'nvidia':
            raise UserError('The TorchScript detector has NVIDIA pre-processing built in; use --preprocess=nvidia.')
        try:
            net = _TorchScriptInception(torch.jit.load(path, map_location='cpu'))
        except Exception:
            raise UserError(not_a_detector) from None
    else:
        try:  # the loader's own message would suggest weights_only=False, which runs the file's code: never quoted
            with warnings.catch_warnings():  # nor its warnings about pickle protocols
                warnings.simplefilter('ignore')
                state = torch.load(path, map_location='cpu', weights_only=True)
        except Exception:
            raise UserError(not_a_detector) from None
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise UserError(f'{path}: expected a state dict of tensors, got {type(state).__name__}')
        net = InceptionV3(preprocess)
        for key, value in net.state_dict().items():  # legacy state dicts lack the BN counters
            if key.endswith('num_batches_tracked'):
                state.setdefault(key, value)
        try:
            net.load_state_dict(state, strict=True)
        except Exception as e:
            reason = ' '.join(str(e).split())[:300]
            raise UserError(f'{path}: not FID Inception-v3 weights with pytorch-fid\'s names ({reason})') from None
    bad = [k for k, v in net.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f'{path}: {bad[0]} holds NaN or inf ({len(bad)} tensors do): damaged weights')
    return net.eval().requires_grad_(False).to(device)

class FeatureStats:
    """Running float64 sums of features and of their outer products (EDM fid.py), so that the statistics of a
    1.28M-image reference never hold all features at once. Mean and unbiased covariance (N-1), as np.cov."""
    def __init__(self, dim):
        self.n, self.sum, self.sum_outer = 0, np.zeros(dim), np.zeros([dim, dim])

    def update(self, features):
        features = np.asarray(features, dtype=np.float64)
        self.n += len(features)
        with np.errstate(all='ignore'):  # non-finite features are refused with one line once the sums are done
            self.sum += features.sum(axis=0)
            self.sum_outer += features.T @ features

    def mean_cov(self):
        with np.errstate(all='ignore'):
            mu = self.sum / self.n
            return mu, (self.sum_outer - self.n * np.outer(mu, mu)) / (self.n - 1)

def inception_score(logits, split_size=5000):
    """Inception score exp(E_x KL(p(y|x) || p(y))), Salimans et al. 2016; as ADM's evaluator: softmax of bias-free
    logits, the mean score over splits of split_size images."""
    logp = torch.as_tensor(logits).detach().to(torch.float64).log_softmax(dim=1)
    scores = []
    for part in logp.split(split_size):
        p = part.exp()
        p_y = p.mean(dim=0, keepdim=True)
        kl = (torch.xlogy(p, p) - torch.xlogy(p, p_y)).sum(dim=1).mean()   # 0 log 0 = 0
        scores.append(kl.exp().item())
    return float(np.mean(scores))

def _pairwise_sq_dist(a, b):
    """Squared Euclidean distances [len(a), len(b)]; callers pass row blocks to bound memory."""
    return (a.square().sum(1, keepdim=True) - 2 * a @ b.t() + b.square().sum(1)).clamp(min=0)

def precision_recall(ref_features, gen_features, k=3, row_batch=1000, device='cpu'):
    """Improved precision and recall, Kynkaanniemi et al. 2019, as ADM's evaluator (ManifoldEstimator): each set's
    manifold is the union of balls reaching each point's k-th nearest neighbour (itself excluded); precision = share
    of generated points inside the reference manifold, recall = share of reference points inside the generated one."""
    ref, gen = (torch.as_tensor(f).detach().to(device, torch.float32) for f in (ref_features, gen_features))
    if min(len(ref), len(gen)) <= k:
        raise ValueError(f'Precision/recall with k={k} needs more than {k} images per set, got {len(ref)} and '
                         f'{len(gen)}')
    def radii(f):  # k+1-th smallest distance of each row, the first being the point itself
        return torch.cat([_pairwise_sq_dist(r, f).kthvalue(k + 1, dim=1).values for r in f.split(row_batch)])
    def inside(points, centers, r):
        return torch.cat([(_pairwise_sq_dist(p, centers) <= r).any(dim=1) for p in points.split(row_batch)])
    precision = inside(gen, ref, radii(ref)).double().mean().item()
    recall = inside(ref, gen, radii(gen)).double().mean().item()
    return precision, recall

#------------------------------------------------------------------------------
# 1. Feature extraction, split over ranks. Images are cut into batches of `batch` in dataset order and the batches
#    are dealt round-robin to the ranks, so every image meets the same batch on any number of processes. Features
#    are gathered in dataset order, `chunk` batches at a time, and summed into float64 statistics in that order:
#    every metric is identical for 1 or N processes, and memory stays bounded for a 1.28M-image reference.

def compute_features(dataset, detector, device, batch=64, workers=3, keys=('pool',), keep=(), chunk=256):
    """FeatureStats for each of `keys`, and the raw float32 features [len(dataset), dim] of those in `keep`, in
    dataset order; the same on every rank."""
    rank, world_size = get_rank(), get_world_size()
    n = len(dataset)
    batches = [list(range(i, min(i + batch, n))) for i in range(0, n, batch)]
    mine = batches[rank::world_size]
    warnings.filterwarnings('ignore', message='This DataLoader will create')  # more workers than cores: our choice
    loader = iter(torch.utils.data.DataLoader(dataset, batch_sampler=mine, num_workers=workers))
    stats, kept = {key: FeatureStats(FEATURE_DIMS[key]) for key in keys}, {key: [] for key in keep}
    progress = tqdm(total=sum(len(b) for b in mine), unit='img', disable=(rank != 0))
    for first in range(0, len(batches), chunk):
        group = batches[first:first + chunk]
        offset, size = group[0][0], group[-1][-1] + 1 - group[0][0]
        buffers = {key: torch.zeros([size, FEATURE_DIMS[key]], dtype=torch.float32, device=device) for key in keys}
        for b in range(first, first + len(group)):
            if b % world_size != rank:  # not in `mine`
                continue
            indices = batches[b]
            images, _labels = next(loader)
            with torch.no_grad():
                out = detector(images.to(device), return_dict=(keys != ('pool',)))
            out = out if isinstance(out, dict) else dict(pool=out)
            for key in keys:
                buffers[key][indices[0] - offset:indices[-1] + 1 - offset] = out[key].to(torch.float32)
            progress.update(len(indices))
        for key, value in buffers.items():
            dist.all_reduce(value)  # every row is non-zero on one rank only, so the sum is exact
            value = value.cpu().numpy()
            stats[key].update(value)
            if key in keep:
                kept[key].append(value)
    progress.close()
    return stats, {key: np.concatenate(value) for key, value in kept.items()}

def rank0_first(fn, *args, **kwargs):
    """Run fn on rank 0 before the other ranks (downloads land in the cache once)."""
    if get_rank() != 0:
        dist.barrier()
    result = fn(*args, **kwargs)
    if get_rank() == 0:
        dist.barrier()
    return result

def open_detector(args, device):
    print0(f'Loading detector {args.detector} (preprocess={args.preprocess})...')
    return rank0_first(load_detector, args.detector, preprocess=args.preprocess, device=device)

#------------------------------------------------------------------------------
# 2. Commands.

def check_dest(path, what):
    """A file we may write: not a folder, its folder (or the nearest existing one above) writable, found by creating
    and removing a probe file there (permission bits do not stop root; a read-only mount or /proc does); before any
    work."""
    if os.path.isdir(path):
        raise UsageError(f'{what} is a folder; give a file name')
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    try:
        fd, probe = tempfile.mkstemp(prefix='.write-check-', dir=parent)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UsageError(f'{what}: cannot write there ({parent}: {e.strerror})') from None

def check_finite(arrays, where):
    bad = [k for k, v in arrays.items() if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()]
    if bad:
        raise UserError(f'{where}: {bad[0]} holds NaN or inf')

def save_npz(path, arrays):
    """np.savez to a hidden temp file beside `path`, renamed at the end: a failed write (full disk) leaves nothing."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f'.{name}.tmp{os.getpid()}')
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, 'wb') as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise OSError(e.errno, e.strerror or str(e), path) from None

def open_images(path, flag, **kwargs):
    """`--images`/`--data` of ref and calc: an EDM-format zip or folder (or for ref the demo data)."""
    if not re.fullmatch(r'demo(-\d+)?', path) and not os.path.exists(path):
        raise UsageError(f'{flag}={path}: no such file or folder')
    return open_dataset(path, **kwargs)

def ref(args):
    """Statistics of every image of a dataset (or of --num of them): EDM's `mu`, `sigma`; ADM's `mu_s`, `sigma_s`;
    optionally `features`; and the images' `resolution` and `num_channels`."""
    device = init_distributed()
    if not args.dest.endswith('.npz'):
        raise UsageError(f'--dest={args.dest}: must end with .npz (numpy would add it)')
    check_dest(args.dest, f'--dest={args.dest}')
    demo = re.fullmatch(r'demo(-\d+)?', args.data)
    dataset = open_images(args.data, '--data', **(dict(size=args.num or 4096) if demo else dict(max_size=args.num)))
    if args.num is not None and len(dataset) < args.num:
        raise UsageError(f'{args.data}: found {len(dataset)} images, but --num={args.num}')
    print0(f'Found {len(dataset)} images in {args.data}')
    if len(dataset) < 2:
        raise UserError(f'{args.data}: a covariance needs at least 2 images, found {len(dataset)}')
    if args.features:
        check_memory(2 * len(dataset) * 2048 * 4, f'--features=1 for {len(dataset):,} images', torch.device('cpu'))
    detector = open_detector(args, device)
    with working():
        stats, features = compute_features(dataset, detector, device, args.batch, args.workers,
                                           keys=('pool', 'spatial'), keep=(('pool',) if args.features else ()))
        if get_rank() == 0:
            mu, sigma = stats['pool'].mean_cov()
            mu_s, sigma_s = stats['spatial'].mean_cov()
            arrays = dict(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s) | (
                dict(features=features['pool']) if args.features else {})
            check_finite(arrays, f'the statistics of {args.data} (nothing written)')
            save_npz(args.dest, arrays | dict(preprocess=np.array(args.preprocess),
                                              resolution=np.array(dataset.resolution),
                                              num_channels=np.array(dataset.num_channels)))
            print0(f'Saved {args.dest}')

class _ImageArray:
    """ADM reference batches keep their images as arr_0 [N, H, W, C] uint8; serve them like ImageFolderDataset."""
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, idx):
        return self.images[idx].transpose(2, 0, 1).copy(), np.zeros([0], np.float32)  # [H, W, C] -> [C, H, W]

def load_ref(path, metrics, preprocess, resolution=None, num_channels=None):
    """The arrays of a reference npz that `metrics` need, checked against what calc will compute: their shapes, finite
    values, the pre-processing mode and, where the file stores them (`fid.py ref` does, EDM's files do not), the
    images' resolution and channels."""
    if '://' in path:
        path = rank0_first(download, path, flag="--ref")
    if os.path.isdir(path):
        raise UsageError(f'{path}: is a folder, not a reference file')
    if not os.path.isfile(path):
        raise UsageError(f'{path}: no such reference file (make one with `python fid.py ref --data=... --dest=...`)')
    if not zipfile.is_zipfile(path):
        raise UsageError(f'{path}: not an npz file')
    need = dict(fid=['mu', 'sigma'], sfid=['mu_s', 'sigma_s'], pr=['features'])
    shapes = dict(mu=(2048,), sigma=(2048, 2048), mu_s=(2023,), sigma_s=(2023, 2023))
    not_ref = 'not a reference of `fid.py ref`'
    try:
        with np.load(path, allow_pickle=False) as f:
            files = set(f.files) | ({'features'} if 'arr_0' in f.files else set())  # ADM batches: arr_0's features
            missing = [k for m in metrics for k in need.get(m, []) if k not in files]
            if missing:
                raise UsageError(f'{path} has no {", ".join(missing)}, needed for --metrics={",".join(metrics)}; '
                    'make it with `python fid.py ref` (add --features=1 for precision/recall)')
            keys = [k for m in metrics for k in need.get(m, [])] + ['preprocess', 'resolution', 'num_channels']
            keys += ['arr_0'] if 'pr' in metrics and 'features' not in f.files else []
            data = {}
            for k in keys:
                if k in f.files:
                    try:
                        data[k] = f[k]
                    except ValueError:  # object arrays: loading them would unpickle, i.e. run code from the file
                        raise UsageError(f'{path}: {k} holds Python objects, not numbers: {not_ref}') from None
                    if not isinstance(data[k], np.ndarray):  # np.load returns a member without .npy header as bytes
                        raise UsageError(f'{path}: {k} is not a .npy array: {not_ref}')
    except UserError:
        raise
    except Exception as e:  # a damaged zip member, a bad .npy header
        reason = ' '.join(str(e).split())[:200]
        raise UsageError(f'{path}: cannot read ({type(e).__name__}: {reason}): {not_ref}') from None
    for key, shape in shapes.items():
        if key in data and data[key].shape != shape:
            raise UsageError(f'{path}: {key} has shape {data[key].shape}, expected {shape}: not made with this '
                             'detector')
    if 'features' in data and (data['features'].ndim != 2 or data['features'].shape[1] != 2048):
        raise UsageError(f'{path}: features have shape {data["features"].shape}, expected [N, 2048]')
    if 'arr_0' in data and (data['arr_0'].ndim != 4 or data['arr_0'].dtype != np.uint8
                            or data['arr_0'].shape[3] not in (1, 3)):
        raise UsageError(f'{path}: arr_0 is {data["arr_0"].dtype} {data["arr_0"].shape}, expected ADM\'s uint8 '
                         'images [N, H, W, C]')
    numeric = [k for k in ('mu', 'sigma', 'mu_s', 'sigma_s', 'features') if k in data]
    for key in numeric:
        if not np.issubdtype(data[key].dtype, np.number):
            raise UsageError(f'{path}: {key} is {data[key].dtype}, not numbers: {not_ref}')
    try:
        check_finite({k: data[k] for k in numeric}, path)
    except UserError as e:
        raise UsageError(f'{e}: a damaged reference; make it again with `python fid.py ref`') from None
    if 'pr' in metrics and len(data.get('features', data.get('arr_0'))) < 4:
        raise UsageError(f'{path}: precision/recall (k=3) needs at least 4 reference images')
    if 'preprocess' in data and str(data['preprocess']) != preprocess:
        raise UsageError(f'{path} was made with --preprocess={data["preprocess"]}; calc uses '
                         f'--preprocess={preprocess}. Use the same mode for both.')
    for key, given in (('resolution', resolution), ('num_channels', num_channels)):
        if key in data:
            if data[key].shape != () or not np.issubdtype(data[key].dtype, np.integer):
                raise UsageError(f'{path}: {key} is {data[key].dtype} {data[key].shape}, not one integer: {not_ref}')
            if given is not None and int(data[key]) != given:
                raise UsageError(f'{path} was made from images with {key}={int(data[key])}, these have '
                                 f'{key}={given}; make a reference of images like them')
    return data

def calc(args):
    """Metrics of `--num` images against a reference; prints one `name value` line per number."""
    device = init_distributed()
    metrics = args.metrics
    dataset = open_images(args.images, '--images', max_size=args.num, random_seed=args.seed)
    reference = load_ref(args.ref, metrics, args.preprocess, dataset.resolution, dataset.num_channels)
    print0(f'Found {len(dataset)} images in {args.images} (using {min(len(dataset), args.num)})')
    if len(dataset) < args.num:
        raise UsageError(f'{args.images}: found {len(dataset)} images, but --num={args.num}')
    if 'pr' in metrics and len(dataset) < 4:
        raise UsageError(f'--num={args.num} is too small: precision/recall (k=3) needs 4 images')
    kept = (1008 if 'is' in metrics else 0) + (2048 if 'pr' in metrics else 0)
    check_memory(2 * len(dataset) * kept * 4, f'--metrics={",".join(metrics)} for {len(dataset):,} images',
                 torch.device('cpu'))  # numpy arrays in host memory
    detector = open_detector(args, device)
    with working():
        results = calc_metrics(args, metrics, dataset, reference, detector, device)
    for name, value in (results or {}).items():
        print(f'{name:<10s}{value:.8g}', flush=True)

def calc_metrics(args, metrics, dataset, reference, detector, device):
    keys = ('pool',) + (('logits',) if 'is' in metrics else ()) + (('spatial',) if 'sfid' in metrics else ())
    keep = (('logits',) if 'is' in metrics else ()) + (('pool',) if 'pr' in metrics else ())
    stats, features = compute_features(dataset, detector, device, args.batch, args.workers, keys=keys, keep=keep)
    stats = {key: value.mean_cov() for key, value in stats.items()}
    check_finite({f'{key} {what}': a for key, (mu, cov) in stats.items() for what, a in (('mean', mu), ('cov', cov))}
                 | {f'{key} features': a for key, a in features.items()}, f'the features of {args.images}')
    if 'pr' in metrics and 'features' not in reference:
        print0('Computing features of the reference images (arr_0)...')
        images = _ImageArray(reference['arr_0'])
        reference['features'] = compute_features(images, detector, device, args.batch, 0, keep=('pool',))[1]['pool']
    if get_rank() != 0:
        return None
    results = {}
    if 'fid' in metrics:
        results['fid'] = frechet_distance(*stats['pool'], reference['mu'], reference['sigma'])
    if 'is' in metrics:
        results['is'] = inception_score(features['logits'])
    if 'sfid' in metrics:
        results['sfid'] = frechet_distance(*stats['spatial'], reference['mu_s'], reference['sigma_s'])
    if 'pr' in metrics:
        results['precision'], results['recall'] = precision_recall(reference['features'], features['pool'],
                                                                   device=device)
    bad = [k for k, v in results.items() if not np.isfinite(v)]
    if bad:
        raise UserError(f'{args.images}: {bad[0]} came out {results[bad[0]]} (the detector\'s features of these '
                        'images are not finite or degenerate)')
    return results

#------------------------------------------------------------------------------
# 3. Toy score: sample quality at 8-64 px, offline, on CPU. Inception needs downloaded weights and sees little in a
#    16 px image, so a tiny classifier is trained on the dataset itself (the demo's shape classes, a dataset's
#    labels, or without labels which of 4 rotations an image shows, as in Gidaris et al. 2018, arXiv:1803.07728),
#    in under a minute on one CPU core, and cached. The score is FID's recipe with this network in place of Inception:
#    the Frechet distance of penultimate features, generated images against held-out real ones, next to the same
#    distance for as many other held-out real images (the floor: finite-sample bias) and for uniform noise (a
#    yardstick; heavy blur can score worse); plus the share of images the classifier names with softmax > 0.9.

TOY_STEPS, TOY_BATCH, TOY_LR = 900, 64, 3e-3    # Adam steps, images per step, learning rate
TOY_VERSION = 1                                 # part of the cache name: bump when the classifier or training changes
TOY_CACHE = os.path.join(torch.hub.get_dir(), 'toy-classifiers')  # where trained toy classifiers are kept

class ToyClassifier(torch.nn.Module):
    """3x3 convolutions with batch norm, down to 2x2-4x4 maps (stride 2 in the first one from 32 px on, so that
    32 px trains as fast as 16 px), the mean and the max of each channel -> features [N, 4*width] -> logits."""
    def __init__(self, channels, num_classes, resolution, width=32):
        super().__init__()
        strides = [2 if resolution >= 32 else 1, 2, 2] + [2] * max(int(np.log2(resolution)) - 5, 0)
        widths = [channels, width] + [2 * width] * (len(strides) - 1)
        layers = []
        for stride, c_in, c_out in zip(strides, widths[:-1], widths[1:]):
            layers += [torch.nn.Conv2d(c_in, c_out, 3, stride, padding=1), torch.nn.BatchNorm2d(c_out), torch.nn.SiLU()]
        self.body = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(4 * width, num_classes)

    def forward(self, images):  # uint8 [N, C, H, W] -> features [N, 4w], logits [N, num_classes]
        h = self.body(images.float() / 127.5 - 1)                           # [N, 2w, h, w]
        features = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], 1)   # -> [N, 4w]
        return features, self.head(features)

def rotate(images, k):
    """Image i turned by k[i] quarter turns."""
    out = images.clone()
    for r in range(1, 4):
        out[k == r] = images[k == r].rot90(r, dims=(2, 3))
    return out

def load_images(dataset, indices):
    """uint8 images [N, C, H, W] and class indices [N] (argmax of the one-hot label; -1 without labels)."""
    items = [dataset[int(i)] for i in indices]
    labels = [int(np.argmax(label)) if len(label) else -1 for _, label in items]
    return torch.from_numpy(np.stack([image for image, _ in items])), torch.tensor(labels)

def open_toy_data(data, channels):
    """`--data` for the toy score: the demo shapes with their labels, or a dataset with its labels if it has them."""
    if re.fullmatch(r'demo(-\d+)?', data):
        return open_dataset(data, size=1 << 30, use_labels=True, num_channels=channels)
    try:
        return ImageFolderDataset(data, use_labels=True)
    except UserError:  # no labels: the classifier learns rotations
        return ImageFolderDataset(data)

def toy_splits(dataset, n):
    """Indices of the training images, of n held-out reference images and of n other held-out (floor) images.
    Demo: 0-16383 (a model trains on 0-4095) and two distant ranges. A dataset: a seeded split, at most a quarter
    of it for each held-out set and 16384 of the rest for training."""
    if isinstance(dataset, DemoDataset):
        return range(16384), range(1 << 20, (1 << 20) + n), range(1 << 21, (1 << 21) + n)
    order = np.random.RandomState(0).permutation(len(dataset))
    n = min(n, len(dataset) // 4)
    if n < 2:
        raise UserError(f'{dataset.path}: {len(dataset)} images are too few for the toy score (need at least 8)')
    return order[2 * n:2 * n + 16384], order[:n], order[n:2 * n]

def toy_classifier(dataset, indices, cache_path=None, seed=0):
    """The classifier of section 3 for `dataset`: loaded from `cache_path`, or trained on dataset[indices] (fixed
    seed, one thread) and saved there. Its target: the labels, or without labels (label_dim 0) the rotation."""
    rotation = dataset.label_dim == 0
    net = ToyClassifier(dataset.num_channels, 4 if rotation else dataset.label_dim, dataset.resolution)
    if cache_path and os.path.isfile(cache_path):
        try:
            net.load_state_dict(torch.load(cache_path, map_location='cpu', weights_only=True))
        except Exception as e:
            raise UserError(f'{cache_path}: not a toy classifier for this data ({str(e)[:200]}); delete it') from None
        return net.eval().requires_grad_(False)
    train_images, train_labels = load_images(dataset, indices)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU kernels are bitwise reproducible only at a fixed thread count
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = ToyClassifier(dataset.num_channels, 4 if rotation else dataset.label_dim, dataset.resolution)
        gen = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(net.parameters(), lr=TOY_LR)
        for _ in tqdm(range(TOY_STEPS), desc='Training the toy classifier', unit='step', leave=False):
            idx = torch.randint(len(train_images), [TOY_BATCH], generator=gen)
            images, labels = train_images[idx], train_labels[idx]
            if rotation:
                labels = torch.randint(4, [TOY_BATCH], generator=gen)
                images = rotate(images, labels)
            loss = torch.nn.functional.cross_entropy(net(images)[1], labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    if cache_path:  # a hidden temp file renamed at the end; a failed write (full disk) removes it, names the file
        os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
        save_checkpoint(net.state_dict(), cache_path)
    return net.eval().requires_grad_(False)

def toy_features(net, images, batch=500):
    """Penultimate features [N, dim] (float64) and class probabilities [N, num_classes] of uint8 images."""
    with torch.no_grad():
        outs = [net(x) for x in images.split(batch)]
    return torch.cat([f for f, _ in outs]).double().numpy(), torch.cat([l.softmax(1) for _, l in outs]).numpy()

def toy_fd(features, ref_features):
    return frechet_distance(features.mean(0), np.cov(features, rowvar=False),
                            ref_features.mean(0), np.cov(ref_features, rowvar=False))

# For the built-in demo data the score also asks the direct question: does an image have the data's structure? Each
# image is fitted with the demo generator's own model, a top and a bottom colour and one shape of a third colour, the
# shape's pixels one of the masks the generator draws (2,500 at 8x8, 22,000 at 16x16, from 100,000 draws). An image
# fits when that model explains it to DEMO_FIT_RMS and its three regions differ by DEMO_FIT_CONTRAST (max over
# channels, 0-255): the two-tone background and one clean shape. Reported as a share, next to held-out real images'.

DEMO_FIT_DRAWS, DEMO_FIT_RMS, DEMO_FIT_CONTRAST, DEMO_FIT_MAX_RES = 100000, 8.0, 24.0, 16

def demo_masks(R, draws=DEMO_FIT_DRAWS):
    """The distinct shape masks [K, R*R] (bool) of `draws` shape draws of the demo generator at R x R."""
    rng = np.random.default_rng(0)
    return np.unique(np.stack([demo_shape(R, rng)[1].ravel() for _ in range(draws)]), axis=0)

def demo_fit(images, masks, batch=25):
    """Share of uint8 images [N, C, R, R] that the demo generator's model explains: the best mask by least squares
    (region means as the colours), then its RMS residual <= DEMO_FIT_RMS and region contrasts >= DEMO_FIT_CONTRAST
    (top vs bottom, the shape vs each half it covers)."""
    R = images.shape[-1]
    top = torch.from_numpy(demo_top_half(R).ravel())
    m = torch.from_numpy(masks)
    regions = torch.stack([m, ~m & top, ~m & ~top], 1).double()            # [K, 3, P]: shape, top, bottom
    counts = regions.sum(2)                                                # [K, 3]
    fits = []
    for x in images.double().flatten(2).split(batch):                      # [n, C, P]
        sums = torch.einsum('ncp,krp->nkrc', x, regions)                   # [n, K, 3, C]
        sse = x.square().sum((1, 2))[:, None] - (sums.square().sum(3) / counts.clamp(min=1)).sum(2)
        best = sse.argmin(1)                                               # [n]
        colours = sums[torch.arange(len(x)), best] / counts[best].clamp(min=1)[:, :, None]   # [n, 3, C]
        rms = (sse[torch.arange(len(x)), best].clamp(min=0) / x[0].numel()).sqrt()
        diff = lambda i, j: (colours[:, i] - colours[:, j]).abs().amax(1)
        covers = regions[best][:, 0] @ torch.stack([top, ~top], 1).double() > 0  # [n, 2]: the shape is in each half
        shape_contrast = torch.where(covers, torch.stack([diff(0, 1), diff(0, 2)], 1), torch.inf).amin(1)
        fits.append((rms <= DEMO_FIT_RMS) & (diff(1, 2) >= DEMO_FIT_CONTRAST) & (shape_contrast >= DEMO_FIT_CONTRAST)
                    & (counts[best][:, 0] > 0))
    return torch.cat(fits).double().mean().item()

def toy_cache_path(cache_dir, data, dataset):
    """One cached classifier per demo resolution and channel count, or per dataset file (path, size, time)."""
    if isinstance(dataset, DemoDataset):
        key = f'demo-{dataset.resolution}px-{dataset.num_channels}ch'
    else:
        stat = os.stat(data)
        digest = hashlib.sha1(f'{os.path.abspath(data)} {stat.st_size} {stat.st_mtime_ns}'.encode()).hexdigest()[:12]
        key = f'{dataset.name}-{digest}'
    return os.path.join(cache_dir, f'toy-classifier-v{TOY_VERSION}-{key}.pt')

def score(args):
    """Toy score of up to `--num` generated images against as many held-out images of `--data`; prints one
    `name value` line per number."""
    if os.path.exists(args.cache) and not os.path.isdir(args.cache):
        raise UsageError(f'--cache={args.cache}: exists and is not a folder')
    if not os.path.exists(args.images):
        raise UsageError(f'--images={args.images}: no such file or folder')
    images = ImageFolderDataset(args.images, max_size=args.num, random_seed=args.seed)
    if len(images) < 2:
        raise UserError(f'{args.images}: a covariance needs at least 2 images, found {len(images)}')
    dataset = open_toy_data(args.data, images.num_channels)
    if (dataset.resolution, dataset.num_channels) != (images.resolution, images.num_channels):
        raise UserError(f'{args.images} holds {images.resolution}x{images.resolution}x{images.num_channels} images, '
                        f'{args.data} {dataset.resolution}x{dataset.resolution}x{dataset.num_channels}')
    image_bytes = images.num_channels * images.resolution ** 2
    check_memory((4 * len(images) + 16384) * image_bytes * 2, f'the toy score of {len(images):,} images',
                 torch.device('cpu'))
    splits = toy_splits(dataset, len(images))
    path = toy_cache_path(args.cache, args.data, dataset)
    cached = os.path.isfile(path)
    if not cached:
        check_dest(path, f'--cache={args.cache}')
    print(f'Scoring {len(images)} images of {args.images} against {args.data}', flush=True)
    print(f'Toy classifier: {path}' + ('' if cached else ' (training it, once)'), flush=True)
    net = toy_classifier(dataset, splits[0], path) if cached else None  # a bad cache file is bad input
    with working():
        score_images(args, images, dataset, path, splits, net)

def score_images(args, images, dataset, path, splits, net=None):
    samples = load_images(images, range(len(images)))[0]
    train_idx, ref_idx, floor_idx = splits
    net = net or toy_classifier(dataset, train_idx, path)
    (ref_images, ref_labels), floor_images = load_images(dataset, ref_idx), load_images(dataset, floor_idx)[0]
    noise = torch.from_numpy(np.random.default_rng(args.seed).integers(0, 256, samples.shape, dtype=np.uint8))
    (ref_f, ref_p), (floor_f, floor_p), (gen_f, gen_p), (noise_f, _) = (toy_features(net, x) for x in
                                                                        (ref_images, floor_images, samples, noise))
    if dataset.label_dim:
        accuracy = (ref_p.argmax(1) == ref_labels.numpy()).mean()
        print(f'Classifier accuracy on {len(ref_images)} held-out real images: {accuracy:.3f}', flush=True)
    results = dict(toy_fd=toy_fd(gen_f, ref_f), toy_fd_real=toy_fd(floor_f, ref_f), toy_fd_noise=toy_fd(noise_f, ref_f),
                   confident=(gen_p.max(1) > 0.9).mean(), confident_real=(floor_p.max(1) > 0.9).mean())
    if isinstance(dataset, DemoDataset) and dataset.resolution <= DEMO_FIT_MAX_RES:
        masks = demo_masks(dataset.resolution)
        results |= dict(demo_fit=demo_fit(samples, masks), demo_fit_real=demo_fit(floor_images, masks))
    bad = [k for k, v in results.items() if not np.isfinite(v)]
    if bad:
        raise UserError(f'{args.images}: {bad[0]} came out {results[bad[0]]}')
    for name, value in results.items():
        print(f'{name:<16s}{value:.6g}', flush=True)

#------------------------------------------------------------------------------
# 4. Metrics during training (`train --metrics`, common.METRICS): the numbers that `generate` with seeds 0..N-1
#    followed by `calc` (fid50k_full, fid10k_full) or `score --num=500` (toy_fd) give for a snapshot, from images that
#    are never written to disk. The seeds are split over the ranks as `generate` splits them; features are gathered
#    in seed order, so 1 and N processes give the same statistics.

class TrainingMetrics:
    """Checks and loads what `names` need when made (before the first training step): the reference and the
    detector for the FIDs, the toy classifier and its held-out reference features for toy_fd. Called with the
    method's `sample(seeds) -> float [-1, 1] images`, returns {name: value} on every rank."""
    def __init__(self, names, data, resolution, channels, device, ref=None, detector=None, preprocess='nvidia',
                 cache=None, batch=64):
        self.names, self.device, self.batch = list(names), device, batch
        self.num = max(TRAINING_METRICS[name] for name in self.names)
        if any(name.startswith('fid') for name in self.names):
            if not ref:
                raise UsageError(f'--metrics={",".join(self.names)}: the FIDs need --metrics-ref=NPZ|URL, made by '
                                 '`python fid.py ref --data=DATASET --dest=NPZ`')
            try:
                self.ref = load_ref(ref, ['fid'], preprocess, resolution, channels)
                self.detector = rank0_first(load_detector, detector or FID_WEIGHTS_URL, preprocess, device)
            except UserError as e:
                raise UsageError(f'--metrics={",".join(self.names)}: {e}') from None
        if 'toy_fd' in self.names:
            dataset = open_toy_data(data, channels)
            if dataset.resolution != resolution:
                raise UsageError(f'--metrics=toy_fd: --data={data} has {dataset.resolution}x{dataset.resolution} '
                                 f'images, the samples are {resolution}x{resolution}')
            train_idx, ref_idx, _ = toy_splits(dataset, TRAINING_METRICS['toy_fd'])
            cache = cache or TOY_CACHE
            if os.path.exists(cache) and not os.path.isdir(cache):
                raise UsageError(f'--metrics-cache={cache}: exists and is not a folder')
            path = toy_cache_path(cache, data, dataset)
            if not os.path.isfile(path):
                check_dest(path, f'--metrics-cache={cache}')
            print0(f'toy_fd: toy classifier {path}' + ('' if os.path.isfile(path) else ' (training it, once)'))
            self.toy = rank0_first(toy_classifier, dataset, train_idx, path)
            self.toy_ref = toy_features(self.toy, load_images(dataset, ref_idx)[0])[0]

    @torch.no_grad()
    def __call__(self, sample):
        rank, world_size = get_rank(), get_world_size()
        fid = hasattr(self, 'detector')
        pool = torch.zeros([self.num, FEATURE_DIMS['pool']] if fid else [0], device=self.device)
        toy = torch.zeros([self.num if hasattr(self, 'toy') else 0, self.toy_ref.shape[1] if hasattr(self, 'toy')
                           else 0], dtype=torch.float64, device=self.device)
        for seeds in seed_batches(list(range(self.num)), self.batch, rank, world_size):
            images = to_uint8(sample(seeds))  # what generate writes and calc / score read back
            if fid:
                pool[seeds] = self.detector(images.to(self.device)).to(torch.float32)
            if len(toy):
                toy[seeds] = torch.from_numpy(toy_features(self.toy, images.cpu())[0]).to(self.device)
        for buffer in (pool, toy):
            if buffer.numel():
                dist.all_reduce(buffer)  # every row is non-zero on one rank only: the sum is exact
        results = {}
        for name in self.names:
            n = TRAINING_METRICS[name]
            if name == 'toy_fd':
                results[name] = float(toy_fd(toy[:n].cpu().numpy(), self.toy_ref))
            else:
                stats = FeatureStats(FEATURE_DIMS['pool'])
                stats.update(pool[:n].cpu().numpy())
                results[name] = float(frechet_distance(*stats.mean_cov(), self.ref['mu'], self.ref['sigma']))
        return results

#------------------------------------------------------------------------------
# 5. Command line.

def parse_metrics(s):
    metrics = [m.strip() for m in s.split(',') if m.strip()]
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise argparse.ArgumentTypeError(f'unknown metric {bad[0] if bad else s!r}; choose from {",".join(METRICS)}')
    return metrics

def parse_args(argv=None):
    parser = Parser(description=__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)
    r = sub.add_parser('ref', help='reference statistics of a dataset')
    r.add_argument('--data', required=True, metavar='ZIP|DIR|demo[-RES]',
                   help='dataset: zip or folder of images (recursive), or the built-in demo data')
    r.add_argument('--num', type=number(int, 2, MAX_IMAGES), default=None, metavar='INT',
                   help='images to use: a seeded random subset of a dataset (default: all); of demo data the first '
                        'INT (default: 4096, the images the demos train on)')
    r.add_argument('--dest', required=True, metavar='NPZ', help='output file')
    r.add_argument('--features', type=parse_bool, default=False, metavar='BOOL',
                   help='also store the raw pool features (for precision/recall)')
    c = sub.add_parser('calc', help='metrics of generated images')
    c.add_argument('--images', required=True, metavar='ZIP|DIR', help='generated images: zip or folder (recursive)')
    c.add_argument('--ref', required=True, metavar='NPZ|URL',
                   help='reference statistics from `fid.py ref`, EDM, pytorch-fid or ADM')
    c.add_argument('--num', type=number(int, 2, MAX_IMAGES), default=50000, metavar='INT',
                   help='number of images to use (a seeded random subset if more exist)')
    c.add_argument('--seed', type=number(int, 0, 2**32 - 1), default=0, metavar='INT',
                   help='seed of the random subset')
    c.add_argument('--metrics', type=parse_metrics, default=['fid'], metavar='LIST',
                   help=f'comma-separated, from {",".join(METRICS)}')
    for p in (r, c):
        p.add_argument('--batch', type=number(int, 1, 2048), default=64, metavar='INT',
                       help='images per detector call (per GPU)')
        p.add_argument('--detector', default=FID_WEIGHTS_URL, metavar='PATH|URL',
                       help='Inception weights: pytorch-fid .pth or NVIDIA TorchScript .pt')
        p.add_argument('--preprocess', choices=['nvidia', 'pytorch_fid'], default='nvidia',
                       help='resize/normalization: NVIDIA/EDM (TF1) or pytorch-fid')
        p.add_argument('--workers', type=number(int, 0, 256), default=3, metavar='INT',
                       help='DataLoader worker processes per GPU')
    s = sub.add_parser('score', help='offline score of generated images against a small dataset (a toy classifier; '
                                     'CPU, seconds)')
    s.add_argument('--images', required=True, metavar='ZIP|DIR', help='generated images: zip or folder (recursive)')
    s.add_argument('--data', required=True, metavar='demo[-RES]|ZIP|DIR', help='what they should look like')
    s.add_argument('--num', type=number(int, 2, 2**20), default=10000, metavar='INT',
                   help='images to use (seeded subset if more exist)')
    s.add_argument('--seed', type=number(int, 0, 2**32 - 1), default=0, metavar='INT',
                   help='seed of the subset and of the noise images')
    s.add_argument('--cache', default=TOY_CACHE, metavar='DIR',
                   help='where trained toy classifiers are kept')
    return parser.parse_args(argv)

def main(argv=None):
    """Exit 2 for bad input found before the work, 1 for a failure while working, 130 for Ctrl-C (common.run_main)."""
    args = parse_args(argv)
    return run_main(dict(ref=ref, calc=calc, score=score)[args.command], args)

if __name__ == '__main__':
    main()
