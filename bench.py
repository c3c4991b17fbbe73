"""Benchmarks for Vision-LSTM: training throughput and peak memory of a preset beside a plain ViT,
the cost of the three mLSTM forms as the sequence grows, and the speed of the data pipeline.

    python bench.py train                  # training table: vil-t beside its ViT, batch 64, every
                                           # dtype (and eager + compiled) that suits the device
    python bench.py train --model vil-t --batch-size 64 --device cpu --dtypes fp32 bf16 --steps 10 --warmup 3
    python bench.py train --model vil-t vil-s --device cuda --dtypes bf16 --compile
    python bench.py block                  # one pair of ViL blocks beside one ViT block, timed in turns
    python bench.py forms                  # parallel / chunkwise / recurrent mLSTM, S = 64 .. 4096
    python bench.py data                   # DeviceLoader images/s, all augmentations, vs vil-1m training
    python bench.py profile --model vil-t  # top ops of one training step, ViL and its ViT
    python bench.py train -h               # a subcommand's options; with no subcommand, bench.py prints
                                           # this help and runs nothing

Training throughput is one optimisation step as training.py takes it (autocast forward,
cross-entropy with label smoothing 0.1 on float32 logits, zero_grad, backward, gradient clipping to
norm 1.0, AdamW step; AdamW fused on CUDA; not the weight EMA that a recipe may add after it) on random
32x32 images and labels, in images/s, in processes set up as training.py's (set_up_as_training: freed memory
kept for the next step; "fp32" on a CUDA GPU is float32 with TF32 matmuls, as training.py runs it). Each row pair
(a preset and its ViT, same dtype, compile mode and batch) is timed in turns within one fresh process: one ViL
step, one ViT step, and so on, each step a window of its own (synchronised on CUDA), warm-up turns excluded. The
table shows each model's median and range over its windows and the ratio of the two medians, so that a shared
machine's drift touches both models alike. Peak memory is measured apart, in a short pass per model in a fresh
process of its own (one warm-up step, then one step, so that gradients and AdamW state exist), so that it stays
each model's own: on CUDA torch.cuda.max_memory_allocated, on CPU the peak resident set size of the
process (getrusage maxrss, which includes the Python + torch runtime: the header prints that
baseline).
"% of peak" is the training FLOPs achieved over the device's matmul peak in the row's dtype. The
training FLOPs of one image are 3 x the forward FLOPs the model counts itself (the "GFLOPs/img"
column: matmuls and convolutions, 2 per multiply-add; the backward pass taken as twice the forward,
the usual rule), times the img/s. The peak is measured before the table: one plain square matmul
(2048 on CPU, 4096 on CUDA) in fp32 (TF32 on CUDA), or in bf16 on bf16 tensors for bf16 rows, median of a few
repeats after a warm-up, printed in the header in TFLOP/s.
"ops/step" counts the torch operators one training step dispatches below autograd (forward, backward, clipping and
AdamW), views left out: each is a kernel launched on a GPU, and an eager step whose kernels are small (a small
model's, as vil-1m at batch 256 is on a GPU) takes about as long as the host needs to launch them, so there the
two models' counts, more than their FLOPs, set their speed ratio (RESULTS.md, "Operators per step"; compiled
rows: "-", the compiler fuses the operators).
train --compile adds rows with the models wrapped in torch.compile (compiled during the warm-up; the
optimizer step stays eager).
block times one pair of ViL blocks (both directions) beside one ViT block, forward + backward,
then one ViL layer and each of its pieces on inputs of their own (up-projection, conv, q/k/v and
gates, mLSTM cell, output gate and down-projection), all in turns within one process, as the table
does: where a layer's time goes.

The yardstick is a plain ViT of the preset's width and about its FLOPs: a ViT block costs about
as much as two ViL blocks (one pair of directions), so its depth is half the preset's block count
(vil-t: dim 192, depth 12, 3 heads; the table prints both FLOP counts, so the gap is visible).
Pre-norm, head width 64, MLP ratio 4 (GELU), the preset's patch size, learnable position embedding,
no class token and mean pooling over the tokens (ViL has no class token either), attention by
torch's scaled_dot_product_attention. Its FLOPs are
counted as the model counts its own: forward multiply-adds of matmuls and convolutions, times 2.
The "counted" column is torch's FlopCounterMode on one forward pass: the FLOPs actually executed,
a check of both counts (above the model's own count where it multiplies zeros on purpose).
"""
import argparse
import multiprocessing
import os
import platform
import resource
import signal
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

