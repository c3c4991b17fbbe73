"""
Train and evaluate a Vision-LSTM (ViL) classifier on a small image dataset.

One device (a GPU when present, else the CPU):
    python training.py --dataset mnist
    python training.py --dataset cifar
    python training.py --dataset cifar --model vil-t --epochs 200 --rand-augment 2 --mixup 0.8
Several GPUs on one machine (DistributedDataParallel, --batch-size is the global batch):
    torchrun --standalone --nproc_per_node=4 training.py --dataset cifar
Continue an interrupted run, or evaluate a saved model on the test set:
    python training.py --resume --out-dir runs/cifar10-vil-seed-20261124-120000
    python training.py --eval-only --checkpoint runs/cifar10-vil-seed-20261124-120000/checkpoint.pt

A run writes into its folder (--out-dir): config.json, metrics.jsonl (one line per epoch),
checkpoint.pt (every epoch, atomically), final.json (test accuracy and timing) and curves.png.
The test set chooses nothing: it is evaluated once at the end (and per epoch with
--eval-test-every-epoch, for curves only). --val-size holds out part of the training set; with it,
best.pt keeps the weights of the epoch with the best validation accuracy.
"""
import argparse
import copy
import dataclasses
import json
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from data import (ALIASES, DATASETS, Augment, DataError, DeviceLoader, channel_mean_std, load_dataset,
                  split_train_val)
from model import PRESETS, VisionLSTM, ViLConfig, create_model
from utils import (ProgressBar, UserError, WeightEMA, all_reduce_sum, atomic_write, autocast,
                   cpu_has_native_bf16, ensure_writable_dir, format_seconds, learning_rate, load_checkpoint, plot_curves,
                   save_checkpoint, save_json, setup_distributed)

# ---------------------------------------------------------------------------------------------
# Defaults: edit them here. A flag on the command line wins over these; the recipe of the chosen
# dataset (RECIPES, below) wins over the general values.
DEFAULTS = dict(
    # I/O
    dataset="mnist",
    data_dir="./data",
    out_dir=None,               # None: runs/<dataset>-<model>-<date>-<time>
    # model: a preset of model.py; None keeps the preset's own value
    model="vil-seed",
    dim=None,
    depth=None,                 # number of single-direction blocks (a pair is one "layer")
    patch_size=None,
    pooling=None,               # bilateral_concat | bilateral_avg
    conv_kind=None,             # 2d | causal1d
    mlstm_form=None,            # parallel | chunkwise | recurrent
    chunk_size=None,
    drop_path=0.0,              # largest stochastic-depth rate, reached by the last block
    pad_to=32,                  # zero-pad smaller images (28-px MNIST) to this size, as the seed did
    image_size=32,              # image-folder datasets are resized to this size
    # optimiser and schedule
    epochs=20,
    batch_size=256,             # global batch (split over processes under torchrun)
    lr=1e-3,
    weight_decay=0.05,
    warmup_epochs=2.0,          # never more than a fifth of the run
    grad_clip=1.0,              # 0: off
    label_smoothing=0.1,
    ema=0.0,                    # decay of an exponential moving average of the weights (0: off)
    # augmentation (on the training device, per sample)
    crop_padding=4,             # random translation by up to this many pixels (0: off)
    flip=True,                  # random horizontal flip (never for digits)
    policy="none",              # none | randaugment (policy_ops ops) | trivialaugment (one op)
    policy_ops=2,               # operations per image for randaugment
    policy_magnitude=9.0,       # their strength on the 0..30 scale (trivialaugment: the largest)
    erasing=0.0,                # probability of random erasing
    mixup=0.0,                  # mixup Beta(a, a) parameter (0: off)
    cutmix=0.0,                 # cutmix Beta(a, a) parameter (0: off)
    # evaluation
    val_size=0,                 # training images held out for validation (0: none)
    tta=True,                   # evaluate the mean logits of each image and its mirror image
                                # (only where training flips: never for digits)
    eval_test_every_epoch=False,
    # system
    amp="auto",                 # auto: bf16 on a GPU or CPU that has it natively, else off | bf16 | fp16 | off
    compile=False,
    seed=0,
    limit_train=0,              # train on the first N images only (0: all)
    device=None,                # None: cuda when present, else cpu
)

