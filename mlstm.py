"""The mLSTM of xLSTM and the Vision-LSTM block built on it (the maths: parts (1) to (4) below).

First the maths over plain tensors, in three exact forms of the same function:
    parallel_mlstm   quadratic in S, what ViL trains with at short token sequences
    chunkwise_mlstm  linear in S (parallel inside chunks, a carried state between them)
    recurrent_mlstm  the step-by-step recurrence, the reference
then the modules that own parameters: BlockDiagonalLinear, MLSTMCell, ViLLayer, DropPath, ViLBlock.
ViLLayer.forward is the fast path the model runs; reference_vil_layer, beside it, is the same layer
written out plainly (part 4 with dense matrices, the gates from [q, k, v], recurrent_mlstm), and the
tests hold the one to the other, forward and every parameter gradient.
Two autograd Functions carry the speed work of the training path, each with its gradient written
out and tested against autograd on the plain formulation: ParallelMLSTM (the parallel form: the
decay matrix as an outer product where a row's gates allow it, from segment sums for any gates;
two or four passes over the S x S matrices in the backward instead of about twenty) and
GroupsToHeads (the grouped q/k/v matmul output unpacked into heads in one copy each way).

Shapes: B batch, NH heads, S tokens, DH head width. Every form takes
q, k, v: (B, NH, S, DH) and the gate pre-activations igate, fgate: (B, NH, S), and returns
h: (B, NH, S, DH) in the dtype of q. Keys are scaled by 1/sqrt(DH) inside, the state starts
empty (m_0 = -inf, C_0 = 0, n_0 = 0). Gate and stabiliser arithmetic runs in float32 (float64
for float64 inputs), also under bf16 autocast.

(1) The recurrence, per head: exponential input gate, sigmoid forget gate, stabilised in log space.
    m_t  = max(logsigmoid(fgate_t) + m_{t-1}, igate_t)                        m_0 = -inf
    i'_t = exp(igate_t - m_t)          f'_t = exp(logsigmoid(fgate_t) + m_{t-1} - m_t)
    C_t  = f'_t C_{t-1} + i'_t v_t (k_t / sqrt(DH))^T     n_t = f'_t n_{t-1} + i'_t k_t / sqrt(DH)
    h_t  = C_t q_t / (max(|n_t . q_t|, exp(-m_t)) + eps)                      eps = 1e-6
C (DH x DH) and n are held scaled by exp(-m_t), so every exp() stays finite for any gate values.

(2) The parallel form, for all tokens at once (rows t, columns s):
    log D[t, s] = sum_{s<j<=t} logsigmoid(fgate_j) + igate_s for s <= t, -inf for s > t
    m_t = max_s log D[t, s]            C~ = (Q K^T / sqrt(DH)) * exp(log D - m)
    n_t = max(|sum_s C~[t, s]|, exp(-m_t))                 H = C~ V / (n + eps)
log D is a masked segment sum of the gates, not the difference of two running sums (which
cancels in float32). Where a row's gates span a moderate range, the same matrix factors:
with F_t = sum_{j<=t} logsigmoid(fgate_j) (running sums in float64) and u_s = igate_s - F_s,
exp(log D[t, s] - m_t) = exp(c - max_{s'<=t} u_s') * exp(u_s - c) for s <= t, an outer product of
two vectors that stay finite for a suitable c; then C~ = tril((Q a)(K b)^T / sqrt(DH)) needs no
S x S exp (ParallelMLSTM picks one of the two per row). The chunkwise form runs the
parallel form inside chunks of L tokens and carries (C, n, m) between chunks with the update of
(1); with S <= L it is the parallel form (its segment sums, differentiated by autograd).

(3) The cell (MLSTMCell). Two linear maps from [q, k, v] (width 3 inner) to NH outputs give the
gates, igate = W_i [q, k, v] + b_i and fgate = W_f [q, k, v] + b_f; after the recurrence, each head
is normalised on its own (a per-head LayerNorm), then scaled (and shifted, with norm_bias) by
learnable per-channel vectors. The cell owns the gate maps; ViLLayer applies them folded into its
q/k/v matmuls (ViLLayer._qkv_and_gates), and the cell runs the recurrence and the norm.
Init: W_f = 0, b_f = linspace(3, 6) over the heads (forget gates start near 1: long memory),
W_i = 0, b_i ~ N(0, 0.1).

(4) The ViL block (ViLBlock, ViLLayer); D model width, inner = expansion * D (expansion 2):
    block(x) = x + DropPath(layer(LayerNorm(x)))
    layer(x): a "bottom_right" block reverses the token order first and undoes it at the end
        x_m, z = split(Linear(D -> 2 inner)(x))
        x_c = SiLU(conv(x_m))      depthwise: 3x3 on the patch grid ("2d"), or causal 1-D of width 4
        q = Wq x_c, k = Wk x_c, v = Wv x_m        block-diagonal maps, 4 x 4 blocks (default)
        h = cell(q, k, v)                         NH = 4 heads (default), DH = inner / NH
        h = (h + skip * x_c) * SiLU(z)            skip a learnable vector
        out = Linear(inner -> D)(h)
Init: up-projection and q/k/v weights normal with std sqrt(2 / (5 D)) ("small init", the model
width D also for the inner-width q/k/v maps), down-projection std 2 / (n sqrt(D)) with n = 1 or
n = the number of blocks (ViLConfig.down_proj_init "fixed"); their biases 0, skip 1; the conv
keeps PyTorch's default init.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def _gate_dtype(x):
    """float64 for float64 inputs, else float32: the log-space gate sums need at least float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _matmul_dtype(a, b):
    """The dtype of a matmul of a and b: the autocast dtype under autocast, else their common dtype (mixed
    dtypes raise, as the matmul itself would). For float32 inputs on a CPU or a CUDA GPU it is read from torch's
    autocast state (torch.get_autocast_dtype, torch 2.4 and later; autocast casts float32 matmul inputs to its
    dtype); otherwise from a 1 x 1 matmul, which works on every torch version and device but launches five
    operators."""
    device = a.device.type
    if a.dtype == b.dtype == torch.float32 and device in ("cpu", "cuda") and hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32
    return torch.matmul(a.new_ones(1, 1), b.new_ones(1, 1)).dtype


def _normaliser(dot, m, eps, scale=None):
    """The (..., S, 1) factor of _normalise, scale * u / den, and what its gradient needs -> (factor, u, lower, den,
    on_dot): u = exp(min(m, 0)), lower = exp(-max(m, 0)), den = max(|dot| u, lower) + eps u, and on_dot, which side
    of the max is taken (|dot| u >= lower).

    exp(-m) overflows float32 once m < -88, and m >= igate can be as low as the smallest input gate. Multiplying the
    numerator and the denominator by u <= 1 keeps every factor finite (the denominator is then at least min(1, eps))
    and changes nothing in exact arithmetic. h is smooth in m at m = 0, where the two sides meet: there autograd's
    derivative goes through u alone (min(m, 0) passes it at 0, lower's exponent min(m, 0) - m does not), as it must
    (through both, it would count twice; through neither, it would vanish).
    """
    low = m.clamp(max=0.0)
    u, lower = low.exp(), (low - m).exp()
    scaled_dot = dot.abs() * u
    den = torch.add(torch.maximum(scaled_dot, lower), u, alpha=eps)
    factor = u / den if scale is None else scale * u / den
    return factor, u, lower, den, scaled_dot >= lower


