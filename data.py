"""Datasets and the on-device batch pipeline.

load_dataset reads MNIST, Fashion-MNIST, CIFAR-10/100 from their original distribution files in
torchvision's layout under a data root (downloading and md5-checking missing ones), or an image
folder of your own. DeviceLoader keeps a whole split on the training device as one uint8 tensor and
draws, augments and normalises batches there, vectorised over the batch:

    images, labels = load_dataset("cifar10", "./data", train=True)
    info = DATASETS["cifar10"]
    loader = DeviceLoader(images, labels, 256, num_classes=info.num_classes, mean=info.mean,
                          std=info.std, train=True, augment=Augment(crop_padding=4, flip=True), seed=0)
    for x, y in loader.epoch(0): ...
"""

import contextlib
import gzip
import hashlib
import http.client
import io
import json
import math
import os
import pickle
import shutil
import socket
import stat
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass

try:
    import fcntl
except ImportError:  # Windows: downloads go without the lock of _data_root_lock
    fcntl = None

import numpy as np
import torch
import torch.nn.functional as F

from utils import UserError, atomic_write, derive_seed


class DataError(UserError):
    """A data problem the user can fix (missing, corrupt or wrong files, a bad folder)."""


# -----------------------------------------------------------------------------
# Datasets: what each one is, and loading a split

@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int           # 0 for "folder": the number of class folders decides
    in_chans: int
    mean: tuple                # per channel, on the [0, 1] scale, over the training split
    std: tuple
    digits: bool               # hand-written digits: no horizontal flips
    image_size: int            # side of the square images in pixels; 0 for "folder": they are resized to --image-size
    # 28-px images that training zero-pads to 32 px (--pad-to), as the replaced repository did
    padded: bool = False


DATASETS = {
    "mnist": DatasetInfo(10, 1, (0.1307,), (0.3081,), digits=True, image_size=28, padded=True),
    "fashion-mnist": DatasetInfo(10, 1, (0.2860,), (0.3530,), digits=False, image_size=28, padded=True),
    "cifar10": DatasetInfo(10, 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), digits=False, image_size=32),
    "cifar100": DatasetInfo(100, 3, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), digits=False,
                            image_size=32),
    # your own images: training.py normalises them by their own statistics (channel_mean_std); 0.5 is a
    # neutral placeholder for other code that reads this table
    "folder": DatasetInfo(0, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), digits=False, image_size=0),
}
DATASET_ALIASES = {"cifar": "cifar10"}


def load_dataset(name, root="./data", train=True, image_size=32, classes=None):
    """Load a split -> (images uint8 (N, C, H, W), labels int64 (N,)).

    name: "mnist", "fashion-mnist", "cifar10" (or "cifar"), "cifar100", or "folder" for
    root/train/<class>/*.png|jpg and root/test/<class>/* (resized to image_size x image_size, RGB),
    whose labels index `classes` (default: the class folders of root/train; a saved model's own
    names let its test split be read without root/train).
    Missing files are downloaded into root; every file is md5-checked once (see _verify)."""
    name = DATASET_ALIASES.get(name, name)
    if name == "folder":
        classes = classes or _class_names(os.path.join(root, "train"))
        folder = os.path.join(root, "train" if train else "test")
        images, labels = load_image_folder(folder, image_size, classes=classes)
        counts = torch.bincount(labels, minlength=len(classes)).tolist()
        empty = [cls for cls, count in zip(classes, counts) if count == 0]
        if empty and train:  # a class with no images would be trained as one that never occurs
            raise DataError(f"{folder}: the class folder(s) {', '.join(empty)} hold no images "
                            f"({', '.join(IMAGE_SUFFIXES)}); add images or remove the folder(s)")
        if empty:
            print(f"data: {folder} has no images of the class(es) {', '.join(empty)}; they go unscored",
                  file=sys.stderr)
        return images, labels
    if name not in _LAYOUTS:
        raise DataError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    layout = _LAYOUTS[name]
    wanted = [f"{layout.folder}/{f}" for f in (layout.train if train else layout.test)]
    created = _absent_folders(os.path.join(root, layout.folder))  # what locking and fetching may create
    try:
        with _data_root_lock(root):
            missing = [rel for rel in wanted if not os.path.isfile(os.path.join(root, rel))]
            if missing:
                _fetch_missing(name, root, layout, missing)
            _verify(root, wanted)
    except BaseException:
        # a mistyped root that nothing could be fetched into (no network) leaves no empty folders behind
        _remove_empty_folders(created)
        raise
    paths = [os.path.join(root, rel) for rel in wanted]
    if layout.archive is None:
        images, labels = read_idx(paths[0], 2051), read_idx(paths[1], 2049)
        if len(images) != len(labels):
            raise DataError(f"{paths[0]} holds {len(images)} images but {paths[1]} {len(labels)} labels; "
                            "replace them with the official files.")
        return images.unsqueeze(1), labels.long()  # (N, H, W) -> (N, 1, H, W)
    label_key = b"labels" if name == "cifar10" else b"fine_labels"
    batches = [read_cifar_batch(p, label_key) for p in paths]
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def split_train_val(images, labels, val_size, seed=0):
    """Hold out val_size images (an int count, or a fraction in (0, 1)) of a training split, chosen by a
    seeded permutation -> (train_images, train_labels, val_images, val_labels); both keep the original
    order, are disjoint and together hold every image."""
    n = len(images)
    count = round(val_size * n) if isinstance(val_size, float) and 0 < val_size < 1 else int(val_size)
    if not 0 < count < n:
        raise ValueError(f"val_size={val_size} must leave at least one image in each of train and val (N={n})")
    val_idx, train_idx = seeded_choice(n, count, seed)
    return images[train_idx], labels[train_idx], images[val_idx], labels[val_idx]