# Per-dataset recipes: the values that make the plain `--dataset X` command beat the seed table.
RECIPES = {
    "mnist": dict(epochs=20, lr=2e-3, crop_padding=2, flip=False, label_smoothing=0.1,
                  warmup_epochs=1.0),
    "fashion-mnist": dict(epochs=30, lr=2e-3, crop_padding=2, flip=True, erasing=0.25),
    # 20 epochs: under an hour on a 2-core CPU with native bf16 (README.md, "Results"); longer
    # runs reach more (--epochs 100)
    "cifar10": dict(epochs=20, lr=2e-3, policy="randaugment", drop_path=0.05, ema=0.999),
    "cifar100": dict(epochs=150, lr=2e-3, crop_padding=4, flip=True, policy="randaugment",
                     policy_ops=2, policy_magnitude=9.0, label_smoothing=0.1, drop_path=0.1,
                     mixup=0.8, cutmix=1.0, ema=0.999, warmup_epochs=5.0),
    "folder": dict(epochs=50, crop_padding=4, flip=True),
}
# On --resume the run's own config.json is used; only these may be changed on the command line.
RESUME_OVERRIDABLE = ("epochs", "device", "data_dir", "compile", "tta")
# ---------------------------------------------------------------------------------------------


class Interrupted(Exception):
    """Ctrl-C or SIGTERM arrived; the training loop saved a checkpoint."""


class NonFiniteLoss(Exception):
    """The training loss became NaN or inf."""


def build_parser(suppress_defaults=False):
    """The command line. With suppress_defaults, parse_args returns only the flags actually given."""
    parser = argparse.ArgumentParser(
        description="Train a Vision-LSTM on MNIST, Fashion-MNIST, CIFAR-10/100 or an image folder.",
        argument_default=argparse.SUPPRESS if suppress_defaults else None)
    group = parser.add_argument_group("data and run folder")
    group.add_argument("--dataset", help="mnist | fashion-mnist | cifar10 (cifar) | cifar100 | folder")
    group.add_argument("--data-dir", help="data root (torchvision layout); downloads go there")
    group.add_argument("--out-dir", help="run folder (default runs/<dataset>-<model>-<time>)")
    group.add_argument("--limit-train", type=int, help="use only the first N training images")
    group.add_argument("--val-size", type=int, help="hold out N training images for validation")
    group.add_argument("--pad-to", type=int, help="zero-pad smaller images to this size (0: off)")
    group.add_argument("--image-size", type=int, help="size image-folder datasets are resized to")
    group = parser.add_argument_group("model")
    group.add_argument("--model", help="preset: " + ", ".join(PRESETS))
    group.add_argument("--dim", type=int, help="model width")
    group.add_argument("--depth", type=int, help="number of blocks (each reads one direction)")
    group.add_argument("--patch-size", type=int)
    group.add_argument("--pooling", help="bilateral_concat | bilateral_avg")
    group.add_argument("--conv-kind", help="2d | causal1d")
    group.add_argument("--mlstm-form", help="parallel | chunkwise | recurrent")
    group.add_argument("--chunk-size", type=int, help="chunk length of the chunkwise form")
    group.add_argument("--drop-path", type=float, help="stochastic depth rate of the last block")
    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=int)
    group.add_argument("--batch-size", type=int, help="global batch size")
    group.add_argument("--lr", type=float, help="peak learning rate of AdamW")
    group.add_argument("--weight-decay", type=float)
    group.add_argument("--warmup-epochs", type=float)
    group.add_argument("--grad-clip", type=float, help="gradient norm clipping (0: off)")
    group.add_argument("--label-smoothing", type=float)
    group.add_argument("--ema", type=float, help="weight EMA decay, e.g. 0.999 (0: off)")
    group = parser.add_argument_group("augmentation")
    group.add_argument("--crop-padding", type=int, help="random translation in pixels (0: off)")
    group.add_argument("--flip", action=argparse.BooleanOptionalAction, help="random horizontal flip")
    group.add_argument("--policy", choices=["none", "randaugment", "trivialaugment"],
                       help="automatic augmentation policy")
    group.add_argument("--policy-ops", type=int, help="RandAugment operations per image")
    group.add_argument("--policy-magnitude", type=float,
                       help="policy strength on the 0..30 scale (trivialaugment draws up to it: "
                            "30 is TrivialAugment's full range)")
    group.add_argument("--erasing", type=float, help="random erasing probability")
    group.add_argument("--mixup", type=float, help="mixup alpha (0: off)")
    group.add_argument("--cutmix", type=float, help="cutmix alpha (0: off)")
    group = parser.add_argument_group("evaluation and checkpoints")
    group.add_argument("--tta", action=argparse.BooleanOptionalAction,
                       help="test-time augmentation: mean logits of an image and its mirror image "
                            "(datasets trained with --flip only)")
    group.add_argument("--eval-test-every-epoch", action=argparse.BooleanOptionalAction,
                       help="also evaluate the test set after every epoch (curves only)")
    group.add_argument("--resume", action="store_true", help="continue the run in --out-dir")
    group.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint on the test set")
    group.add_argument("--checkpoint", help="checkpoint file for --eval-only")
    group = parser.add_argument_group("system")
    group.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], help="autocast precision")
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model")
    group.add_argument("--seed", type=int)
    group.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda when present)")
    return parser