if __name__ == "__mp_main__":  # a measurement's fresh process (spawn imports this file so): Ctrl-C ends it at once,
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))  # quietly; its parent says "interrupted"
elif __name__ == "__main__":  # Ctrl-C while torch loads (a second or two): no traceback
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(130))
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from data import DATASETS, Augment, DeviceLoader
from mlstm import ViLBlock, chunkwise_mlstm, parallel_mlstm, recurrent_mlstm
from model import PRESETS, ViLConfig, create_model, decay_groups
from utils import (AUTOCAST_DTYPES, UserError, allow_tf32, autocast, has_native_bf16, keep_freed_memory,
                   out_of_memory, resolve_device, synchronize)

if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # loaded: Ctrl-C is main()'s to handle again
DTYPES = ("fp32", "bf16")  # plain fp32, or bf16 autocast (utils.AUTOCAST_DTYPES)
IMG_SIZE, IN_CHANS, NUM_CLASSES = 32, 3, 10  # CIFAR-10 shaped inputs
VIT_HEAD_DIM, VIT_MLP_RATIO = 64, 4
LABEL_SMOOTHING, GRAD_CLIP, WEIGHT_DECAY = 0.1, 1.0, 0.05  # training.py's defaults
TRAINING_FLOPS_PER_FORWARD = 3  # forward + backward (gradients of the inputs and of the weights)

# the matmul peak: one (N, N) @ (N, N) product per dtype, median of the repeats after the warm-up
PEAK_MATMUL_SIZE = {"cpu": 2048, "cuda": 4096}
PEAK_REPEATS, PEAK_WARMUP = 5, 2

# forms: one mLSTM layer of vil-t (inner width 384 over 4 heads); batch 1 keeps the parallel
# form's (S, S) matrices at S = 4096 within a shared machine's memory
FORMS_LENGTHS = [64, 128, 256, 512, 1024, 2048, 4096]
FORMS_BATCH, FORMS_HEADS, FORMS_HEAD_DIM, FORMS_CHUNK_SIZE = 1, 4, 96, 64
RECURRENT_MAX_LENGTH = 1024  # one Python step per token (~0.7 s forward + backward at 1024 on 2 CPU cores)

# data: the loader at the training batch size of the replaced repository, on synthetic CIFAR-shaped
# uint8 images (the augmentations' cost does not depend on the pixel values)
DATA_BATCH_SIZE, DATA_NUM_IMAGES, DATA_MODEL, DATA_TARGET_RATIO = 256, 10240, "vil-1m", 10
# every augmentation on: crop, flip, RandAugment(2, 9), random erasing, mixup and cutmix
DATA_AUGMENT = Augment(crop_padding=4, flip=True, policy="randaugment", erasing_prob=0.25, mixup_alpha=0.8,
                       cutmix_alpha=1.0)


# ----------------------------------------------------------------------------- the yardstick ViT