def _normalise(numerator, dot, m, eps, scale=None):
    """numerator * scale / (max(|dot|, exp(-m)) + eps), computed without overflow (_normaliser).

    numerator: (..., S, DH); dot, m: (..., S, 1); scale: (..., S, 1) or None (1).
    """
    # the (..., S, 1) factor in the numerator's dtype, so that a bf16 numerator gives a bf16 h
    # without a float32 copy of the whole output
    return numerator * _normaliser(dot, m, eps, scale)[0].to(numerator.dtype)


def _normalise_saving(numerator, dot, m, eps, scale=None):
    """_normalise for a written-out backward -> (h, saved for _normalise_backward): the factor and the two
    (..., S, 1) coefficients that turn the gradient of the factor into those of dot and m, scale held fixed (the
    factored form's scale a reaches the gates through its own route: _factored_backward's grad_log_a).

    With f = scale * u / den: where on_dot, den = u (|dot| + eps), so f = scale / (|dot| + eps) does not depend on
    m, and df/d dot = -f sign(dot) u / den; elsewhere f does not depend on dot, and df/dm = f lower / den (for
    m <= 0, u = exp(m) and lower = 1; for m > 0, u = 1 and lower = exp(-m); at m = 0 both give f / den).
    """
    factor, u, lower, den, on_dot = _normaliser(dot, m, eps, scale)
    per_den = factor / den
    to_dot = torch.where(on_dot, per_den * u * dot.sign(), 0.0).neg_()  # -0.0 off the dot side: harmless
    to_m = torch.where(on_dot, 0.0, per_den * lower)
    return numerator * factor.to(numerator.dtype), (factor, to_dot, to_m)


def _normalise_backward(grad_h, numerator, saved, matmul_dtype):
    """The gradient of _normalise_saving(numerator, dot, m, ...) -> (grad_numerator in matmul_dtype, grad_dot,
    grad_m). The (..., S, DH) products in h's dtype, bf16 under autocast (float32 copies of grad_h and of the
    numerator cost more than the products); their row sums and the (..., S, 1) terms in the factor's dtype.
    matmul_dtype: v's, for the matmuls that follow (h's dtype differs where float32 inputs met autocast).
    """
    factor, to_dot, to_m = saved
    grad_numerator = (grad_h * factor.to(grad_h.dtype)).to(matmul_dtype)  # (..., S, DH)
    grad_factor = (grad_h * numerator).sum(-1, keepdim=True, dtype=factor.dtype)  # (..., S, 1)
    return grad_numerator, grad_factor * to_dot, grad_factor * to_m


def _log_decay_matrix(log_forget, igate):
    """log D[t, s] = sum_{j=s+1..t} log_forget_j + igate_s for s <= t, -inf for s > t.

    log_forget, igate: (..., L) -> (..., L, L), rows t, columns s. The sum is a masked cumulative
    sum down each column (a segment sum), not the difference b_t - b_s of two running sums, which
    cancels catastrophically in float32 once the gates are large.
    """
    length = log_forget.shape[-1]
    rows = torch.arange(length, device=log_forget.device)
    strictly_below = rows[:, None] > rows[None, :]  # (L, L): t > s
    on_or_below = rows[:, None] >= rows[None, :]
    # (..., L, L): entry [t, s] = log_forget_t where t > s, summed down the column s
    segment = torch.where(strictly_below, log_forget.unsqueeze(-1), 0.0).cumsum(-2)
    return torch.where(on_or_below, segment + igate.unsqueeze(-2), -math.inf)


def _decayed_scores(q, k, v, log_d, m, overwrite=False):
    """The parallel form (part 2) from log D and the row stabiliser m, up to the normalisation.

    q, k, v: (..., L, DH); log_d: (..., L, L) and m: (..., L, 1) in the gate dtype. Returns the
    decay D' = exp(log D - m) / sqrt(DH) and the scores C = (q k^T) * D', both (..., L, L), the
    numerator C v: (..., L, DH) and dot = sum_s C[:, s]: (..., L, 1). overwrite: D' is computed in
    the memory of log_d (one S x S matrix fewer at a time; not where autograd or the caller needs log D).
    """
    # 1/sqrt(DH) on the keys is folded into the decay: exp(log D - m - log sqrt(DH))
    shift = m + 0.5 * math.log(q.shape[-1])
    decay = log_d.sub_(shift).exp_() if overwrite else torch.exp(log_d - shift)
    c = (q @ k.transpose(-1, -2)) * decay
    numerator = c.to(v.dtype) @ v
    dot = c.sum(-1, keepdim=True)
    return decay, c, numerator, dot


def _chunk(q, k, v, igate, log_forget, state, eps, need_state):
    """The parallel form on one chunk, plus the contribution of a carried state.

    q, k, v: (B, NH, L, DH); igate, log_forget: (B, NH, L) in the gate dtype.
    state: None (empty) or (C: (B, NH, DH, DH) as sum of k v^T, n: (B, NH, DH), m: (B, NH)),
    both stabilised by exp(-m). Returns h: (B, NH, L, DH) and the state after the chunk
    (None unless need_state).
    """
    head_dim = q.shape[-1]
    log_d = _log_decay_matrix(log_forget, igate)  # (B, NH, L, L)
    m = log_d.amax(-1, keepdim=True)  # (B, NH, L, 1)
    if state is not None:
        state_c, state_n, state_m = state
        # decay of the carried state up to each token of the chunk: a running sum of negative
        # terms, so no cancellation
        log_state = (log_forget.cumsum(-1) + state_m.unsqueeze(-1)).unsqueeze(-1)  # (B, NH, L, 1)
        m = torch.maximum(m, log_state)
    _, _, numerator, dot = _decayed_scores(q, k, v, log_d, m)  # (B, NH, L, DH), (B, NH, L, 1)
    if state is not None:
        state_weight = torch.exp(log_state - m)  # (B, NH, L, 1)
        q_scaled = q * (state_weight / math.sqrt(head_dim)).to(q.dtype)
        numerator = numerator + q_scaled @ state_c.to(q.dtype)
        dot = dot + (q_scaled @ state_n.to(q.dtype).unsqueeze(-1))
    h = _normalise(numerator, dot, m, eps)
    if not need_state:
        return h, None
    new_m = m[..., -1, 0]  # (B, NH): the stabiliser of the last token
    key_weight = torch.exp(log_d[..., -1, :] - new_m.unsqueeze(-1)).unsqueeze(-1)  # (B, NH, L, 1)
    weighted_k = k.to(key_weight.dtype) * key_weight
    new_c = weighted_k.transpose(-1, -2) @ v.to(key_weight.dtype)  # (B, NH, DH, DH)
    new_n = weighted_k.sum(-2)  # (B, NH, DH)
    if state is not None:
        carry = torch.exp(log_state[..., -1, 0] - new_m)  # (B, NH)
        new_c = new_c + carry[..., None, None] * state_c
        new_n = new_n + carry.unsqueeze(-1) * state_n
    return h, (new_c, new_n, new_m)


