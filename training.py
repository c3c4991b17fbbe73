"""
Train and evaluate a Vision-LSTM (ViL) classifier on a small image dataset.

One device (a GPU when present, else the CPU):
    python training.py --dataset mnist
    python training.py --dataset cifar
    python training.py --dataset cifar --model vil-t --epochs 300 --mixup 0.8 --cutmix 1.0 --drop-path 0.1
Several GPUs on one machine, or one process per core of a CPU, which trains faster there than one process
(DistributedDataParallel, --batch-size is the global batch):
    torchrun --standalone --nproc_per_node=4 training.py --dataset cifar
Continue an interrupted run, or evaluate a saved model on the test set:
    python training.py --resume --out-dir runs/cifar10-vil-1m-20261124-120000
    python training.py --eval-only --checkpoint runs/cifar10-vil-1m-20261124-120000/checkpoint.pt

A run writes into its folder (--out-dir, locked while it runs): config.json and checkpoint.pt
(every epoch, atomically), metrics.jsonl (one line per epoch), final.json (test accuracy and
timing) and curves.png.
The test set chooses nothing: it is evaluated once at the end (and per epoch with
--eval-test-every-epoch, for curves only). --val-size holds out part of the training set; with it,
best.pt keeps the weights of the epoch with the best validation accuracy.
"""
import argparse
import contextlib
import copy
import dataclasses
import itertools
import json
import math
import os
import shlex
import signal
import sys
import time

if __name__ == "__main__":  # Ctrl-C while torch loads (a second or two): nothing to save yet, no traceback
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(130))
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

try:
    import fcntl
except ImportError:  # Windows: run folders are not locked there
    fcntl = None

from data import (DATASET_ALIASES, DATASETS, POLICIES, POLICY_OPS, Augment, DeviceLoader, channel_mean_std,
                  folder_classes, load_dataset, seeded_choice, split_train_val)
from mlstm import CONV_KINDS, MLSTM_FORMS, factors_decay_matrix
from model import POOLINGS, PRESET_ALIASES, PRESETS, VisionLSTM, ViLConfig, preset_config
from utils import (AUTOCAST_DTYPES, ProgressBar, UserError, WeightEMA, all_reduce_max, all_reduce_sum, allow_tf32,
                   atomic_write, autocast, counted, derive_seed, ensure_writable_dir, error_text, format_seconds,
                   has_native_bf16, json_text, keep_freed_memory, learning_rate, load_checkpoint, out_of_memory,
                   plot_curves, resolve_device, save_checkpoint, save_json, setup_distributed, stop_requests,
                   synchronize)

if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # loaded: Ctrl-C is main()'s to handle again


def flag_name(name):
    """The command-line flag of a setting: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


def flag_names(name):
    """The flags that give a setting a value: "--tta or --no-tta" for an on/off one, else flag_name's."""
    flag = FLAG_OF.get(name)
    if flag is not None and flag.type is bool:
        return f"{flag_name(name)} or --no-{flag_name(name)[2:]}"
    return flag_name(name)


@dataclasses.dataclass(frozen=True)
class Flag:
    """One setting of a run and its command-line flag (--name-with-dashes). allowed: an interval
    such as "(0, 10]" ("[" and "]" include an end, "(" and ")" leave it out), a tuple of choices,
    or None (any value of the type). A default of None means "not set" (the model preset's own
    value, a run folder named after the run, the best device) and is always allowed."""
    default: object
    type: type
    allowed: object
    help: str

    def interval(self):
        """The allowed interval as (low, high, low included, high included)."""
        low, high = (self.type(end) for end in self.allowed[1:-1].split(","))
        return low, high, self.allowed[0] == "[", self.allowed[-1] == "]"

    def in_interval(self, value):
        """Whether value is a number of the flag's type (an int passes for a float), finite, in the interval."""
        numbers = (int, float) if self.type is float else int
        if isinstance(value, bool) or not isinstance(value, numbers) or not math.isfinite(value):
            return False
        low, high, low_included, high_included = self.interval()
        above_low = low < value or (low_included and value == low)
        below_high = value < high or (high_included and value == high)
        return above_low and below_high

    def check(self, name, value):
        """Raise a UserError that names the flag unless value is allowed."""
        if value is None and self.default is None:
            return
        flag = flag_name(name)
        if isinstance(self.allowed, tuple):
            if value not in self.allowed:
                raise UserError(f"{flag} must be one of {', '.join(self.allowed)}, got {value!r}")
        elif isinstance(self.allowed, str):
            if not self.in_interval(value):
                kind = "an integer" if self.type is int else "a finite number"
                raise UserError(f"{flag} must be {kind} in {self.allowed}, got {value!r}")
        elif not isinstance(value, self.type):
            raise UserError(f"{flag} must be a {self.type.__name__}, got {value!r}")
        elif value == "":  # a path or a name: an empty one is a slip (an unset shell variable, say)
            raise UserError(f"{flag} is empty; give it a value")


# ---------------------------------------------------------------------------------------------
# Settings: edit a default here. A flag on the command line wins over it; the recipe of the chosen
# dataset (RECIPES, below) wins over the general value. Each is Flag(default, type, allowed, help);
# the command line (a group of --help per heading), its checks and README.md's "Flags" follow.
FLAGS = {
    "I/O": dict(
        dataset=Flag("mnist", str, tuple(DATASETS),
                     "the dataset (cifar: cifar10)"),
        data_dir=Flag("./data", str, None, "data root (torchvision layout); downloads go there"),
        out_dir=Flag(None, str, None, "run folder (default runs/<dataset>-<model>-<date>-<time>)"),
        limit_train=Flag(0, int, "[0, 1000000000]", "train on N images only, drawn at random by --seed (0: all)"),
        # for small images: 60000 MNIST digits padded to 256 px already take 4 GB
        pad_to=Flag(32, int, "[0, 256]", "zero-pad the 28-px MNIST and Fashion-MNIST images to this size, as the "
                                         "replaced repository did (0 or at most 28: off; other datasets keep "
                                         "their size)"),
        image_size=Flag(32, int, "[1, 1024]", "image-folder datasets are resized to this size"),
    ),
    "model": dict(  # a preset of model.py; None keeps the preset's own value
        model=Flag("vil-1m", str, tuple(PRESETS), "the preset"),
        dim=Flag(None, int, "[8, 8192]", "model width (a multiple of 8)"),
        depth=Flag(None, int, "[1, 256]", "number of single-direction blocks (a pair is one 'layer')"),
        patch_size=Flag(None, int, "[1, 1024]", "patch side in pixels; divides the image size"),
        pooling=Flag(None, str, POOLINGS, "pooling of the first and last token"),
        conv_kind=Flag(None, str, CONV_KINDS, "depthwise conv before q and k: 3x3 on the patch grid, or "
                                              "causal of width 4 along the sequence"),
        mlstm_form=Flag(None, str, MLSTM_FORMS, "the form of the mLSTM (all three compute the same)"),
        chunk_size=Flag(None, int, "[1, 65536]", "chunk length of the chunkwise form"),
        drop_path=Flag(0.0, float, "[0, 1)", "largest stochastic-depth rate, reached by the last block"),
    ),
    "optimiser and schedule": dict(
        epochs=Flag(20, int, "[1, 100000]", "epochs of training"),
        # a 2-core CPU's speed varies between machines of one kind (1.7x between two AMD EPYCs here), so
        # a fixed number of epochs cannot promise an hour; the budget measures this machine instead
        time_budget=Flag(0.0, float, "[0, 1e6]", "minutes of training steps (evaluations come on top): "
                                                 "the epochs are cut to what fits them on this machine, from "
                                                 "steps timed before the run and again after each epoch of "
                                                 "the run's first half (0: off; a given --epochs turns the "
                                                 "recipe's off)"),
        # progressive resizing: early epochs at low resolution cost a quarter as much (16 of 64 tokens) and
        # learn the coarse features; the last third at full size adapts the model to it
        low_res=Flag(1.0, float, "(0, 1]", "train the first third of the epochs on images scaled to this "
                                          "fraction of their side, the second third halfway between it and "
                                          "full size, the last third at full size; evaluation is always at "
                                          "full size (1: off; a given --epochs turns the recipe's off)"),
        batch_size=Flag(256, int, "[1, 1048576]", "global batch (split over processes under torchrun)"),
        lr=Flag(1e-3, float, "(0, 10]", "peak learning rate of AdamW"),
        weight_decay=Flag(0.05, float, "[0, 10]", "AdamW weight decay of weight matrices and kernels"),
        warmup_epochs=Flag(2.0, float, "[0, 100000]", "linear warm-up, never more than a fifth of the run"),
        grad_clip=Flag(1.0, float, "[0, 1e6]", "gradient norm clipping (0: off)"),
        # 1 would make every target uniform: nothing left to learn
        label_smoothing=Flag(0.1, float, "[0, 1)", "label smoothing of the cross-entropy"),
        ema=Flag(0.0, float, "[0, 1)", "decay of an exponential moving average of the weights, e.g. "
                                       "0.999 (0: off)"),
    ),
    "augmentation": dict(  # on the training device, per sample
        crop_padding=Flag(4, int, "[0, 64]", "random translation by up to this many pixels (0: off)"),
        flip=Flag(True, bool, None, "random horizontal flip (never for digits)"),
        policy=Flag("none", str, POLICIES,
                    "randaugment: --policy-ops operations per image; trivialaugment: one"),
        policy_ops=Flag(2, int, f"[1, {len(POLICY_OPS)}]", "operations per image for randaugment"),
        policy_magnitude=Flag(9.0, float, "[0, 30]", "their strength on the 0..30 scale (trivialaugment "
                                                     "draws up to it: 30 is its full range)"),
        erasing=Flag(0.0, float, "[0, 1]", "probability of random erasing"),
        mixup=Flag(0.0, float, "[0, 100]", "mixup Beta(a, a) parameter (0: off)"),
        cutmix=Flag(0.0, float, "[0, 100]", "cutmix Beta(a, a) parameter (0: off)"),
    ),
    "evaluation": dict(
        val_size=Flag(0, int, "[0, 1000000000]", "training images held out for validation (0: none)"),
        tta=Flag(True, bool, None, "evaluate the mean logits of each image and its mirror image (only "
                                   "where training flips: never for digits)"),
        # the final evaluation only: ten views cost five times the mirror's two, too much after every epoch
        tta_shift=Flag(0, int, "[0, 64]", "the final test evaluation (and --eval-only) also averages the "
                                          "logits of each image shifted by this many pixels left, right, up "
                                          "and down, black fill as the training crops', each with its mirror "
                                          "image where --tta mirrors: 10 views, else 5 (0: off)"),
        eval_test_every_epoch=Flag(False, bool, None, "also evaluate the test set after every epoch "
                                                      "(curves only)"),
    ),
    "system": dict(
        amp=Flag("auto", str, ("auto", "bf16", "fp16", "off"),
                 "autocast precision; auto: bf16 on a GPU or CPU that has it natively, else off"),
        compile=Flag(False, bool, None, "torch.compile the model"),
        seed=Flag(0, int, f"[0, {2**63 - 1}]", "seed of the initial weights, data order and augmentation"),
        device=Flag(None, str, None, "cuda, cuda:1, cpu, ... (default: cuda when present, else cpu)"),
    ),
}
FLAG_OF = {name: flag for flags in FLAGS.values() for name, flag in flags.items()}
DEFAULTS = {name: flag.default for name, flag in FLAG_OF.items()}