class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        batch, length, dim = x.shape
        # (B, S, 3D) -> (3, B, NH, S, DH)
        qkv = self.qkv(x).view(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(h.transpose(1, 2).reshape(batch, length, dim))  # (B, NH, S, DH) -> (B, S, D)


class Block(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, VIT_MLP_RATIO * dim), nn.GELU(), nn.Linear(VIT_MLP_RATIO * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Plain pre-norm ViT with mean pooling. forward(x: (B, C, H, W)) -> logits (B, num_classes)."""

    def __init__(self, dim, depth, patch_size, img_size, in_chans, num_classes):
        super().__init__()
        self.dim, self.depth, self.num_classes = dim, depth, num_classes
        self.num_tokens = (img_size[0] // patch_size) * (img_size[1] // patch_size)
        self.patch_embed = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, self.num_tokens, dim), std=0.02))
        self.blocks = nn.Sequential(*[Block(dim, dim // VIT_HEAD_DIM) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        # (B, D, H/p, W/p) -> (B, S, D), laid out token-major as in model.py
        x = self.patch_embed(x).flatten(2).transpose(1, 2).contiguous()
        x = self.blocks(x + self.pos_embed)
        return self.head(self.norm(x).mean(dim=1))

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def param_groups(self, weight_decay):
        """AdamW's groups by the ViL's rule (model.decay_groups), as training.py makes them."""
        return decay_groups(self, weight_decay)

    def flops_per_image(self):
        """Forward FLOPs of one image: 2 x multiply-adds of the convolution and the matmuls."""
        tokens, dim = self.num_tokens, self.dim
        patch_embed = 2 * tokens * dim * self.patch_embed.weight[0].numel()
        projections = 2 * tokens * (3 + 1 + 2 * VIT_MLP_RATIO) * dim * dim  # qkv, out, MLP up and down
        attention = 2 * 2 * tokens * tokens * dim  # Q K^T and (attention) V
        return patch_embed + self.depth * (projections + attention) + 2 * dim * self.num_classes


def yardstick_arch(preset):
    """The ViT keyword arguments that match a ViL preset's width, patch, input and FLOPs."""
    config = ViLConfig(**PRESETS[preset])
    return dict(dim=config.dim, depth=max(1, config.depth // 2), patch_size=config.patch_size,
                img_size=(IMG_SIZE, IMG_SIZE), in_chans=IN_CHANS, num_classes=NUM_CLASSES)


def bench_model(spec):
    """spec: ("vil", preset name) or ("vit", ViT keyword arguments) -> nn.Module with
    num_params() and flops_per_image()."""
    kind, what = spec
    if kind == "vit":
        return ViT(**what)
    return create_model(what, num_classes=NUM_CLASSES, in_chans=IN_CHANS, img_size=IMG_SIZE)


def model_label(spec):
    kind, what = spec
    return f"vit-d{what['dim']}x{what['depth']}" if kind == "vit" else what


# ----------------------------------------------------------------------------- measuring

def timed_in_turns(fns, steps, warmup, device):
    """Calls the functions of the dict fns one after the other, turn after turn: warmup untimed
    turns, then steps turns in which each call is timed alone -> {name: list of seconds}."""
    seconds = {name: [] for name in fns}
    for turn in range(warmup + steps):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if turn >= warmup:
                seconds[name].append(time.perf_counter() - start)
    return seconds


def timed_windows(fn, steps, warmup, device):
    """Runs fn warmup times untimed, then steps times, each timed alone -> list of seconds."""
    return timed_in_turns({"fn": fn}, steps, warmup, device)["fn"]


def matmul_peak_flops(dtype, device, size, repeats=PEAK_REPEATS, warmup=PEAK_WARMUP):
    """FLOP/s of one plain (size, size) @ (size, size) matmul in dtype ("bf16": bf16 tensors, no
    autocast), the median over the repeats."""
    tensor_dtype = AUTOCAST_DTYPES[dtype] or torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=tensor_dtype) for _ in range(2))
    return 2 * size**3 / statistics.median(timed_windows(lambda: a @ b, repeats, warmup, device))


def training_flops_per_image(forward_flops):
    """Forward + backward FLOPs of one image, by the 3x rule."""
    return TRAINING_FLOPS_PER_FORWARD * forward_flops


def fraction_of_peak(forward_flops, images_per_s, peak_flops):
    """Training FLOP/s achieved, as a fraction of the peak FLOP/s."""
    return training_flops_per_image(forward_flops) * images_per_s / peak_flops


def peak_memory_bytes(device):
    """Peak memory of this process so far: allocated CUDA memory, or CPU resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class OpCounter(TorchDispatchMode):
    """Counts the operators dispatched below autograd while active, views left out (they launch no kernel; nor
    does _unsafe_view, the view a reshape ends with where it had to copy): `with OpCounter() as counter: step()`,
    then counter.ops."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not (func.is_view or func.overloadpacket is torch.ops.aten._unsafe_view)
        return func(*args, **(kwargs or {}))


def counted_flops(model, device):
    """Forward FLOPs of one image by torch's FlopCounterMode (the math attention backend, so the
    counter sees the attention matmuls)."""
    x = torch.randn(1, IN_CHANS, IMG_SIZE, IMG_SIZE, device=device)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def make_train_step(model, batch_size, dtype, device):
    """A closure doing one training step as training.py does (without its weight EMA, and with a constant learning
    rate, which costs the same), on a fixed random batch."""
    x = torch.randn(batch_size, IN_CHANS, IMG_SIZE, IMG_SIZE, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch_size,), device=device)
    params = list(model.parameters())
    # its parameter groups, fused on CUDA, as training.py runs it
    optimizer = torch.optim.AdamW(model.param_groups(WEIGHT_DECAY), lr=1e-3, fused=device.type == "cuda")
    autocast_dtype = AUTOCAST_DTYPES[dtype]

    def train_step():
        with autocast(device, autocast_dtype):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=LABEL_SMOOTHING)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()

    return train_step