# the largest spread max_s u_s - u_0 (see _factored_forward) for which a row's decay matrix is factored: then
# a_t lies in [e^-30, e^30] and b_s <= e^30, far inside float32 and bf16 (not float16)
FACTORED_SPREAD = 60.0


def _segment_forward(q, k, v, igate, log_forget, eps):
    """The parallel form from the segment sums of the gates (any gate values) -> (h, saved for _segment_backward).

    q, k, v: (..., S, DH); igate, log_forget: (..., S) in the gate dtype.
    """
    log_d = _log_decay_matrix(log_forget, igate)  # (..., S, S)
    m, argmax = log_d.max(-1, keepdim=True)  # (..., S, 1)
    decay, c, numerator, dot = _decayed_scores(q, k, v, log_d, m, overwrite=True)  # (..., S, S) in the gate dtype
    h, normaliser = _normalise_saving(numerator, dot, m, eps)
    return h, (q, k, v, c, decay, numerator, argmax, *normaliser)


def _segment_backward(saved, grad_h):
    """The gradient of _segment_forward -> (grad q, k, v, igate, log_forget); ParallelMLSTM's docstring
    derives it."""
    q, k, v, c, decay, numerator, argmax, *normaliser = saved
    dtype = c.dtype
    grad_numerator, grad_dot, grad_m = _normalise_backward(grad_h, numerator, normaliser, v.dtype)
    grad_v = c.to(v.dtype).transpose(-1, -2) @ grad_numerator
    grad_c = (grad_numerator @ v.transpose(-1, -2)).to(dtype).add_(grad_dot)  # (..., S, S)
    grad_log_d = grad_c * c  # through exp(L - m); zero above the diagonal
    grad_scores = grad_c.mul_(decay).to(q.dtype)  # in place of dC
    grad_q = grad_scores @ k
    grad_k = grad_scores.transpose(-1, -2) @ q
    # dL = grad_log_d, plus at each row's argmax the normaliser's gradient into m (grad_m) less the row's sum of
    # grad_log_d (the -m in exp(L - m)): so each row of dL sums to grad_m, and its columns sum as below
    at_argmax = grad_m - grad_log_d.sum(-1, keepdim=True)
    col_sums = grad_log_d.sum(-2).scatter_add_(-1, argmax.squeeze(-1), at_argmax.squeeze(-1))  # (..., S)
    difference = col_sums - grad_m.squeeze(-1)  # column sums less row sums
    grad_log_forget = difference.cumsum(-1) - difference  # sum over s < j
    return grad_q, grad_k, grad_v, col_sums, grad_log_forget


def _factored_forward(q, k, v, running, u, gate_dtype, eps):
    """The parallel form with the decay matrix as an outer product -> (h, saved for _factored_backward).
    Exact for rows whose spread max_s u_s - u_0 is at most FACTORED_SPREAD; finite, and to be
    replaced, on the others. ParallelMLSTM's docstring derives it.

    q, k, v: (..., S, DH); running = F = cumsum(log_forget) and u = igate - F: (..., S) in float64.
    """
    running_max, argmax = torch.cummax(u, -1)  # r_t = max_{s<=t} u_s, (..., S)
    m = (running + running_max).to(gate_dtype).unsqueeze(-1)  # (..., S, 1)
    centre = u[..., :1] + FACTORED_SPREAD / 2
    # both factors kept within [e^-80, e^30]: no overflow on rows beyond the spread (their results are replaced)
    # and no subnormal numbers (slow on some CPUs); within the spread a_t >= e^-30 and b_s <= e^30 anyway, and
    # the lower bound on b_s only changes entries below e^-50 of the row's largest, which is 1
    a = torch.exp((centre - running_max).clamp(min=-80.0)).to(gate_dtype).unsqueeze(-1)  # (..., S, 1)
    b = torch.exp((u - centre).clamp(-80.0, FACTORED_SPREAD / 2) - 0.5 * math.log(q.shape[-1]))  # with 1/sqrt(DH)
    b = b.to(gate_dtype).unsqueeze(-1)
    kb = k * b.to(k.dtype)  # (..., S, DH)
    # C' = tril(q kb^T): the scores C without the row factor a, which scales their row sums and C v
    # afterwards, per row (no pass over q)
    c = (q @ kb.transpose(-1, -2)).tril_()  # (..., S, S), in q's dtype (bf16 under autocast)
    numerator = c.to(v.dtype) @ v  # C' v
    dot = c.sum(-1, keepdim=True, dtype=gate_dtype) * a  # sum_s C[t, s]
    h, normaliser = _normalise_saving(numerator, dot, m, eps, scale=a)
    return h, (v, q, kb, c, numerator, argmax, a, b, *normaliser)


def _factored_backward(saved, grad_h):
    """The gradient of _factored_forward -> (grad q, k, v, igate, log_forget)."""
    v, q, kb, c, numerator, argmax, a, b, *normaliser = saved
    grad_numerator, grad_dot, grad_m = _normalise_backward(grad_h, numerator, normaliser, v.dtype)
    grad_v = c.to(v.dtype).transpose(-1, -2) @ grad_numerator
    grad_c = (grad_numerator @ v.transpose(-1, -2)).add_((grad_dot * a).to(v.dtype)).tril_().to(q.dtype)  # dC'
    grad_q, grad_kb = grad_c @ kb, grad_c.transpose(-1, -2) @ q  # (..., S, DH)
    grad_k = grad_kb * b.to(kb.dtype)
    # d log a_t = sum_s dC' * C' along the row (a's two routes, the output scale and the row sum dot, collected:
    # C' is lower-triangular), d log b_s down the column: both from one S x S product (in q's dtype, bf16 under
    # autocast), summed in float32, so that their roundings cancel where the gate gradient takes their
    # difference. From (S, DH) or (S, 1) products instead (d qa * qa, d kb * kb, or the scale's share of a in
    # _normalise), they put 2-7% into the forget-gate gradient of the bf16 test; this 0.5-0.9%
    grad_scores = grad_c * c
    grad_log_a, grad_log_b = grad_scores.sum(-1, dtype=a.dtype), grad_scores.sum(-2, dtype=a.dtype)  # (..., S)
    grad_m = grad_m.squeeze(-1)
    grad_running_max = grad_m - grad_log_a  # r enters through m = F + r and a = exp(c - r)
    grad_u = grad_log_b.scatter_add(-1, argmax, grad_running_max)
    grad_running = grad_m - grad_u  # F enters through m = F + r and u = igate - F
    grad_log_forget = grad_running.flip(-1).cumsum(-1).flip(-1)  # F_t sums log_forget_j for j <= t
    return grad_q, grad_k, grad_v, grad_u, grad_log_forget


def _rows(tensor, index, trailing):
    """The rows `index` of tensor (..., *trailing dims) flattened to (rows, *trailing dims)."""
    return tensor.reshape(-1, *tensor.shape[tensor.dim() - trailing:]).index_select(0, index)