def parse_config(argv):
    """Resolve the run's configuration: command line > dataset recipe > DEFAULTS.
    Returns (config dict, the set of flags given on the command line, resume, eval_only, checkpoint)."""
    given = vars(build_parser(suppress_defaults=True).parse_args(argv))
    resume, eval_only = given.pop("resume", False), given.pop("eval_only", False)
    checkpoint = given.pop("checkpoint", None)
    config = dict(DEFAULTS)
    dataset = given.get("dataset", config["dataset"])
    dataset = ALIASES.get(dataset, dataset)
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}: choose one of {', '.join(sorted(DATASETS))}")
    config.update(RECIPES.get(dataset, {}))
    config.update(given)
    config["dataset"] = dataset
    return config, set(given), resume, eval_only, checkpoint


def check_config(config):
    """Refuse impossible values with a message naming the flag."""
    positive = ("epochs", "batch_size")
    for key in positive:
        if config[key] < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1, got {config[key]}")
    non_negative = ("lr", "weight_decay", "warmup_epochs", "grad_clip", "ema", "crop_padding",
                    "policy_ops", "policy_magnitude", "erasing", "mixup", "cutmix", "val_size",
                    "limit_train", "pad_to", "drop_path", "label_smoothing")
    for key in non_negative:
        if config[key] < 0:
            raise UserError(f"--{key.replace('_', '-')} must not be negative, got {config[key]}")
    if config["lr"] == 0:
        raise UserError("--lr must be positive")
    for key in ("ema", "erasing", "drop_path", "label_smoothing"):
        if config[key] >= 1:
            raise UserError(f"--{key.replace('_', '-')} must be below 1, got {config[key]}")
    if config["image_size"] < 1:
        raise UserError(f"--image-size must be at least 1, got {config['image_size']}")
    if config["model"] not in PRESETS:
        raise UserError(f"unknown model {config['model']!r}: choose one of {', '.join(PRESETS)}")


def resolve_device(name):
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but this machine has no usable CUDA GPU; "
                        "use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r} is not supported: use cpu or cuda")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), "
                        f"numbered from 0")
    return name