def measure_training(spec, batch_size, device, dtype, compiled, steps, warmup):
    """Runs in a fresh process. -> dict with params, flops, counted flops, a list of images/s per
    timed window, peak memory in bytes, and the operators a step dispatches (not where compiled)."""
    device = torch.device(device)
    torch.manual_seed(0)
    model = bench_model(spec).to(device)
    result = dict(params=model.num_params(), flops=model.flops_per_image(), counted=counted_flops(model, device))
    step = make_train_step(torch.compile(model) if compiled else model, batch_size, dtype, device)
    seconds = timed_windows(step, steps, warmup, device)
    result["images_per_s"] = [batch_size / s for s in seconds]
    result["peak_memory"] = peak_memory_bytes(device)
    if not compiled:  # a step after the first, whose AdamW creates its state
        with OpCounter() as counter:
            step()
        result["ops"] = counter.ops
    return result


def measure_in_turns(specs, batch_size, device, dtype, compiled, steps, warmup):
    """Runs in a fresh process: the models' training steps in turns, one step of each per turn.
    -> {model label: list of images/s per timed window}."""
    device = torch.device(device)
    train_steps = {}
    for spec in specs:
        torch.manual_seed(0)
        model = bench_model(spec).to(device)
        train_steps[model_label(spec)] = make_train_step(torch.compile(model) if compiled else model,
                                                         batch_size, dtype, device)
    seconds = timed_in_turns(train_steps, steps, warmup, device)
    return {label: [batch_size / s for s in times] for label, times in seconds.items()}


def runtime_baseline():
    """Runs in a fresh process: peak resident set size of Python + torch with no model."""
    torch.zeros(1)
    return peak_memory_bytes(torch.device("cpu"))


def set_up_as_training(device):
    """This process set up as training.py sets up its own: the memory a step frees kept for the next
    (keep_freed_memory), float32 matmuls in TF32 on a CUDA GPU (allow_tf32). device: its name."""
    keep_freed_memory()
    allow_tf32(torch.device(device))


def in_fresh_process(device, fn, *args):
    """fn(*args) in a newly spawned interpreter set up for device as training.py's process (set_up_as_training),
    so that its peak memory and caches are its own."""
    # an executor, unlike a Pool, fails loudly when the worker dies (killed for memory, say)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                             initializer=set_up_as_training, initargs=(str(device),)) as executor:
        return executor.submit(fn, *args).result()


# ----------------------------------------------------------------------------- tables

def hardware_line(device):
    if device.type == "cuda":
        chip = f"GPU {torch.cuda.get_device_name(device)}"
    elif os.path.exists("/proc/cpuinfo"):  # Linux, where platform.processor() says little
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        chip = f"CPU {names[0] if names else platform.machine()}"
    else:
        chip = f"CPU {platform.processor() or platform.machine()}"
    return (f"{chip}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}")


def print_header(columns):
    """Opens a markdown table (ready to paste into README.md); rows follow as they are measured."""
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|", flush=True)


def print_row(cells):
    print("| " + " | ".join(str(cell) for cell in cells) + " |", flush=True)


def megabytes(num_bytes):
    return f"{num_bytes / 2**20:.0f} MB"


def figures(value):
    """A rate to three significant figures at least, without an exponent: 1234, 123, 12.3, 0.123."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def memory_pass(spec, dtype, compiled, args, device):
    """Params, FLOP counts and peak memory of one model, from one warm-up step and one step in a
    fresh process of its own (the second step holds gradients and AdamW state), then the operators of a third."""
    return in_fresh_process(device, measure_training, spec, args.batch_size, str(device), dtype, compiled, 1, 1)


def training_cells(spec, result, speeds, vit_speed, dtype, compiled, args, peak_flops):
    """One table row: a model's memory pass result and its images/s per window."""
    speed = statistics.median(speeds)
    return [model_label(spec), f"{result['params'] / 1e6:.2f}M", f"{result['flops'] / 1e9:.3f}",
            f"{result['counted'] / 1e9:.3f}", args.batch_size, dtype, "yes" if compiled else "no",
            f"{figures(speed)} ({figures(min(speeds))}-{figures(max(speeds))})",
            f"{figures(100 * fraction_of_peak(result['flops'], speed, peak_flops))}%", f"{speed / vit_speed:.2f}",
            result.get("ops", "-"), megabytes(result["peak_memory"])]