class ParallelMLSTM(torch.autograd.Function):
    """The parallel form with its gradient written out (what parallel_mlstm runs), in two computations
    chosen per row (batch and head): the decay matrix factored as an outer product where the row's
    gates allow it, from segment sums elsewhere.

    apply(q, k, v: (..., S, DH), igate, fgate: (..., S) pre-activations in the gate dtype, eps, factor)
    -> h (..., S, DH); factor=False: the segment sums on every row. Below, log_forget = logsigmoid(fgate).

    Segment sums (any gate values). Autograd through _chunk keeps about ten S x S intermediates and
    runs about twenty passes over them; this backward needs the scores C and the decay matrix from the
    forward and makes four passes, besides the four matmuls. With L = log D, m_t = max_s L[t, s], the decay
    D' = exp(L - m) / sqrt(DH), C = (q k^T) * D', dot = sum_s C[:, s] and h = (C v) * u / den(dot, m)
    (see _normalise):
        dC = (dh * u/den) v^T + d dot,   dv = C^T (dh * u/den),   dq = (dC * D') k,   dk = (dC * D')^T q
        dL = dC * C, plus dm at the argmax of each row (m enters through exp(L - m) and den)
    and, as L[t, s] = igate_s + sum_{s<j<=t} log_forget_j, the gate gradients are sums of dL:
        d igate_s = sum_t dL[t, s],   d log_forget_j = sum_{s<j} (sum_t dL[t, s] - sum_t' dL[s, t'])
    (the second: the entries with s < j <= t are all entries of the columns s < j minus those in the
    rows t < j, which lie in the same columns since dL is lower-triangular). Where a row's maximum is
    tied (forget gates of exactly 1), h has no derivative in m; dm goes to the first maximum (autograd
    through amax splits it evenly), a different subgradient with the same sum over the tokens.

    Factored (rows whose spread max_s u_s - u_0 is at most FACTORED_SPREAD; no S x S exp or segment sum).
    With the running sums F_t = sum_{j<=t} log_forget_j,
    u_s = igate_s - F_s and r_t = max_{s<=t} u_s, log D[t, s] = F_t + u_s and m_t = F_t + r_t, so for s <= t
        exp(log D[t, s] - m_t) = exp(u_s - r_t) = a_t b_s,    a_t = exp(c - r_t),  b_s = exp(u_s - c)
    for any constant c per row; c = u_0 + FACTORED_SPREAD / 2 keeps a_t within e^+-30 and b_s below e^30. Then
    C[t, s] = a_t C'[t, s] with C' = tril(q kb^T), kb = k b / sqrt(DH): one matmul of q and the scaled keys,
    one mask, and a scales the rows of C' v and the row sums of C' afterwards, (..., S, 1) work instead of a
    pass over q. F, u and r are (..., S) sums in float64 (the running-sum difference that loses precision in
    float32 at long S is then exact to float64), and a, b are rounded once to the gate dtype. So
    h = (C' v) * a u / den(dot) with dot = a sum_s C'[:, s] (see _normalise), and with dh' = dh * a u / den:
        dC' = tril(dh' v^T + a d dot),   dv = C'^T dh',   dq = dC' kb,   d kb = dC'^T q,   dk = d kb * b / sqrt(DH)
        d log a_t = sum_s (dC' * C')[t, s],   d log b_s = sum_t (dC' * C')[t, s]
    (a reaches h through the output scale and through dot; as C' is lower-triangular, the two together sum to
    the row of dC' * C', the same expression as when a scaled q)
    and through log a_t = c - r_t, log b_s = u_s - c (c cancels in every product), m_t = F_t + r_t,
    r_t = u at the argmax of the running maximum, u = igate - F and F = cumsum(log_forget). Where the
    running maximum is tied, dm goes to the last maximum, again a subgradient with the same sum.

    Rows of both kinds: the factored computation runs on every row, the segment sums on the others,
    whose results overwrite those rows of h and of each gradient. First derivatives only: a backward
    through its gradient raises.
    """

    @staticmethod
    def forward(ctx, q, k, v, igate, fgate, eps, factor):
        log_forget = F.logsigmoid(fgate)  # inside the Function, so that no part of its gradient is left to autograd
        segment_rows = None  # all rows
        if factor:
            running = log_forget.double().cumsum(-1)  # F
            u = igate.double() - running
            segment_rows = (u.amax(-1) - u[..., 0] > FACTORED_SPREAD).flatten().nonzero().squeeze(1)
            factor = len(segment_rows) < igate.shape[:-1].numel()
        if not factor:
            h, saved = _segment_forward(q, k, v, igate, log_forget, eps)
            ctx.save_for_backward(fgate, *saved)
        else:
            h, saved = _factored_forward(q, k, v, running, u, igate.dtype, eps)
            segment_saved = ()
            if len(segment_rows):
                inputs = [_rows(x, segment_rows, x.dim() - igate.dim() + 1) for x in (q, k, v, igate, log_forget)]
                segment_h, segment_saved = _segment_forward(*inputs, eps)
                h.view(-1, *h.shape[-2:]).index_copy_(0, segment_rows, segment_h.to(h.dtype))
            ctx.save_for_backward(fgate, *saved, *segment_saved, segment_rows)
            ctx.factored_count = len(saved)
        ctx.factor = factor
        return h

    @staticmethod
    @once_differentiable  # built from saved forward values: a second derivative through it would be wrong
    def backward(ctx, grad_h):
        fgate, *saved = ctx.saved_tensors
        if not ctx.factor:
            grads = _segment_backward(saved, grad_h)
        else:
            count, segment_rows = ctx.factored_count, saved[-1]
            grads = _factored_backward(saved[:count], grad_h)
            if len(segment_rows):
                segment_grads = _segment_backward(saved[count:-1], _rows(grad_h, segment_rows, 2))
                for grad, segment_grad in zip(grads, segment_grads):
                    # in the factored gradient's dtype: a backward run under autocast can leave the two apart
                    grad.view(-1, *segment_grad.shape[1:]).index_copy_(0, segment_rows, segment_grad.to(grad.dtype))
        grad_q, grad_k, grad_v, grad_igate, grad_log_forget = grads
        grad_fgate = grad_log_forget * torch.sigmoid(-fgate)  # d logsigmoid(x) / dx = sigmoid(-x)
        return grad_q, grad_k, grad_v, grad_igate, grad_fgate, None, None


def factors_decay_matrix(device_type, dtypes, compiling):
    """Whether parallel_mlstm factors the decay matrix (on the rows whose gates allow it; the docstrings of
    parallel_mlstm and ParallelMLSTM say why not elsewhere): on a CPU, not under torch.compile, and not where
    q, k or their matmuls are float16 (dtypes), whose range (largest 65504) the factors, up to e^30, exceed."""
    return device_type == "cpu" and not compiling and torch.float16 not in dtypes


