"""Properties of the three mLSTM forms in mlstm.py: they compute the recurrence of mlstm.py's
module docstring, part 1 (checked against the naive float64 loop of tests/helpers.py), stay finite at
extreme gates, have correct gradients, and the chunkwise form needs memory linear in S."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import mlstm
from helpers import (FORMS, GRADIENT_REGIMES, assert_parallel_gradient_equals_the_naive_loop_gradient, make_inputs,
                     naive_mlstm, normwise_relative_error)
from mlstm import FACTORED_SPREAD, ParallelMLSTM, chunkwise_mlstm, parallel_mlstm


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
    # the segment sums, which the parallel form runs on every row where it does not factor
    inputs = make_inputs(40, 5.0, torch.float32, seed=1)
    segment_sums = apply_form(False, *inputs)
    assert torch.equal(chunkwise_mlstm(*inputs, chunk_size=40), segment_sums)
    assert torch.equal(chunkwise_mlstm(*inputs, chunk_size=64), segment_sums)


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


def spreads(igate, fgate):
    """max_s u_s - u_0 per row, u = igate - cumsum(logsigmoid(fgate)): what parallel_mlstm compares with
    FACTORED_SPREAD."""
    u = igate.double() - F.logsigmoid(fgate.double()).cumsum(-1)
    return u.amax(-1) - u[..., 0]


def apply_form(factor, q, k, v, igate, fgate):
    """ParallelMLSTM on gate pre-activations, as parallel_mlstm calls it; factor=False: the segment sums on
    every row, True: the factored computation on the rows within FACTORED_SPREAD."""
    return ParallelMLSTM.apply(q, k, v, igate, fgate, 1e-6, factor)


COMPUTATIONS = {"factored": True, "segment-sums": False}  # the factor argument of each


@pytest.mark.parametrize("computation", COMPUTATIONS)
@pytest.mark.parametrize("regime", ["gates-1", "lower-bound-m-negative", "lower-bound-m-positive"])
def test_bf16_parallel_gradient_agrees_with_float64(regime, computation):
    # what autocast hands the cell: q, k, v in bf16, the gates in float32. The backward keeps the
    # (S, DH) products in bf16 and the sums and gate arithmetic in float32; every gradient must stay
    # within bf16 rounding (about 0.4% per value, here 0.3-0.9% norm-wise) of the float64 loop's at the
    # same rounded inputs. Large gates are left out: there the rounding of q and k alone moves h by 5%.
    gate_scale, igate_offset, query_scale = GRADIENT_REGIMES[regime]
    q, k, v, igate, fgate = make_inputs(64, gate_scale, torch.float64, seed=7, head_dim=32)
    leaves = [(q * query_scale).bfloat16(), k.bfloat16(), v.bfloat16(), (igate + igate_offset).float(), fgate.float()]
    leaves = [x.requires_grad_() for x in leaves]
    naive_leaves = [x.detach().double().requires_grad_() for x in leaves]
    assert (spreads(igate, fgate) <= FACTORED_SPREAD).all()  # so that both computations may take these rows
    cotangent = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    (apply_form(COMPUTATIONS[computation], *leaves).double() * cotangent).sum().backward()
    (naive_mlstm(*naive_leaves) * cotangent).sum().backward()
    for name, leaf, naive in zip("q k v igate fgate".split(), leaves, naive_leaves):
        assert leaf.grad.dtype == leaf.dtype, name
        assert normwise_relative_error(leaf.grad, naive.grad) <= 2e-2, name


def test_gradients_at_m_zero_equal_the_naive_loop():
    # an input gate of exactly 0 on the first token gives m = 0 there, where the two sides of the overflow-safe
    # normaliser meet (_normalise); with a small query its lower bound exp(-m) is taken, and the gradient
    # through m must be the naive loop's, neither lost (as it was) nor counted twice
    q, k, v, igate, fgate = make_inputs(4, 1.0, torch.float64, seed=0, batch=1, heads=1)
    q = q * 1e-3
    igate[..., 0] = 0.0
    naive_leaves = [x.clone().requires_grad_() for x in (q, k, v, igate, fgate)]
    cotangent = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (naive_mlstm(*naive_leaves) * cotangent).sum().backward()
    forms = dict(FORMS, **{name: functools.partial(apply_form, factor) for name, factor in COMPUTATIONS.items()})
    for name, form in forms.items():
        leaves = [x.clone().requires_grad_() for x in (q, k, v, igate, fgate)]
        (form(*leaves) * cotangent).sum().backward()
        for grad_name, leaf, naive in zip("q k v igate fgate".split(), leaves, naive_leaves):
            assert normwise_relative_error(leaf.grad, naive.grad) <= 1e-9, (name, grad_name)


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


def rows_of_two_kinds(seq_len, dtype):
    """Inputs of 2 x 2 rows: rows (0, 0) and (1, 1) with gates that forget within a few tokens (spread above
    FACTORED_SPREAD), the other two with moderate gates."""
    q, k, v, igate, fgate = make_inputs(seq_len, 1.0, torch.float64, seed=11)
    fgate[0, 0] -= 6.0
    fgate[1, 1] -= 6.0
    assert (spreads(igate, fgate) > FACTORED_SPREAD).tolist() == [[True, False], [False, True]]
    return [x.to(dtype) for x in (q, k, v, igate, fgate)]


@pytest.mark.parametrize("computation", COMPUTATIONS)
def test_each_parallel_computation_equals_the_naive_loop_in_float64(computation):
    # the factored one on rows within its spread; the segment sums also on a row far beyond it (FORMS
    # covers extreme gates)
    inputs = list(make_inputs(40, 1.0, torch.float64, seed=12))
    if computation == "segment-sums":
        inputs[4][0, 1] -= 6.0
    within = spreads(*inputs[3:]) <= FACTORED_SPREAD
    assert within.all() if computation == "factored" else not within.all()
    leaves = [x.clone().requires_grad_() for x in inputs]
    naive_leaves = [x.clone().requires_grad_() for x in inputs]
    cotangent = torch.randn(inputs[0].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    h = apply_form(COMPUTATIONS[computation], *leaves)
    expected = naive_mlstm(*naive_leaves)
    assert relative_error(h, expected) <= 1e-10
    (h * cotangent).sum().backward()
    (expected * cotangent).sum().backward()
    for name, leaf, naive in zip("q k v igate fgate".split(), leaves, naive_leaves):
        assert (leaf.grad - naive.grad).norm() <= 1e-9 * naive.grad.norm(), name


def test_factored_form_keeps_float32_accuracy_at_its_largest_spread():
    # its factors reach e^+-30 at the bound: the result must still match the float64 loop as the
    # segment sums do (1e-4 norm-wise, as test_forms_match_naive_loop_in_float32)
    q, k, v, igate, fgate = make_inputs(64, 1.0, torch.float32, seed=14)
    # u = igate - cumsum(logsigmoid(fgate)) rising with noise, stretched to a spread just under the bound
    u = torch.linspace(0.0, 1.0, 64, dtype=torch.float64) + 0.05 * igate.double()
    u = (u - u[..., :1]) * (FACTORED_SPREAD - 0.01) / (u.amax(-1, keepdim=True) - u[..., :1])
    igate = (u + F.logsigmoid(fgate.double()).cumsum(-1)).float()
    assert (spreads(igate, fgate) - FACTORED_SPREAD).abs().max() < 0.02
    expected = naive_mlstm(q, k, v, igate, fgate)
    assert normwise_relative_error(apply_form(True, q, k, v, igate, fgate), expected) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_parallel_form_gives_the_segment_sums_only_the_rows_beyond_the_spread(dtype, monkeypatch):
    # rows of both kinds in one batch: the segment sums get the two rows beyond FACTORED_SPREAD, and the
    # output and the gradients are the naive loop's on every row
    rows_seen = {}
    for name, computation in (("factored", "_factored_forward"), ("segment-sums", "_segment_forward")):
        def counting(*args, original=getattr(mlstm, computation), name=name):
            rows_seen[name] = args[0].shape[:-2].numel()
            return original(*args)
        monkeypatch.setattr(mlstm, computation, counting)
    inputs = rows_of_two_kinds(30, dtype)
    leaves = [x.clone().requires_grad_() for x in inputs]
    naive_leaves = [x.clone().double().requires_grad_() for x in inputs]
    h = parallel_mlstm(*leaves)
    assert rows_seen == {"factored": 4, "segment-sums": 2}  # the factored one on all rows, then replaced
    expected = naive_mlstm(*naive_leaves)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    assert normwise_relative_error(h, expected) <= tolerance
    cotangent = torch.randn(h.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(15))
    (h.double() * cotangent).sum().backward()
    (expected * cotangent).sum().backward()
    for name, leaf, naive in zip("q k v igate fgate".split(), leaves, naive_leaves):
        assert normwise_relative_error(leaf.grad, naive.grad) <= 100 * tolerance, name


def test_mixed_rows_backward_under_autocast():
    # a backward run inside autocast (the autocast state carries into it): the segment rows' gradients
    # come out in bf16, the factored ones in float32, and the overwrite must still fit them together
    leaves = [x.requires_grad_() for x in rows_of_two_kinds(24, torch.float32)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = parallel_mlstm(*leaves)
        h.float().square().sum().backward()
    expected = torch.autograd.grad(naive_mlstm(*leaves).square().sum(), leaves)
    for name, leaf, naive in zip("q k v igate fgate".split(), leaves, expected):
        assert leaf.grad.dtype == torch.float32 and normwise_relative_error(leaf.grad, naive) <= 5e-2, name


def test_factored_form_under_autocast_takes_float32_inputs():
    # float32 q, k, v met by bf16 autocast: the matmuls run in bf16, the output and the gradients keep
    # their inputs' dtypes and stay close to the float64 loop
    q, k, v, igate, fgate = make_inputs(24, 1.0, torch.float32, seed=16)
    assert (spreads(igate, fgate) <= FACTORED_SPREAD).all()
    leaves = [x.clone().requires_grad_() for x in (q, k, v, igate, fgate)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = parallel_mlstm(*leaves)
    assert h.dtype == torch.float32
    assert normwise_relative_error(h, naive_mlstm(q, k, v, igate, fgate)) <= 3e-2
    h.sum().backward()
    for leaf in leaves:
        assert leaf.grad.dtype == torch.float32 and torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("inputs", ["float16", "float32-in-float16-autocast", "float16-in-bf16-autocast"])
def test_parallel_form_stays_finite_where_matmuls_run_in_float16(inputs):
    # the factored computation's factors (up to e^30) would overflow float16; these gates are well within
    # FACTORED_SPREAD, so only the choice of the segment sums keeps h and the gradients finite
    q, k, v, igate, fgate = make_inputs(64, 1.0, torch.float32, seed=17, head_dim=32)
    assert (spreads(igate, fgate) <= FACTORED_SPREAD).all()
    if inputs.startswith("float16"):
        q, k, v = q.half(), k.half(), v.half()
    autocast_dtype = {"float32-in-float16-autocast": torch.float16, "float16-in-bf16-autocast": torch.bfloat16}
    leaves = [x.clone().requires_grad_() for x in (q, k, v, igate, fgate)]
    with torch.autocast("cpu", dtype=autocast_dtype.get(inputs, torch.bfloat16), enabled=inputs in autocast_dtype):
        h = parallel_mlstm(*leaves)
    assert normwise_relative_error(h, naive_mlstm(q, k, v, igate, fgate)) <= 1e-2
    h.float().sum().backward()
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all()


def test_parallel_form_gives_no_second_derivative_in_the_forget_gates():
    # with a constant output gradient the Function's backward returns plain tensors: differentiating the
    # forget-gate gradient again must fail, not return the logsigmoid's share alone (as it did while the
    # logsigmoid sat outside the Function)
    q, k, v, igate, fgate = make_inputs(5, 1.0, torch.float64, seed=9, batch=1, heads=1, head_dim=3)
    fgate.requires_grad_()
    (grad_fgate,) = torch.autograd.grad(parallel_mlstm(q, k, v, igate, fgate).sum(), fgate, create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad"):
        torch.autograd.grad(grad_fgate.sum(), fgate)


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


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                    (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_matmul_dtype_is_the_dtype_of_the_matmul(autocast_dtype, dtypes):
    a, b = (torch.ones(2, 2, dtype=dtype) for dtype in dtypes)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        try:
            expected = (a @ b).dtype
        except RuntimeError:  # mixed dtypes without autocast: both refuse
            with pytest.raises(RuntimeError):
                mlstm._matmul_dtype(a, b)
            return
        assert mlstm._matmul_dtype(a, b) == expected


def test_matmul_dtype_follows_nested_autocast_and_dispatches_nothing_where_torch_says():
    a = torch.ones(2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autocast("cpu", enabled=False):  # a region that turns it off again
            assert mlstm._matmul_dtype(a, a) == (a @ a).dtype == torch.float32
        assert mlstm._matmul_dtype(a, a) == (a @ a).dtype == torch.bfloat16

        class Operators(TorchDispatchMode):
            count = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                Operators.count += 1
                return func(*args, **(kwargs or {}))

        with Operators():
            mlstm._matmul_dtype(a, a)
    # torch 2.4 and later: read from the autocast state (torch 2.3: a 1 x 1 matmul)
    assert Operators.count == (0 if hasattr(torch, "get_autocast_dtype") else 5)