def autocast_dtype(amp, device):
    """The autocast dtype for --amp on this device (None: full precision). auto: bf16 on a GPU
    that supports it and on a CPU with native bf16 matmuls (AVX512-BF16 or AMX), where it trains
    about 1.7x faster than float32 to the same accuracy (README.md, "Speed"); float32 elsewhere."""
    if amp == "auto":
        if device.type == "cuda":
            amp = "bf16" if torch.cuda.is_bf16_supported() else "off"
        else:
            amp = "bf16" if cpu_has_native_bf16() else "off"
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device; use --amp bf16 or --amp off on the CPU")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU has no bf16 support; use --amp fp16 or --amp off")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def build_model(config, num_classes, in_chans, img_size):
    """The model of a run's config; bad model flags become a UserError."""
    overrides = {key: config[key] for key in ("dim", "depth", "patch_size", "pooling", "conv_kind",
                                              "mlstm_form", "chunk_size") if config[key] is not None}
    try:
        return create_model(config["model"], num_classes=num_classes, in_chans=in_chans,
                            img_size=img_size, drop_path=config["drop_path"], **overrides)
    except ValueError as error:
        raise UserError(f"cannot build the model: {error}")


def make_augment(config, digits):
    try:
        return Augment(crop_padding=config["crop_padding"], flip=config["flip"] and not digits,
                       policy=config["policy"], policy_ops=config["policy_ops"],
                       policy_magnitude=config["policy_magnitude"], erasing_prob=config["erasing"],
                       mixup_alpha=config["mixup"], cutmix_alpha=config["cutmix"])
    except ValueError as error:
        raise UserError(f"bad augmentation flags: {error}")


def load_split(config, train):
    try:
        return load_dataset(config["dataset"], config["data_dir"], train=train,
                            image_size=config["image_size"])
    except DataError as error:
        raise UserError(str(error))
    except OSError as error:  # e.g. --data-dir names a file, or a folder that cannot be created
        raise UserError(f"cannot use the data folder {config['data_dir']}: {error}")


def model_image_size(images, config, info):
    """The model's input size: 28-px MNIST-like images are padded to --pad-to (the seed's 32 px);
    other datasets keep their size."""
    height, width = images.shape[-2:]
    if info.pad_to and config["pad_to"] > max(height, width):
        return config["pad_to"], config["pad_to"]
    return height, width


def padding_for(images, img_size):
    """DeviceLoader's pad_to for images smaller than the model's input (None: no padding)."""
    return img_size[0] if tuple(images.shape[-2:]) != tuple(img_size) else None


def mirror_tta(config, digits):
    """Whether evaluation averages the logits of each image and its mirror image: with --tta, for
    models trained with random flips (so never for digits)."""
    return bool(config.get("tta", False) and config["flip"] and not digits)


def predict(model, x, tta):
    """The model's logits for x; with tta, the mean of the logits of x and of x mirrored left-right."""
    logits = model(x)
    if tta:
        logits = (logits.float() + model(x.flip(-1)).float()) / 2
    return logits


@torch.no_grad()
def evaluate(model, images, labels, config, device, dtype, rank, world_size, pad_to, tta=False):
    """Mean cross-entropy and accuracy of `model` on (images, labels), each process taking every
    world_size-th image; with tta, of the mean logits of each image and its mirror image.
    Returns (loss, accuracy)."""
    model.eval()
    loader = DeviceLoader(images[rank::world_size], labels[rank::world_size], 500,
                          num_classes=config["num_classes"], mean=config["mean"], std=config["std"],
                          train=False, device=device, pad_to=pad_to)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    for x, y in loader.epoch(0):
        with autocast(device, dtype):
            logits = predict(model, x, tta)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(dim=-1) == y).sum()
    loss_sum, correct, count = all_reduce_sum([loss_sum.item(), correct.item(),
                                               len(labels[rank::world_size])], device)
    model.train()
    return loss_sum / count, correct / count