def print_training_header(args, device, size, peaks):
    if device.type == "cuda":
        memory_kind = "torch.cuda.max_memory_allocated"
    else:
        baseline = in_fresh_process("cpu", runtime_baseline)
        memory_kind = f"peak process RSS (maxrss), of which Python + torch alone: {megabytes(baseline)}"
    print(f"## Training throughput (forward + backward + clipping + AdamW step), {hardware_line(device)}\n")
    print(f"{IMG_SIZE}x{IMG_SIZE} inputs, random data; img/s: median (min-max) of {args.steps} timed steps "
          f"after {args.warmup} warm-up, each preset and its ViT in turns within one process; peak memory: "
          f"{memory_kind}, of each model in a 2-step pass in its own process\n")
    print(f"matmul peak ({size}x{size} @ {size}x{size}, median of {PEAK_REPEATS} after {PEAK_WARMUP} warm-up): "
          + ", ".join(f"{dtype} {figures(peak / 1e12)} TFLOP/s" for dtype, peak in peaks.items())
          + f"; % of peak: {TRAINING_FLOPS_PER_FORWARD} x GFLOPs/img (forward + backward) x img/s over the "
          f"peak of the row's dtype\n")
    print_header(["model", "params", "GFLOPs/img", "counted", "batch", "dtype", "compile", "img/s", "% of peak",
                  "vs ViT", "ops/step", "peak memory"])


def training_table(args, device):
    size = PEAK_MATMUL_SIZE.get(device.type, PEAK_MATMUL_SIZE["cpu"])
    peaks = {dtype: matmul_peak_flops(dtype, device, size) for dtype in args.dtypes}
    print_training_header(args, device, size, peaks)
    memory = {}  # (model label, dtype, compiled) -> memory pass; presets of one width and depth share a ViT
    for preset in args.model:
        vil, vit = ("vil", preset), ("vit", yardstick_arch(preset))
        for dtype in args.dtypes:
            for compiled in args.compile_modes:
                for spec in (vit, vil):
                    key = (model_label(spec), dtype, compiled)
                    if key not in memory:
                        memory[key] = memory_pass(spec, dtype, compiled, args, device)
                speeds = in_fresh_process(device, measure_in_turns, [vil, vit], args.batch_size, str(device), dtype,
                                          compiled, args.steps, args.warmup)
                vit_speed = statistics.median(speeds[model_label(vit)])
                for spec in (vit, vil):
                    print_row(training_cells(spec, memory[(model_label(spec), dtype, compiled)],
                                             speeds[model_label(spec)], vit_speed, dtype, compiled, args,
                                             peaks[dtype]))
    print()


def time_form(form, length, dtype, args, device):
    """Milliseconds (forward, forward + backward) of one mLSTM form over (1, 4, length, 96) inputs."""
    shape = (FORMS_BATCH, FORMS_HEADS, length, FORMS_HEAD_DIM)
    q, k, v = (torch.randn(shape, device=device, requires_grad=True) for _ in range(3))
    igate = torch.randn(shape[:3], device=device, requires_grad=True)
    fgate = (torch.randn(shape[:3], device=device) + 4).requires_grad_()  # forget gates near their init
    autocast_dtype = AUTOCAST_DTYPES[dtype]

    def forward():
        with torch.no_grad(), autocast(device, autocast_dtype):
            form(q, k, v, igate, fgate)

    def forward_backward():
        with autocast(device, autocast_dtype):
            h = form(q, k, v, igate, fgate)
        h.float().sum().backward()

    return [1000 * statistics.median(timed_windows(fn, args.steps, args.warmup, device))
            for fn in (forward, forward_backward)]