# Per-dataset recipes, only what differs from the defaults: the values that make the plain
# `--dataset X` command beat the replaced repository's figures.
RECIPES = {
    "mnist": dict(lr=2e-3, crop_padding=2, warmup_epochs=1.0),  # digits are never flipped (random_flips)
    "fashion-mnist": dict(epochs=30, lr=2e-3, crop_padding=2, erasing=0.25),
    # CIFAR-10; the runs behind each choice are in RESULTS.md, in the section named:
    # - epochs, time_budget: as many of 50 epochs as fit 50 minutes of training steps on this machine, timed before the
    #   run and again after each epoch of its first half; the rest of the hour is for the evaluation and a machine that
    #   drifts ("The time budget's rules"). 50 epochs in thirds are about 30 full-size ones, what the fastest 2-core
    #   CPU met fits ("Progressive resizing")
    # - low_res: the first two thirds of the epochs at 16 and 24 px, more epochs in the budget ("Progressive
    #   resizing"); off where the budget holds all 50 at full size (FULL_SIZE_SHARE: a GPU), as with a given --epochs
    # - policy_ops 1: RandAugment with one op, ahead of two at 20 and 30 epochs; no weight EMA: the raw weights scored
    #   as well or better in runs of 3-21 epochs ("Recipe ablations")
    # - tta_shift 2: the final evaluation adds four views shifted by 2 px, +1.2-1.8 points over the mirror pair
    #   ("Test-time shifts")
    # Longer runs reach more: --epochs 100 --policy-ops 2 --ema 0.999, as measured (README.md, "Results").
    "cifar10": dict(epochs=50, time_budget=50.0, low_res=0.5, lr=2e-3, policy="randaugment", policy_ops=1,
                    drop_path=0.05, tta_shift=2),
    "cifar100": dict(epochs=150, lr=2e-3, policy="randaugment", drop_path=0.1, mixup=0.8, cutmix=1.0,
                     ema=0.999, warmup_epochs=5.0),
    "folder": dict(epochs=50),
}
# On --resume the configuration saved in the run's checkpoint.pt is used (config.json is a copy to read, not read
# back); only these may be changed on the command line.
RESUME_OVERRIDABLE = ("epochs", "device", "data_dir", "compile", "tta", "tta_shift", "amp")
# settings added after runs were saved, with the value that trains as those runs did: no budget (only a new run
# reads it), full-size images
NEWER_SETTINGS = dict(time_budget=0.0, low_res=1.0)
# ---------------------------------------------------------------------------------------------


class NonFiniteLoss(Exception):
    """The training loss or the weights became NaN or inf; advice: what the user may change (non_finite_advice)."""

    def __init__(self, message, advice):
        super().__init__(message)
        self.advice = advice


def build_parser(suppress_defaults=False):
    """The command line: a flag per entry of FLAGS, and the three that choose what to do with a
    saved run. With suppress_defaults, parse_args returns only the flags actually given."""
    parser = argparse.ArgumentParser(
        description="Train a Vision-LSTM on MNIST, Fashion-MNIST, CIFAR-10/100 or an image folder. "
                    "The defaults shown are the general ones; the recipe of each dataset changes some "
                    "(RECIPES in training.py).",
        argument_default=argparse.SUPPRESS if suppress_defaults else None)
    for title, flags in FLAGS.items():
        group = parser.add_argument_group(title)
        for name, flag in flags.items():
            notes = ([f"in {flag.allowed}"] if isinstance(flag.allowed, str) else []) + \
                    ([f"default {flag.default}"] if flag.default is not None else [])
            help = "; ".join([flag.help, ", ".join(notes)] if notes else [flag.help]).replace("%", "%%")
            option = flag_name(name)
            if flag.type is bool:
                group.add_argument(option, action=argparse.BooleanOptionalAction, help=help)
            elif isinstance(flag.allowed, tuple):  # checked by check_config, which names the flag
                group.add_argument(option, metavar="{" + ",".join(flag.allowed) + "}", help=help)
            else:
                group.add_argument(option, type=flag.type, help=help)
    group = parser.add_argument_group("continue or evaluate a saved run")
    group.add_argument("--resume", action="store_true", help="continue the run in --out-dir")
    group.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint on the test set")
    group.add_argument("--checkpoint", help="checkpoint file for --eval-only")
    return parser


def parse_config(argv):
    """Resolve the run's configuration: command line > dataset recipe > DEFAULTS, every value
    checked. Returns (config dict, the set of flags given on the command line, resume, eval_only,
    checkpoint)."""
    given = vars(build_parser(suppress_defaults=True).parse_args(argv))
    resume, eval_only = given.pop("resume", False), given.pop("eval_only", False)
    checkpoint = given.pop("checkpoint", None)
    if checkpoint is not None and not eval_only:
        raise UserError("--checkpoint names the file for --eval-only; to continue a run use --resume "
                        "--out-dir FOLDER")
    if eval_only and resume:
        raise UserError("--eval-only and --resume exclude each other: evaluate a saved run, or continue it")
    given = canonical_names(given)
    config = {**DEFAULTS, **RECIPES.get(given.get("dataset", DEFAULTS["dataset"]), {}), **given}
    # the epochs asked for are the run's: the recipe's budget is off, and so is its low resolution, which serves
    # the budget (it was measured in budgeted runs only)
    for name in ("time_budget", "low_res"):
        if "epochs" in given and name not in given:
            config[name] = DEFAULTS[name]
    check_config(config)
    return config, set(given), resume, eval_only, checkpoint


def canonical_names(config):
    """config with the other names of a dataset or preset (--dataset cifar, a run saved with
    --model vil-seed) replaced by their own: --dataset cifar10, --model vil-1m."""
    for key, aliases in (("dataset", DATASET_ALIASES), ("model", PRESET_ALIASES)):
        if key in config:
            config[key] = aliases.get(config[key], config[key])
    return config


def check_config(config):
    """Refuse a value its flag does not allow (FLAGS) with a UserError that names the flag. A
    setting that config lacks (a run saved before the flag existed) is not checked."""
    for name, flag in FLAG_OF.items():
        if name in config:
            flag.check(name, config[name])


def autocast_dtype(amp, device):
    """The autocast dtype for --amp on this device (None: full precision). auto: bf16 on a GPU
    that supports it and on a CPU with native bf16 matmuls (AVX512-BF16 or AMX), where it trains
    about 2x faster than float32 to the same accuracy (RESULTS.md, "CIFAR-10 within the hour"); float32
    elsewhere."""
    if amp == "auto":
        amp = "bf16" if has_native_bf16(device) else "off"
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device; use --amp bf16 or --amp off on the CPU")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU has no bf16 support; use --amp fp16 or --amp off")
    return AUTOCAST_DTYPES["fp32" if amp == "off" else amp]


MODEL_FLAGS = ("dim", "depth", "patch_size", "pooling", "conv_kind", "mlstm_form", "chunk_size")  # change a preset


def model_name(config, model_config):
    """The preset's name and the model flags that changed it, as the opening line names the model:
    "vil-1m", "vil-1m --dim 32 --depth 2"."""
    preset = {**{field.name: field.default for field in dataclasses.fields(ViLConfig)},
              **PRESETS[PRESET_ALIASES.get(config["model"], config["model"])]}
    unused = settings_without_effect(config, model_config)  # --chunk-size of a parallel form, say
    changed = [option_text(key, getattr(model_config, key)) for key in MODEL_FLAGS
               if getattr(model_config, key) != preset[key] and key not in unused]
    return " ".join([config["model"]] + changed)


def vil_config(config, num_classes, in_chans, img_size):
    """The ViLConfig of a run's config: its preset with the model flags given (None keeps the preset's value) and
    the drop-path rate; model flags that make no model become a UserError."""
    given = {key: config[key] for key in MODEL_FLAGS if config[key] is not None}
    try:
        return preset_config(config["model"], num_classes=num_classes, in_chans=in_chans, img_size=img_size,
                             drop_path=config["drop_path"], **given)
    except ValueError as error:
        raise UserError(f"cannot build the model: {error}")


def model_image_size(config):
    """The model's input (height, width): the dataset's side, --image-size for an image folder, and 28-px
    MNIST-like images padded to --pad-to (the replaced repository's 32 px)."""
    info = DATASETS[config["dataset"]]
    side = config["image_size"] if config["dataset"] == "folder" else info.image_size
    if info.padded:
        side = max(side, config["pad_to"])
    return side, side


def check_model_flags(config):
    """Refuse model flags that make no model for this dataset (a --dim that does not split into heads, a
    --patch-size that does not divide the image) before any data is loaded or downloaded. Returns the
    model's ViLConfig (with a placeholder class count for an image folder)."""
    info = DATASETS[config["dataset"]]
    check_tta_shift(config["tta_shift"], model_image_size(config))
    # an image folder's class count is not known yet, and no other setting depends on it
    return vil_config(config, max(info.num_classes, 1), info.in_chans, model_image_size(config))


def check_tta_shift(shift, img_size):
    """Refuse a --tta-shift that moves the model's (height, width) images wholly out of view: 8 of the 10 views
    would be blank."""
    side = min(img_size)
    if shift >= side:
        raise UserError(f"--tta-shift {shift} moves the {side}-px images out of view; give less than {side} "
                        f"(the CIFAR-10 recipe shifts its 32-px images by 2)")


def settings_without_effect(config, model_config):
    """The settings that change nothing in this run (their help says when they act) -> {name: what it is for}."""
    info = DATASETS[config["dataset"]]
    reasons = dict(
        chunk_size=(model_config.mlstm_form != "chunkwise", "--mlstm-form chunkwise"),
        image_size=(config["dataset"] != "folder", "image folders"),
        pad_to=(not info.padded, "28-px MNIST and Fashion-MNIST"),
        policy_ops=(config["policy"] != "randaugment", "--policy randaugment"),
        policy_magnitude=(config["policy"] == "none", "--policy randaugment or trivialaugment"),
        flip=(info.digits, "datasets other than hand-written digits"),
        tta=(not random_flips(config), "runs that train with random flips"),
        # stage_sizes rounds each side down to whole patches, at least one: one patch a side stays as it is; and a
        # run of one epoch is all last third (third_starts), at full size
        low_res=(all(side <= model_config.patch_size for side in model_config.img_size) or config["epochs"] == 1,
                 "images more than one patch a side, in runs of more than one epoch"),
    )
    return {name: purpose for name, (unused, purpose) in reasons.items() if unused}


def flags_without_effect(config, given, model_config):
    """The flags given on the command line that change nothing in this run, as given, each with what it is for:
    a note saves a user from waiting for a difference that cannot come."""
    return [f"{option_text(name, config[name])} (for {purpose})"
            for name, purpose in settings_without_effect(config, model_config).items() if name in given]


def random_flips(config):
    """Whether training flips images left-right: with --flip, never for hand-written digits."""
    return config["flip"] and not DATASETS[config["dataset"]].digits


def make_augment(config):
    try:
        return Augment(crop_padding=config["crop_padding"], flip=random_flips(config),
                       policy=config["policy"], policy_ops=config["policy_ops"],
                       policy_magnitude=config["policy_magnitude"], erasing_prob=config["erasing"],
                       mixup_alpha=config["mixup"], cutmix_alpha=config["cutmix"])
    except ValueError as error:
        raise UserError(f"bad augmentation flags: {error}")


def load_split(config, train):
    try:
        return load_dataset(config["dataset"], config["data_dir"], train=train,
                            image_size=config["image_size"], classes=config.get("classes"))
    except OSError as error:  # e.g. --data-dir names a file, or a folder that cannot be created
        raise data_folder_error(config["data_dir"], error)


def data_folder_error(data_dir, error):
    """The UserError of an OSError met in the data folder `data_dir`."""
    if os.path.isfile(data_dir):
        return UserError(f"cannot use the data folder {data_dir} (it is a file, not a folder); point --data-dir "
                         f"at a folder")
    where = f": {error.filename}" if error.filename else ""
    advice = "make it readable" if isinstance(error, PermissionError) else "fix that"
    return UserError(f"cannot use the data folder {data_dir} ({error.strerror or error}{where}); {advice}, or point "
                     f"--data-dir at another copy of the data")


def padding_for(images, img_size):
    """DeviceLoader's pad_to for images smaller than the model's input (None: no padding)."""
    return img_size[0] if tuple(images.shape[-2:]) != tuple(img_size) else None


def mirror_tta(config):
    """Whether evaluation averages the logits of each image and its mirror image: with --tta, for
    models trained with random flips."""
    return bool(config.get("tta", False) and random_flips(config))


