"""Properties of the three mLSTM forms in mlstm.py: they compute the recurrence of mlstm.py's
module docstring, part 1 (checked against a naive float64 loop written here), stay finite at
extreme gates, have correct gradients, and the chunkwise form needs memory linear in S."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import (FORMS, GRADIENT_REGIMES, assert_parallel_gradient_equals_the_naive_loop_gradient, make_inputs,
                     naive_mlstm, normwise_relative_error)
from mlstm import chunkwise_mlstm, parallel_mlstm


def relative_error(actual, expected):
    """Largest deviation relative to the largest output."""
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("seq_len", [1, 2, 5, 16, 17, 48, 100])
@pytest.mark.parametrize("gate_scale", [1.0, 10.0, 50.0])
def test_forms_equal_naive_loop_in_float64(seq_len, gate_scale):
    inputs = make_inputs(seq_len, gate_scale, torch.float64, seed=seq_len)
    expected = naive_mlstm(*inputs)
    for name, form in FORMS.items():
        assert relative_error(form(*inputs), expected) <= 1e-10, name


@pytest.mark.parametrize("seq_len", [1, 7, 33, 64, 100, 130])
@pytest.mark.parametrize("gate_scale", [1.0, 10.0, 50.0])
def test_forms_match_naive_loop_in_float32(seq_len, gate_scale):
    inputs = make_inputs(seq_len, gate_scale, torch.float32, seed=seq_len + 1000)
    expected = naive_mlstm(*inputs)  # float64 on the same float32 inputs
    for name, form in FORMS.items():
        assert normwise_relative_error(form(*inputs), expected) <= 1e-4, name


def test_chunkwise_with_one_chunk_is_the_parallel_form():
    inputs = make_inputs(40, 5.0, torch.float32, seed=1)
    assert torch.equal(chunkwise_mlstm(*inputs, chunk_size=40), parallel_mlstm(*inputs))
    assert torch.equal(chunkwise_mlstm(*inputs, chunk_size=64), parallel_mlstm(*inputs))


def test_representable_values_survive_extreme_input_gates():
    # igate = -90: exp(-m) = e^90 overflows float32, yet h ~ e^-90 is a representable (subnormal)
    # float32 number; igate = -80: exp(-m) fits, h ~ e^-80; both must match the float64 value, not
    # be flushed to zero
    for igate_value in (-80.0, -90.0):
        q, k, v, igate, fgate = make_inputs(20, 1.0, torch.float32, seed=2)
        igate = torch.full_like(igate, igate_value)
        expected = naive_mlstm(q, k, v, igate, fgate)
        for name, form in FORMS.items():
            assert relative_error(form(q, k, v, igate, fgate), expected) <= 1e-4, name


GATE_PATTERNS = {
    "i+f+": (100.0, 100.0), "i+f-": (100.0, -100.0), "i-f+": (-100.0, 100.0), "i-f-": (-100.0, -100.0),
}


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("pattern", [*GATE_PATTERNS, "random-signs"])
def test_outputs_and_gradients_finite_at_extreme_gates(pattern, autocast):
    q, k, v, igate, fgate = make_inputs(37, 1.0, torch.float32, seed=3)
    if pattern == "random-signs":
        igate, fgate = 100.0 * igate.sign(), 100.0 * fgate.sign()
    else:
        igate, fgate = (torch.full_like(igate, value) for value in GATE_PATTERNS[pattern])
    for name, form in FORMS.items():
        leaves = [x.clone().requires_grad_() for x in (q, k, v, igate, fgate)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            h = form(*leaves)
        assert torch.isfinite(h).all(), name
        (h.float() * torch.randn_like(h.float())).sum().backward()
        for leaf in leaves:
            assert torch.isfinite(leaf.grad).all(), name


def test_bf16_inputs_agree_with_float64():
    inputs = make_inputs(50, 3.0, torch.bfloat16, seed=4)
    expected = naive_mlstm(*inputs)
    for name, form in FORMS.items():
        out = form(*inputs)
        assert out.dtype == torch.bfloat16
        assert relative_error(out, expected) <= 5e-2, name


@pytest.mark.parametrize("regime", ["gates-1", "lower-bound-m-negative", "lower-bound-m-positive"])
def test_bf16_parallel_gradient_agrees_with_float64(regime):
    # what autocast hands the cell: q, k, v in bf16, the gates in float32. The backward keeps the
    # (S, DH) products in bf16 and the sums and gate arithmetic in float32; every gradient must stay
    # within bf16 rounding (about 0.4% per value, here 0.3-0.8% norm-wise) of the float64 loop's at the
    # same rounded inputs. Large gates are left out: there the rounding of q and k alone moves h by 5%.
    gate_scale, igate_offset, query_scale = GRADIENT_REGIMES[regime]
    q, k, v, igate, fgate = make_inputs(64, gate_scale, torch.float64, seed=7, head_dim=32)
    leaves = [(q * query_scale).bfloat16(), k.bfloat16(), v.bfloat16(), (igate + igate_offset).float(), fgate.float()]
    leaves = [x.requires_grad_() for x in leaves]
    naive_leaves = [x.detach().double().requires_grad_() for x in leaves]
    cotangent = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    (parallel_mlstm(*leaves).double() * cotangent).sum().backward()
    (naive_mlstm(*naive_leaves) * cotangent).sum().backward()
    for name, leaf, naive in zip("q k v igate fgate".split(), leaves, naive_leaves):
        assert leaf.grad.dtype == leaf.dtype, name
        assert normwise_relative_error(leaf.grad, naive.grad) <= 2e-2, name


@pytest.mark.parametrize("form", [parallel_mlstm, lambda *x: chunkwise_mlstm(*x, chunk_size=3)],
                         ids=["parallel", "chunkwise"])
@pytest.mark.parametrize("gate_scale", [1.0, 5.0])
def test_gradcheck_float64(form, gate_scale):
    inputs = [x.requires_grad_() for x in make_inputs(7, gate_scale, torch.float64, seed=5, batch=1, heads=2,
                                                       head_dim=3)]
    assert torch.autograd.gradcheck(form, inputs)


@pytest.mark.parametrize("regime", GRADIENT_REGIMES)
def test_parallel_gradient_equals_the_naive_loop_gradient(regime):
    assert_parallel_gradient_equals_the_naive_loop_gradient(regime, "cpu")


def test_parallel_form_refuses_a_second_derivative():
    # its backward is written from saved forward values; differentiating that backward would give wrong
    # second derivatives, so it must raise rather than answer
    leaves = [x.requires_grad_() for x in make_inputs(5, 1.0, torch.float64, seed=9, batch=1, heads=1, head_dim=3)]
    grads = torch.autograd.grad(parallel_mlstm(*leaves).square().sum(), leaves, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grads[0].sum().backward()


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def largest_tensor_and_saved_elements(form, seq_len):
    """(largest tensor made in forward and backward, elements saved for the backward) of one call."""
    leaves = [x.requires_grad_() for x in make_inputs(seq_len, 2.0, torch.float32, seed=6, batch=1, heads=1,
                                                       head_dim=8)]
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with LargestTensor() as probe, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        form(*leaves).sum().backward()
    return probe.largest, sum(saved)


def test_chunkwise_memory_is_linear_in_sequence_length():
    # the probe sees the S x S matrices of the parallel form
    largest, saved = largest_tensor_and_saved_elements(parallel_mlstm, 256)
    assert largest >= 256 * 256 and saved >= 256 * 256
    seq_len = 4096
    largest, saved = largest_tensor_and_saved_elements(lambda *x: chunkwise_mlstm(*x, chunk_size=64), seq_len)
    # the parallel form needs several S x S = 16.8M-element tensors here; chunkwise needs O(S L)
    assert largest <= seq_len * 8 * 2
    assert saved <= 40 * seq_len * 64
    assert saved < seq_len * seq_len / 4
