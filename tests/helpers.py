"""Helpers that more than one test module uses: the float64 mLSTM loop and its inputs, the forms
and gradient regimes (test_mlstm, test_cuda), the small model (test_model, test_cuda) and the tiny
training run on an image-folder dataset (test_training, test_cuda)."""
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import training
from mlstm import chunkwise_mlstm, parallel_mlstm, recurrent_mlstm

# torch before 2.4 on Python 3.12 and later has no torch.compile ("Dynamo is not supported on Python 3.12+"), and its
# torchrun crashes in the c10d rendezvous (pytorch/pytorch#125990): torch's own limits, for the tests that need either
# to skip (training.py's --compile falls back to eager there, with a note)
TORCH_LACKS_COMPILE_AND_TORCHRUN = (sys.version_info >= (3, 12)
                                    and tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 4))
NO_COMPILE_OR_TORCHRUN = "torch before 2.4 on Python 3.12+ has neither torch.compile nor a working torchrun"


def naive_mlstm(q, k, v, igate, fgate, eps=1e-6):
    """mlstm.py's module docstring, part 1, word for word, one step at a time in float64, m_0 = -inf."""
    q, k, v, igate, fgate = (x.double() for x in (q, k, v, igate, fgate))
    batch, heads, seq_len, head_dim = q.shape
    c = torch.zeros(batch, heads, head_dim, head_dim, dtype=torch.float64)
    n = torch.zeros(batch, heads, head_dim, dtype=torch.float64)
    m = torch.full((batch, heads), -math.inf, dtype=torch.float64)
    outputs = []
    for t in range(seq_len):
        log_forget = F.logsigmoid(fgate[..., t])
        new_m = torch.maximum(log_forget + m, igate[..., t])
        forget = torch.exp(log_forget + m - new_m)[..., None]
        input_ = torch.exp(igate[..., t] - new_m)[..., None]
        key = k[..., t, :] / math.sqrt(head_dim)
        c = forget[..., None] * c + input_[..., None] * v[..., t, :, None] * key[..., None, :]
        n = forget * n + input_ * key
        m = new_m
        numerator = (c @ q[..., t, :, None]).squeeze(-1)
        denominator = torch.maximum((n * q[..., t, :]).sum(-1).abs(), torch.exp(-m)) + eps
        outputs.append(numerator / denominator[..., None])
    return torch.stack(outputs, dim=-2)


def make_inputs(seq_len, gate_scale, dtype, seed, batch=2, heads=2, head_dim=4):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, seq_len, head_dim, generator=generator) for _ in range(3))
    igate, fgate = (gate_scale * torch.randn(batch, heads, seq_len, generator=generator) for _ in range(2))
    return tuple(x.to(dtype) for x in (q, k, v, igate, fgate))


def normwise_relative_error(actual, expected):
    """||actual - expected|| / ||expected|| (Frobenius). In float32 single tokens can be ill-conditioned
    (the q.k of the dominant token nearly cancels), which any float32 implementation shows in its
    largest deviation; the norm-wise error measures the forms instead of those inputs."""
    return ((actual.double() - expected).norm() / expected.norm()).item()


FORMS = {
    "parallel": parallel_mlstm,
    "recurrent": recurrent_mlstm,
    "chunkwise-1": lambda *x: chunkwise_mlstm(*x, chunk_size=1),
    "chunkwise-3": lambda *x: chunkwise_mlstm(*x, chunk_size=3),
    "chunkwise-16": lambda *x: chunkwise_mlstm(*x, chunk_size=16),
    "chunkwise-64": lambda *x: chunkwise_mlstm(*x, chunk_size=64),
}


GRADIENT_REGIMES = {
    # name: (gate scale, input gate offset, query scale); the last two put the normaliser on its
    # lower bound exp(-m), with m < 0 and with m > 0, so the gradient through m is exercised
    "gates-1": (1.0, 0.0, 1.0), "gates-10": (10.0, 0.0, 1.0), "gates-50": (50.0, 0.0, 1.0),
    "lower-bound-m-negative": (1.0, -20.0, 1.0), "lower-bound-m-positive": (1.0, 5.0, 1e-4),
}


def assert_parallel_gradient_equals_the_naive_loop_gradient(regime, device):
    """parallel_mlstm's backward is written out (ParallelMLSTM); the loop's comes from autograd in
    float64 on the CPU."""
    gate_scale, igate_offset, query_scale = GRADIENT_REGIMES[regime]
    q, k, v, igate, fgate = make_inputs(23, gate_scale, torch.float64, seed=7)
    inputs = [q * query_scale, k, v, igate + igate_offset, fgate]
    leaves = [x.to(device, copy=True).requires_grad_() for x in inputs]
    naive_leaves = [x.clone().requires_grad_() for x in inputs]
    cotangent = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    (parallel_mlstm(*leaves) * cotangent.to(device)).sum().backward()
    (naive_mlstm(*naive_leaves) * cotangent).sum().backward()
    for name, leaf, naive in zip("q k v igate fgate".split(), leaves, naive_leaves):
        assert (leaf.grad.cpu() - naive.grad).norm() <= 1e-9 * naive.grad.norm() + 1e-300, name


SMALL = dict(dim=32, depth=2)  # a fast model for the shape and gradient tests

TINY = ["--dataset", "folder", "--dim", "32", "--depth", "2", "--patch-size", "4",
        "--batch-size", "16", "--lr", "3e-3", "--warmup-epochs", "0.5", "--crop-padding", "2",
        "--no-flip", "--image-size", "16", "--device", "cpu", "--seed", "3",
        "--amp", "off"]  # float32 on every CPU: the tests compare runs to float32 tolerances


def write_folder_dataset(root, train_per_class=48, test_per_class=16, size=16):
    """Two classes of 16x16 RGB PNGs that differ in brightness, in root/{train,test}/<class>/."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for label, name in enumerate(("dark", "light")):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for index in range(count):
                base = 60 + 120 * label
                pixels = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"{index}.png"))


def run_main(args, capsys=None):
    code = training.main(list(args))
    return code, (capsys.readouterr() if capsys else None)