def shifted(x, dy, dx, fill):
    """x (B, C, H, W) with its content moved dy pixels down and dx right (negative: up, left), the uncovered border
    set to fill (a number, or (1, C, 1, 1) per channel): a translation of the training crops (--crop-padding)."""
    height, width = x.shape[-2:]
    rows, cols = height - abs(dy), width - abs(dx)  # of the image that stay in view
    out = torch.empty_like(x).copy_(torch.as_tensor(fill, dtype=x.dtype, device=x.device).expand_as(x))
    if rows > 0 and cols > 0:
        out[..., max(dy, 0):max(dy, 0) + rows, max(dx, 0):max(dx, 0) + cols] = \
            x[..., max(-dy, 0):max(-dy, 0) + rows, max(-dx, 0):max(-dx, 0) + cols]
    return out


def predict(model, x, tta, shift=0, fill=0.0):
    """The model's logits for x; with tta, the mean of the logits of x and of x mirrored left-right; with shift,
    the mean over x and x shifted by `shift` pixels left, right, up and down (fill: the border, black in the
    normalised images), each mirrored too under tta."""
    views = [x]
    if shift:
        views += [shifted(x, dy, dx, fill) for dy, dx in ((0, -shift), (0, shift), (-shift, 0), (shift, 0))]
    if tta:
        views += [view.flip(-1) for view in views]
    if len(views) == 1:
        return model(x)
    return sum(model(view).float() for view in views) / len(views)


def views_text(tta, shift):
    """How many views of each image predict averages, for the closing lines: ", mean of 10 views" ("" for one)."""
    views = (1 + 4 * bool(shift)) * (1 + bool(tta))
    return f", mean of {views} views" if views > 1 else ""


EVAL_BATCH_SIZE = 500  # images per evaluation batch and process


@torch.no_grad()
def evaluate(model, images, labels, config, device, dtype, rank, world_size, pad_to, tta=False, shift=0,
             progress=None):
    """Mean cross-entropy and accuracy of `model` on (images, labels), each process taking every
    world_size-th image; with tta and shift, of the mean logits of the views of predict.
    progress: the split's name ("test") for progress lines on stderr from the first process (ProgressBar: a line
    at every tenth of the batches in a log file), for an evaluation long enough to need them; None: silent.
    Returns (loss, accuracy)."""
    model.eval()
    loader = DeviceLoader(images, labels, EVAL_BATCH_SIZE, num_classes=config["num_classes"], mean=config["mean"],
                          std=config["std"], train=False, device=device, rank=rank, world_size=world_size,
                          pad_to=pad_to)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    bar = ProgressBar(len(loader), f"{progress}{views_text(tta, shift)}, batch", rank == 0 and progress is not None)
    seen = 0
    for batch, (x, y) in enumerate(loader.epoch(0), start=1):
        with autocast(device, dtype):
            logits = predict(model, x, tta, shift, fill=loader.shift)  # black: 0 before normalising
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(dim=-1) == y).sum()
        seen += len(y)
        if bar.enabled:  # this process's share so far; the result below is all processes'
            bar.update(batch, loss_sum.item() / seen, correct.item() / seen,
                       seen * world_size / max(time.perf_counter() - bar.start, 1e-9))
    bar.close()
    loss_sum, correct, count = all_reduce_sum([loss_sum.item(), correct.item(), loader.shard_size], device)
    model.train()
    return loss_sum / count, correct / count


RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "best.pt", "final.json")


class RunFolder:
    """A run's folder and what the run has saved in it, from the start of the run to its end.

    Process 0 holds a lock on <out_dir>/.lock (fcntl.flock, released when the run ends, however it
    ends), so that a second run into the same folder stops at once instead of mixing its files in,
    and writes every run file through write(). `saved` says which checkpoint.pt is on disk, for the
    message of a run that stops (main prints it)."""

    def __init__(self, stop):
        self.stop = stop  # the run's StopRequests: writes hold back Ctrl-C and SIGTERM
        self.out_dir = None
        self.saved = None  # the newest checkpoint.pt: "epoch 3", or "epoch 4, step 20 of 196"
        self.training = False  # whether the training loop has begun
        self._lock = None  # the open .lock file while this process holds it
        self._named = False  # whether claim() named and created the folder
        self._made_runs = False  # whether it also created runs/, the folder of the named folders

    def claim(self, out_dir, default_name, resume):
        """Lock out_dir, or with out_dir None a new folder runs/<default_name> (-2, -3, ... added
        when that name is taken: two runs started in the same second). A new run refuses a folder
        that holds run files."""
        if out_dir is None:
            self._made_runs = not os.path.isdir("runs")
            out_dir, self._named = new_folder("runs", default_name), True
        elif resume and not os.path.isdir(out_dir):
            missing = "it is a file, not a folder" if os.path.exists(out_dir) else "the folder does not exist"
            raise UserError(f"no run in {out_dir}: {missing} (--resume continues the run in --out-dir from its "
                            f"checkpoint.pt)")
        try:
            ensure_writable_dir(out_dir, RUN_FILES + ("curves.png",))
        except OSError as error:
            reason = "it is a file, not a folder" if os.path.isfile(out_dir) else error.strerror or error
            advice = "make it writable to continue the run" if resume else "choose another with --out-dir"
            raise UserError(f"cannot write to the run folder {out_dir} ({reason}); {advice}")
        self.out_dir = out_dir
        try:
            lock = open(os.path.join(out_dir, ".lock"), "a+")
        except OSError as error:  # a folder of that name, or another user's lock file
            raise UserError(f"cannot open the run folder's lock file {os.path.join(out_dir, '.lock')} "
                            f"({error.strerror or error}); remove it if no run is using {out_dir}")
        try:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            lock.close()
            raise UserError(f"another run is using {out_dir} (pid {holder}); wait for it to end, or "
                            f"choose another --out-dir")
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self._lock = lock
        found = [name for name in RUN_FILES if os.path.exists(os.path.join(out_dir, name))]
        if found and not resume:
            advice = "continue it with --resume or choose" if "checkpoint.pt" in found else "choose"
            raise UserError(f"{out_dir} already holds a run ({', '.join(found)}); {advice} another --out-dir")

    def release(self):
        if self._lock is None:
            return
        # a folder this run named and saved nothing in goes again, so that failed starts leave no
        # empty folders in runs/, nor runs/ itself where this run made it and it is empty; any other lock
        # file stays (removed, two runs could lock two files of one name)
        if self._named and os.listdir(self.out_dir) == [".lock"]:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(self.out_dir, ".lock"))
                os.rmdir(self.out_dir)
                if self._made_runs:
                    os.rmdir(os.path.dirname(self.out_dir))  # fails, and stays, where another run's folder is
        self._lock.close()  # which releases the lock
        self._lock = None

    def write(self, name, write_fn):
        """Write the run file `name` with write_fn(path), an atomic writer (save_checkpoint, ...).
        Ctrl-C and SIGTERM wait until it is written; an OSError (a full disk, a folder made
        read-only) stops the run with a message that says what is left."""
        path = os.path.join(self.out_dir, name)
        try:
            with self.stop.deferred():
                write_fn(path)
        except OSError as error:
            raise UserError(f"cannot write {path} ({error.strerror or error}); {self.outcome('intact')}")

    def outcome(self, state, resumable=True):
        """What the run leaves behind: its last checkpoint, in `state`, and how to continue from
        it; or nothing."""
        if self.saved is None:
            return "nothing was saved"
        text = f"the last checkpoint {os.path.join(self.out_dir, 'checkpoint.pt')} ({self.saved}) is {state}"
        if resumable:  # quoted: a folder name with a space or a quote in it pastes as it is
            text += f"; continue with: python training.py --resume --out-dir {shlex.quote(self.out_dir)}"
        return text

    def interrupted(self):
        """The message of a run stopped by Ctrl-C or SIGTERM."""
        when = " before training started" if self.out_dir is not None and not self.training else ""
        return f"interrupted{when}; {self.outcome('saved')}"


def new_folder(parent, name):
    """Create parent/name, or parent/name-2, -3, ... where that exists; returns its path. makedirs
    either creates the last folder or fails, so two runs never get the same one."""
    path = parent
    try:
        for number in itertools.count(1):
            path = os.path.join(parent, name if number == 1 else f"{name}-{number}")
            try:
                # parent too where it is missing (a failed start of another run removes a runs/ it made)
                os.makedirs(path)
                return path
            except FileExistsError:
                continue
    except OSError as error:
        raise UserError(f"cannot create the run folder {path} ({error.strerror}); choose one with --out-dir")


def checkpoint_point(epoch, step, steps_per_epoch=None):
    """Where a checkpoint of (epoch, step) stands, as its messages name it: epoch is the number of
    whole epochs done, step the steps done of the next one."""
    if not step:
        return f"epoch {epoch}"
    return f"epoch {epoch + 1}, step {step}" + (f" of {steps_per_epoch}" if steps_per_epoch else "")


def saved_config(checkpoint, path, needed, given=(), optional=()):
    """The configuration saved in a checkpoint; a UserError naming the file when it lacks a key
    of `needed` not `given` (a checkpoint of another version of training.py, or an edited one), or holds a value
    of `needed` or, where saved, of `optional` (those the command line may replace) that its flag refuses
    (the settings `given` on the command line, which replace the saved ones, aside)."""
    config = checkpoint["config"]
    missing = sorted(key for key in needed if key not in config and key not in given) if isinstance(config, dict) \
        else ["all"]
    if missing:
        given_instead = [flag_names(key) for key in missing if key in optional]  # what the command line could give
        raise UserError(f"the configuration saved in {path} lacks {', '.join(missing)} (written by another "
                        f"version of training.py?); this version cannot use that checkpoint"
                        f"{' without ' + ', '.join(given_instead) if given_instead else ''}")
    config = canonical_names(dict(config))
    replace = ""  # how to replace the value refused, where the command line may
    try:
        check_config({key: config[key] for key in needed if key not in given and key not in optional})
        check_saved_dataset(config)
        for key in optional:
            if key in config and key not in given:
                replace = f"; give {flag_names(key)} to replace it"
                check_config({key: config[key]})
    except UserError as error:
        raise UserError(f"the configuration saved in {path} is not one this version can use (edited by hand?): "
                        f"{error}{replace}")
    return config


@contextlib.contextmanager
def saved_value(key, from_checkpoint):
    """A UserError about the setting `key` inside says, where its value was the checkpoint's, that it was and which
    flag replaces it (a run's saved --device or --amp on a machine that cannot run them)."""
    try:
        yield
    except UserError as error:
        if not from_checkpoint:
            raise
        raise UserError(f"{error} (the value saved with the run; give {flag_names(key)} to replace it)") from None


def check_saved_dataset(config):
    """Refuse a saved configuration whose dataset is not the one its model, classes and normalisation were
    made for (a dataset changed by hand: the model would meet images of another shape)."""
    info = DATASETS.get(config.get("dataset"))
    if info is None:  # not a dataset of this version: check_config names it
        return
    model = config.get("model_config") if isinstance(config.get("model_config"), dict) else {}
    found = [("model_config in_chans", model.get("in_chans"), info.in_chans)]
    found += [(f"{key} (entries)", len(config[key]) if isinstance(config.get(key), (list, tuple)) else None,
               info.in_chans) for key in ("mean", "std")]
    if info.num_classes:  # an image folder's classes are checked against its folders (check_classes)
        found += [("num_classes", config.get("num_classes"), info.num_classes),
                  ("model_config num_classes", model.get("num_classes"), info.num_classes)]
    wrong = [f"{name} {value}" for name, value, expected in found if value is not None and value != expected]
    if wrong:
        raise UserError(f"its dataset {config['dataset']} has {info.in_chans} channel(s)"
                        f"{f' and {info.num_classes} classes' if info.num_classes else ''}, but it has "
                        f"{', '.join(wrong)}")
    classes = config.get("classes")  # an image folder's class names, which its labels index: each a folder of
    if classes is not None:          # <root>/test/ (not a path that leads elsewhere, nor a hidden one)
        names = classes if isinstance(classes, list) else []
        plain = all(isinstance(name, str) and name and name == os.path.basename(name) and not name.startswith(".")
                    for name in names)
        if not (names and plain and len(set(names)) == len(names) == model.get("num_classes", len(names))):
            raise UserError(f"its classes {str(classes)[:80]} are not distinct class-folder names, one for each of "
                            f"its model's {model.get('num_classes', len(names))} classes")