def resolve_run(config, given, resume):
    """The run's configuration and, with --resume, its checkpoint: a resumed run keeps its saved
    configuration except RESUME_OVERRIDABLE. Returns (config, checkpoint or None)."""
    if not resume:
        if not config["out_dir"]:
            config["out_dir"] = os.path.join(
                "runs", f"{config['dataset']}-{config['model']}-{time.strftime('%Y%m%d-%H%M%S')}")
        return config, None
    if not config.get("out_dir"):
        raise UserError("--resume needs --out-dir: the run folder that holds checkpoint.pt")
    checkpoint = load_checkpoint(os.path.join(config["out_dir"], "checkpoint.pt"))
    saved = dict(checkpoint["config"])
    ignored = sorted(key for key in given if key not in RESUME_OVERRIDABLE + ("out_dir",)
                     and saved.get(key) != config[key])
    if ignored:
        print(f"note: --resume uses the run's saved configuration; ignoring "
              f"{', '.join('--' + key.replace('_', '-') for key in ignored)}")
    for key in RESUME_OVERRIDABLE:
        if key in given:
            saved[key] = config[key]
    if saved["epochs"] < checkpoint["epoch"]:
        raise UserError(f"the run in {config['out_dir']} has trained {checkpoint['epoch']} epochs "
                        f"already; --epochs {saved['epochs']} would end before that")
    saved["out_dir"] = config["out_dir"]
    return saved, checkpoint


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


def step_seed(seed, rank, global_step):
    """The seed of the global RNG (drop-path) at a training step: a function of the step alone,
    so that a resumed run draws exactly what an uninterrupted one would, on every process."""
    return ((seed * 1_000_003 + rank) * 1_000_000_007 + global_step) % 2**63