def seeded_choice(n, count, seed):
    """count of the indices 0..n-1 drawn by a seeded permutation, and the others: two index tensors,
    each in ascending order (a subset keeps the order of the split it comes from)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:count].sort().values, perm[count:].sort().values


def channel_mean_std(images):
    """Per-channel mean and std of uint8 images (N, C, H, W) on the [0, 1] scale -> (tuple, tuple)."""
    # exact, from a histogram of the 256 levels, without a float copy of the whole split
    hist = torch.zeros(images.shape[1], 256, dtype=torch.float64)
    for chunk in images.split(4096):
        for c in range(images.shape[1]):
            hist[c] += torch.bincount(chunk[:, c].reshape(-1).long(), minlength=256).double()
    levels = torch.arange(256, dtype=torch.float64) / 255
    count = hist.sum(1)
    mean = (hist * levels).sum(1) / count
    var = (hist * (levels - mean[:, None]) ** 2).sum(1) / (count - 1)
    return tuple(mean.tolist()), tuple(var.sqrt().tolist())


# -----------------------------------------------------------------------------
# Augmentation, on whole batches on the device

POLICIES = ("none", "randaugment", "trivialaugment")  # of Augment.policy


@dataclass(frozen=True)
class Augment:
    """Training-time augmentation; each switch off by default, so Augment() changes nothing."""
    # random translation by up to this many pixels, zero fill (random crop of a padded image)
    crop_padding: int = 0
    flip: bool = False              # horizontal flip with probability 1/2
    # "none", "randaugment" (policy_ops ops of fixed magnitude) or "trivialaugment" (one op, random magnitude)
    policy: str = "none"
    policy_ops: int = 2             # ops per image for randaugment
    policy_magnitude: float = 9.0   # on torchvision's 0..30 scale; trivialaugment draws uniformly from [0, this]
    erasing_prob: float = 0.0       # probability of erasing one random rectangle (2%-33% of the image) to the mean
    mixup_alpha: float = 0.0        # Beta(alpha, alpha) mixing with another image of the batch; 0 = off
    cutmix_alpha: float = 0.0       # Beta(alpha, alpha) box pasted from another image; 0 = off

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown augmentation policy {self.policy!r}: {', '.join(POLICIES)}")
        # each a condition that holds: NaN fails every comparison, so it is refused too
        holds = {"crop_padding >= 0": self.crop_padding >= 0, "policy_ops >= 1": self.policy_ops >= 1,
                 "0 <= policy_magnitude <= 30": 0 <= self.policy_magnitude <= 30,
                 "0 <= erasing_prob <= 1": 0 <= self.erasing_prob <= 1,
                 "mixup_alpha finite, >= 0": 0 <= self.mixup_alpha < math.inf,
                 "cutmix_alpha finite, >= 0": 0 <= self.cutmix_alpha < math.inf}
        broken = [condition for condition, held in holds.items() if not held]
        if broken:
            raise ValueError(f"need {'; '.join(broken)}: {self}")

    @property
    def mixes(self):
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def _translate(x, shifts, padding):
    """Shift each image of x (B, C, H, W) by shifts (B, 2) pixels (dy, dx in [-padding, padding]), zero fill."""
    B, C, H, W = x.shape
    padded = F.pad(x, (padding,) * 4)  # (B, C, H + 2p, W + 2p)
    row_stride = W + 2 * padding
    rows = torch.arange(H, device=x.device) + padding - shifts[:, :1]  # (B, H)
    cols = torch.arange(W, device=x.device) + padding - shifts[:, 1:]  # (B, W)
    # one gather over the flattened padded image: (B, H, W) -> (B, C, H*W), the same source pixel per channel
    flat_index = (rows[:, :, None] * row_stride + cols[:, None, :]).view(B, 1, H * W).expand(B, C, H * W)
    return padded.view(B, C, -1).gather(2, flat_index).view(B, C, H, W)


def _grayscale(x):
    """(B, C, H, W) in [0, 1] -> (B, 1, H, W) luminance (ITU-R 601, as Pillow)."""
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _blend(x, other, factor):
    """factor * x + (1 - factor) * other, per image factor (B,), clamped to [0, 1]."""
    factor = factor.view(-1, 1, 1, 1)
    return (other + factor * (x - other)).clamp_(0, 1)


def _sharpness(x, factor):
    # blend with a 3x3 smoothed image (centre weight 5 of 13); the border keeps its pixels, as in PIL
    rows = x[:, :, :-2] + x[:, :, 1:-1] + x[:, :, 2:]  # (B, C, H - 2, W): separable 3x3 sum, cheaper than a conv
    smooth = (rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:] + 4 * x[:, :, 1:-1, 1:-1]) / 13  # (B, C, H - 2, W - 2)
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return _blend(x, degenerate, factor)


def _autocontrast(x):
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    scale = torch.where(high > low, 1 / (high - low).clamp_min(1e-6), torch.ones_like(high))
    low = torch.where(high > low, low, torch.zeros_like(low))
    return ((x - low) * scale).clamp_(0, 1)


def _equalize(x):
    """Histogram equalisation per image and channel, PIL's formula, on 256 levels."""
    B, C, H, W = x.shape
    levels = (x * 255).round_().long().reshape(B * C, H * W)
    hist = torch.zeros(B * C, 256, device=x.device).scatter_add_(1, levels, torch.ones_like(levels, dtype=torch.float))
    top_count = hist.gather(1, levels.amax(1, keepdim=True))  # count of the highest level present
    step = torch.div(H * W - top_count, 255, rounding_mode="floor")  # (B*C, 1)
    lut = torch.div(hist.cumsum(1) - hist + torch.div(step, 2, rounding_mode="floor"), step.clamp_min(1),
                    rounding_mode="floor").clamp_(0, 255)
    out = lut.gather(1, levels)
    out = torch.where(step > 0, out, levels.float())  # a flat histogram stays as it is
    return (out / 255).view(B, C, H, W).to(x.dtype)