def forms_table(args, device):
    forms = [("parallel", parallel_mlstm),
             ("chunkwise", lambda *tensors: chunkwise_mlstm(*tensors, chunk_size=FORMS_CHUNK_SIZE)),
             ("recurrent", recurrent_mlstm)]
    print(f"## mLSTM forms, ms per call: forward / forward + backward, {hardware_line(device)}\n")
    print(f"q, k, v (B={FORMS_BATCH}, NH={FORMS_HEADS}, S, DH={FORMS_HEAD_DIM}) (one vil-t layer), chunk size "
          f"{FORMS_CHUNK_SIZE}; median of {args.steps} after {args.warmup} warm-up; recurrent only up to "
          f"S={RECURRENT_MAX_LENGTH} (one Python step per token: longer is only a slow loop)\n")
    print_header(["dtype", "S"] + [name for name, _ in forms])
    for dtype in args.dtypes:
        for length in FORMS_LENGTHS:
            cells = [dtype, length]
            for name, form in forms:
                if name == "recurrent" and length > RECURRENT_MAX_LENGTH:
                    cells.append("skipped")
                    continue
                forward_ms, forward_backward_ms = time_form(form, length, dtype, args, device)
                cells.append(f"{forward_ms:.1f} / {forward_backward_ms:.1f}")
            print_row(cells)
    print()


def measure_loader(device, steps, warmup):
    """Runs in a fresh process. -> images/s per timed batch of the DeviceLoader with the "strong"
    recipe (crop, flip, RandAugment, erasing, mixup/cutmix: every augmentation on), over synthetic
    CIFAR-shaped uint8 images."""
    device = torch.device(device)
    info = DATASETS["cifar10"]
    images = torch.randint(0, 256, (DATA_NUM_IMAGES, IN_CHANS, IMG_SIZE, IMG_SIZE), dtype=torch.uint8)
    labels = torch.randint(0, info.num_classes, (DATA_NUM_IMAGES,))
    loader = DeviceLoader(images, labels, DATA_BATCH_SIZE, num_classes=info.num_classes, mean=info.mean,
                          std=info.std, train=True, augment=DATA_AUGMENT, device=device)

    def every_batch():  # as many epochs as the timing needs
        epoch = 0
        while True:
            yield from loader.epoch(epoch)
            epoch += 1

    batches = every_batch()
    seconds = timed_windows(lambda: next(batches), steps, warmup, device)
    return [DATA_BATCH_SIZE / s for s in seconds]


def data_table(args, device):
    dtype, compiled = args.dtype, args.compile
    loader_speeds = in_fresh_process(device, measure_loader, str(device), args.steps, args.warmup)
    training = in_fresh_process(device, measure_training, ("vil", DATA_MODEL), DATA_BATCH_SIZE, str(device), dtype,
                                compiled, args.steps, args.warmup)
    loader_speed = statistics.median(loader_speeds)
    training_speed = statistics.median(training["images_per_s"])
    print(f"## Data pipeline, {hardware_line(device)}\n")
    print(f"DeviceLoader, batch {DATA_BATCH_SIZE}, every augmentation on, synthetic uint8 {IMG_SIZE}x{IMG_SIZE} "
          f"images, against {DATA_MODEL} training at the same batch ({dtype}, compile "
          f"{'yes' if compiled else 'no'}); median (min-max) of {args.steps} after {args.warmup} warm-up; "
          f"target: loader >= {DATA_TARGET_RATIO}x training\n")
    print_header(["what", "img/s", "vs training"])
    print_row(["DeviceLoader", f"{loader_speed:.0f} ({min(loader_speeds):.0f}-{max(loader_speeds):.0f})",
               f"{loader_speed / training_speed:.1f}x"])
    print_row([f"{DATA_MODEL} training", f"{training_speed:.0f} ({min(training['images_per_s']):.0f}-"
                                         f"{max(training['images_per_s']):.0f})", "1.0x"])
    print()


def layer_pieces(layer, batch_size, autocast_dtype, device):
    """Each piece of one ViLLayer's forward on inputs of its own, in the dtype its activations have under
    autocast_dtype: {name: function returning the piece's outputs}, to be called under that autocast. In
    order the pieces make up ViLLayer.forward (less the token flip of a reversed layer)."""
    tokens, dim, inner = layer.patch_grid[0] * layer.patch_grid[1], layer.dim, layer.skip.shape[0]
    generator = torch.Generator().manual_seed(0)

    def leaf(width):
        values = torch.randn(batch_size, tokens, width, generator=generator)
        return values.to(device, autocast_dtype or torch.float32).requires_grad_()

    x, x_mlstm, x_conv, z, h = leaf(dim), leaf(inner), leaf(inner), leaf(inner), leaf(inner)
    with torch.no_grad(), autocast(device, autocast_dtype):
        cell_inputs = [t.detach().requires_grad_() for t in layer._qkv_and_gates(x_conv, x_mlstm)]
    return {"up-projection": lambda: layer._up(x), "conv + SiLU": lambda: (F.silu(layer._conv(x_mlstm)),),
            "q/k/v and gates": lambda: layer._qkv_and_gates(x_conv, x_mlstm),
            "mLSTM cell (recurrence + norm)": lambda: (layer.cell(*cell_inputs),),
            "output gate + down-projection": lambda: (layer._out(h, x_conv, z),)}