def train(config, given, resume):
    config, checkpoint = resolve_run(config, given, resume)
    check_config(config)
    rank, world_size, device = setup_distributed(resolve_device(config["device"]))
    is_main = rank == 0
    dtype = autocast_dtype(config["amp"], device)
    if config["batch_size"] % world_size:
        raise UserError(f"--batch-size {config['batch_size']} must divide evenly over "
                        f"{world_size} processes")
    out_dir = config["out_dir"]
    ensure_writable_dir(out_dir)  # every process checks, so that all of them stop together
    if not resume and os.path.exists(os.path.join(out_dir, "checkpoint.pt")):
        raise UserError(f"{out_dir} already holds a run (checkpoint.pt); continue it with "
                        f"--resume or choose another --out-dir")

    # data: the whole split lives on the training device
    info = DATASETS[config["dataset"]]
    (train_images, train_labels), (test_images, test_labels) = load_data(config, rank, world_size, device)
    # a folder dataset's classes are its class folders, counted before --limit-train cuts any away
    num_classes = info.num_classes or int(torch.cat([train_labels, test_labels]).max()) + 1
    val_images = val_labels = None
    if config["val_size"]:
        if config["val_size"] >= len(train_labels):
            raise UserError(f"--val-size {config['val_size']} leaves no training images "
                            f"(the training split has {len(train_labels)})")
        train_images, train_labels, val_images, val_labels = split_train_val(
            train_images, train_labels, config["val_size"], seed=config["seed"])
    if config["limit_train"]:
        train_images, train_labels = train_images[:config["limit_train"]], train_labels[:config["limit_train"]]
    if len(train_labels) < config["batch_size"]:
        raise UserError(f"--batch-size {config['batch_size']} is larger than the "
                        f"{len(train_labels)} training images")
    in_chans = train_images.shape[1]
    height, width = model_image_size(train_images, config, info)
    pad_to = padding_for(train_images, (height, width))
    if "mean" not in config:  # an image folder is normalised by its own statistics
        config["mean"], config["std"] = (channel_mean_std(train_images) if config["dataset"] == "folder"
                                         else (info.mean, info.std))
    loader = DeviceLoader(train_images, train_labels, config["batch_size"] // world_size,
                          num_classes=num_classes, mean=config["mean"], std=config["std"], train=True,
                          augment=make_augment(config, info.digits), seed=config["seed"],
                          device=device, rank=rank, world_size=world_size, pad_to=pad_to)

    # model, optimiser, schedule; the same initial weights on every process
    torch.manual_seed(config["seed"])
    raw_model = build_model(config, num_classes, in_chans, (height, width)).to(device)
    config["model_config"] = dataclasses.asdict(raw_model.config)
    config["num_classes"] = num_classes
    optimizer = torch.optim.AdamW(raw_model.param_groups(config["weight_decay"]), lr=config["lr"],
                                  betas=(0.9, 0.999), fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ema = WeightEMA(raw_model, config["ema"]) if config["ema"] else None
    steps_per_epoch = len(loader)
    total_steps = config["epochs"] * steps_per_epoch
    warmup_steps = int(min(config["warmup_epochs"] * steps_per_epoch, 0.2 * total_steps))

    start_epoch, start_step, partial = 0, 0, None
    if checkpoint is not None:
        raw_model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        if ema is not None:
            ema.load_state_dict(checkpoint["ema"])
        start_epoch, start_step, partial = checkpoint["epoch"], checkpoint["step"], checkpoint["partial"]
        del checkpoint

    model = raw_model
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config["compile"]:
        model = torch.compile(model)
    eval_model = copy.deepcopy(raw_model) if ema is not None else raw_model

    def save(name, epoch, step, partial_sums):
        # the data order and every random draw are functions of (seed, epoch, step): no RNG state
        save_checkpoint(dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(),
                             scaler=scaler.state_dict(), ema=ema.state_dict() if ema is not None else None,
                             epoch=epoch, step=step, partial=partial_sums, config=config),
                        os.path.join(out_dir, name))

    def evaluate_split(images, labels):
        if ema is not None:
            ema.copy_to(eval_model)
        return evaluate(eval_model, images, labels, config, device, dtype, rank, world_size, pad_to,
                        tta=mirror_tta(config, info.digits))

    history = []
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    if is_main:
        save_json(config, os.path.join(out_dir, "config.json"))
        if resume and os.path.exists(metrics_path):
            with open(metrics_path) as f:
                history = [json.loads(line) for line in f if line.strip()]
            history = [record for record in history if record["epoch"] <= start_epoch]
        print(f"{config['dataset']}: {len(train_labels)} training images"
              f"{f', {len(val_labels)} validation' if val_images is not None else ''}, "
              f"{len(test_labels)} test | {config['model']}: {raw_model.num_params() / 1e6:.2f}M "
              f"parameters, {raw_model.flops_per_image() / 1e6:.0f} MFLOPs/image | {device}, "
              f"{world_size} process{'es' if world_size > 1 else ''}, autocast "
              f"{str(dtype).replace('torch.', '') if dtype else 'off'} | run folder {out_dir}")
        if resume:
            print(f"resuming after epoch {start_epoch}" + (f", step {start_step}" if start_step else ""))

    stop_signal = []
    previous_handlers = {}

    def on_signal(signum, frame):
        # the first Ctrl-C or SIGTERM asks for a checkpoint and a clean stop; a second one acts as usual
        stop_signal.append(signum)
        signal.signal(signum, previous_handlers[signum])

    for signum in (signal.SIGINT, signal.SIGTERM):
        previous_handlers[signum] = signal.signal(signum, on_signal)
    best_val_acc = max((record.get("val_acc", -1) for record in history), default=-1)
    train_seconds = sum(record["seconds"] for record in history)
    # reading the running sums makes a GPU wait for its queue, so it is done every 20 steps there
    log_every = 20 if device.type == "cuda" else 1
    try:
        for epoch in range(start_epoch, config["epochs"]):
            progress = ProgressBar(steps_per_epoch, f"epoch {epoch + 1}/{config['epochs']}", is_main)
            # running sums on the device (loss * images, correct), read only every log_every steps
            sums = torch.zeros(2, device=device, dtype=torch.float64)
            step_losses = torch.zeros(steps_per_epoch, device=device)
            seen, seconds_before = 0, 0.0
            if partial is not None:
                sums += torch.tensor(partial["sums"], device=device, dtype=torch.float64)
                step_losses[:start_step] = torch.tensor(partial["step_losses"], device=device)
                seen, seconds_before = partial["seen"], partial["seconds"]
            epoch_start = time.perf_counter()
            for step, (x, y) in enumerate(loader.epoch(epoch, start_step), start=start_step):
                global_step = epoch * steps_per_epoch + step
                torch.manual_seed(step_seed(config["seed"], rank, global_step))
                lr = learning_rate(global_step, total_steps, warmup_steps, config["lr"])
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with autocast(device, dtype):
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=config["label_smoothing"])
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if config["grad_clip"]:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), config["grad_clip"])
                scaler.step(optimizer)
                scaler.update()
                if ema is not None:
                    ema.update(raw_model)
                labels = y if y.dim() == 1 else y.argmax(dim=-1)
                step_losses[step] = loss.detach()
                sums += torch.stack([loss.detach().double() * len(y),
                                     (logits.argmax(dim=-1) == labels).sum().double()])
                seen += len(y)
                last = step + 1 == steps_per_epoch
                # a signal is acted on at the next check, taken by all processes at the same step
                if not ((step + 1) % log_every == 0 or last or (world_size == 1 and stop_signal)):
                    continue
                loss_sum, correct = sums.tolist()
                flags = torch.tensor([float(bool(stop_signal)), float(not math.isfinite(loss_sum))],
                                     device=device)
                if world_size > 1:
                    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                stop, non_finite = bool(flags[0]), bool(flags[1])
                if non_finite:  # checked before any save: a NaN run never overwrites a checkpoint
                    bad = torch.nonzero(~torch.isfinite(step_losses[:step + 1]))
                    where = f"step {int(bad[0]) + 1} of {steps_per_epoch}" if len(bad) else \
                        f"a step up to {step + 1} of {steps_per_epoch} (on another process)"
                    raise NonFiniteLoss(f"the training loss became non-finite (nan or inf) at "
                                        f"epoch {epoch + 1}, {where}")
                elapsed = seconds_before + time.perf_counter() - epoch_start
                progress.update(step + 1, loss_sum / seen, correct / seen, seen * world_size / max(elapsed, 1e-9))
                if stop and not last:
                    progress.close()
                    if is_main:
                        save("checkpoint.pt", epoch, step + 1, dict(
                            sums=sums.tolist(), step_losses=step_losses[:step + 1].tolist(),
                            seen=seen, seconds=elapsed))
                    raise Interrupted(f"epoch {epoch + 1}, step {step + 1}", out_dir)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = seconds_before + time.perf_counter() - epoch_start
            progress.close()
            start_step, partial = 0, None
            train_seconds += seconds
            loss_sum, correct, seen = all_reduce_sum(sums.tolist() + [seen], device)
            record = dict(epoch=epoch + 1, train_loss=loss_sum / seen, train_acc=correct / seen,
                          lr=lr, images_per_second=seen / seconds, seconds=seconds)
            if val_images is not None:
                record["val_loss"], record["val_acc"] = evaluate_split(val_images, val_labels)
            if config["eval_test_every_epoch"]:
                record["test_loss"], record["test_acc"] = evaluate_split(test_images, test_labels)
            if is_main:
                # the checkpoint first: a metrics line never refers to an epoch that is not saved
                save("checkpoint.pt", epoch + 1, 0, None)
                if val_images is not None and record["val_acc"] > best_val_acc:
                    best_val_acc = record["val_acc"]
                    save("best.pt", epoch + 1, 0, None)
                history.append(record)
                atomic_write(metrics_path, lambda f: f.write(
                    "".join(json.dumps(line) + "\n" for line in history).encode()))
                plot_curves(history, os.path.join(out_dir, "curves.png"))
                print(epoch_summary(record, config["epochs"]), flush=True)
            if stop_signal:
                raise Interrupted(f"the end of epoch {epoch + 1}", out_dir)
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)

    test_loss, test_acc = evaluate_split(test_images, test_labels)
    images_trained = sum(record["images_per_second"] * record["seconds"] for record in history)
    final = dict(dataset=config["dataset"], model=config["model"], test_acc=test_acc, test_loss=test_loss,
                 params=raw_model.num_params(), epochs=config["epochs"], train_seconds=train_seconds,
                 images_per_second=images_trained / max(train_seconds, 1e-9),
                 ema=bool(ema), tta=mirror_tta(config, info.digits),
                 autocast=str(dtype).replace("torch.", "") if dtype else "off", device=str(device),
                 world_size=world_size)
    if is_main:
        save_json(final, os.path.join(out_dir, "final.json"))
        print(f"test accuracy {100 * test_acc:.2f}% (loss {test_loss:.4f}) after {config['epochs']} "
              f"epochs, {format_seconds(train_seconds)} of training | run folder {out_dir}")
    return final


