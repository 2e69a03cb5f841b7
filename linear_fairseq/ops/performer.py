"""Kernel ("linear") attention as pure tensor functions (no fairseq imports).

"Transformers are RNNs" (Katharopoulos et al., ICML 2020, arXiv 2006.16236):

    out_i = phi(q_i)^T S_i / max(phi(q_i)^T z_i, eps)
    S_i = sum_{j<=i} phi(k_j) v_j^T,   z_i = sum_{j<=i} phi(k_j)

Shapes are per head and batch-first: phi_q (B, H, T, m), phi_k (B, H, n, m),
v (B, H, n, d); a padding mask is (B, n), True at padding.

Two generalizations share one mechanism, per-key log-weights:

* log-scaled key features. Performer's positive random features are
  exponentials; a key feature may be given as phi_k_j with a log-scale s_j
  (B, H, n), the true feature being phi_k_j * exp(s_j).
* RFA's recency gate g_j in (0, 1) (causal only): the state decays,
  S_i = g_i S_{i-1} + (1 - g_i) phi(k_i) v_i^T, so key j counts
  (1 - g_j) prod_{l=j+1..i} g_l at query i.

All sums are kept relative to a reference R_i = the largest log-weight among
the keys query i may see, so every factor exp(. - R_i) is <= 1 and nothing
overflows. R_i is a prefix maximum: the causal forms never look at future
keys, and the reference cancels between numerator and normalizer. A query's
features may carry a log-scale too (FAVOR+ divides out its largest
exponent); it cancels the same way.

The normalizer is clamped (not eps added), so the forms agree wherever it is
above the clamp, and the clamp acts in true scale: phi(q_i).z_i >= eps for
the features as defined, i.e. the stabilized normalizer is clamped at
eps * exp(-(R_i + query log-scale)), and never below the smallest normal
float (an empty sum gives 0, not 0/0). eps = 0 guards only that: for
nonnegative features the output is then the exact ratio of two sums of
nonnegative terms, however small both are. Sums accumulate in float32
(float64 if given).

Forms: ``naive`` (quadratic reference), ``causal_chunked`` (a loop over chunks
of G tokens, quadratic inside a chunk, the carried state across),
``causal_parallel`` (training: the same function with every chunk at once, a
number of kernels that does not grow with T), ``causal_step`` (decoding: the
same update with G = 1, as a recurrence), and ``summarize``/``read`` for the
non-causal form.
"""
import math
from itertools import repeat
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import State, acc, acc_dtype, constant, lower_triangle, own_precision, writable, zero_padded

# State: {"S": (B, H, m, d + 1), "M": (B, H)}: S = [sum phi(k) v^T, z] (z its last column), the true
# sums being exp(M) S. The values enter as [v, 1] (`with_ones`), so one product with phi(q) gives the
# numerator and the normalizer together, and one update moves both.
NEG_INF = float("-inf")