def parallel_mlstm(q, k, v, igate, fgate, eps=1e-6):
    """The quadratic form (module docstring, part 2): all S x S token pairs at once. O(S^2 DH) time,
    O(S^2) memory per head.

    q, k, v: (B, NH, S, DH); igate, fgate: gate pre-activations (B, NH, S). Returns h (B, NH, S, DH).
    On a CPU, ParallelMLSTM factors the decay matrix on the rows whose gates allow it; in trained models
    a few heads forget within a few tokens and take the segment sums. That choice per row reads the gates
    on the host, which on a GPU makes every call wait for the device (a host sync, which tests/test_cuda.py
    caught on an H100), so on any other device every row takes the segment sums. So does every row under
    torch.compile (a compiled graph would break at a choice that depends on the gate values, and the
    compiler fuses their elementwise passes itself), and every row whose matmuls run in float16.
    """
    gate_dtype = _gate_dtype(q)
    # asked only on a CPU, the one device where the answer can be yes: reading the matmuls' dtype may launch a
    # 1 x 1 matmul (_matmul_dtype)
    factor = q.device.type == "cpu" and factors_decay_matrix(
        "cpu", (q.dtype, k.dtype, _matmul_dtype(q, k)), torch.compiler.is_compiling())
    return ParallelMLSTM.apply(q, k, v, igate.to(gate_dtype), fgate.to(gate_dtype), eps, factor).to(q.dtype)