def epoch_summary(record, epochs):
    text = (f"epoch {record['epoch']}/{epochs} | train loss {record['train_loss']:.4f} "
            f"acc {100 * record['train_acc']:.2f}%")
    for split in ("val", "test"):
        if f"{split}_acc" in record:
            text += f" | {split} loss {record[f'{split}_loss']:.4f} acc {100 * record[f'{split}_acc']:.2f}%"
    return text + (f" | lr {record['lr']:.2e} | {record['images_per_second']:.0f} img/s | "
                   f"{record['seconds']:.1f} s")


def evaluate_checkpoint(path, given):
    """--eval-only: rebuild the model from the checkpoint's own config, report test accuracy and
    write it to eval.json beside the checkpoint."""
    if not path:
        raise UserError("--eval-only needs --checkpoint PATH (a checkpoint.pt or best.pt of a run)")
    checkpoint = load_checkpoint(path)
    config = dict(checkpoint["config"])
    for key in ("data_dir", "amp", "tta"):
        if key in given:
            config[key] = given[key]
    device = torch.device(resolve_device(given.get("device")))
    dtype = autocast_dtype(config["amp"], device)
    try:
        model = VisionLSTM(ViLConfig(**config["model_config"]))
        weights = checkpoint["ema"]["shadow"] if checkpoint.get("ema") is not None else checkpoint["model"]
        model.load_state_dict({name: value.to(model.state_dict()[name].dtype) for name, value in weights.items()})
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise UserError(f"{path} does not match this version's model ({type(error).__name__}: "
                        f"{str(error)[:200]})")
    model.to(device)
    images, labels = load_split(config, train=False)
    pad_to = padding_for(images, config["model_config"]["img_size"])
    loss, accuracy = evaluate(model, images, labels, config, device, dtype, 0, 1, pad_to,
                              tta=mirror_tta(config, DATASETS[config["dataset"]].digits))
    result = dict(checkpoint=os.path.abspath(path), dataset=config["dataset"], test_acc=accuracy,
                  test_loss=loss, epoch=checkpoint["epoch"], ema=checkpoint.get("ema") is not None)
    print(f"test accuracy {100 * accuracy:.2f}% (loss {loss:.4f}) of {path} "
          f"(epoch {checkpoint['epoch']}{', EMA weights' if result['ema'] else ''})")
    eval_path = os.path.join(os.path.dirname(os.path.abspath(path)), "eval.json")
    try:
        save_json(result, eval_path)
    except OSError as error:
        print(f"note: could not write {eval_path} ({error.strerror}); the result is above")
    return result


def main(argv=None):
    try:
        config, given, resume, eval_only, checkpoint = parse_config(sys.argv[1:] if argv is None else argv)
        if eval_only:
            evaluate_checkpoint(checkpoint, {key: config[key] for key in given})
        else:
            train(config, given, resume)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLoss as error:
        print(f"error: {error}. Stopped; the checkpoint written before it, if any, is unchanged. "
              f"Try a lower --lr, --grad-clip 1 or --amp off.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before training started (loading or downloading data)
        print("\ninterrupted before training started; nothing was saved", file=sys.stderr)
        return 130
    except Interrupted as interruption:
        where, out_dir = interruption.args
        print(f"\ninterrupted at {where}; checkpoint saved. Continue with: "
              f"python training.py --resume --out-dir {out_dir}", file=sys.stderr)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