@constant(maxsize=32)
def one_then_zeros(zeros: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(1 + zeros,): [1, 0, ..., 0]."""
    tail = torch.zeros(1 + zeros, device=device, dtype=dtype)
    tail[0] = 1
    return tail


def with_ones(v: Tensor, zeros: int = 0) -> Tensor:
    """[v, 1], then `zeros` zero columns: (..., d) -> (..., d + 1 + zeros), one kernel
    (the columns after v a cached constant, broadcast over the rows)."""
    tail = one_then_zeros(zeros, v.device, v.dtype)
    return torch.cat([v, tail.expand(*v.shape[:-1], -1)], dim=-1)


def _column(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.unsqueeze(-1)


# -- feature maps phi ---------------------------------------------------------
@own_precision
def elu_features(x: Tensor) -> Tensor:
    """phi(x) = elu(x) + 1 (Katharopoulos et al. 2020, Eq. 7)."""
    return F.elu(acc(x)) + 1.0


@own_precision
def favor_features(x: Tensor, projection: Tensor) -> Tuple[Tensor, Tensor]:
    """Performer FAVOR+ positive random features of the softmax kernel exp(q.k / sqrt(d)).

    phi(x) = exp(w_r . x' - |x'|^2 / 2) / sqrt(m), x' = x d^{-1/4}, rows w_r of
    `projection` (m, d). Returned as (exp(a - s), s - log(m) / 2) with
    s = max_r a, a constant per token: the log-scale, so the largest feature
    is 1. For keys it keeps their relative weights; for a query it cancels,
    and places the normalizer's clamp.
    """
    x = acc(x) * x.shape[-1] ** -0.25
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    a = torch.addcmul(x @ acc(projection).t(), norm, norm, value=-0.5)  # w_r . x' - |x'|^2 / 2
    s = a.amax(dim=-1, keepdim=True).detach()
    return torch.exp(a - s), s.squeeze(-1) - 0.5 * math.log(projection.shape[0])


@own_precision
def rfa_features(x: Tensor, projection: Tensor) -> Tensor:
    """RFA random Fourier features of the Gaussian kernel on unit-norm inputs
    (Peng et al., ICLR 2021): phi(x) = [sin(W x), cos(W x)] / sqrt(m)."""
    proj = F.normalize(acc(x), dim=-1) @ acc(projection).t()
    return torch.cat([proj.sin(), proj.cos()], dim=-1) / math.sqrt(projection.shape[0])


@own_precision
def t2r_features(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """T2R's learned feature map, phi(x) = relu(W_h x + b_h) per head (Kasai et al., EMNLP 2021).
    x (B, H, ..., d), weight (H, m, d), bias (H, m)."""
    phi = torch.einsum("bh...d,hmd->bh...m", acc(x), acc(weight))
    return F.relu(phi + acc(bias).view(bias.shape[0], *[1] * (x.dim() - 3), bias.shape[1]))


def orthogonal_gaussian(m: int, d: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """m x d matrix of blocks of orthogonal rows, each row rescaled to the norm
    of a Gaussian vector (Performer's orthogonal random features)."""
    blocks = []
    for _ in range(-(-m // d)):
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator))
        blocks.append(q.t())
    rows = torch.cat(blocks)[:m]
    norms = torch.randn(m, d, generator=generator).norm(dim=1, keepdim=True)
    return rows * norms


# -- per-key log-weights --------------------------------------------------------
def key_log_weights(
    shape, like: Tensor, padding_mask: Optional[Tensor], log_scale: Optional[Tensor], gate_logits: Optional[Tensor]
) -> Tuple[Tensor, Optional[Tensor]]:
    """(a, lg), both of `shape`, (B, H, n) or (B, H) for one step (padding_mask
    (B, n) or (B,)): a_j = log-weight of key j when written, lg_j = log g_j,
    the decay applied at step j (0 at padding; None without a gate: no decay)."""
    a = like.new_zeros(shape) if log_scale is None else acc(log_scale)
    lg = None
    if gate_logits is not None:
        a = a + F.logsigmoid(-acc(gate_logits))  # log(1 - g_j)
        lg = F.logsigmoid(acc(gate_logits))  # log g_j
    if padding_mask is not None:
        pad = padding_mask.unsqueeze(1)  # over the heads
        a = a.masked_fill(pad, NEG_INF)
        lg = None if lg is None else lg.masked_fill(pad, 0.0)
    return a, lg


@constant(maxsize=32)
def later(n: int, device: torch.device) -> Tensor:
    """(n, n) boolean, True at [i, j] for j > i: what row i may not see."""
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)


@constant(maxsize=32)
def later_log_mask(n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(n, n): -inf where column j is later than row i, 0 elsewhere; added to log-weights."""
    return torch.zeros(n, n, device=device, dtype=dtype).masked_fill(later(n, device), NEG_INF)


LOWEST = -1e30  # a reference where no key is visible yet: every visible log-weight is above it


def _finite(R: Tensor) -> Tensor:
    """The reference R, or LOWEST where no key is visible yet (R = -inf), so
    exp(w - R) is 0 for the invisible keys rather than nan."""
    return R.clamp(min=LOWEST)


TINY = torch.finfo(torch.float32).tiny  # the smallest clamp: an empty sum gives 0, not 0/0


def clamp_floor(eps: float, log_offset: Optional[Tensor], q_log_scale: Optional[Tensor]):
    """The clamp of a stabilized normalizer that is eps in true scale, where the
    true normalizer is the stabilized one times exp(log_offset + q_log_scale)
    (None: 0): eps exp(-offset), kept between TINY and eps exp(80). A number
    where it is the same for every query."""
    if not eps:
        return TINY
    if q_log_scale is not None:
        log_offset = acc(q_log_scale) if log_offset is None else log_offset + acc(q_log_scale)
    if log_offset is None:
        return max(eps, TINY)
    return torch.exp((math.log(eps) - log_offset).clamp(min=math.log(TINY), max=math.log(eps) + 80.0))


def at_least(den: Tensor, floor) -> Tensor:
    """den clamped below at floor (a number or a tensor, from clamp_floor)."""
    return den.clamp(min=floor) if isinstance(floor, float) else torch.maximum(den, floor)


def normalized(num: Tensor, floor) -> Tensor:
    """phi(q).S over max(phi(q).z, floor), from num = phi(q) [S, z] (..., d + 1);
    a tensor floor has num's shape with a last axis of 1."""
    values, den = num.split([num.shape[-1] - 1, 1], dim=-1)  # split: its backward is one concatenation
    return values / at_least(den, floor)


# -- reference -------------------------------------------------------------------
@own_precision
def weights(
    phi_q: Tensor,
    phi_k: Tensor,
    causal: bool,
    padding_mask: Optional[Tensor] = None,
    log_scale: Optional[Tensor] = None,
    gate_logits: Optional[Tensor] = None,
    q_log_scale: Optional[Tensor] = None,
    *,
    eps: float,
) -> Tensor:
    """The attention weights (B, H, T, n) of the kernel form, quadratic: key j's
    weight at query i is phi_q_i . phi_k_j exp(w_ij - R_i), over their sum
    (clamped as everywhere). Each row sums to 1 unless the clamp acts."""
    phi_q, phi_k = acc(phi_q), zero_padded(acc(phi_k), padding_mask, 2)
    B, H, n = phi_k.shape[:3]
    a, lg = key_log_weights((B, H, n), phi_k, padding_mask, log_scale, gate_logits if causal else None)
    if causal:
        L = torch.zeros_like(a) if lg is None else lg.cumsum(-1)
        w = a[..., None, :] + L[..., :, None] - L[..., None, :]  # [i, j]: a_j + sum_{l=j+1..i} log g_l
        w = w.masked_fill(later(n, phi_k.device), NEG_INF)
    else:
        w = a[..., None, :].expand(B, H, phi_q.shape[2], n)
    R = _finite(w.amax(-1, keepdim=True)).detach()
    scores = (phi_q @ phi_k.transpose(-1, -2)) * torch.exp(w - R)
    floor = clamp_floor(eps, R, _column(q_log_scale))
    return scores / at_least(scores.sum(-1, keepdim=True), floor)


@own_precision
def naive(phi_q: Tensor, phi_k: Tensor, v: Tensor, causal: bool, *args, **kwargs) -> Tensor:
    """Quadratic reference: the weights above times v. After `causal` come the
    other arguments of `weights`, by position or name (padding_mask, log_scale,
    gate_logits, q_log_scale, eps)."""
    attn = weights(phi_q, phi_k, causal, *args, **kwargs)
    return (attn @ acc(v)).to(v.dtype)


# -- non-causal: summarize the source once, read it per query ------------------------
@own_precision
def summarize(
    phi_k: Tensor, v: Tensor, padding_mask: Optional[Tensor] = None, log_scale: Optional[Tensor] = None
) -> State:
    """{S, M}: S = sum_j phi(k_j) [v_j, 1]^T relative to M (B, H), the largest
    key log-scale: the true sums are exp(M) S."""
    phi_k, v = zero_padded(acc(phi_k), padding_mask, 2), acc(v)
    a, _ = key_log_weights(phi_k.shape[:3], phi_k, padding_mask, log_scale, None)
    M = _finite(a.amax(-1, keepdim=True)).detach()
    w = torch.exp(a - M).unsqueeze(-1)
    return {"S": (phi_k * w).transpose(-1, -2) @ with_ones(v), "M": M.squeeze(-1)}


@own_precision
def read(
    phi_q: Tensor, state: State, dtype: torch.dtype, q_log_scale: Optional[Tensor] = None, *, eps: float
) -> Tensor:
    """out = phi(q)^T S / max(phi(q)^T z, eps), the clamp in true scale."""
    floor = clamp_floor(eps, state["M"][..., None, None], _column(q_log_scale))
    return normalized(acc(phi_q) @ state["S"], floor).to(dtype)


# -- causal: chunks carrying the state; a decoding step is a chunk of one ------------
def empty_state(B: int, H: int, m: int, d: int, like: Tensor) -> State:
    """The state before any key, for values of width d."""
    S = like.new_zeros(B, H, m, d + 1, dtype=acc_dtype(like))
    return {"S": S, "M": S.new_full((B, H), NEG_INF)}


def _chunk_out(phi_q, phi_k, v1, r, L, state: State, eps: float, q_log_scale) -> Tensor:
    """The outputs of a chunk (or of a batch of chunks, on a chunk axis before
    the time axis) given the state carried into it; v1 = [v, 1]. L: the decay from
    the chunk's start to t (None: no decay); r = a - L: key j's log-weight up to
    the factor exp(L_t)."""
    S, M = state["S"], state["M"]
    R_raw = torch.maximum(M.unsqueeze(-1), r.cummax(-1).values).detach()  # prefix max: no look-ahead
    R = _finite(R_raw)
    w = torch.exp(r[..., None, :] - R[..., :, None] + later_log_mask(r.shape[-1], r.device, r.dtype))  # j <= t
    scores = (phi_q @ phi_k.transpose(-1, -2)) * w
    w_state = torch.exp(M.unsqueeze(-1) - R)  # the carried state, seen from t
    num = scores @ v1 + w_state.unsqueeze(-1) * (phi_q @ S)
    return normalized(num, clamp_floor(eps, (R if L is None else R + L).unsqueeze(-1), _column(q_log_scale)))


def _summaries(phi_k, v1, r, L) -> State:
    """Each chunk's own sums at its end, nothing carried in: sum_j weight_j phi(k_j) [v_j, 1]^T
    relative to M, the chunk's largest log-weight at its end (the decay over the chunk included)."""
    top = r.amax(-1).detach()
    w = torch.exp(r - _finite(top).unsqueeze(-1)).unsqueeze(-1)
    return {"S": (phi_k * w).transpose(-1, -2) @ v1, "M": top if L is None else top + L[..., -1]}


def _chunk_end(phi_k, v1, r, L, state: State) -> State:
    """The state at a chunk's end: S' = decay * S + the chunk's own sums (`_summaries`),
    relative to the larger of their log-weights."""
    own = _summaries(phi_k, v1, r, L)
    M = state["M"] if L is None else state["M"] + L[..., -1]  # the carried state, decayed over the chunk
    top = torch.maximum(M, own["M"]).detach()  # the new reference; the decays' gradients reach w_old, w_own
    w_old, w_own = torch.exp(torch.stack([M, own["M"]]) - _finite(top)).unsqueeze(-1).unsqueeze(-1).unbind()
    return {"S": w_old * state["S"] + w_own * own["S"], "M": top}


def _causal_values(phi_q, phi_k, v, padding_mask, chunk_size: int):
    """The inputs in accumulation precision, padded keys zeroed, the values as [v, 1]."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    return acc(phi_q), zero_padded(acc(phi_k), padding_mask, 2), with_ones(acc(v))


def _causal_inputs(phi_q, phi_k, v, padding_mask, log_scale, gate_logits, chunk_size: int):
    """What both causal forms start from: `_causal_values` and the keys' log-weights
    and log-decays (None without a gate: nothing decays)."""
    phi_q, phi_k, v1 = _causal_values(phi_q, phi_k, v, padding_mask, chunk_size)
    a, lg = key_log_weights(phi_k.shape[:3], phi_k, padding_mask, log_scale, gate_logits)
    return phi_q, phi_k, v1, a, lg


@own_precision
def causal_chunked(
    phi_q: Tensor,
    phi_k: Tensor,
    v: Tensor,
    padding_mask: Optional[Tensor] = None,
    log_scale: Optional[Tensor] = None,
    gate_logits: Optional[Tensor] = None,
    q_log_scale: Optional[Tensor] = None,
    state: Optional[State] = None,
    *,
    chunk_size: int,
    eps: float,
) -> Tuple[Tensor, State]:
    """Causal kernel attention, a loop over chunks of G tokens carrying the
    state; returns (out, final state). Memory O(T G + m d) beyond the inputs,
    but T / G steps of kernel launches: the reference `causal_parallel` is
    tested against, and the form to read first."""
    dtype, d = v.dtype, v.shape[-1]
    phi_q, phi_k, v, a, lg = _causal_inputs(phi_q, phi_k, v, padding_mask, log_scale, gate_logits, chunk_size)
    state = state if state is not None else empty_state(*phi_k.shape[:2], phi_k.shape[-1], d, v)
    # split once rather than slice per chunk: the backward of a slice writes its
    # gradient into a zero tensor of the whole input, once per chunk (O(T^2 / G))
    chunks = lambda x, dim: x.split(chunk_size, dim=dim)  # noqa: E731
    q_scales = repeat(None) if q_log_scale is None else chunks(q_log_scale, -1)
    decays = repeat(None) if lg is None else chunks(lg, -1)
    outs = []
    for q_c, k_c, v_c, a_c, lg_c, q_scale in zip(
        chunks(phi_q, 2), chunks(phi_k, 2), chunks(v, 2), chunks(a, -1), decays, q_scales
    ):
        L = None if lg_c is None else lg_c.cumsum(-1)
        r = a_c if L is None else a_c - L
        outs.append(_chunk_out(q_c, k_c, v_c, r, L, state, eps, q_scale))
        state = _chunk_end(k_c, v_c, r, L, state)
    return torch.cat(outs, dim=2).to(dtype), state


# -- causal, chunkwise parallel: every chunk at once --------------------------------
def _by_chunk(x: Tensor, G: int, fill: float = 0.0) -> Tensor:
    """(B, H, T, ...) -> (B, H, C, G, ...), the time axis padded with `fill` to C G."""
    T = x.shape[2]
    pad = -T % G
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad), value=fill)
    return x.unflatten(2, (-1, G))


def _carried(summaries: State, first: Optional[State], decay: Optional[Tensor]) -> State:
    """The state entering each chunk c = 0..C (C: the final state) from the
    chunks' own summaries (S relative to M, their log-weight at the chunk's
    end), the state given before the first chunk (None: none, nothing enters
    chunk 0) and each chunk's total log-decay (None: nothing decays). Chunk
    c' < c reaches chunk c decayed by the chunks between them: log-weight
    M_c' + P_c - P_{c'+1}, P the decay before a chunk, summed in float64 (a
    difference of long sums). Every entering state is then one masked
    (C+1) x (sources) weighting of the sources, relative to its own largest
    log-weight: a constant number of kernels at any length."""
    logw, sources = summaries["M"], summaries["S"]  # (B, H, C), (B, H, C, m, d + 1): the chunks
    if first is not None:  # a source before the chunks, entering chunk 0 onwards
        logw = torch.cat([first["M"].unsqueeze(-1), logw], dim=-1)
        sources = torch.cat([first["S"].unsqueeze(2), sources], dim=2)
    C = summaries["M"].shape[-1]
    skip = 0 if first is not None else 1  # the sources are columns skip.. of the (C+1) x (C+1) layout
    if decay is not None:
        P = F.pad(decay.double().cumsum(-1), (1, 0))  # (B, H, C+1): the decay before chunk c
        logw = logw.double()[..., None, :] + P[..., :, None] - P[..., None, skip:]  # [c, j]: j entering c
    else:
        logw = logw[..., None, :]
    # a source enters chunk c when it ends before c
    logw = logw + later_log_mask(C + 1, logw.device, logw.dtype)[:, skip:]
    M = logw.amax(-1).detach()
    w = torch.exp(logw - _finite(M).unsqueeze(-1)).to(sources.dtype)
    S = (w @ sources.flatten(-2)).unflatten(-1, sources.shape[-2:])
    return {"S": S, "M": M.to(S.dtype)}


@own_precision
def causal_parallel(
    phi_q: Tensor, phi_k: Tensor, v: Tensor, padding_mask: Optional[Tensor] = None,
    log_scale: Optional[Tensor] = None, gate_logits: Optional[Tensor] = None, q_log_scale: Optional[Tensor] = None,
    state: Optional[State] = None, *, chunk_size: int, eps: float,
) -> Tuple[Tensor, State]:
    """Causal kernel attention, chunkwise parallel (the function of
    `causal_chunked`, without its loop): every chunk's summary at once, the
    state entering each chunk from those summaries (`_carried`), then every
    chunk's outputs at once. The number of kernels does not grow with T.
    Memory beyond the inputs, with C = T / G chunks: O(T G) for the scores
    inside the chunks, O(C m d) for the summaries and entering states, O(C^2)
    for their weights; the compute of the carry is O(C^2 m d). Keys of weight 1
    (no log-scale, gate or state given: elu, T2R, RFA without its gate) take
    `_unweighted_parallel`, the same sums without log-weights."""
    dtype, T, G = v.dtype, v.shape[2], chunk_size
    if log_scale is None and gate_logits is None and q_log_scale is None and state is None:
        out, S = _unweighted_parallel(*_causal_values(phi_q, phi_k, v, padding_mask, chunk_size), G, eps)
        return out[:, :, :T].to(dtype), {"S": S, "M": S.new_zeros(S.shape[:2])}
    phi_q, phi_k, v, a, lg = _causal_inputs(phi_q, phi_k, v, padding_mask, log_scale, gate_logits, chunk_size)
    # padded to whole chunks: the extra keys weigh nothing (a = -inf) and do not decay (log g = 0)
    pq, pk, vc = _by_chunk(phi_q, G), _by_chunk(phi_k, G), _by_chunk(v, G)
    qs = None if q_log_scale is None else _by_chunk(acc(q_log_scale).unsqueeze(-1), G).squeeze(-1)
    a = _by_chunk(a.unsqueeze(-1), G, NEG_INF).squeeze(-1)
    L = None if lg is None else _by_chunk(lg.unsqueeze(-1), G).squeeze(-1).cumsum(-1)
    r = a if L is None else a - L
    entering = _carried(_summaries(pk, vc, r, L), state, None if L is None else L[..., -1])
    inside = {k: x[:, :, :-1] for k, x in entering.items()}
    out = _chunk_out(pq, pk, vc, r, L, inside, eps, qs)
    return out.flatten(2, 3)[:, :, :T].to(dtype), {k: x[:, :, -1] for k, x in entering.items()}


def _unweighted_parallel(phi_q, phi_k, v1, G: int, eps: float) -> Tuple[Tensor, Tensor]:
    """`causal_parallel` for keys of weight 1 (no log-scale, no gate, no state
    given; padded keys are zero features): plain sums, no stabilizer. Returns the
    outputs (B, H, C G, d) and the final S (B, H, m, d + 1)."""
    pq, pk, vc = _by_chunk(phi_q, G), _by_chunk(phi_k, G), _by_chunk(v1, G)
    C = pk.shape[2]
    own = (pk.transpose(-1, -2) @ vc).flatten(-2)  # (B, H, C, m (d + 1)): each chunk's sums
    before = lower_triangle(C + 1, C, -1, pk.device, pk.dtype)  # [c, c'] = 1 where c' < c
    entering = (before @ own).unflatten(-1, (pk.shape[-1], vc.shape[-1]))  # into chunk c = 0 .. C (C: the end)
    causal = lower_triangle(G, G, 0, pk.device, pk.dtype)
    num = ((pq @ pk.transpose(-1, -2)) * causal) @ vc + pq @ entering[:, :, :-1]
    return normalized(num, clamp_floor(eps, None, None)).flatten(2, 3), entering[:, :, -1]


@own_precision
def causal_step(
    phi_q: Tensor,
    phi_k: Tensor,
    v: Tensor,
    state: Optional[State] = None,
    padding_mask: Optional[Tensor] = None,
    log_scale: Optional[Tensor] = None,
    gate_logits: Optional[Tensor] = None,
    q_log_scale: Optional[Tensor] = None,
    *,
    eps: float,
) -> Tuple[Tensor, State]:
    """One decoding step: phi_q, phi_k (B, H, m), v (B, H, d), log_scale/gate_logits (B, H),
    padding_mask (B,). The recurrence of Katharopoulos et al. (Eq. 18-20), relative to
    the reference M as in the chunked form (the same update with G = 1):
        S_i = w_old S_{i-1} + w_i phi(k_i) v_i^T,  z_i = w_old z_{i-1} + w_i phi(k_i),
        out_i = phi(q_i)^T S_i / max(phi(q_i)^T z_i, eps),
    S and z kept side by side as one (m, d + 1) matrix.
    The state is O(m d) per head, whatever the prefix length. Without autograd
    (decoding) it is updated in place rather than copied every step, and no
    value is read back to the host (no device sync)."""
    dtype = v.dtype
    phi_q, phi_k, v = acc(phi_q), acc(phi_k), acc(v)
    B, H, m = phi_k.shape
    state = state if state is not None else empty_state(B, H, m, v.shape[-1], v)
    if padding_mask is not None:  # a padded key adds nothing: zero features, weight 0
        phi_k = phi_k.masked_fill(padding_mask[:, None, None], 0.0)
    if log_scale is None and gate_logits is None:
        S, M, w_old, kw = _unweighted_update(state, phi_k, padding_mask)
        offset = None
    else:
        S, M, w_old, kw = _weighted_update(state, phi_k, padding_mask, log_scale, gate_logits)
        offset = _finite(M).unsqueeze(-1) if eps else None  # M: the new reference, decay included
    S = _accumulate(S, w_old, kw, v, in_place=writable(phi_q, phi_k, v, S, kw))
    num = (phi_q.unsqueeze(-2) @ S).squeeze(-2)  # phi(q) [S, z]
    return normalized(num, clamp_floor(eps, offset, _column(q_log_scale))).to(dtype), {"S": S, "M": M}


def _accumulate(S: Tensor, w_old: Optional[Tensor], kw: Tensor, v: Tensor, in_place: bool) -> Tensor:
    """S = w_old S + kw [v, 1]^T (w_old None: 1), in place when allowed: there the
    new key's v^T goes into S's first d columns and kw into its last, z."""
    if not in_place:
        if w_old is not None:
            S = w_old[..., None, None] * S
        return S + kw.unsqueeze(-1) * with_ones(v).unsqueeze(-2)
    if w_old is not None:
        S.mul_(w_old[..., None, None])
    S[..., :-1].addcmul_(kw.unsqueeze(-1), v.unsqueeze(-2))
    S[..., -1].add_(kw)
    return S


def _unweighted_update(state: State, phi_k: Tensor, padding_mask):
    """Keys of weight 1 (no log-scale, no gate): the sums just grow. The
    reference stays 0 once a key has been seen (-inf before: nothing yet)."""
    M = state["M"].clamp(min=0.0) if padding_mask is None else state["M"].masked_fill(~padding_mask[:, None], 0.0)
    return state["S"], M, None, phi_k


def _weighted_update(state: State, phi_k: Tensor, padding_mask, log_scale, gate_logits):
    """Keys with a log-scale and/or a decay: the new reference R = max(M, r),
    the old sums scaled by exp(M - R) <= 1, the new key weighted exp(r - R) <= 1."""
    S, M = state["S"], state["M"]
    a, lg = key_log_weights(phi_k.shape[:2], phi_k, padding_mask, log_scale, gate_logits)
    r = a if lg is None else a - lg  # this key's log-weight, up to the common factor exp(lg)
    R_raw = torch.maximum(M, r).detach()
    R = R_raw if padding_mask is None else _finite(R_raw)  # without padding every log-weight, so R, is finite
    w_old, w_new = torch.exp(torch.stack([M, r]) - R).unbind()  # (B, H) each, both <= 1
    return S, R_raw if lg is None else R_raw + lg, w_old, phi_k * w_new.unsqueeze(-1)