def chunkwise_mlstm(q, k, v, igate, fgate, chunk_size=64, eps=1e-6):
    """The linear form: the parallel form inside chunks of chunk_size tokens, the recurrent state
    (C, n, m) carried between them. O(S L DH + S DH^2) time, no tensor larger than L x L or
    DH x DH per head. The last chunk may be shorter.

    q, k, v: (B, NH, S, DH); igate, fgate: gate pre-activations (B, NH, S). Returns h (B, NH, S, DH).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    gate_dtype = _gate_dtype(q)
    log_forget = F.logsigmoid(fgate.to(gate_dtype))
    igate = igate.to(gate_dtype)
    seq_len = q.shape[-2]
    outputs = []
    state = None
    for start in range(0, seq_len, chunk_size):
        end = min(start + chunk_size, seq_len)
        h, state = _chunk(
            q[..., start:end, :], k[..., start:end, :], v[..., start:end, :],
            igate[..., start:end], log_forget[..., start:end], state, eps, need_state=end < seq_len,
        )
        outputs.append(h)
    return torch.cat(outputs, dim=-2).to(q.dtype)


def recurrent_mlstm(q, k, v, igate, fgate, eps=1e-6):
    """The recurrence of the module docstring, part 1, one token at a time (reference, slow).

    q, k, v: (B, NH, S, DH); igate, fgate: gate pre-activations (B, NH, S). Returns h (B, NH, S, DH).
    """
    out_dtype, gate_dtype = q.dtype, _gate_dtype(q)
    log_forget = F.logsigmoid(fgate.to(gate_dtype))
    igate = igate.to(gate_dtype)
    q, k, v = q.to(gate_dtype), k.to(gate_dtype) / math.sqrt(q.shape[-1]), v.to(gate_dtype)
    outputs = []
    for t in range(q.shape[-2]):
        if t == 0:
            # empty state: m_0 = -inf, so m_1 = igate_1 and the (zero) state gets no weight
            m = igate[..., 0]  # (B, NH)
            c = torch.exp(igate[..., 0] - m)[..., None, None] * (v[..., 0, :, None] * k[..., 0, None, :])
            n = torch.exp(igate[..., 0] - m).unsqueeze(-1) * k[..., 0, :]
        else:
            new_m = torch.maximum(log_forget[..., t] + m, igate[..., t])
            forget = torch.exp(log_forget[..., t] + m - new_m)  # (B, NH)
            input_ = torch.exp(igate[..., t] - new_m)
            m = new_m
            # C: (B, NH, DH_v, DH_k), n: (B, NH, DH_k)
            c = forget[..., None, None] * c + input_[..., None, None] * (v[..., t, :, None] * k[..., t, None, :])
            n = forget.unsqueeze(-1) * n + input_.unsqueeze(-1) * k[..., t, :]
        numerator = (c @ q[..., t, :, None]).squeeze(-1)  # (B, NH, DH)
        dot = (n * q[..., t, :]).sum(-1, keepdim=True)  # (B, NH, 1)
        outputs.append(_normalise(numerator, dot, m.unsqueeze(-1), eps))
    return torch.stack(outputs, dim=-2).to(out_dtype)


MLSTM_FORMS = ("parallel", "chunkwise", "recurrent")
CONV_KINDS = ("2d", "causal1d")
# channels per group of the grouped q/k/v matmuls (see ViLLayer): 16 in float32; bf16 and fp16 kernels run
# matmuls 16 channels deep far below their peak. On a 2-core AMD EPYC, the q/k matmul of a layer (384 channels):
# bf16, 16384 tokens, 3.7 ms in groups of 16 and 1.4 ms in groups of 32 (with twice the multiply-adds);
# float32, 4096 tokens, 1.05 ms and 1.50 ms
QKV_GROUP_WIDTH = 16
QKV_GROUP_WIDTH_HALF = 32


def small_init_(weight, dim):
    """The "small init" of the xLSTM/ViL code: normal with std sqrt(2 / (5 dim)), dim the model width."""
    return nn.init.normal_(weight, mean=0.0, std=math.sqrt(2 / (5 * dim)))


def wang_init_(weight, dim, num_blocks):
    """Down-projection init of the xLSTM/ViL code: normal with std 2 / (num_blocks sqrt(dim))."""
    return nn.init.normal_(weight, mean=0.0, std=2 / num_blocks / math.sqrt(dim))


def grouped_blocks(weight, group_width):
    """Block-diagonal matrices cut into diagonal groups of group_width channels: weight (..., blocks, size, size),
    the blocks as (out, in) -> (..., groups, group_width, group_width), zeros between the blocks of a group.

    Batched matmuls with 4 x 4 matrices run far below peak; groups of 16 to 32 channels multiply
    some zeros (group_width / block_size times the multiply-adds) and still run faster.
    """
    *lead, num_blocks, size, _ = weight.shape
    per_group = group_width // size
    weight = weight.view(*lead, num_blocks // per_group, per_group, size, 1, size)  # (..., groups, block, out, 1, in)
    # (..., groups, block, out, block, in), zero unless the two block indices agree
    mask = torch.eye(per_group, dtype=weight.dtype, device=weight.device)[:, None, :, None]
    return (weight * mask).reshape(*lead, num_blocks // per_group, group_width, group_width)


class BlockDiagonalLinear(nn.Module):
    """A linear map width -> width whose matrix is block-diagonal with block_size x block_size
    blocks (the q/k/v maps of the mLSTM layer): width * block_size weights instead of width^2.

    It owns the parameters; ViLLayer._qkv_and_gates applies them cut into groups (grouped_blocks), together
    with the gates, and reference_vil_layer as the dense matrix.
    """

    def __init__(self, width, block_size, bias=True):
        super().__init__()
        if width % block_size:
            raise ValueError(f"width {width} is not a multiple of the block size {block_size}")
        self.weight = nn.Parameter(torch.empty(width // block_size, block_size, block_size))  # (blocks, out, in)
        self.bias = nn.Parameter(torch.zeros(width)) if bias else None

    def dense_weight(self):
        """(width, width) as (out, in): the whole block-diagonal matrix, zeros outside the blocks."""
        return torch.block_diag(*self.weight)


class GroupsToHeads(torch.autograd.Function):
    """Unpacks the output of a grouped matmul over channel groups into per-head tensors.

    apply(grouped: (groups, B S, parts * width + rest), width, parts, heads, batch, sum_dtype) returns
    `parts` tensors (B, NH, S, DH), the column blocks [i * width, (i + 1) * width) of every group in
    channel order, then the last `rest` columns summed over the groups, (B S, rest) in sum_dtype.
    The groups must tile the heads (DH a multiple of width). This is split + permute + reshape +
    sum; written out because autograd's gradient of a split concatenates the permuted part
    gradients, one more pass over the whole output, while here each part's gradient is copied
    straight into its place.
    """

    @staticmethod
    def forward(ctx, grouped, width, parts, heads, batch, sum_dtype):
        groups, tokens, _ = grouped.shape
        ctx.layout = (width, parts, heads, batch, tokens // batch)
        per_head = groups // heads  # groups per head
        outputs = []
        for part in range(parts):
            # (groups, B S, width) -> (NH, groups per head, B, S, width) -> (B, NH, S, DH), one copy
            piece = grouped[..., part * width:(part + 1) * width].view(heads, per_head, batch, tokens // batch, width)
            outputs.append(piece.permute(2, 0, 3, 1, 4).reshape(batch, heads, tokens // batch, per_head * width))
        outputs.append(grouped[..., parts * width:].sum(0, dtype=sum_dtype))
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        width, parts, heads, batch, seq_len = ctx.layout
        first_grad = grads[0]  # (B, NH, S, DH); unused outputs arrive as zeros
        groups = heads * first_grad.shape[-1] // width
        rest = grads[-1]  # (B S, rest)
        grad = first_grad.new_empty(groups, batch * seq_len, parts * width + rest.shape[-1])
        for part, part_grad in enumerate(grads[:parts]):
            target = grad[..., part * width:(part + 1) * width].view(heads, groups // heads, batch, seq_len, width)
            target.copy_(part_grad.view(batch, heads, seq_len, groups // heads, width).permute(1, 3, 0, 2, 4))
        grad[..., parts * width:].copy_(rest)  # the same gradient for every group's share
        return grad, None, None, None, None, None


class MLSTMCell(nn.Module):
    """The mLSTM recurrence in one of its three forms and a per-head LayerNorm (module docstring,
    part 3); it owns the gate maps from [q, k, v], which ViLLayer._qkv_and_gates applies.

    forward(q, k, v: (B, NH, S, DH), igate, fgate: (B, NH, S)) -> (B, S, inner).
    """

    def __init__(self, inner_dim, num_heads, form="parallel", chunk_size=64, norm_bias=True):
        super().__init__()
        if form not in MLSTM_FORMS:
            raise ValueError(f"unknown mLSTM form {form!r}; choose one of {MLSTM_FORMS}")
        if inner_dim % num_heads:
            raise ValueError(f"inner width {inner_dim} is not a multiple of the {num_heads} heads")
        self.num_heads = num_heads
        self.form = form
        self.chunk_size = chunk_size
        self.igate = nn.Linear(3 * inner_dim, num_heads)
        self.fgate = nn.Linear(3 * inner_dim, num_heads)
        self.norm_weight = nn.Parameter(torch.ones(inner_dim))
        self.norm_bias = nn.Parameter(torch.zeros(inner_dim)) if norm_bias else None
        self.reset_parameters()

    def reset_parameters(self):
        # forget gates start near 1 (long memory), spread over the heads; input gates near exp(0)
        nn.init.zeros_(self.fgate.weight)
        with torch.no_grad():
            self.fgate.bias.copy_(torch.linspace(3.0, 6.0, self.num_heads))
        nn.init.zeros_(self.igate.weight)
        nn.init.normal_(self.igate.bias, mean=0.0, std=0.1)
        nn.init.ones_(self.norm_weight)
        if self.norm_bias is not None:
            nn.init.zeros_(self.norm_bias)

    def gate_weights(self):
        """(2 NH, 3 inner) weight and (2 NH,) bias: the input gate map stacked on the forget gate map."""
        return torch.cat([self.igate.weight, self.fgate.weight]), torch.cat([self.igate.bias, self.fgate.bias])

    def forward(self, q, k, v, igate, fgate):
        """The recurrence and the per-head norm, given the gates.

        q, k, v: (B, NH, S, DH); igate, fgate: (B, NH, S) pre-activations. Returns (B, S, inner).
        """
        batch, heads, seq_len, head_dim = q.shape
        if self.form == "parallel":
            h = parallel_mlstm(q, k, v, igate, fgate)
        elif self.form == "chunkwise":
            h = chunkwise_mlstm(q, k, v, igate, fgate, chunk_size=self.chunk_size)
        else:
            h = recurrent_mlstm(q, k, v, igate, fgate)
        # per-head LayerNorm (a GroupNorm with NH groups), then the learnable scale and shift
        h = F.layer_norm(h, (head_dim,)).transpose(1, 2).reshape(batch, seq_len, heads * head_dim)  # (B, S, inner)
        # the affine in h's dtype: under bf16 autocast a float32 weight would promote the whole
        # activation to float32 until the next matmul casts it back
        weight = self.norm_weight.to(h.dtype)
        if self.norm_bias is None:
            return h * weight
        return torch.addcmul(self.norm_bias.to(h.dtype), h, weight)


class ViLLayer(nn.Module):
    """The mLSTM layer of a ViL block (module docstring, part 4), reading the tokens in one direction.

    dim: model width D; reverse: read bottom-right to top-left; patch_grid: (rows, cols) of the
    token grid, needed by the "2d" conv. forward(x: (B, S, D), patch_grid=None) -> (B, S, D): the fast path
    the model runs, on the grid given (that of a smaller image, say) or else on patch_grid;
    reference_vil_layer below is the same function written out plainly.
    """

    def __init__(self, dim, reverse, patch_grid, conv_kind="2d", mlstm_form="parallel", chunk_size=64,
                 expansion=2, num_heads=4, qkv_block_size=4, proj_bias=True, norm_bias=True,
                 down_proj_blocks=1):
        super().__init__()
        if conv_kind not in CONV_KINDS:
            raise ValueError(f"unknown conv kind {conv_kind!r}; choose one of {CONV_KINDS}")
        inner = expansion * dim
        self.dim = dim
        self.reverse = reverse
        self.patch_grid = tuple(patch_grid)
        self.conv_kind = conv_kind
        self.down_proj_blocks = down_proj_blocks
        self.proj_up = nn.Linear(dim, 2 * inner, bias=proj_bias)
        if conv_kind == "2d":
            # depthwise 3x3 on the patch grid (ViL v2)
            self.conv = nn.Conv2d(inner, inner, kernel_size=3, padding=1, groups=inner)
            # its weight laid out channels-last, (9, 1, 3, 1) where the default is (9, 9, 3, 1): the same memory
            # (the size-1 dimension's stride aside), and the layout of the gradient that its channels-last input
            # gives it, which DistributedDataParallel checks, the size-1 stride too, with a warning when they differ;
            # reset_parameters fills it
            self.conv.weight = nn.Parameter(torch.empty(inner, 3, 3, 1).permute(0, 3, 1, 2))
        else:
            # depthwise causal conv of width 4 along the token sequence (ViL v1); left padding only
            self.conv = nn.Conv1d(inner, inner, kernel_size=4, padding=3, groups=inner)
        head_dim = inner // num_heads
        if inner % num_heads or head_dim % qkv_block_size:
            raise ValueError(f"head width {inner}/{num_heads} must be a multiple of the q/k/v block size "
                             f"{qkv_block_size}")
        # channels per group of the grouped q/k/v matmuls, for float32 and for bf16/fp16 inputs: a multiple of
        # the block size that divides the head width (so that each group lies in one head), at most the limit
        self.group_width, self.group_width_half = (
            max(width for width in range(qkv_block_size, head_dim + 1, qkv_block_size)
                if head_dim % width == 0 and (width <= limit or width == qkv_block_size))
            for limit in (QKV_GROUP_WIDTH, QKV_GROUP_WIDTH_HALF))
        self.q_proj = BlockDiagonalLinear(inner, qkv_block_size, bias=proj_bias)
        self.k_proj = BlockDiagonalLinear(inner, qkv_block_size, bias=proj_bias)
        self.v_proj = BlockDiagonalLinear(inner, qkv_block_size, bias=proj_bias)
        self.cell = MLSTMCell(inner, num_heads, form=mlstm_form, chunk_size=chunk_size, norm_bias=norm_bias)
        self.skip = nn.Parameter(torch.ones(inner))
        self.proj_down = nn.Linear(inner, dim, bias=proj_bias)
        self.reset_parameters()

    def reset_parameters(self):
        small_init_(self.proj_up.weight, self.dim)
        wang_init_(self.proj_down.weight, self.dim, self.down_proj_blocks)
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            # the model width, not the inner width, sets the scale (as in the published code)
            small_init_(proj.weight, self.dim)
        for linear in (self.proj_up, self.proj_down, self.q_proj, self.k_proj, self.v_proj):
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        nn.init.ones_(self.skip)
        self.conv.reset_parameters()
        self.cell.reset_parameters()

    def _conv(self, x, patch_grid=None):
        """x: (B, S, inner) in this layer's reading order, on a grid of patch_grid (default: the layer's)
        -> (B, S, inner)."""
        batch, seq_len, inner = x.shape
        if self.conv_kind == "2d":
            # the reversed sequence of a row-major grid is the row-major grid rotated by 180
            # degrees, so the same reshape serves both directions
            # (B, inner, rows, cols) with the channels innermost in memory (channels_last), so that
            # neither the input nor the output needs a transposing copy
            grid = x.reshape(batch, *(patch_grid or self.patch_grid), inner).permute(0, 3, 1, 2)
            return self.conv(grid).permute(0, 2, 3, 1).reshape(batch, seq_len, inner)
        out = self.conv(x.transpose(1, 2))[..., :seq_len]  # (B, inner, S): keep the causal outputs
        return out.transpose(1, 2)

    def _qkv_and_gates(self, x_conv, x_mlstm):
        """q = Wq x_conv, k = Wk x_conv, v = Wv x_mlstm, each (B, NH, S, DH), and the cell's gate
        pre-activations igate, fgate (B, NH, S), from two batched matmuls over channel groups.

        x_conv, x_mlstm: (B, S, inner). The gates are a linear map G of [q, k, v] (module
        docstring, part 3). Folded through the q/k/v maps, G [q, k, v] = (G_q Wq + G_k Wk) x_conv + G_v Wv x_mlstm
        + G [bq, bk, bv] + b_gate, so each group's matmul yields its share of the gates beside its
        q and k (or v) outputs, without three more matmuls over q, k and v with outputs only 2 NH
        wide. reference_vil_layer computes q, k, v and then the gates from their concatenation.
        """
        batch, seq_len, inner = x_conv.shape
        half = x_conv.dtype in (torch.bfloat16, torch.float16)  # as under autocast
        width, heads = self.group_width_half if half else self.group_width, self.cell.num_heads
        groups = inner // width
        projections = (self.q_proj, self.k_proj, self.v_proj)
        # the weights in the matmuls' dtype (bf16 under bf16 autocast), each cast once here: autocast would cast
        # them again at each matmul below, and cat would cast its bf16 pieces back to float32
        dtype = x_conv.dtype
        # (3, groups, width, width) as (out, in): the q, k and v maps cut into groups, all three in one pass
        w_qkv = grouped_blocks(torch.stack([proj.weight for proj in projections]).to(dtype), width)
        gate_weight, gate_bias = self.cell.gate_weights()  # (2 NH, 3 inner), (2 NH,)
        gate_weight = gate_weight.to(dtype)
        # the gate weights on the q, k and v channels of each group, (3, groups, 2 NH, width), times the group's q,
        # k and v maps: each group's share of the gates from its input, (3, groups, 2 NH, width)
        shares = gate_weight.view(2 * heads, 3, groups, width).permute(1, 2, 0, 3) @ w_qkv
        (w_q, w_k, w_v), (share_q, share_k, share_v) = w_qkv.unbind(0), shares.unbind(0)
        # (groups, out, in) with out = [q, k, gate shares] and [v, gate shares]
        weight_conv = torch.cat([w_q, w_k, share_q + share_k], dim=1)
        weight_mlstm = torch.cat([w_v, share_v], dim=1)
        # (groups, B S, width), copied into that layout here: the matmul would copy a strided view itself,
        # and its backward would gather the view a second time for the weight gradient
        conv_groups = x_conv.reshape(batch * seq_len, groups, width).transpose(0, 1).contiguous()
        mlstm_groups = x_mlstm.reshape(batch * seq_len, groups, width).transpose(0, 1).contiguous()
        weight_conv, weight_mlstm = weight_conv.transpose(1, 2), weight_mlstm.transpose(1, 2)  # (groups, in, out)
        if self.q_proj.bias is None:
            out_conv = torch.bmm(conv_groups, weight_conv)  # (groups, B S, 2 width + 2 NH)
            out_mlstm = torch.bmm(mlstm_groups, weight_mlstm)  # (groups, B S, width + 2 NH)
        else:
            bias = torch.stack([proj.bias for proj in projections]).to(dtype)  # (3, inner): [q, k, v] flattened
            bias_q, bias_k, bias_v = bias.view(3, groups, 1, width).unbind(0)
            no_bias = bias.new_zeros(groups, 1, 2 * heads)  # the gate shares' bias is added once, below
            out_conv = torch.baddbmm(torch.cat([bias_q, bias_k, no_bias], dim=2), conv_groups, weight_conv)
            out_mlstm = torch.baddbmm(torch.cat([bias_v, no_bias], dim=2), mlstm_groups, weight_mlstm)
            gate_bias = gate_bias + gate_weight @ bias.view(-1)
        # the gate shares summed over the groups in float32 (float64 for float64 inputs); under autocast
        # each share comes from a bf16 matmul, as q, k and v do (a gate map applied afterwards to those
        # bf16 q, k, v in float32 would round about the same)
        gate_dtype = _gate_dtype(x_conv)
        q, k, gates_conv = GroupsToHeads.apply(out_conv, width, 2, heads, batch, gate_dtype)
        v, gates_mlstm = GroupsToHeads.apply(out_mlstm, width, 1, heads, batch, gate_dtype)
        gates = gates_conv + gates_mlstm + gate_bias.to(gate_dtype)  # (B S, 2 NH)
        igate, fgate = gates.view(batch, seq_len, 2 * heads).transpose(1, 2).chunk(2, dim=1)  # (B, NH, S) each
        return q, k, v, igate, fgate

    def _up(self, x):
        """x: (B, S, D) in the matmuls' dtype -> x_mlstm, z: (B, S, inner) each. The up-projection as two matmuls,
        so that x_mlstm and z are contiguous (the conv reads x_mlstm without a copy, and the gradient needs no
        concatenation); its weight and bias cast to x's dtype once, not per matmul by autocast."""
        weight_mlstm, weight_z = self.proj_up.weight.to(x.dtype).chunk(2)
        bias = self.proj_up.bias
        bias_mlstm, bias_z = bias.to(x.dtype).chunk(2) if bias is not None else (None, None)
        return F.linear(x, weight_mlstm, bias_mlstm), F.linear(x, weight_z, bias_z)

    def _out(self, h, x_conv, z):
        """The output gate and the down-projection: h, x_conv, z: (B, S, inner) -> (B, S, D)."""
        h = torch.addcmul(h, self.skip.to(h.dtype), x_conv) * F.silu(z)  # in h's dtype
        return self.proj_down(h)

    def forward(self, x, patch_grid=None):
        # x in the dtype the up-projection computes in (bf16 under bf16 autocast), cast once here: autocast would
        # cast it for each of the two matmuls, and their input gradients would be cast back and summed in float32
        # (now they are summed in bf16: one more rounding of the gradient into x, about 2^-9)
        x = x.to(_matmul_dtype(x, self.proj_up.weight))
        if self.reverse:
            x = x.flip(1)
        x_mlstm, z = self._up(x)  # (B, S, inner) each
        x_conv = F.silu(self._conv(x_mlstm, patch_grid))
        h = self.cell(*self._qkv_and_gates(x_conv, x_mlstm))  # (B, S, inner)
        out = self._out(h, x_conv, z)
        return out.flip(1) if self.reverse else out