# The op list of RandAugment/TrivialAugment; each colour op maps (images, magnitude in [0, 1], signs) ->
# images. Geometric ops are gathered into one affine grid_sample.
_GEOMETRIC = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")
_COLOUR = {
    "identity": lambda x, m, s: x,
    "brightness": lambda x, m, s: _blend(x, torch.zeros_like(x), 1 + 0.9 * m * s),
    "color": lambda x, m, s: _blend(x, _grayscale(x), 1 + 0.9 * m * s),
    "contrast": lambda x, m, s: _blend(x, _grayscale(x).mean(dim=(1, 2, 3), keepdim=True), 1 + 0.9 * m * s),
    "sharpness": lambda x, m, s: _sharpness(x, 1 + 0.9 * m * s),
    # keep 8 - 4m bits of each level
    "posterize": lambda x, m, s: (torch.floor(x * 255 / 2 ** (4 * m).round().view(-1, 1, 1, 1))
                                  * 2 ** (4 * m).round().view(-1, 1, 1, 1) / 255),
    "solarize": lambda x, m, s: torch.where(x >= (1 - m).view(-1, 1, 1, 1), 1 - x, x),
    "autocontrast": lambda x, m, s: _autocontrast(x),
    "equalize": lambda x, m, s: _equalize(x),
}
POLICY_OPS = tuple(_COLOUR) + _GEOMETRIC