# what a checkpoint needs beyond load_checkpoint's keys to continue the run
RESUME_KEYS = ("optimizer", "scaler", "ema", "step", "partial")


def resolve_run(config, given, resume):
    """The run's configuration and, with --resume, its checkpoint: a resumed run keeps its saved
    configuration except RESUME_OVERRIDABLE. Returns (config, checkpoint or None)."""
    if not resume:
        return config, None
    path = os.path.join(config["out_dir"], "checkpoint.pt")
    if os.path.isdir(path) or (os.path.islink(path) and not os.path.exists(path)):
        what = "a folder" if os.path.isdir(path) else f"a broken link (to {os.readlink(path)})"
        raise UserError(f"{path} is {what}, not a checkpoint, so the run cannot continue from it; put the run's "
                        f"checkpoint file there, or start a new run in another --out-dir")
    if not os.path.exists(path):
        raise UserError(f"nothing to resume in {config['out_dir']}: it has no checkpoint.pt (a run saves one "
                        f"after each epoch, and when Ctrl-C stops its training); start a new run without --resume")
    checkpoint = load_checkpoint(path)
    missing = [key for key in RESUME_KEYS if key not in checkpoint]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}, so the run cannot continue from it (written by "
                        f"another program, or by another version of training.py?); evaluate it with --eval-only "
                        f"--checkpoint {shlex.quote(path)}, or start a new run in another --out-dir")
    # an overridable setting may be missing: the command line (or the default) gives it; a setting newer than
    # the run is missing too, and takes the value that trains as the run did (where saved, it is checked)
    saved_keys = checkpoint["config"] if isinstance(checkpoint["config"], dict) else {}
    newer_missing = set(NEWER_SETTINGS) - set(saved_keys)
    # the folder is the command line's: the saved out_dir is not read
    saved = saved_config(checkpoint, path, set(DEFAULTS) - set(RESUME_OVERRIDABLE) - newer_missing - {"out_dir"},
                         [key for key in RESUME_OVERRIDABLE if key in given], optional=RESUME_OVERRIDABLE)
    for key, value in NEWER_SETTINGS.items():
        saved.setdefault(key, value)
    third = saved.get("low_res_third", 0)  # set by train, not by a flag
    if isinstance(third, bool) or not isinstance(third, int) or not 0 <= third <= 2:
        raise UserError(f"the configuration saved in {path} is not one this version can use (edited by hand?): "
                        f"low_res_third {third!r} is not a third of the run (0, 1 or 2)")
    trained = checkpoint["epoch"] + (checkpoint["step"] > 0)  # epochs begun
    if saved["low_res"] < 1 and "low_res_third" not in saved and trained:  # saved before the third reached was kept
        saved["low_res_third"] = run_third(trained - 1, saved["epochs"])  # of its last epoch, by its own epochs
    ignored = sorted(key for key in given if key not in RESUME_OVERRIDABLE + ("out_dir",)
                     and saved.get(key) != config[key])
    if ignored:
        print(f"note: --resume uses the run's saved configuration; ignoring "
              f"{', '.join(flag_name(key) for key in ignored)}")
    for key in RESUME_OVERRIDABLE:
        if key in given or key not in saved:
            saved[key] = config[key]
    if "epochs" in given and saved.get("time_budget_fit"):
        saved["time_budget_fit"]["refit_pending"] = False  # the epochs given stand
    if saved["epochs"] < trained:
        done = (counted(checkpoint["epoch"], "epoch") if trained == checkpoint["epoch"] else
                f"{counted(checkpoint['epoch'], 'epoch')} and {counted(checkpoint['step'], 'step')} of epoch {trained}")
        raise UserError(f"the run in {config['out_dir']} has trained {done} already; --epochs "
                        f"{saved['epochs']} would end before that")
    saved["out_dir"] = config["out_dir"]
    return saved, checkpoint