def reference_vil_layer(layer, x, patch_grid=None):
    """ViLLayer.forward written out plainly from the layer's own parameters (module docstring,
    parts 3 and 4): dense block-diagonal q/k/v matrices, the gates from the concatenation [q, k, v],
    the recurrence step by step (recurrent_mlstm), an explicit per-head normalisation. The reference
    the tests hold the fast path to; slow.

    layer: a ViLLayer; x: (B, S, D) on a grid of patch_grid (default: the layer's) -> (B, S, D).
    """
    batch, seq_len, _ = x.shape
    if layer.reverse:
        x = x.flip(1)
    x_mlstm, z = F.linear(x, layer.proj_up.weight, layer.proj_up.bias).chunk(2, dim=-1)  # (B, S, inner) each
    inner = x_mlstm.shape[-1]
    channels_first = x_mlstm.transpose(1, 2)  # (B, inner, S)
    if layer.conv_kind == "2d":
        grid = channels_first.reshape(batch, inner, *(patch_grid or layer.patch_grid))
        conv = F.conv2d(grid, layer.conv.weight, layer.conv.bias, padding=1, groups=inner).flatten(2)
    else:
        conv = F.conv1d(F.pad(channels_first, (3, 0)), layer.conv.weight, layer.conv.bias, groups=inner)
    x_conv = F.silu(conv.transpose(1, 2))  # (B, S, inner)

    def block_diagonal(proj, inputs):
        out = inputs @ proj.dense_weight().T
        return out if proj.bias is None else out + proj.bias

    q = block_diagonal(layer.q_proj, x_conv)
    k = block_diagonal(layer.k_proj, x_conv)
    v = block_diagonal(layer.v_proj, x_mlstm)
    cell = layer.cell
    gate_input = torch.cat([q, k, v], dim=-1)  # (B, S, 3 inner)
    igate = F.linear(gate_input, cell.igate.weight, cell.igate.bias).transpose(1, 2)  # (B, NH, S)
    fgate = F.linear(gate_input, cell.fgate.weight, cell.fgate.bias).transpose(1, 2)
    q, k, v = (t.view(batch, seq_len, cell.num_heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, NH, S, DH)
    h = recurrent_mlstm(q, k, v, igate, fgate)
    h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
    h = h.transpose(1, 2).reshape(batch, seq_len, inner) * cell.norm_weight  # (B, S, inner)
    h = h if cell.norm_bias is None else h + cell.norm_bias
    h = (h + layer.skip * x_conv) * F.silu(z)
    out = F.linear(h, layer.proj_down.weight, layer.proj_down.bias)
    return out.flip(1) if layer.reverse else out


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a whole sample's residual branch with probability p and
    scale the kept ones by 1 / (1 - p). p in [0, 1): ViLConfig checks it."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1.0 - self.p)  # 0 or 1, exact in any dtype
        if x.dtype in (torch.float32, torch.float64):
            return x * keep.div_(1.0 - self.p)  # one pass over x; the scale rounded to float32 is off by under 1e-7
        # bf16 and float16: the scale rounded to x's dtype would scale every kept branch by the same error (bf16:
        # 1.0547 for the 1.0526 of p = 0.05), so x * keep (exact) is divided, each value rounded once
        return x * keep / (1.0 - self.p)


class ViLBlock(nn.Module):
    """x + DropPath(ViLLayer(LayerNorm(x))), one traversal direction (module docstring, part 4).

    direction: "top_left" (row-major from the top-left patch) or "bottom_right" (the reverse).
    forward(x: (B, S, D), patch_grid=None) -> (B, S, D), as ViLLayer's.
    """

    DIRECTIONS = ("top_left", "bottom_right")

    def __init__(self, dim, direction, patch_grid, drop_path=0.0, conv_kind="2d", mlstm_form="parallel",
                 chunk_size=64, norm_bias=True, **layer_options):
        super().__init__()
        if direction not in self.DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}; choose one of {self.DIRECTIONS}")
        self.direction = direction
        self.norm = nn.LayerNorm(dim, bias=norm_bias)
        self.layer = ViLLayer(dim, direction == "bottom_right", patch_grid, conv_kind=conv_kind,
                              mlstm_form=mlstm_form, chunk_size=chunk_size, norm_bias=norm_bias, **layer_options)
        self.drop_path = DropPath(drop_path)

    def forward(self, x, patch_grid=None):
        return x + self.drop_path(self.layer(self.norm(x), patch_grid))