def _geometric(x, op, magnitude, sign):
    """Apply op[i] in _GEOMETRIC to image i with an affine grid -> (B, C, H, W). Maxima as torchvision:
    shear 0.3, translation 45% of the side, rotation 30 degrees; zero fill."""
    B, C, H, W = x.shape
    signed = magnitude * sign
    theta = torch.zeros(B, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    angle = torch.deg2rad(30 * signed) * (op == 4)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # theta acts on coordinates normalised per axis; the pixel-space map A becomes S^-1 A S, S = diag(W, H)
    rotate = op == 4
    theta[:, 0, 0] = torch.where(rotate, cos, theta[:, 0, 0])
    theta[:, 1, 1] = torch.where(rotate, cos, theta[:, 1, 1])
    theta[:, 0, 1] = torch.where(rotate, -sin * H / W, (op == 0) * 0.3 * signed * H / W)
    theta[:, 1, 0] = torch.where(rotate, sin * W / H, (op == 1) * 0.3 * signed * W / H)
    theta[:, 0, 2] = (op == 2) * 0.9 * signed  # 45% of the width is 0.9 of the normalised [-1, 1]
    theta[:, 1, 2] = (op == 3) * 0.9 * signed
    return F.grid_sample(x, _affine_grid(theta, H, W), mode="bilinear", padding_mode="zeros", align_corners=False)


def _affine_grid(theta, H, W):
    """F.affine_grid(theta, (B, C, H, W), align_corners=False) by broadcasting: its batched matmul is
    slow for small images on CPU. theta (B, 2, 3) -> grid (B, H, W, 2)."""
    B = theta.shape[0]
    xs = ((torch.arange(W, device=theta.device, dtype=theta.dtype) * 2 + 1) / W - 1).view(1, 1, W)  # pixel centres
    ys = ((torch.arange(H, device=theta.device, dtype=theta.dtype) * 2 + 1) / H - 1).view(1, H, 1)
    t = theta.view(B, 6, 1, 1)
    return torch.stack([t[:, 0] * xs + t[:, 1] * ys + t[:, 2], t[:, 3] * xs + t[:, 4] * ys + t[:, 5]], dim=3)


def _where_drawn(x, drawn, op, per_image, batch_wide):
    """x (B, C, H, W) with op(images, *per_image) applied to the images where drawn (B,) is True;
    per_image: tensors (B,) of the op's per-image arguments. batch_wide: op runs on the whole batch
    and torch.where keeps its result where drawn, never waiting for the device; otherwise the drawn
    images are gathered, transformed and written back into x, which is less arithmetic (faster on
    CPU) but needs their count on the host (a sync on a GPU). Both give the same images."""
    if batch_wide:
        return torch.where(drawn.view(-1, 1, 1, 1), op(x, *per_image).to(x.dtype), x)
    chosen = drawn.nonzero().squeeze(1)
    if len(chosen):
        x[chosen] = op(x[chosen], *(argument[chosen] for argument in per_image)).to(x.dtype)
    return x


def _policy(x, augment, generator, batch_wide=None):
    """RandAugment / TrivialAugment on x (B, C, H, W) float in [0, 1], transformed (in place unless
    batch_wide) and returned: each image draws its own ops. batch_wide (default: on a GPU): see
    _where_drawn."""
    B = x.shape[0]
    batch_wide = x.device.type != "cpu" if batch_wide is None else batch_wide
    rounds = augment.policy_ops if augment.policy == "randaugment" else 1
    for _ in range(rounds):
        op = torch.randint(len(POLICY_OPS), (B,), device=x.device, generator=generator)
        sign = torch.randint(2, (B,), device=x.device, generator=generator).to(x.dtype) * 2 - 1
        magnitude = torch.full((B,), augment.policy_magnitude / 30, device=x.device, dtype=x.dtype)
        if augment.policy == "trivialaugment":
            magnitude = magnitude * torch.rand(B, device=x.device, generator=generator, dtype=x.dtype)
        # the groups are disjoint, so each op reads images no other op of this round has changed
        for index, name in enumerate(_COLOUR):
            if name != "identity":
                x = _where_drawn(x, op == index, _COLOUR[name], (magnitude, sign), batch_wide)
        x = _where_drawn(x, op >= len(_COLOUR), _geometric, (op - len(_COLOUR), magnitude, sign), batch_wide)
    return x


def _boxes(B, H, W, area, ratio, generator, device):
    """Boxes of the given area fraction and aspect ratio (B,), placed uniformly -> mask (B, 1, H, W), True inside."""
    h = (torch.sqrt(area * ratio) * H).round().clamp(1, H)
    w = (torch.sqrt(area / ratio) * W).round().clamp(1, W)
    top = (torch.rand(B, device=device, generator=generator) * (H - h + 1)).floor()
    left = (torch.rand(B, device=device, generator=generator) * (W - w + 1)).floor()
    rows = torch.arange(H, device=device).view(1, H, 1)
    cols = torch.arange(W, device=device).view(1, 1, W)
    inside = ((rows >= top.view(-1, 1, 1)) & (rows < (top + h).view(-1, 1, 1))
              & (cols >= left.view(-1, 1, 1)) & (cols < (left + w).view(-1, 1, 1)))
    return inside.unsqueeze(1)


def _to_device(tensor, device):
    """A CPU tensor copied to `device`; to a GPU through pinned memory, so the host need not wait for
    the work queued before the copy (a copy from pageable memory does)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _mix(x, y, augment, num_classes, generator, rng):
    """Mixup / cutmix of each image with its mirror in the batch (image i with B-1-i) -> (x, soft targets
    (B, num_classes) that sum to one). With both on, each image picks one at random."""
    B, C, H, W = x.shape
    device = x.device
    target = F.one_hot(y, num_classes).to(x.dtype)
    use_cutmix = torch.from_numpy(rng.random(B) < (0.5 if augment.mixup_alpha > 0 else 1.0)) \
        if augment.cutmix_alpha > 0 else torch.zeros(B, dtype=torch.bool)
    lam = torch.ones(B, dtype=torch.float64)
    if augment.mixup_alpha > 0:
        lam = torch.where(~use_cutmix, torch.from_numpy(rng.beta(augment.mixup_alpha, augment.mixup_alpha, B)), lam)
    if augment.cutmix_alpha > 0:
        lam = torch.where(use_cutmix, torch.from_numpy(rng.beta(augment.cutmix_alpha, augment.cutmix_alpha, B)), lam)
    lam, use_cutmix = _to_device(lam.float(), device), _to_device(use_cutmix, device)
    # cutmix: a box of area 1 - lam, square in relative units, from the partner; lam becomes the area kept
    box = _boxes(B, H, W, (1 - lam).clamp_min(0), torch.ones_like(lam), generator, device)
    box = box & use_cutmix.view(-1, 1, 1, 1)
    lam = torch.where(use_cutmix, 1 - box.float().mean(dim=(1, 2, 3)), lam)
    # the weight of each image's own pixel, (B, 1, H, W): 0/1 for cutmix, lam for mixup
    weight = torch.where(use_cutmix.view(-1, 1, 1, 1), (~box).to(x.dtype), lam.view(-1, 1, 1, 1).to(x.dtype))
    x = torch.lerp(x.flip(0), x, weight)
    lam = lam.to(x.dtype).view(-1, 1)
    return x, lam * target + (1 - lam) * target.flip(0)


# -----------------------------------------------------------------------------
# The loader

class DeviceLoader:
    """A whole split as one uint8 tensor on `device`; epoch(e) yields normalised, augmented batches.

    images: uint8 (N, C, H, W); labels: int64 (N,). train=True: a seeded permutation per epoch (without
    replacement), the last partial batch dropped, augmentation on; train=False: original order, every
    image once, no augmentation. rank/world_size: each rank takes a disjoint shard of every epoch's
    permutation (training: the same number of batches on every rank). pad_to: zero-pad images to
    pad_to x pad_to (28x28 digits -> 32x32).
    Batches depend only on (seed, epoch, step, rank), for a given world_size, batch size and device type (a CPU's
    and a GPU's random generators draw differently)."""

    def __init__(self, images, labels, batch_size, *, num_classes, mean, std, train, augment=None, seed=0,
                 device="cpu", rank=0, world_size=1, pad_to=None):
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"images must be uint8 (N, C, H, W) with one label each, got {images.dtype} "
                             f"{tuple(images.shape)} and {len(labels)} labels")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise ValueError(f"mean/std have {len(mean)}/{len(std)} entries for {images.shape[1]} channels")
        augment = augment or Augment()
        self.device = torch.device(device)
        self.images = images.to(self.device)
        if pad_to is not None:
            H, W = images.shape[2:]
            if pad_to < max(H, W):
                raise ValueError(f"pad_to={pad_to} is smaller than the images ({H}x{W})")
            top, left = (pad_to - H) // 2, (pad_to - W) // 2
            self.images = F.pad(self.images, (left, pad_to - W - left, top, pad_to - H - top))
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size, self.num_classes = batch_size, num_classes
        self.train, self.augment, self.seed = train, augment, seed
        self.rank, self.world_size = rank, world_size
        # normalising uint8 v: (v / 255 - mean) / std = v * scale + shift
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.scale, self.shift = 1 / (255 * std_t), -mean_t / std_t
        n = len(self.images)
        if train:
            self.shard_size = n // world_size
            self.num_batches = self.shard_size // batch_size
            if self.num_batches == 0:
                raise ValueError(f"{n} images over {world_size} ranks make no full batch of {batch_size}")
        else:
            self.shard_size = len(range(rank, n, world_size))
            self.num_batches = math.ceil(self.shard_size / batch_size)

    def __len__(self):
        return self.num_batches

    def _indices(self, epoch):
        n = len(self.images)
        if not self.train:
            return torch.arange(self.rank, n, self.world_size, device=self.device)
        generator = torch.Generator().manual_seed(derive_seed("permutation", self.seed, epoch))
        perm = torch.randperm(n, generator=generator)[: self.shard_size * self.world_size]
        return perm[self.rank:: self.world_size].to(self.device)

    def epoch(self, epoch, start_step=0):
        """Yield (x, y) for steps start_step..len-1 of epoch `epoch`: x (B, C, H, W) float32 normalised on
        the device; y int64 (B,), or float (B, num_classes) soft targets when mixup/cutmix is on."""
        indices = self._indices(epoch)
        for step in range(start_step, self.num_batches):
            batch = indices[step * self.batch_size: (step + 1) * self.batch_size]
            x, y = self.images[batch], self.labels[batch]
            if self.train:
                x, y = self._augment(x, y, epoch, step)
            else:
                x = torch.addcmul(self.shift, x.float(), self.scale)
            yield x, y

    def _augment(self, x, y, epoch, step):
        augment = self.augment
        batch_seed = derive_seed("augment", self.seed, epoch, step, self.rank)
        generator = torch.Generator(device=self.device).manual_seed(batch_seed)
        B, C, H, W = x.shape
        if augment.crop_padding > 0:
            shifts = torch.randint(-augment.crop_padding, augment.crop_padding + 1, (B, 2), device=self.device,
                                   generator=generator)
            x = _translate(x, shifts, augment.crop_padding)
        if augment.flip:
            flip = torch.rand(B, device=self.device, generator=generator) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        if augment.policy != "none":
            x = torch.addcmul(self.shift, _policy(x.float().div_(255), augment, generator), 255 * self.scale)
        else:
            x = torch.addcmul(self.shift, x.float(), self.scale)
        if augment.erasing_prob > 0:
            area = 0.02 + (1 / 3 - 0.02) * torch.rand(B, device=self.device, generator=generator)
            ratio = torch.exp(math.log(0.3) + (math.log(1 / 0.3) - math.log(0.3))
                              * torch.rand(B, device=self.device, generator=generator))
            erase = torch.rand(B, device=self.device, generator=generator) < augment.erasing_prob
            box = _boxes(B, H, W, area, ratio, generator, self.device) & erase.view(-1, 1, 1, 1)
            x.masked_fill_(box, 0.0)  # 0 is the mean after normalisation
        if augment.mixes:
            x, y = _mix(x, y, augment, self.num_classes, generator, np.random.default_rng(batch_seed))
        return x, y


# -----------------------------------------------------------------------------
# File formats: the original files (IDX, CIFAR pickles) and image folders

@dataclass(frozen=True)
class _Layout:
    folder: str              # under the data root
    train: tuple             # files the training split reads, in order
    test: tuple
    # downloaded into the root and unpacked into `folder`; None: files are downloaded one by one
    archive: str | None


_LAYOUTS = {
    "mnist": _Layout("MNIST/raw", ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                     ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"), None),
    "fashion-mnist": _Layout("FashionMNIST/raw", ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                             ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"), None),
    "cifar10": _Layout("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                       "cifar-10-python.tar.gz"),
    "cifar100": _Layout("cifar-100-python", ("train",), ("test",), "cifar-100-python.tar.gz"),
}


def read_idx(path, magic):
    """Read a gzip'd IDX file (MNIST format) -> uint8 tensor of the dimensions in its header.
    magic: 2051 for images (N, H, W), 2049 for labels (N,). Raises DataError naming the file."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: not a readable gzip file ({e}); it is truncated or corrupt. "
                        "Delete it so it is downloaded again, or replace it with the official file.") from None
    if len(raw) < 8 or int.from_bytes(raw[:4], "big") != magic:
        found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        raise DataError(f"{path}: IDX magic number is {found}, expected {magic}; this is not the "
                        "right file. Replace it with the official file.")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) != header + math.prod(dims):
        raise DataError(f"{path}: IDX header says {dims} ({math.prod(dims)} bytes of data) but the file "
                        f"holds {len(raw) - header}; it is truncated or corrupt. Delete it so it is "
                        "downloaded again, or replace it with the official file.")
    return torch.from_numpy(np.frombuffer(raw, np.uint8, offset=header).reshape(dims).copy())


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR's files hold (a dict, lists, bytes and numpy arrays), so a wrong file
    cannot run code."""
    _allowed = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def read_cifar_batch(path, label_key=b"labels"):
    """Read one CIFAR python-pickle batch -> (images uint8 (N, 3, 32, 32), labels int64 (N,)).
    label_key: b"labels" for CIFAR-10, b"fine_labels" for CIFAR-100. Raises DataError naming the file."""
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, UnicodeDecodeError, MemoryError) as e:
        raise DataError(f"{path}: not a readable CIFAR batch ({type(e).__name__}: {e}); it is truncated, "
                        "corrupt or the wrong file. Delete it so it is downloaded again, or replace it "
                        "with the official file.") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DataError(f"{path}: expected uint8 data of shape (N, 3072) and N labels, found "
                        f"{data.dtype} {data.shape} and {len(labels)} labels; this is not the right file.")
    # (N, 3072) -> (N, 3, 32, 32): the red plane, then green, then blue, each row-major
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
DECODING = 2  # in the decode cache's key: a change of how images are decoded makes earlier caches stale


def _rgb(image):
    """A PIL image as 8-bit RGB. Grey values of 16 bits (modes I;16 and I: 16-bit PNGs) are scaled to 8,
    their top byte; Pillow's convert would clip them at 255, and a 16-bit image would turn nearly white."""
    if image.mode.startswith("I"):
        from PIL import Image
        grey = np.asarray(image).astype(np.int64).clip(0, 65535) >> 8
        image = Image.fromarray(grey.astype(np.uint8))
    return image.convert("RGB")


def _subfolders(folder):
    """The class folders in folder, sorted. Hidden folders (our .vil-cache among them) are not classes; a link
    to nothing is refused: a class folder moved or deleted would drop its class without a word."""
    names = sorted(d for d in os.listdir(folder) if not d.startswith("."))
    for name in names:
        _refuse_broken_link(os.path.join(folder, name))
    return [d for d in names if os.path.isdir(os.path.join(folder, d))]


def _refuse_broken_link(path):
    """Refuse a link whose target cannot be reached: gone, a loop of links, or behind a folder we may not enter."""
    if not os.path.islink(path):
        return
    try:
        os.stat(path)
    except FileNotFoundError:
        raise DataError(f"{path}: a link to nothing ({os.readlink(path)}: a folder or file moved or deleted?); "
                        f"fix or remove it") from None
    except OSError as error:
        raise DataError(f"{path}: cannot follow this link ({error.strerror}); make its target readable, or remove "
                        f"it") from None


def _cannot_list(error):
    raise DataError(f"{error.filename}: cannot list this folder ({error.strerror}); make it readable, or remove it")


def _image_files(class_dir):
    """The images in class_dir and in its subfolders at any depth, in torchvision ImageFolder's order (by
    folder, then by name). Hidden files and folders are skipped (macOS leaves a ._x.jpg of metadata beside
    each x.jpg it copies to some disks); a folder reached twice through links is read once, by the path the
    walk meets first (ImageFolder reads it twice); a link to nothing is refused, as a class folder's is."""
    found, seen = [], set()
    unread = [class_dir]  # folders still to read, the next one last: a walk of any depth (os.walk recursed on 3.11)
    while unread:
        top = unread.pop()
        real = os.path.realpath(top)
        if real in seen:  # a link back to a folder above it, or a second link to one
            continue
        seen.add(real)
        try:
            with os.scandir(top) as entries:
                entries = [(entry.name, *_entry_kind(entry)) for entry in entries if not entry.name.startswith(".")]
        except OSError as error:
            _cannot_list(error)
        # subfolders walked in order, the first first: the same on any disk
        unread.extend(os.path.join(top, name) for name, folder, _ in sorted(entries, reverse=True) if folder)
        for name, folder, link in entries:
            if not folder:
                if link:  # the listing says which entries are links: no lstat for each image
                    _refuse_broken_link(os.path.join(top, name))
                if name.lower().endswith(IMAGE_SUFFIXES):
                    found.append((top, name))
    return [os.path.join(top, name) for top, name in sorted(found)]


def _entry_kind(entry):
    """(folder, link) of a folder's entry: whether it is a folder or a link to one (False where the system cannot
    tell, as os.walk), and whether it may be a link (True where the system cannot tell: _refuse_broken_link looks)."""
    try:
        folder = entry.is_dir()
    except OSError:
        folder = False
    try:
        return folder, entry.is_symlink()
    except OSError:
        return folder, True


def _class_names(train_folder):
    if not os.path.isdir(train_folder):
        raise DataError(f"{train_folder}: no such folder. An image-folder dataset needs "
                        "<root>/train/<class>/*.png|jpg and <root>/test/<class>/*.")
    classes = _subfolders(train_folder)
    if not classes:
        raise DataError(f"{train_folder}: no class folders in it; put each class's images in "
                        f"{train_folder}/<class>/.")
    return classes


def folder_classes(root):
    """The class names of the image-folder dataset in root, which its labels index: the sorted
    class folders of root/train."""
    return _class_names(os.path.join(root, "train"))


def load_image_folder(folder, image_size=32, classes=None):
    """Decode folder/<class>/<image> once with Pillow (RGB, resized to image_size x image_size) ->
    (images uint8 (N, 3, S, S), labels int64 (N,)); labels index `classes` (default: the sorted class
    folders). The decoded tensor is cached, keyed by the files' names and _identity."""
    from PIL import Image, UnidentifiedImageError

    classes = classes or _class_names(folder)
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: no such folder; it should hold one folder per class: {classes}")
    extra = sorted(set(_subfolders(folder)) - set(classes))
    if extra:
        raise DataError(f"{folder}: class folders {extra} are not among the training classes {classes}")
    files = []
    for label, cls in enumerate(classes):
        class_dir = os.path.join(folder, cls)
        if os.path.isdir(class_dir):
            files += [(path, label) for path in _image_files(class_dir)]
    if not files:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    listing = [(os.path.relpath(p, folder), _image_identity(p), y) for p, y in files]
    identity = [os.path.abspath(folder), image_size, classes, listing, DECODING]
    key = hashlib.md5(json.dumps(identity).encode()).hexdigest()
    cache_dir = (os.path.join(folder, ".vil-cache") if _writable(folder)
                 else os.path.join(os.path.dirname(verification_cache_path(folder)), "folders"))
    # named by the folder and size first, so that a new cache replaces the one of the folder's earlier contents
    # at that size (the folder cache beside the md5 record serves every read-only folder)
    kind = f"{hashlib.md5(os.path.abspath(folder).encode()).hexdigest()[:12]}-{image_size}px-"
    cache_path = os.path.join(cache_dir, f"{kind}{key}.pt")
    if os.path.isfile(cache_path):
        try:
            cached = torch.load(cache_path, weights_only=True)
            images, labels = cached["images"], cached["labels"]
            if (images.dtype != torch.uint8 or images.shape != (len(files), 3, image_size, image_size)
                    or labels.dtype != torch.int64 or labels.tolist() != [y for _, y in files]):
                raise ValueError("its images or labels are not those of the folder")
            return images, labels
        except Exception as e:  # a broken cache is rebuilt, never trusted
            print(f"data: ignoring the cache {cache_path} ({e})", file=sys.stderr)
    print(f"data: decoding {len(files)} images from {folder}", file=sys.stderr, flush=True)
    images = np.empty((len(files), image_size, image_size, 3), np.uint8)
    for i, (path, _) in enumerate(files):
        try:
            with Image.open(path) as im:
                images[i] = np.asarray(_rgb(im).resize((image_size, image_size), Image.BICUBIC))
        # a PNG chunk whose type is garbled raises SyntaxError (Pillow's ChunkStream.read)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            if isinstance(e, OSError) and e.errno is not None:  # the file system's refusal (Pillow's own have none)
                raise DataError(f"{path}: cannot read this file ({e.strerror}); make it readable, or remove it") \
                    from None
            # Pillow refuses images of more than 2 * Image.MAX_IMAGE_PIXELS (179M) pixels as decompression bombs
            raise DataError(f"{path}: cannot decode this image ({e}); remove or replace it.") from None
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # (N, S, S, 3) -> (N, 3, S, S)
    labels = torch.tensor([y for _, y in files], dtype=torch.int64)
    try:
        buffer = io.BytesIO()
        torch.save({"images": images, "labels": labels}, buffer)
        _atomic_write(cache_path, buffer.getvalue())
    except OSError as e:
        print(f"data: could not cache decoded images in {cache_path} ({e})", file=sys.stderr)
        return images, labels
    for name in os.listdir(cache_dir):
        if name.startswith(kind) and name.endswith(".pt") and name != os.path.basename(cache_path):
            try:
                os.remove(os.path.join(cache_dir, name))
            except OSError:  # removed by another run meanwhile, say: it only takes space
                pass
    return images, labels


# -----------------------------------------------------------------------------
# File verification, remembered across runs

# md5 of every official file, by its path under the data root (tests replace these).
MD5S = {
    "MNIST/raw/train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "MNIST/raw/train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "MNIST/raw/t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "MNIST/raw/t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    "FashionMNIST/raw/train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "FashionMNIST/raw/train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "FashionMNIST/raw/t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "FashionMNIST/raw/t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "cifar-10-batches-py/data_batch_1": "c99cafc152244af753f735de768cd75f",
    "cifar-10-batches-py/data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "cifar-10-batches-py/data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "cifar-10-batches-py/data_batch_4": "634d18415352ddfa80567beed471001a",
    "cifar-10-batches-py/data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "cifar-10-batches-py/test_batch": "40351d587109b95175f43aff81a1287e",
    "cifar-10-batches-py/batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
    "cifar-100-python/train": "16019d7e3df5f24257cddd939b257f8d",
    "cifar-100-python/test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "cifar-100-python/meta": "7973b15100ade9c7d40fb424638fde48",
}


def _writable(folder):
    """Whether files may be created in `folder` (or in the nearest existing parent). The mode bits
    count even for root, who ignores them, so a folder marked read-only is left alone by everyone."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    mode = os.stat(path).st_mode
    return os.access(path, os.W_OK) and bool(mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def verification_cache_path(root):
    """Where the md5 results for files under `root` are remembered: in the root when it is writable,
    else in $VIL_CACHE_DIR, $XDG_CACHE_HOME/vision-lstm or ~/.cache/vision-lstm."""
    if _writable(root):
        return os.path.join(root, ".vil-verified.json")
    cache = os.environ.get("VIL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "vision-lstm")
    return os.path.join(cache, "verified.json")


def _absent_folders(path):
    """The folders of path that do not exist yet, path first, then its parents up to the first that exists."""
    absent, path = [], os.path.abspath(path)
    while not os.path.exists(path):
        absent.append(path)
        path = os.path.dirname(path)
    return absent


def _remove_empty_folders(folders):
    """Remove each of folders (innermost first) that is empty; stop at the first that is not."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except FileNotFoundError:
            continue
        except OSError:  # not empty (or not ours to remove): so are the folders above it
            return


@contextlib.contextmanager
def _data_root_lock(root):
    """Hold an exclusive lock (flock) on the data root folder while its files are fetched and checked.
    Runs that share a root (two started together, say; within one torchrun run process 0 loads first)
    then download and md5 each file once, one after the other, instead of removing each other's
    temporary files; a process that waits finds the files in place and already checked. A read-only
    root, a filesystem without flock, or Windows go without it."""
    if fcntl is None or not _writable(root):
        yield
        return
    os.makedirs(root, exist_ok=True)
    fd = os.open(root, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"data: waiting for another process that fetches or checks files in {root}",
                  file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # no flock here (some network filesystems)
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def _md5(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _identity(path, st=None):
    """What tells that a file changed without reading it -> [size, mtime_ns, ctime_ns, inode]. Copies
    keep size and mtime (cp -p, rsync -t, tar); a copy put in place has another inode and one written
    over the old file another ctime, which no tool can set back. st: the file's os.stat, where known."""
    st = st or os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _image_identity(path):
    """_identity of an image file, from the one stat that also refuses what is not a regular file: Pillow
    would wait forever on a named pipe."""
    try:
        st = os.stat(path)
    except FileNotFoundError:  # listed a moment ago
        raise DataError(f"{path}: gone while the dataset was read (moved or deleted?); run again") from None
    if not stat.S_ISREG(st.st_mode):
        what = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise DataError(f"{path}: {what}, not an image; remove it or replace it with the image")
    return _identity(path, st)


def _atomic_write(path, data):
    """Write bytes to path through a temporary file and a rename, creating its folder."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, lambda f: f.write(data))


def _read_verified(cache_path):
    """The remembered checks {real path: [size, mtime_ns, ctime_ns, inode, md5]}; a record that is
    missing, unreadable or of another shape counts as empty (and is rewritten at the next check)."""
    try:
        with open(cache_path, "rb") as f:
            cache = json.load(f)
    except (OSError, ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return {}
    return cache if isinstance(cache, dict) else {}  # entries of another shape never match, below


_UNWRITABLE_RECORDS = set()  # the records of verified files this process could not write


def _verify(root, relpaths):
    """Check the md5 of each file (paths relative to root) against MD5S. A file whose path and
    _identity match a remembered good check is not read again. Raises DataError on a mismatch."""
    cache_path = verification_cache_path(root)
    cache = _read_verified(cache_path)
    changed = False
    for rel in relpaths:
        path = os.path.join(root, rel)
        key = os.path.realpath(path)
        expected = MD5S[rel]
        identity = _identity(path) + [expected]
        if cache.get(key) == identity:
            continue
        found = _md5(path)
        if found != expected:
            raise DataError(f"{path}: md5 is {found}, expected {expected}: the file is truncated, corrupt or "
                            "not the official one. Delete it so it is downloaded again, or replace it with "
                            "the official file.")
        cache[key] = identity
        changed = True
    if changed:
        try:
            _atomic_write(cache_path, json.dumps(cache, indent=0).encode())
        except OSError as e:  # only costs a re-check next time
            if cache_path not in _UNWRITABLE_RECORDS:  # said once a process, not once per split
                _UNWRITABLE_RECORDS.add(cache_path)
                print(f"data: could not remember verified files in {cache_path} ({e})", file=sys.stderr)


# -----------------------------------------------------------------------------
# Download

# Base URLs tried in order; tests point these at a local server.
MIRRORS = {
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
    "fashion-mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
    "cifar10": ["https://www.cs.toronto.edu/~kriz/"],
    "cifar100": ["https://www.cs.toronto.edu/~kriz/"],
}

DOWNLOAD_TIMEOUT = 30.0  # seconds without progress before a download is given up


class _DownloadFailed(Exception):
    def __init__(self, reason, network):
        super().__init__(reason)
        self.network = network  # True when the server could not be reached at all


def _download(url, dest, md5):
    """Download url to dest through atomic_write's temporary file next to it, which goes on any
    failure or interruption (Ctrl-C, a SIGTERM turned into SystemExit); dest appears only once the
    md5 matches."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    print(f"data: downloading {url} -> {dest}", file=sys.stderr, flush=True)
    received = 0

    def fetch(f):  # raising here discards the temporary file
        nonlocal received
        digest = hashlib.md5()
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
                expected_size = response.headers.get("Content-Length")
                for block in iter(lambda: response.read(1 << 20), b""):
                    f.write(block)
                    digest.update(block)
                    received += len(block)
        except urllib.error.HTTPError as e:
            raise _DownloadFailed(f"{url}: HTTP {e.code} {e.reason}", network=False) from None
        except urllib.error.URLError as e:
            raise _DownloadFailed(f"{url}: {e.reason}", network=True) from None
        except (http.client.HTTPException, socket.timeout, OSError) as e:
            raise _DownloadFailed(f"{url}: interrupted ({type(e).__name__}: {e})", network=False) from None
        if expected_size is not None and received != int(expected_size):
            raise _DownloadFailed(f"{url}: interrupted after {received} of {expected_size} bytes", network=False)
        if digest.hexdigest() != md5:
            raise _DownloadFailed(f"{url}: md5 of the download is {digest.hexdigest()}, expected {md5}; "
                                  "it was discarded", network=False)

    try:
        atomic_write(dest, fetch)
    except OSError as e:  # writing the file, not the network: a full disk, a folder turned read-only
        raise _DownloadFailed(f"{url}: cannot write {dest} ({e.strerror or e})", network=False) from None
    print(f"data: done, {received / 1e6:.1f} MB", file=sys.stderr, flush=True)


def _extract(archive_path, root, folder, names):
    """Unpack folder/<name> for each name from a tar.gz into root, through a temporary folder, so a
    file appears under its final name only complete and with the right md5."""
    tmp = tempfile.mkdtemp(dir=root, prefix=".extract-")
    try:
        try:
            with tarfile.open(archive_path, "r:gz") as tar:
                for name in names:
                    member = tar.getmember(f"{folder}/{name}")
                    if not member.isfile():
                        raise KeyError(member.name)
                    with tar.extractfile(member) as src, open(os.path.join(tmp, name), "wb") as dst:
                        shutil.copyfileobj(src, dst)
        except (tarfile.TarError, KeyError, OSError, EOFError, zlib.error) as e:
            if isinstance(e, OSError) and e.errno is not None:  # the file system's (a full disk), not the archive's
                raise DataError(f"{archive_path}: cannot unpack {folder}/ into {root} ({e.strerror}); the archive "
                                f"itself passed its md5 check: make room there, or make it writable") from None
            raise DataError(f"{archive_path}: cannot unpack {folder}/ from it ({type(e).__name__}: {e}). "
                            "Delete it so it is downloaded again.") from None
        for name in names:
            found = _md5(os.path.join(tmp, name))
            if found != MD5S[f"{folder}/{name}"]:
                raise DataError(f"{archive_path}: {folder}/{name} inside it has md5 {found}, expected "
                                f"{MD5S[f'{folder}/{name}']}. Delete the archive so it is downloaded again.")
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(root, folder, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fetch_missing(name, root, layout, missing):
    """Download (and unpack) the files in `missing` (paths relative to root). An archive already in the
    root (where torchvision keeps it) is verified and unpacked instead of downloaded. Raises DataError
    with what to do when that is impossible."""
    folder = os.path.abspath(os.path.join(root, layout.folder))
    files = ", ".join(os.path.basename(m) for m in missing)
    # the root given one or two levels too deep (the dataset's own folder): its files sit below an ancestor
    parent = os.path.dirname(os.path.abspath(root))
    for ancestor in (parent, os.path.dirname(parent)):
        if all(os.path.isfile(os.path.join(ancestor, m)) for m in missing):
            raise DataError(f"{name}: missing {files} in {folder}, but they are in "
                            f"{os.path.join(ancestor, layout.folder)}: the data root is the folder that holds "
                            f"{layout.folder.split('/')[0]}, so point it at {ancestor}")
    sources = ", ".join(MIRRORS[name])
    if layout.archive:
        how = (f"Download {layout.archive} (from {sources}) on a machine with network and put it in "
               f"{os.path.abspath(root)} (it is unpacked on the next run), or unpack it yourself and copy the "
               f"files into {folder}, or point the data root at a folder that holds them in torchvision's layout.")
    else:
        how = (f"Download them (from {sources}) on a machine with network and copy the files into {folder}, "
               "or point the data root at a folder that holds them in torchvision's layout.")
    if not _writable(root):
        raise DataError(f"{name}: missing {files} in {folder}, and the data root {os.path.abspath(root)} is "
                        f"read-only so nothing can be downloaded or unpacked there. {how}")
    downloads = [layout.archive] if layout.archive else [os.path.basename(m) for m in missing]
    provided = layout.archive is not None and os.path.isfile(os.path.join(root, layout.archive))
    if provided:
        _verify(root, [layout.archive])
        downloads = []
    for download in downloads:
        rel = download if layout.archive else f"{layout.folder}/{download}"
        failures = []
        for base in MIRRORS[name]:
            try:
                _download(base + download, os.path.join(root, rel), MD5S[rel])
                break
            except _DownloadFailed as e:
                print(f"data: {e}", file=sys.stderr)
                failures.append(e)
        else:
            reasons = "; ".join(str(e) for e in failures)
            if all(e.network for e in failures):
                raise DataError(f"{name}: {files} missing in {folder} and no network to download them "
                                f"({reasons}). {how}")
            raise DataError(f"{name}: could not download {download}: {reasons}. No partial file of it was kept. {how}")
    if layout.archive:
        archive_path = os.path.join(root, layout.archive)
        names = [rel.split("/", 1)[1] for rel in MD5S if rel.startswith(layout.folder + "/")]
        _extract(archive_path, root, layout.folder, names)
        if not provided:  # ours to remove: the unpacked files carry their own md5s
            os.remove(archive_path)