def restore(checkpoint, path, model, optimizer, scaler, ema, device):
    """Load a checkpoint into the run's model, optimiser, gradient scaler and EMA. Returns
    (epoch, step, partial sums) of the point it was saved at."""
    try:
        model.load_state_dict(checkpoint["model"])
        # the fused AdamW kernel where this device has one, whichever device saved the checkpoint.
        # load_state_dict takes 'fused' from the file and places each 'step' counter by it: a CPU
        # checkpoint's counters would stay on the CPU under a fused CUDA kernel (and torch before
        # 2.4 has no fused AdamW on the CPU), so the file's groups are set before loading
        state = checkpoint["optimizer"]
        groups = [{**group, "fused": device.type == "cuda"} for group in state["param_groups"]]
        optimizer.load_state_dict({**state, "param_groups": groups})
        # a scaler state only where both the run's and the saved scaler are on (--amp fp16 before and
        # now); a run resumed under another --amp starts a fresh one or none
        if scaler.is_enabled() and checkpoint["scaler"]:
            scaler.load_state_dict(checkpoint["scaler"])
        if ema is not None:
            ema.load_state_dict(checkpoint["ema"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise UserError(f"{path} does not fit the run's model ({type(error).__name__}: {error_text(error)})")
    return checkpoint["epoch"], checkpoint["step"], checkpoint["partial"]


def read_metrics(path, start_epoch):
    """The records of metrics.jsonl up to start_epoch, for a resumed run (it writes the later
    ones again). A line that is not a record stops the run with a message naming it."""
    if not os.path.exists(path):
        return []
    history = []
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as error:
        raise UserError(f"cannot read {path} ({error.strerror})")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not (isinstance(record, dict) and isinstance(record.get("epoch"), int)
                and all(isinstance(record.get(key), (int, float)) for key in ("seconds", "images_per_second"))):
            raise UserError(f"{path}, line {number}, is not a metrics record: {line[:80]!r}; mend or delete "
                            f"that line (or the file: the curves then begin at the resumed epoch)")
        history.append(record)
    return [record for record in history if record["epoch"] <= start_epoch]


def dataset_classes(config):
    """The class names of an image-folder dataset, its labels' meaning; None for the others."""
    if config["dataset"] != "folder":
        return None
    try:
        return folder_classes(config["data_dir"])
    except OSError as error:
        raise data_folder_error(config["data_dir"], error)


def check_classes(saved, classes, path):
    """Refuse an image folder whose classes are not those the model of `path` (whose saved
    configuration is `saved`) was trained on: its labels would mean other classes."""
    if classes is None:
        return
    trained = saved.get("classes")
    if trained is None:  # a run saved before the names were kept: only their number is known
        if saved.get("num_classes") in (None, len(classes)):
            return
        difference = f"{len(classes)} class folders, where it was trained on {saved['num_classes']} classes"
    elif classes == trained:
        return
    else:
        new, gone = sorted(set(classes) - set(trained)), sorted(set(trained) - set(classes))
        difference = "; ".join(f"{what}: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}"
                               for what, names in (("new", new), ("missing", gone)) if names)
    raise UserError(f"the class folders of {os.path.join(saved['data_dir'], 'train')} are not those "
                    f"{path} was trained on ({difference}); point --data-dir at the data of that run")


def load_data(config, rank, world_size, device):
    """Both splits of the dataset. Process 0 loads (and downloads) first, the others after it, so
    that several processes never download into one folder at once."""
    failed = None
    if rank == 0:
        try:
            splits = load_split(config, train=True), load_split(config, train=False)
        except UserError as error:
            failed = error
    if world_size > 1:
        flag = torch.tensor([float(failed is not None)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and rank != 0:
            raise UserError("process 0 could not load the data (its message says why)")
    if failed is not None:
        raise failed
    if rank != 0:
        splits = load_split(config, train=True), load_split(config, train=False)
    return splits


def available_memory(device):
    """Bytes free for new tensors on device: the GPU's free memory, or the RAM the kernel reports
    available (/proc/meminfo, else sysconf). None where neither is known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def parallel_form_bytes(model_config, batch_size, training, device_type="cpu", dtype=None, compiled=False):
    """About the memory the parallel mLSTM form's S x S matrices take at once for a batch: about three
    float32 ones exist at a time, and in training every block keeps, for its backward, its scores in the
    matmuls' dtype where the form factors its decay matrix (mlstm.factors_decay_matrix: on a CPU, not
    compiled, not float16), else its scores and decay matrix in float32. dtype: the autocast dtype (None:
    float32). The least the S x S matrices need (the rows whose gates take the segment sums keep two more
    float32 ones each), not all of a step's memory; 0 for the chunkwise and recurrent forms."""
    if model_config.mlstm_form != "parallel":
        return 0
    rows, cols = model_config.patch_grid
    entries = batch_size * model_config.num_heads * (rows * cols) ** 2  # of one S x S matrix
    transient = 3 * entries * 4
    if not training:
        return transient
    matmul_dtype = dtype or torch.float32
    kept = (entries * matmul_dtype.itemsize if factors_decay_matrix(device_type, (matmul_dtype,), compiled)
            else 2 * entries * 4)
    return transient + model_config.depth * kept


def check_parallel_form_memory(model_config, device, train_batch_size=None, dtype=None, compiled=False):
    """Refuse a model whose parallel form cannot fit: its S x S matrices alone, in training at
    train_batch_size images per process (None: evaluation only) under autocast dtype (None: float32), or
    in evaluation, need more memory than the device has free. Out of memory on the first step says less."""
    evaluation = parallel_form_bytes(model_config, EVAL_BATCH_SIZE, training=False)
    training = (parallel_form_bytes(model_config, train_batch_size, True, device.type, dtype, compiled)
                if train_batch_size else 0)
    free = available_memory(device)
    if free is None or max(evaluation, training) <= free:
        return
    rows, cols = model_config.patch_grid
    raise UserError(f"the parallel mLSTM form would need about {max(evaluation, training) / 2**30:.3g} GiB "
                    f"for its S x S matrices in {'training' if training > evaluation else 'evaluation'} "
                    f"(S = {rows * cols} patches of {model_config.patch_size} px, {model_config.num_heads} "
                    f"heads, {model_config.depth} blocks), more than the {free / 2**30:.3g} GiB free on "
                    f"{device}; use --mlstm-form chunkwise (memory linear in S) or a larger --patch-size"
                    + (", or a smaller --batch-size" if training > evaluation else ""))


def finite_weights(model, ema):
    """Whether every weight of the model and of its EMA is finite (one device sync)."""
    tensors = [value for value in model.state_dict().values() if value.is_floating_point()]
    if ema is not None:
        tensors += [value for value in ema.shadow.values() if value.is_floating_point()]
    return bool(torch.stack([torch.isfinite(tensor).all() for tensor in tensors]).all())


class CompileFallback:
    """torch.compile(model), or the model itself once compiling has failed. Compilation happens at
    the first call (and at a new input shape: one graph per image size of --low-res), and fails there on a
    machine without a working C compiler or with a GPU that Triton does not support, or at torch.compile itself
    where torch cannot compile at all (torch 2.3 on Python 3.12: "Dynamo is not supported"); --compile asks for
    speed only, so the run goes on uncompiled after a note rather than losing the data loading it has done."""

    def __init__(self, model, verbose):
        self.model, self.compiled, self.verbose = model, None, verbose
        try:
            # dynamic=False: a static graph per image size, not one graph for any size after the second
            self.compiled = torch.compile(model, dynamic=False)
        except RuntimeError as error:
            self.give_up(error)

    def give_up(self, error):
        if self.verbose:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            print(f"note: torch.compile failed ({reason}); training without it", file=sys.stderr)
        self.compiled = None

    def __call__(self, x):
        if self.compiled is not None:
            try:
                return self.compiled(x)
            except torch._dynamo.exc.TorchDynamoException as error:  # the compiler's failures, not the model's
                self.give_up(error)
        return self.model(x)


@dataclasses.dataclass
class Run:
    """A training run as setup_run builds it: what the loop and its bookkeeping read and update."""
    config: dict
    folder: RunFolder  # the locked run folder; its `stop` holds Ctrl-C and SIGTERM requests
    device: torch.device
    dtype: torch.dtype | None  # of autocast; None: full precision
    rank: int
    world_size: int
    loader: DeviceLoader  # this process's share of the training split
    train_size: int  # images of the training split, over all processes
    source_size: int  # the training images it was drawn from (before --val-size and --limit-train)
    val: tuple | None  # (images, labels) held out by --val-size, or None
    test: tuple  # (images, labels)
    pad_to: int | None
    tta: bool  # evaluation averages each image's logits with its mirror image's
    raw_model: VisionLSTM  # the weights that are saved
    model: object  # what a step calls: raw_model, in DistributedDataParallel and/or compiled
    eval_model: VisionLSTM  # raw_model, or a copy that evaluation loads the EMA weights into
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: WeightEMA | None
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    resumed: bool
    start_epoch: int  # the first epoch to train ...
    start_step: int  # ... from this step of it ...
    partial: dict | None  # ... with its meter's state at that step (EpochMeter.to_partial)
    history: list  # metrics.jsonl's records so far (process 0)
    best_val_acc: float = -1
    train_seconds: float = 0.0

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def log_every(self):
        # reading the running sums makes a GPU wait for its queue, so it is done every 20 steps there
        return 20 if self.device.type == "cuda" else 1

    def lr_at(self, global_step):
        return learning_rate(global_step, self.total_steps, self.warmup_steps, self.config["lr"])


def load_splits(config, rank, world_size, device, checkpoint_path):
    """The run's data, whole on the training device: (train images, train labels, validation split or
    None, test split, number of classes, the number of training images the split was drawn from, before
    --val-size and --limit-train). Records an image folder's class names in config, checked
    against a resumed run's (checkpoint_path None: a new run)."""
    info = DATASETS[config["dataset"]]
    classes = dataset_classes(config)
    if checkpoint_path is not None:
        check_classes(config, classes, checkpoint_path)
    if classes is not None:
        if len(classes) < 2:
            raise UserError(f"{os.path.join(config['data_dir'], 'train')} has one class folder "
                            f"({classes[0]}); a classifier needs at least 2 classes")
        config["classes"] = classes
    (train_images, train_labels), test = load_data(config, rank, world_size, device)
    num_classes = len(classes) if classes is not None else info.num_classes
    source_size, val = len(train_labels), None
    if config["val_size"]:
        if config["val_size"] >= len(train_labels):
            raise UserError(f"--val-size {config['val_size']} leaves no training images "
                            f"(the training split has {len(train_labels)})")
        train_images, train_labels, val_images, val_labels = split_train_val(
            train_images, train_labels, config["val_size"], seed=config["seed"])
        val = val_images, val_labels
    if 0 < config["limit_train"] < len(train_labels):
        # a seeded random subset (in the split's order), not the first N: a folder's images come
        # sorted by class, so its first N could all be of one class
        keep = seeded_choice(len(train_labels), config["limit_train"], config["seed"])[0].to(train_labels.device)
        train_images, train_labels = train_images[keep], train_labels[keep]
    if len(train_labels) < config["batch_size"]:
        raise UserError(f"--batch-size {config['batch_size']} is larger than the "
                        f"{len(train_labels)} training images")
    return train_images, train_labels, val, test, num_classes, source_size


def setup_run(config, given, resume, folder):
    """Claim the run folder, resolve the configuration (a resumed run's own, with its checkpoint),
    join the process group, load the data and build the model, optimiser, gradient scaler, EMA and
    schedule, restored from the checkpoint on --resume. Returns the Run."""
    if resume and not config["out_dir"]:
        raise UserError("--resume needs --out-dir: the run folder that holds checkpoint.pt")
    if not resume:  # before a folder is made for it (a resumed run's settings are its checkpoint's)
        check_model_flags(config)
    if int(os.environ.get("RANK", "0")) == 0:
        # the lock comes before anything is read from the folder, so before the process group
        # (a resumed run's device is in its checkpoint); process 0, which alone writes the
        # folder, holds it and names a new one
        name = f"{config['dataset']}-{config['model']}-{time.strftime('%Y%m%d-%H%M%S')}"
        folder.claim(config["out_dir"], name, resume)
        config["out_dir"] = folder.out_dir
    config, checkpoint = resolve_run(config, given, resume)
    if checkpoint is not None:
        folder.saved = checkpoint_point(checkpoint["epoch"], checkpoint["step"], checkpoint.get("steps_per_epoch"))
    check_config(config)  # a resumed run's settings from its command line, and the saved ones saved_config left
    with saved_value("device", resume and "device" not in given):  # a run moved to a machine without its device
        device_name = resolve_device(config["device"])
    rank, world_size, device = setup_distributed(device_name)
    if world_size > 1:  # the folder process 0 holds, which it may have named
        shared = [folder.out_dir]
        dist.broadcast_object_list(shared, src=0)
        folder.out_dir = config["out_dir"] = shared[0]
    with saved_value("amp", resume and "amp" not in given):
        dtype = autocast_dtype(config["amp"], device)
    allow_tf32(device)
    if config["batch_size"] % world_size:
        raise UserError(f"--batch-size {config['batch_size']} must divide evenly over "
                        f"{world_size} processes")
    checkpoint_path = os.path.join(config["out_dir"], "checkpoint.pt")

    # data: the whole split lives on the training device
    info = DATASETS[config["dataset"]]
    train_images, train_labels, val, test, num_classes, source_size = load_splits(
        config, rank, world_size, device, checkpoint_path if checkpoint is not None else None)
    height, width = model_image_size(config)
    pad_to = padding_for(train_images, (height, width))
    if "mean" not in config:  # an image folder is normalised by its own statistics
        config["mean"], config["std"] = (channel_mean_std(train_images) if config["dataset"] == "folder"
                                         else (info.mean, info.std))
    loader = DeviceLoader(train_images, train_labels, config["batch_size"] // world_size,
                          num_classes=num_classes, mean=config["mean"], std=config["std"], train=True,
                          augment=make_augment(config), seed=config["seed"],
                          device=device, rank=rank, world_size=world_size, pad_to=pad_to)

    # model, optimiser, schedule; the same initial weights on every process
    torch.manual_seed(config["seed"])
    raw_model = VisionLSTM(vil_config(config, num_classes, train_images.shape[1], (height, width))).to(device)
    check_parallel_form_memory(raw_model.config, device, config["batch_size"] // world_size, dtype,
                               config["compile"])
    check_tta_shift(config["tta_shift"], raw_model.config.img_size)  # a resume may change it
    config["model_config"] = dataclasses.asdict(raw_model.config)
    config["num_classes"] = num_classes
    optimizer, scaler, ema = training_state(raw_model, config, device, dtype)
    steps_per_epoch = len(loader)
    total_steps, warmup_steps = schedule_steps(config, steps_per_epoch)

    start_epoch, start_step, partial, saved_record = 0, 0, None, None
    if checkpoint is not None:
        start_epoch, start_step, partial = restore(checkpoint, checkpoint_path, raw_model, optimizer, scaler,
                                                   ema, device)
        saved_record = checkpoint.get("record")  # of start_epoch (absent in checkpoints before 2026-12-02)
        check_training_split(checkpoint, checkpoint_path, len(train_labels), source_size, steps_per_epoch)
        del checkpoint

    model = raw_model
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config["compile"]:
        model = CompileFallback(model, verbose=rank == 0)
    eval_model = copy.deepcopy(raw_model) if ema is not None else raw_model

    history = []
    if rank == 0 and resume:
        history = read_metrics(os.path.join(config["out_dir"], "metrics.jsonl"), start_epoch)
        if saved_record is not None and saved_record["epoch"] > max((line["epoch"] for line in history),
                                                                    default=0):
            history.append(saved_record)
    return Run(config=config, folder=folder, device=device, dtype=dtype, rank=rank, world_size=world_size,
               loader=loader, train_size=len(train_labels), source_size=source_size, val=val, test=test,
               pad_to=pad_to, tta=mirror_tta(config), raw_model=raw_model, model=model, eval_model=eval_model,
               optimizer=optimizer, scaler=scaler, ema=ema, steps_per_epoch=steps_per_epoch,
               total_steps=total_steps, warmup_steps=warmup_steps, resumed=resume, start_epoch=start_epoch,
               start_step=start_step, partial=partial, history=history,
               best_val_acc=max((record.get("val_acc", -1) for record in history), default=-1),
               train_seconds=sum(record["seconds"] for record in history))


def check_training_split(checkpoint, path, train_size, source_size, steps_per_epoch):
    """A resumed run trains on the split it was saved with: a UserError where the training split has another
    number of images (an image folder that gained or lost some), whose batches would not continue the run's
    order, nor would its schedule and time budget count the same steps; or where a split of the same size is
    drawn (--val-size, --limit-train) from another number of images, and so holds other images."""
    saved, step = checkpoint.get("train_size"), checkpoint["step"]
    point = checkpoint_point(checkpoint["epoch"], step, checkpoint.get("steps_per_epoch"))
    saved_source = checkpoint.get("source_size")  # absent in checkpoints before 2026-12-04
    if saved == train_size and saved_source not in (None, source_size):
        raise UserError(f"{path} was saved at {point} of a run whose {saved} training images were drawn from "
                        f"{saved_source}, but there are {source_size} to draw from now, so the run's images would "
                        f"not be the same: point --data-dir at the data it trained on, or start a new run")
    if saved is None:  # a checkpoint from before 2026-12-04: only a stop past the new epoch's end is known wrong
        changed = 0 < steps_per_epoch <= step
    else:
        changed = saved != train_size
    if changed:
        was = f" on {saved} images" if saved is not None else ""
        raise UserError(f"{path} was saved at {point} of a run{was}, but the training split now has {train_size} "
                        f"images, {counted(steps_per_epoch, 'step')} an epoch (an image folder that gained or lost "
                        f"images, or has some in subfolders of its class folders, read since 2026-12-04): the run "
                        f"cannot go on as it trained; point --data-dir at the data it trained on, or start a new run")


def training_state(model, config, device, dtype):
    """A fresh (AdamW optimiser, gradient scaler, EMA or None) for model: the run's, or the time budget's
    throwaway copy's."""
    optimizer = torch.optim.AdamW(model.param_groups(config["weight_decay"]), lr=config["lr"],
                                  betas=(0.9, 0.999), fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ema = WeightEMA(model, config["ema"]) if config["ema"] else None
    return optimizer, scaler, ema


def schedule_steps(config, steps_per_epoch):
    """(total steps, warm-up steps) of the learning-rate schedule. After the time budget's first refit the
    warm-up never grows (time_budget_fit["warmup_steps"]): a later refit that adds epochs lengthens the
    cosine, not a warm-up that may have ended."""
    total_steps = config["epochs"] * steps_per_epoch
    warmup_steps = int(min(config["warmup_epochs"] * steps_per_epoch, 0.2 * total_steps))
    fixed = (config.get("time_budget_fit") or {}).get("warmup_steps")
    return total_steps, warmup_steps if fixed is None else min(fixed, warmup_steps)


def stage_sizes(config):
    """--low-res: the (height, width) of the training images in the three thirds of the run's epochs: scaled by
    --low-res, by halfway between it and 1, and full size (config["model_config"]["img_size"]); each side
    rounded down to a multiple of the patch size, at least one patch."""
    model_config = config["model_config"]
    patch, low = model_config["patch_size"], config["low_res"]
    return [tuple(max(patch, math.floor(side * scale + 1e-6) // patch * patch) for side in model_config["img_size"])
            for scale in (low, (low + 1) / 2, 1.0)]


def third_starts(epochs):
    """The first epoch (from 0) of each third of a run of `epochs`: floor(k epochs / 3), so that the last third is
    never empty (a run of one epoch is all last third, of two half second, half last)."""
    return [k * epochs // 3 for k in range(3)]


def run_third(epoch, epochs):
    """Which third (0, 1, 2) of a run of `epochs` holds `epoch` (from 0)."""
    return max(k for k, start in enumerate(third_starts(epochs)) if start <= epoch)


def train_stage(config, epoch):
    """The third of the run (0, 1, 2) whose size of stage_sizes `epoch` (from 0) trains at: its run_third, or the
    latest third an epoch trained at so far (config["low_res_third"], which train sets at the start of each epoch
    of --low-res), whichever is later. So no epoch trains smaller than the one before it, where the thirds move
    under a run already in a later one (a resume given more --epochs, a refit of the time budget that adds some)."""
    return max(run_third(epoch, config["epochs"]), config.get("low_res_third", 0))


def train_image_size(config, epoch):
    """(height, width) of the training images in `epoch` (from 0): stage_sizes of its train_stage."""
    return stage_sizes(config)[train_stage(config, epoch)]


def resize_images(x, size):
    """A batch (B, C, H, W) resized to size (height, width), antialiased bilinear (at half size a triangle filter
    over 4 pixels a side); the batch itself at its own size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


# --time-budget's estimate: untimed steps (caches and the allocator warm up), then timed ones
BUDGET_WARMUP_STEPS, BUDGET_TIMED_STEPS = 3, 10
# the recipe's --low-res is turned off where every epoch asked for fits this share of the budget at full size: the
# margin keeps it where a machine that slows down would need the epochs it buys (the full-size epochs of the 87.31%
# run of README.md's results table took 195-212 s, up to 1.38 times the 153 s of their timed steps)
FULL_SIZE_SHARE = 0.7


def fit_to_time_budget(run, low_res_given=False):
    """--time-budget on a new run: cut config["epochs"] (and the schedule) to the most epochs, at least
    one, whose training steps fit the budget on this machine, from step_seconds' estimate of a step (of each
    image size under --low-res). The estimate and the epochs asked for are recorded in config (config.json);
    refit_to_time_budget fits them again after the first epoch and after each later one of the run's first half.
    Where every epoch asked for fits FULL_SIZE_SHARE of the budget at full size, the recipe's --low-res (not one
    given: low_res_given) is turned off: it serves the budget, and would buy no epochs (as a given --epochs turns it
    off)."""
    config = run.config
    sizes = sorted(set(stage_sizes(config)))  # one size, the full one, without --low-res
    timed = dict(zip(sizes, step_seconds(run, sizes)))
    seconds = timed[sizes[-1]]  # a full-size step
    fit = config["time_budget_fit"] = dict(seconds_per_step=seconds, epochs_asked=config["epochs"])
    asked, epoch_seconds = config["epochs"], seconds * run.steps_per_epoch
    full_size = (len(sizes) > 1 and not low_res_given
                 and asked * epoch_seconds <= FULL_SIZE_SHARE * 60 * config["time_budget"])
    if full_size:  # a GPU, say, where a step of vil-1m costs alike at 16, 24 and 32 px (RESULTS.md, "On a GPU")
        fit["low_res_off"], config["low_res"] = config["low_res"], 1.0
    elif len(sizes) > 1:  # a smaller image's step as a share of a full-size one's, per third of the run
        fit["step_shares"] = [timed[size] / seconds for size in stage_sizes(config)]
    config["epochs"] = epochs_in_budget(60 * config["time_budget"], epoch_seconds, asked, shares=budget_shares(config))
    # refit_pending: a refit is due after the epoch under way (a run of one epoch has none)
    fit.update(epochs_from_steps=config["epochs"], refit_pending=config["epochs"] > 1)
    run.total_steps, run.warmup_steps = schedule_steps(config, run.steps_per_epoch)
    if run.is_main:
        # where the budget cut the epochs, what the whole recipe would take here: on a slow machine (float32 on
        # a CPU without native bf16, say) the gap is the user's cue to give --epochs and more time
        whole = (f" (all {asked}: about {format_seconds(epoch_seconds * budget_epochs(config, asked))})"
                 if config["epochs"] < asked else "")
        at_sizes = " / ".join(f"{height}x{width}" for height, width in sizes)
        steps = (f"{seconds:.3f} s a step ({BUDGET_TIMED_STEPS} timed)" if len(sizes) == 1 else
                 " / ".join(f"{timed[size]:.3f}" for size in sizes)
                 + f" s a step at {at_sizes} px ({BUDGET_TIMED_STEPS} timed each)")
        off = (f"; all fit at full size, so --low-res {fit['low_res_off']:g} is off (it would buy no epochs)"
               if full_size else "")
        print(f"time budget {config['time_budget']:g} min: {steps}, {run.steps_per_epoch} steps an epoch -> "
              f"{config['epochs']} of {asked} epochs, about "
              f"{format_seconds(epoch_seconds * budget_epochs(config, config['epochs']))} of training{whole}{off}",
              flush=True)


def budget_shares(config):
    """The time of an epoch in each third of the run as a share of a full-size epoch's (all 1 without --low-res);
    the thirds before the one the run has reached count at its share, as their epochs train at its size
    (train_stage)."""
    shares = config["time_budget_fit"].get("step_shares", (1.0, 1.0, 1.0))
    reached = config.get("low_res_third", 0)
    return tuple(shares[max(third, reached)] for third in range(3))


def budget_epochs(config, epochs, done=0):
    """Epochs `done` to `epochs` of a run of `epochs`, counted in full-size epochs (budget_shares)."""
    return epochs_ahead(epochs, done, budget_shares(config))


def epochs_ahead(epochs, done, shares):
    """Epochs `done` to `epochs` of a run of `epochs`, weighted by shares[k] in its k-th third (run_third)."""
    starts = third_starts(epochs) + [epochs]
    return sum(share * max(0, starts[k + 1] - max(done, starts[k])) for k, share in enumerate(shares))


def epochs_in_budget(budget_seconds, epoch_seconds, asked, done=0, spent=0.0, shares=(1.0, 1.0, 1.0)):
    """The most epochs, at most `asked`, whose training fits budget_seconds where `done` epochs took `spent`
    seconds and each further one takes epoch_seconds, times shares[k] in the k-th third of the run (--low-res:
    budget_shares). At least one, and after done > 0 epochs at least one more: a schedule cut after the fact
    to the epochs done would end the run at a high learning rate."""
    for epochs in range(asked, done + 1, -1):
        if spent + epoch_seconds * epochs_ahead(epochs, done, shares) <= budget_seconds:
            return epochs
    return done + 1


def refit_due(run):
    """Whether the time budget fits the run's epochs again after the epoch under way: after the first, and after
    each later one that ends within the first half of the run as planned (before its cosine reaches the
    middle), not where the timed steps gave one epoch, nor where a resumed run was given --epochs."""
    fit = run.config.get("time_budget_fit")
    return fit is not None and bool(fit.get("refit_pending"))


def refit_to_time_budget(run, epoch, seconds, paced_seconds):
    """--time-budget after `epoch`, which took `seconds`: the epochs (and the schedule) fitted again, at most the
    epochs asked for and at least one more than those done, the epochs done counted as spent (the run's
    train_seconds) and the others at the mean pace of the epochs refitted after so far, this one included (a resumed
    run's too, as its config keeps them). This epoch's pace: paced_seconds, an epoch at the pace of its
    steps after the first BUDGET_WARMUP_STEPS, for the first epoch a process runs and the first at a new size of
    --low-res (their first steps warm up, or compile), or None for the whole epoch's; under --low-res that pace is
    scaled to a full-size epoch's by the timed steps' shares (budget_shares), which the epochs ahead then take. Why
    a machine needs refits: RESULTS.md, "The time budget's rules". Under torchrun the slowest process's times count.
    Recorded in config (time_budget_fit["refits"]); returns the line that reports it, or None after a later
    refit that leaves the epochs unchanged."""
    config, fit = run.config, run.config["time_budget_fit"]
    paced = paced_seconds is not None  # alike on every process: it depends on the steps alone
    # a max: a resumed run's train_seconds are read back on process 0 only, and the slowest process's pace counts
    spent, paced_seconds = all_reduce_max([run.train_seconds, paced_seconds if paced else seconds], run.device)
    before, shares = config["epochs"], budget_shares(config)
    this_share = shares[train_stage(config, epoch)]  # of the epoch just done
    paced_seconds /= this_share  # a full-size epoch's at that pace
    # the epochs ahead at the mean pace of the epochs refitted after so far: one epoch's pace wanders by +-8% on a
    # quiet machine, and refits from it alone moved the plan by up to two epochs either way (RESULTS.md, "The time
    # budget's rules")
    paces = [refit["pace_seconds"] for refit in fit.get("refits", [])] + [paced_seconds]
    pace = sum(paces) / len(paces)
    config["epochs"] = epochs_in_budget(60 * config["time_budget"], pace, fit["epochs_asked"],
                                        done=epoch + 1, spent=spent, shares=shares)
    fit.setdefault("refits", []).append(dict(epoch=epoch + 1, spent_seconds=spent, pace_seconds=paced_seconds,
                                             mean_pace_seconds=pace, epochs=config["epochs"]))
    fit["refit_pending"] = 2 * (epoch + 2) <= config["epochs"]  # the next epoch ends within the first half
    run.total_steps, run.warmup_steps = schedule_steps(config, run.steps_per_epoch)
    fit.setdefault("warmup_steps", run.warmup_steps)  # set by the first refit, as schedule_steps then keeps it
    ahead = (f"-> {config['epochs']} of {fit['epochs_asked']} epochs, about "
             f"{format_seconds(spent + budget_epochs(config, config['epochs'], epoch + 1) * pace)} of "
             f"training")
    if epoch == 0:
        estimate = fit["seconds_per_step"] * this_share * run.steps_per_epoch
        pace = (f"; {format_seconds(paced_seconds * this_share)} at its pace after {BUDGET_WARMUP_STEPS} steps"
                if paced else "")
        return (f"time budget {config['time_budget']:g} min: epoch 1 took {format_seconds(spent)} (estimated "
                f"{format_seconds(estimate)}{pace}) {ahead}")
    if config["epochs"] == before:
        return None
    size = " at full size" if len(set(shares)) > 1 else ""
    mean = f" (the mean of {len(paces)})" if len(paces) > 1 else ""
    return (f"time budget {config['time_budget']:g} min: {epoch + 1} epochs took {format_seconds(spent)}, at "
            f"{format_seconds(pace)} an epoch{size}{mean} {ahead}")


def step_seconds(run, sizes):
    """The seconds of one training step of the run on this machine at each image size of `sizes` (a list of
    (height, width)): a throwaway copy of the model, optimiser and EMA takes BUDGET_WARMUP_STEPS steps at each
    size, then BUDGET_TIMED_STEPS rounds of one step at each size in turns, on the run's own first batches, the
    loader included, as the loop takes them; each size's mean. In turns, so that a machine whose speed drifts
    while it is timed skews every size alike, not the last ones timed (their shares of a full-size step are what
    --low-res budgets the thirds by). The run's weights, optimiser state and random draws are untouched (every
    draw is a function of seed, epoch and step). Under --compile the copy is compiled too (the untimed steps
    take the compile of each size); it runs without DistributedDataParallel: under torchrun each process times
    its own and the slowest counts."""
    config = run.config
    copied = copy.deepcopy(run.raw_model)
    optimizer, scaler, ema = training_state(copied, config, run.device, run.dtype)
    model = CompileFallback(copied, verbose=False) if config["compile"] else copied
    probe = dataclasses.replace(run, raw_model=copied, model=model, optimizer=optimizer, scaler=scaler, ema=ema)
    batches = itertools.chain.from_iterable(run.loader.epoch(epoch) for epoch in itertools.count())
    for size in sizes:
        for step in range(BUDGET_WARMUP_STEPS):
            x, y = next(batches)
            train_step(probe, resize_images(x, size), y, step)
    seconds = [0.0] * len(sizes)
    synchronize(run.device)
    for step in range(BUDGET_WARMUP_STEPS, BUDGET_WARMUP_STEPS + BUDGET_TIMED_STEPS):
        for index, size in enumerate(sizes):
            started = time.perf_counter()
            x, y = next(batches)
            train_step(probe, resize_images(x, size), y, step)
            synchronize(run.device)
            seconds[index] += time.perf_counter() - started
    return all_reduce_max([total / BUDGET_TIMED_STEPS for total in seconds], run.device)


def recipe_line(config, given, model_config):
    """The settings this run takes from its dataset's recipe (not given on the command line, and acting in this
    run), as flags; None where there are none. --help shows the general defaults, which a recipe changes."""
    unused = settings_without_effect(config, model_config)
    used = [option_text(key, value) for key, value in RECIPES.get(config["dataset"], {}).items()
            if key not in given and key not in unused and config[key] == value]  # a given --epochs ends the budget
    return f"recipe for {config['dataset']} (RECIPES in training.py): {' '.join(used)}" if used else None


def option_text(name, value):
    """A setting as its command-line flag: --epochs 50, --flip or --no-flip."""
    flag = flag_name(name)
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    return f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}"


def announce(run, given):
    """The lines that open a run: data, model, device and folder; for a new run the settings its recipe gave and
    the flags given (`given`) that change nothing in it; for a resumed run where it goes on."""
    if not run.is_main:
        return
    config = run.config
    print(f"{config['dataset']}: {run.train_size} training images"
          f"{f', {len(run.val[1])} validation' if run.val is not None else ''}, "
          f"{len(run.test[1])} test | {model_name(config, run.raw_model.config)}: "
          f"{run.raw_model.num_params() / 1e6:.2f}M parameters, "
          f"{run.raw_model.flops_per_image() / 1e6:.0f} MFLOPs/image | {run.device}, "
          f"{run.world_size} process{'es' if run.world_size > 1 else ''}, autocast "
          f"{str(run.dtype).replace('torch.', '') if run.dtype else 'off'} | run folder {config['out_dir']}")
    if run.resumed:
        done = (f": training is done ({counted(config['epochs'], 'epoch')}), so only the test set is evaluated again "
                f"(a larger --epochs trains on)" if run.start_epoch >= config["epochs"] else "")
        print(f"resuming after {checkpoint_point(run.start_epoch, run.start_step, run.steps_per_epoch)}{done}")
        return
    recipe = recipe_line(config, given, run.raw_model.config)
    if recipe:
        print(recipe)
    unused = flags_without_effect(config, given, run.raw_model.config)
    if unused:
        print(f"note: no effect in this run: {', '.join(unused)}")


def train_step(run, x, y, global_step):
    """One optimiser step on the batch (x, y): the scheduled learning rate, the forward pass under
    autocast, loss, backward, gradient clipping, the step and the EMA. Returns the loss and the
    number of correct predictions as tensors on the device (reading them would wait for it)."""
    config = run.config
    # the global RNG (drop-path) is seeded by the step alone, so that a resumed run draws exactly
    # what an uninterrupted one would, on every process
    torch.manual_seed(derive_seed("step", config["seed"], run.rank, global_step))
    for group in run.optimizer.param_groups:
        group["lr"] = run.lr_at(global_step)
    with autocast(run.device, run.dtype):
        logits = run.model(x)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=config["label_smoothing"])
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if config["grad_clip"]:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), config["grad_clip"])
    run.scaler.step(run.optimizer)
    run.scaler.update()
    if run.ema is not None:
        run.ema.update(run.raw_model)
    labels = y if y.dim() == 1 else y.argmax(dim=-1)
    return loss.detach(), (logits.argmax(dim=-1) == labels).sum()


class EpochMeter:
    """An epoch's training so far on this process: running sums on the device (loss * images,
    correct), read only at checks, the loss of each step (to name the first non-finite one), the
    images seen and the seconds spent. A mid-epoch checkpoint keeps its partial state, the sums and
    images of all processes, so that a resumed epoch reports what an uninterrupted one would (each
    process of the resumed run starts from an equal share of them; end_epoch adds the shares up)."""

    def __init__(self, steps_per_epoch, device):
        self.sums = torch.zeros(2, device=device, dtype=torch.float64)
        self.step_losses = torch.zeros(steps_per_epoch, device=device)
        self.seen, self.seconds_before = 0, 0.0
        self.started = time.perf_counter()
        self.steps_per_epoch, self.pace_mark = steps_per_epoch, None

    @classmethod
    def from_partial(cls, partial, steps_done, steps_per_epoch, device, world_size=1):
        """The meter of one of world_size processes in an epoch that goes on after steps_done steps
        from `partial` (to_partial's dict; None: an epoch from its start)."""
        meter = cls(steps_per_epoch, device)
        if partial is not None:
            meter.sums += torch.tensor(partial["sums"], device=device, dtype=torch.float64) / world_size
            meter.step_losses[:steps_done] = torch.tensor(partial["step_losses"], device=device)
            meter.seen, meter.seconds_before = partial["seen"] / world_size, partial["seconds"]
        return meter

    def to_partial(self, steps_done):
        """The state after steps_done steps, as a checkpoint keeps it (plain numbers): the sums and
        images of all processes (a collective: under torchrun every process calls it at the same step),
        this process's step losses."""
        *sums, seen = all_reduce_sum(self.sums.tolist() + [self.seen], self.sums.device)
        return dict(sums=sums, step_losses=self.step_losses[:steps_done].tolist(),
                    seen=round(seen), seconds=self.seconds())

    def add(self, step, loss, correct, images):
        self.step_losses[step] = loss
        self.sums += torch.stack([loss.double() * images, correct.double()])
        self.seen += images

    def seconds(self):
        return self.seconds_before + time.perf_counter() - self.started

    def mark_pace(self, steps_done):
        """Note the seconds after steps_done steps: the steps after them set paced_epoch_seconds."""
        self.pace_mark = (steps_done, self.seconds())

    def paced_epoch_seconds(self, seconds):
        """A whole epoch's seconds at the pace of its steps after mark_pace, given `seconds`, the epoch's time
        at its end; None where nothing was marked or fewer than BUDGET_TIMED_STEPS steps followed the mark."""
        if self.pace_mark is None or self.steps_per_epoch - self.pace_mark[0] < BUDGET_TIMED_STEPS:
            return None
        steps_done, seconds_done = self.pace_mark
        return (seconds - seconds_done) / (self.steps_per_epoch - steps_done) * self.steps_per_epoch

    def first_non_finite(self, steps_done):
        """The index of the first step of the first steps_done whose loss is not finite, or None."""
        bad = torch.nonzero(~torch.isfinite(self.step_losses[:steps_done]))
        return int(bad[0]) if len(bad) else None


def check_due(run, step):
    """Whether the running sums are read after this step: every log_every steps, at the epoch's last
    step, and at once on a stop request in a single process. With several, a signal is acted on at
    the next check, which all of them take at the same step."""
    return ((step + 1) % run.log_every == 0 or step + 1 == run.steps_per_epoch
            or (run.world_size == 1 and run.folder.stop.requested))


def non_finite_advice(run):
    """The flags that may keep a run's loss finite, among those it can take: --resume keeps --lr and --grad-clip."""
    amp = run.dtype is not None  # under autocast; --amp off is float32 already
    if not run.resumed:
        return "Try a lower --lr, --grad-clip 1 or --amp off" if amp else "Try a lower --lr or --grad-clip 1"
    return ("--resume keeps the run's --lr and --grad-clip: " + ("resume it with --amp off, or " if amp else "")
            + "start a new run with a lower --lr or --grad-clip 1")


def check_step(run, meter, epoch, step):
    """The check after a step, agreed by all processes: NonFiniteLoss where the loss has become
    nan or inf on any of them, before any save (a NaN run never overwrites a checkpoint). Returns
    (loss sum, correct, whether any process was asked to stop)."""
    loss_sum, correct = meter.sums.tolist()
    flags = torch.tensor([float(run.folder.stop.requested), float(not math.isfinite(loss_sum))],
                         device=run.device)
    if run.world_size > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if bool(flags[1]):
        bad = meter.first_non_finite(step + 1)
        where = f"step {bad + 1} of {run.steps_per_epoch}" if bad is not None else \
            f"a step up to {step + 1} of {run.steps_per_epoch} (on another process)"
        raise NonFiniteLoss(f"the training loss became non-finite (nan or inf) at epoch {epoch + 1}, {where}",
                            non_finite_advice(run))
    return loss_sum, correct, bool(flags[0])


def save(run, epoch, step, partial=None, best=False, record=None):
    """checkpoint.pt (and best.pt) of the run after `step` steps of the epoch after `epoch`; record: the
    metrics record of `epoch`, at its end."""
    # every process looks, so that all of them stop together: the weights turn NaN without a
    # NaN loss when the last step of an epoch diverges, which the loss shows only a step later
    if not finite_weights(run.raw_model, run.ema):
        where = (f"epoch {epoch + 1}, step {step} of {run.steps_per_epoch}" if step
                 else f"the end of epoch {epoch}")
        raise NonFiniteLoss(f"the weights became non-finite (nan or inf) by {where}, while the training loss was "
                            f"still finite", non_finite_advice(run))
    if run.is_main:
        # the data order and every random draw are functions of (seed, epoch, step): no RNG state
        state = dict(model=run.raw_model.state_dict(), optimizer=run.optimizer.state_dict(),
                     scaler=run.scaler.state_dict(),
                     ema=run.ema.state_dict() if run.ema is not None else None,
                     epoch=epoch, step=step, partial=partial, config=run.config,
                     train_size=run.train_size, source_size=run.source_size, steps_per_epoch=run.steps_per_epoch,
                     # the last finished epoch's metrics record, which metrics.jsonl gets after the checkpoint:
                     # a resume restores it where a write that stopped the run left the file without it
                     record=record if record is not None else (run.history[-1] if run.history else None))
        # config.json follows the checkpoint (which holds the config too): a run stopped before its first
        # checkpoint, or whose first checkpoint could not be written, leaves no run file, so that the same
        # command starts it again; and a resumed run's config.json changes only once its checkpoint has
        with run.folder.stop.deferred():
            run.folder.write("checkpoint.pt", lambda path: save_checkpoint(state, path))
            run.folder.saved = checkpoint_point(epoch, step, run.steps_per_epoch)  # what a failed write below keeps
            if best:
                run.folder.write("best.pt", lambda path: save_checkpoint(state, path))
            run.folder.write("config.json", lambda path: save_json(run.config, path))
    else:
        run.folder.saved = checkpoint_point(epoch, step, run.steps_per_epoch)


def evaluate_split(run, images, labels, shift=0, progress=None):
    """(loss, accuracy) on a split, of the EMA weights where there are some; shift, progress: evaluate's."""
    if run.ema is not None:
        run.ema.copy_to(run.eval_model)
    return evaluate(run.eval_model, images, labels, run.config, run.device, run.dtype, run.rank,
                    run.world_size, run.pad_to, tta=run.tta, shift=shift, progress=progress)


def end_epoch(run, epoch, meter, seconds):
    """After an epoch's last step: its record (the training sums of all processes, validation, and
    test with --eval-test-every-epoch), then checkpoint.pt (best.pt where validation improved),
    metrics.jsonl, curves.png and the summary line."""
    run.train_seconds += seconds
    loss_sum, correct, seen = all_reduce_sum(meter.sums.tolist() + [meter.seen], run.device)
    record = dict(epoch=epoch + 1, train_loss=loss_sum / seen, train_acc=correct / seen,
                  lr=run.lr_at((epoch + 1) * run.steps_per_epoch - 1), images_per_second=seen / seconds,
                  seconds=seconds)
    if run.config["low_res"] < 1:  # the size the epoch trained at (evaluation is at full size)
        record["image_size"] = list(train_image_size(run.config, epoch))
    if run.val is not None:
        record["val_loss"], record["val_acc"] = evaluate_split(run, *run.val)
    if run.config["eval_test_every_epoch"]:
        record["test_loss"], record["test_acc"] = evaluate_split(run, *run.test)
    # before the checkpoint, which then holds the epochs and schedule the run goes on with
    refit = (refit_to_time_budget(run, epoch, seconds, meter.paced_epoch_seconds(seconds))
             if refit_due(run) else None)
    with run.folder.stop.deferred():  # the epoch's files are written whole, whatever signal arrives
        # the checkpoint first: a metrics line never refers to an epoch that is not saved
        best = run.val is not None and record["val_acc"] > run.best_val_acc
        save(run, epoch + 1, 0, best=best, record=record)
        run.best_val_acc = max(run.best_val_acc, record.get("val_acc", -1))
        if run.is_main:
            run.history.append(record)
            run.folder.write("metrics.jsonl", lambda path: atomic_write(path, lambda f: f.write(
                "".join(json_text(line) + "\n" for line in run.history).encode())))
            run.folder.write("curves.png", lambda path: plot_curves(run.history, path))
            print(epoch_summary(record, run.config["epochs"]), flush=True)
            if refit is not None:
                print(refit, flush=True)


def final_evaluation(run):
    """The test set, evaluated once at the end, with the shifted views of --tta-shift too: final.json and the
    closing line. Returns what final.json holds."""
    config = run.config
    # with progress lines: 10 views of the test set took 7:39 on a 2-core CPU without native bf16
    test_loss, test_acc = evaluate_split(run, *run.test, shift=config["tta_shift"], progress="test")
    images_trained = sum(record["images_per_second"] * record["seconds"] for record in run.history)
    final = dict(dataset=config["dataset"], model=config["model"], test_acc=test_acc, test_loss=test_loss,
                 params=run.raw_model.num_params(), epochs=config["epochs"], train_seconds=run.train_seconds,
                 images_per_second=images_trained / max(run.train_seconds, 1e-9),
                 ema=bool(run.ema), tta=run.tta, tta_shift=config["tta_shift"],
                 autocast=str(run.dtype).replace("torch.", "") if run.dtype else "off",
                 device=str(run.device), world_size=run.world_size)
    if run.is_main:
        run.folder.write("final.json", lambda path: save_json(final, path))
        print(f"test accuracy {100 * test_acc:.2f}% (loss {test_loss:.4f}{views_text(run.tta, config['tta_shift'])})"
              f" after {counted(config['epochs'], 'epoch')}, {format_seconds(run.train_seconds)} of training"
              f" | run folder {config['out_dir']}")
    if run.world_size > 1:
        # all leave together: a process that ends its process group while process 0 still writes
        # final.json aborts in gloo's teardown now and then ("terminate called without an active
        # exception", exit code -6, in about a third of 2-process CPU runs here)
        dist.barrier()
    return final


def begin_epoch(run, epoch):
    """The start of `epoch` -> (its image size, its first step, its ProgressBar, its EpochMeter). Under --low-res the
    third reached is recorded first, in the config that the checkpoints keep (train_stage); the first epoch of a
    resumed run goes on from the step and the meter's state that its checkpoint saved."""
    if run.config["low_res"] < 1:
        run.config["low_res_third"] = train_stage(run.config, epoch)
    size = train_image_size(run.config, epoch)  # smaller than the model's in early epochs of --low-res
    at_size = "" if size == stage_sizes(run.config)[-1] else f" at {size[0]}x{size[1]} px"
    first = epoch == run.start_epoch
    start_step = run.start_step if first else 0
    progress = ProgressBar(run.steps_per_epoch, f"epoch {epoch + 1}/{run.config['epochs']}{at_size}", run.is_main,
                           first=start_step)
    meter = EpochMeter.from_partial(run.partial if first else None, start_step, run.steps_per_epoch, run.device,
                                    run.world_size)
    return size, start_step, progress, meter


def train(config, given, resume, folder):
    """Train in `folder` (a RunFolder, from which main reports a run that stops), then evaluate on
    the test set. Returns what final.json holds."""
    run = setup_run(config, given, resume, folder)
    announce(run, given)
    if not resume and run.config["time_budget"]:
        fit_to_time_budget(run, low_res_given="low_res" in given)
    stop = folder.stop
    folder.training = True
    with stop.in_loop():  # Ctrl-C and SIGTERM now ask the loop to save and stop
        epoch, previous_size = run.start_epoch, None  # the size this process trained the epoch before at
        while epoch < run.config["epochs"]:  # the time budget may refit the epochs in the first half
            size, start_step, progress, meter = begin_epoch(run, epoch)
            for step, (x, y) in enumerate(run.loader.epoch(epoch, start_step), start=start_step):
                loss, correct = train_step(run, resize_images(x, size), y, epoch * run.steps_per_epoch + step)
                meter.add(step, loss, correct, len(y))
                # the first epoch this process runs, or the first at a new size (--low-res: under --compile its
                # first steps compile that size): the time budget's refit reads the pace from here on
                if step + 1 == start_step + BUDGET_WARMUP_STEPS and refit_due(run) and size != previous_size:
                    synchronize(run.device)
                    meter.mark_pace(step + 1)
                if not check_due(run, step):
                    continue
                loss_sum, correct_sum, stop_now = check_step(run, meter, epoch, step)
                progress.update(step + 1, loss_sum / meter.seen, correct_sum / meter.seen,
                                meter.seen * run.world_size / max(meter.seconds(), 1e-9))
                if stop_now and step + 1 < run.steps_per_epoch:
                    progress.close()
                    save(run, epoch, step + 1, meter.to_partial(step + 1))
                    raise KeyboardInterrupt  # main reports it from folder.saved, as any interruption
            synchronize(run.device)
            seconds = meter.seconds()
            progress.close()
            end_epoch(run, epoch, meter, seconds)
            previous_size = size
            # agreed by all processes, as check_step's: process 0, the last to leave end_epoch (it
            # writes the run files), may be asked to stop after the others have started the next epoch
            if all_reduce_sum([float(stop.requested)], run.device)[0]:
                raise KeyboardInterrupt
            epoch += 1
    return final_evaluation(run)


def epoch_summary(record, epochs):
    text = (f"epoch {record['epoch']}/{epochs} | train loss {record['train_loss']:.4f} "
            f"acc {100 * record['train_acc']:.2f}%")
    for split in ("val", "test"):
        if f"{split}_acc" in record:
            text += f" | {split} loss {record[f'{split}_loss']:.4f} acc {100 * record[f'{split}_acc']:.2f}%"
    return text + (f" | lr {record['lr']:.2e} | {record['images_per_second']:.0f} img/s | "
                   f"{record['seconds']:.1f} s")


# what --eval-only reads from a checkpoint's configuration
EVAL_KEYS = ("dataset", "data_dir", "image_size", "amp", "flip", "model_config", "num_classes", "mean", "std")
EVAL_OVERRIDABLE = ("data_dir", "amp", "tta", "tta_shift", "device")  # what --eval-only takes from the command line


def evaluate_checkpoint(path, given):
    """--eval-only: rebuild the model from the checkpoint's own config, report test accuracy and
    write it to eval-<checkpoint name>.json beside the checkpoint (eval-best.json for best.pt)."""
    if not path:
        raise UserError("--eval-only needs --checkpoint PATH (a checkpoint.pt or best.pt of a run)")
    checkpoint = load_checkpoint(path)
    # the saved device is not read: the command line's, or the best this machine has
    config = saved_config(checkpoint, path, EVAL_KEYS, [key for key in EVAL_OVERRIDABLE if key in given],
                          optional=[key for key in EVAL_OVERRIDABLE if key != "device"])
    ignored = sorted(key for key in given if key not in EVAL_OVERRIDABLE and config.get(key) != given[key])
    if ignored:
        print(f"note: --eval-only uses the checkpoint's saved configuration; ignoring "
              f"{', '.join(flag_name(key) for key in ignored)}")
    for key in EVAL_OVERRIDABLE:
        if key in given:
            config[key] = given[key]
    device = torch.device(resolve_device(given.get("device")))
    with saved_value("amp", "amp" not in given):
        dtype = autocast_dtype(config["amp"], device)
    allow_tf32(device)
    try:
        model = VisionLSTM(ViLConfig(**config["model_config"]))
        weights = checkpoint["ema"]["shadow"] if checkpoint.get("ema") is not None else checkpoint["model"]
        model.load_state_dict({name: value.to(model.state_dict()[name].dtype) for name, value in weights.items()})
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise UserError(f"{path} does not match this version's model ({type(error).__name__}: "
                        f"{error_text(error)})")
    # an image folder's test labels index the class names saved with the model; train/, where there is one, must
    # hold the same classes (a run saved before the names were kept has only train/'s to go by)
    if config.get("classes") is None or os.path.isdir(os.path.join(config["data_dir"], "train")):
        check_classes(config, dataset_classes(config), path)
    check_parallel_form_memory(model.config, device)
    check_tta_shift(config.get("tta_shift", 0), model.config.img_size)
    model.to(device)
    images, labels = load_split(config, train=False)
    pad_to = padding_for(images, config["model_config"]["img_size"])
    mirror, shift = mirror_tta(config), config.get("tta_shift", 0)  # shift 0 for a run from before --tta-shift
    loss, accuracy = evaluate(model, images, labels, config, device, dtype, 0, 1, pad_to, tta=mirror, shift=shift,
                              progress="test")
    # epoch: the whole epochs done; step: the steps done of the next one (a checkpoint saved when a run was stopped)
    step = checkpoint.get("step", 0)  # absent in a checkpoint not written by training.py
    result = dict(checkpoint=os.path.abspath(path), dataset=config["dataset"], test_acc=accuracy,
                  test_loss=loss, epoch=checkpoint["epoch"], step=step, ema=checkpoint.get("ema") is not None,
                  tta=mirror, tta_shift=shift)
    print(f"test accuracy {100 * accuracy:.2f}% on {config['dataset']} (loss {loss:.4f}"
          f"{views_text(mirror, shift)}) of {path} "
          f"({checkpoint_point(checkpoint['epoch'], step, checkpoint.get('steps_per_epoch'))}"
          f"{', EMA weights' if result['ema'] else ''})")
    # named after the checkpoint, so that evaluating best.pt and checkpoint.pt keeps both results
    stem = os.path.splitext(os.path.basename(path))[0]
    eval_path = os.path.join(os.path.dirname(os.path.abspath(path)), f"eval-{stem}.json")
    try:
        save_json(result, eval_path)
    except OSError as error:
        print(f"note: could not write {eval_path} ({error.strerror}); the result is above")
    return result


def main(argv=None):
    keep_freed_memory()  # the same activations are freed and re-allocated at every step: no fresh pages each time
    with stop_requests() as stop:  # the whole run: loading data, training, evaluating
        folder = RunFolder(stop)
        try:
            config, given, resume, eval_only, checkpoint = parse_config(sys.argv[1:] if argv is None else argv)
            if eval_only:
                evaluate_checkpoint(checkpoint, {key: config[key] for key in given})
            else:
                train(config, given, resume, folder)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except NonFiniteLoss as error:
            print(f"error: {error}. Stopped; {folder.outcome('unchanged', resumable=False)}. {error.advice}.",
                  file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM, wherever it arrived
            print(f"\n{folder.interrupted()}", file=sys.stderr)
            return 130
        except (MemoryError, RuntimeError) as error:
            if not out_of_memory(error):
                raise
            # a run's batch and model are its own (--resume keeps them): what needs less memory is a new run
            print(f"error: out of memory ({str(error).splitlines()[0][:160]}). A new run needs less with a "
                  f"smaller --batch-size or --model, or with --mlstm-form chunkwise. Stopped; "
                  f"{folder.outcome('intact', resumable=False)}", file=sys.stderr)
            return 1
        finally:
            folder.release()
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    # a path's bytes that are no text (a folder named in another encoding) print as \x.. escapes, as on stderr,
    # where a strict UTF-8 stdout would stop the run with an encoding error
    sys.stdout.reconfigure(errors="backslashreplace")
    sys.exit(main())