def block_table(args, device):
    """Forward + backward time of one pair of ViL blocks (both directions), of one ViT block (the
    pair's counterpart in the training table), of one ViL layer and of each piece of that layer
    (layer_pieces). All are timed in turns within one process, so that a shared machine's drift
    touches them alike and their ratios hold even when the absolute times wander."""
    autocast_dtype = AUTOCAST_DTYPES[args.dtype]
    print(f"## One block forward + backward, ms, {args.dtype}, {hardware_line(device)}\n")
    print(f"batch {args.batch_size} of {IMG_SIZE}x{IMG_SIZE} images as tokens; median (min-max) of {args.steps} "
          f"turns after {args.warmup} warm-up\n")
    print_header(["preset", "what", "ms", "vs ViT block"])
    for preset in args.model:
        config = ViLConfig(**{**PRESETS[preset], "img_size": IMG_SIZE})
        dim, grid = config.dim, config.patch_grid
        torch.manual_seed(0)
        pair = nn.Sequential(*[ViLBlock(dim, direction, grid, expansion=config.expansion, num_heads=config.num_heads,
                                        qkv_block_size=config.qkv_block_size) for direction in ViLBlock.DIRECTIONS])
        vit_block = Block(dim, dim // VIT_HEAD_DIM)
        pair, vit_block = pair.to(device), vit_block.to(device)
        x = torch.randn(args.batch_size, grid[0] * grid[1], dim, device=device, requires_grad=True)
        layer = pair[0].layer
        candidates = {"ViL block pair": lambda: (pair(x),), "ViT block": lambda: (vit_block(x),),
                      "ViL layer": lambda: (layer(x),)}
        pieces = layer_pieces(layer, args.batch_size, autocast_dtype, device)
        candidates.update({f"ViL layer: {name}": outputs for name, outputs in pieces.items()})
        cotangents = {}

        def forward_backward(name, outputs_fn):
            def step():
                with autocast(device, autocast_dtype):
                    outputs = outputs_fn()
                if name not in cotangents:  # a fixed random gradient per output, as a loss would give
                    cotangents[name] = [torch.randn_like(out) for out in outputs]
                torch.autograd.backward(outputs, cotangents[name])
            return step

        seconds = timed_in_turns({name: forward_backward(name, fn) for name, fn in candidates.items()},
                                 args.steps, args.warmup, device)
        vit_ms = 1000 * statistics.median(seconds["ViT block"])
        for name, times in seconds.items():
            median = 1000 * statistics.median(times)
            # three figures: at a small batch a piece takes under a millisecond
            print_row([preset, name, f"{figures(median)} ({figures(1000 * min(times))}-{figures(1000 * max(times))})",
                       f"{median / vit_ms:.2f}"])
    print()


def profile_table(args, device):
    """Top ops by self time, summed over args.steps training steps, of each preset and of its ViT."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for preset in args.model:
        for spec in [("vil", preset), ("vit", yardstick_arch(preset))]:
            model = bench_model(spec).to(device)
            step = make_train_step(model, args.batch_size, args.dtype, device)
            timed_windows(step, 0, args.warmup, device)
            with profile(activities=activities) as profiler:
                for _ in range(args.steps):
                    step()
                synchronize(device)
            print(f"## Profile of {args.steps} training step(s), times summed: {model_label(spec)}, "
                  f"batch {args.batch_size}, "
                  f"{args.dtype}, {hardware_line(device)}\n")
            print(profiler.key_averages().table(sort_by=sort_by, row_limit=15))


def at_least(minimum):
    """An argparse type: an integer of at least minimum."""
    def integer(text):
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return integer


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # the options of every subcommand
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--warmup", type=at_least(0), default=3, help="untimed steps first")
    timed = argparse.ArgumentParser(add_help=False)  # of the subcommands that time steps
    timed.add_argument("--steps", type=at_least(1), default=10, help="timed steps (windows) per measurement")
    # the options of the subcommands that build presets
    presets = argparse.ArgumentParser(add_help=False)
    presets.add_argument("--model", nargs="+", choices=list(PRESETS), default=["vil-t"], metavar="PRESET",
                         help=f"ViL presets, each beside its ViT ({', '.join(PRESETS)})")
    presets.add_argument("--batch-size", type=at_least(1), default=64)
    dtypes = dict(nargs="+", choices=DTYPES,
                  help="fp32 and/or bf16 autocast (default: fp32 bf16 where bf16 is native, as training's --amp "
                       "auto takes it: GPUs from Ampere on, CPUs with AVX512-BF16 or AMX; else fp32)")
    dtype = dict(choices=DTYPES, default="fp32", help="plain fp32 or bf16 autocast")

    commands = parser.add_subparsers(dest="command", title="subcommands")
    train_command = commands.add_parser("train", parents=[common, timed, presets],
                                        help="training throughput and peak memory of each preset beside its ViT")
    train_command.add_argument("--dtypes", **dtypes)
    train_command.add_argument("--compile", action=argparse.BooleanOptionalAction,
                               help="also measure torch.compile'd models (default: yes on CUDA, no on CPU)")
    train_command.set_defaults(table=training_table)
    block_command = commands.add_parser("block", parents=[common, timed, presets],
                                        help="one pair of ViL blocks beside one ViT block, forward + backward")
    block_command.add_argument("--dtype", **dtype)
    block_command.set_defaults(table=block_table)
    forms_command = commands.add_parser("forms", parents=[common, timed],
                                        help="parallel / chunkwise / recurrent mLSTM against the sequence length")
    forms_command.add_argument("--dtypes", **dtypes)
    forms_command.set_defaults(table=forms_table)
    data_command = commands.add_parser("data", parents=[common, timed],
                                       help=f"DeviceLoader images/s, every augmentation on, against {DATA_MODEL} "
                                            "training")
    data_command.add_argument("--dtype", choices=DTYPES,
                              help=f"of the {DATA_MODEL} training (default: bf16 where it is native, as "
                                   "for train; else fp32)")
    data_command.add_argument("--compile", action=argparse.BooleanOptionalAction,
                              help=f"torch.compile the {DATA_MODEL} training (default: yes on CUDA, no on CPU)")
    data_command.set_defaults(table=data_table)
    profile_command = commands.add_parser("profile", parents=[common, presets],
                                          help="top ops of training steps of each preset and of its ViT")
    profile_command.add_argument("--dtype", **dtype)
    profile_command.add_argument("--steps", type=at_least(1), default=1, help="training steps profiled")
    profile_command.set_defaults(table=profile_table)

    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        parser.exit(2)
    command = commands.choices[args.command]
    try:
        device = torch.device(resolve_device(args.device))
    except UserError as error:
        command.error(str(error))
    on_cuda = device.type == "cuda"
    native_bf16 = has_native_bf16(device)  # bf16 by default where training.py's --amp auto takes it
    if args.command in ("train", "forms"):
        args.dtypes = args.dtypes or (["fp32", "bf16"] if native_bf16 else ["fp32"])
    if args.command == "train":
        args.compile_modes = [False, True] if (on_cuda if args.compile is None else args.compile) else [False]
    if args.command == "data":
        args.dtype = args.dtype or ("bf16" if native_bf16 else "fp32")
        args.compile = on_cuda if args.compile is None else args.compile
    compiles = True in args.compile_modes if args.command == "train" else args.command == "data" and args.compile
    if compiles and args.warmup < 1:
        command.error("--compile needs --warmup of at least 1: the first step compiles")
    return args


def main():
    args = parse_args()
    set_up_as_training(args.device)
    try:
        args.table(args, torch.device(args.device))
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while exiting: no traceback either
        print("\ninterrupted", file=sys.stderr)  # the rows printed so far stand
        sys.exit(130)
    except (MemoryError, RuntimeError) as error:
        if not out_of_memory(error):
            raise
        advice = "; use a smaller --batch-size" if hasattr(args, "batch_size") else ""
        sys.exit(f"error: out of memory ({str(error).splitlines()[0][:160]}){advice}")


if __name__ == "__main__":
    main()
