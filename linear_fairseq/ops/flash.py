"""FLASH mixed chunk attention as pure tensor functions (no fairseq imports).

"Transformer Quality in Linear Time" (Hua, Dai, Liu, Le, ICML 2022,
arXiv 2202.10447). The sequence is cut into chunks of G tokens; a query
attends quadratically (relu^2 scores) inside its chunk and linearly to the
chunks before it (causal) or to the whole sequence (non-causal):

    quad_i = sum_{j in chunk(i), j<=i} relu(q_i . k_j / sqrt(s))^2 / c_i  v_j
    lin_i  = q'_i . (sum_{j in earlier chunks} k'_j v_j^T) / n_i
    out_i  = quad_i + lin_i

Normalization, chosen where the paper leaves it open (its pseudo-code divides
by the full sequence length n, which makes a causal model depend on the
future and training differ from decoding):
  * quadratic part: 1/sqrt(s) inside relu^2 (as dot-product attention, so the
    pre-activation stays O(1) for any s), and outside it c_i by `relu2_norm`:
      "keys"   c_i = the number of keys query i sees in its chunk (a mean, so
               the output's scale does not depend on G or on the position);
      "chunk"  c_i = G, the chunk length (the paper's constant);
      "none"   c_i = 1;
  * linear part: divided by n_i, the number of real tokens it sums over
    (tokens of completed chunks when causal, all real tokens otherwise): a
    mean, the same at every step of decoding as in training.

Chunks are aligned on real tokens: a left-padded row is moved so its real
tokens come first, and positions (for RoPE) count real tokens only, so
padding never changes any real position's output. Sums accumulate in float32.

Tensors are batch-first: q, k (quadratic), ql, kl (linear): (B, T, s);
v: (B, T, e); padding_mask (B, T), True at padding.
"""
import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import common
from .common import (State, acc, acc_dtype, constant, lower_triangle, operand, operand_dtype, own_precision, rows_into,
                     update, writable)


# -- positions ---------------------------------------------------------------
@constant(maxsize=16)
def rope_freqs(s: int, base: float, device: torch.device) -> Tensor:
    """base^(-2i/s), i = 0 .. s/2 - 1."""
    return base ** (-torch.arange(0, s, 2, device=device, dtype=torch.float32) / s)


@constant(maxsize=16)
def _one(device: torch.device) -> Tensor:
    return torch.ones((), device=device)


def turns(positions: Tensor, s: int, base: float = 10000.0) -> Tensor:
    """e^(i positions base^(-2j/s)), j = 0 .. s/2 - 1: the turn of each pair of
    RoPE's width s at `positions` (any shape), complex (..., s/2)."""
    return torch.polar(_one(positions.device), positions.unsqueeze(-1) * rope_freqs(s, base, positions.device))


@constant(maxsize=8)
def _first_turns(n: int, s: int, base: float, device: torch.device) -> Tensor:
    return turns(torch.arange(n, device=device), s, base)


@constant(maxsize=8)
def _first_turns_back(n: int, s: int, base: float, device: torch.device) -> Tensor:
    return _first_turns(n, s, base, device).conj().resolve_conj()


def first_turns(T: int, s: int, device: torch.device, base: float = 10000.0, back: bool = False) -> Tensor:
    """turns at positions 0 .. T-1, (T, s/2), or with `back` their inverses (turning
    back, as RoPE's gradient does): a view of a table kept at the next power of two."""
    return (_first_turns_back if back else _first_turns)(1 << max(T - 1, 0).bit_length(), s, base, device)[:T]


def rotate(x: Tensor, turns: Tensor) -> Tensor:
    """Each pair (x_2j, x_2j+1) of x's last dim, as the complex number x_2j + i x_2j+1,
    times its turn (broadcast): RoPE's rotation, computed in float32."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * turns).flatten(-2).to(x.dtype)


def rope(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary position embedding (Su et al., arXiv 2104.09864) on the last dim
    (even width s): pair j turns by the angle positions * base^(-2j/s)."""
    return rotate(x, turns(positions, x.shape[-1], base))


def real_positions(padding_mask: Optional[Tensor], B: int, T: int, device) -> Tensor:
    """0, 1, 2, ... over real tokens (padding gets the next real token's value): (B, T)."""
    if padding_mask is None:
        return torch.arange(T, device=device).expand(B, T)
    return ((~padding_mask).long().cumsum(1) - 1).clamp(min=0)


def real_first(padding_mask: Tensor) -> Tensor:
    """Per-row permutation putting real tokens first, in order (stable)."""
    return torch.sort(padding_mask.to(torch.uint8), dim=1, stable=True).indices


def gather_time(x: Tensor, order: Tensor) -> Tensor:
    return x.gather(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_time(x: Tensor, order: Tensor) -> Tensor:
    return torch.empty_like(x).scatter_(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x)


# -- normalization ---------------------------------------------------------------
def scale_norm(x: Tensor, g: Tensor, eps: float) -> Tensor:
    """ScaleNorm (Nguyen & Salazar 2019, FLASH's default): x / max(|x|, eps) * g over the
    last dim, g a learned scalar; its backward written out (6 kernels, autograd's 17).
    Without a gradient to compute (decoding) the autograd function is not entered."""
    if torch.is_grad_enabled() and (x.requires_grad or g.requires_grad):
        return _ScaleNorm.apply(x, g, eps)
    return unit_norm(x, eps)[0] * g


def unit_norm(x: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """(x / c, c), c = max(|x|, eps) over the last dim. x / c is at most 1 in size: half
    precision holds it where g / c would overflow."""
    c = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_(min=eps)
    return x / c, c


class _ScaleNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g, eps):
        unit, c = unit_norm(x, eps)
        ctx.save_for_backward(unit, c, g)
        ctx.eps = eps
        return unit * g

    @staticmethod
    def backward(ctx, dy):
        # y = g x / c, c = max(|x|, eps): g's gradient is dy.x / c; x's is (dy - x/c (dy.x/c)) g / c,
        # the second term only where |x| > eps (below, c is the constant eps)
        unit, c, g = ctx.saved_tensors
        dot = (dy.unsqueeze(-2) @ unit.unsqueeze(-1)).squeeze(-1)  # dy.x / c
        dg = dot.sum().reshape(g.shape)
        dx = torch.addcmul(dy, unit, dot.masked_fill_(c <= ctx.eps, 0.0), value=-1.0).div_(c).mul_(g)
        return dx, dg, None


# -- scores --------------------------------------------------------------------
RELU2_NORMS = ("keys", "chunk", "none")


def unknown_relu2_norm(norm: str) -> ValueError:
    """The error for a relu2_norm that is none of RELU2_NORMS, naming it and the choices."""
    return ValueError(f"relu2_norm={norm!r}; choose from {', '.join(RELU2_NORMS)}")


def relu2(q: Tensor, k: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """relu(q k^T / sqrt(s) + b)^2, b an optional relative position bias."""
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if bias is not None:
        scores = scores + bias
    return F.relu(scores).square()


def relu2_divisor(norm: str, G: int, seen: Tensor) -> Tensor:
    """c_i of the quadratic part for queries that see `seen` keys (any shape):
    seen ("keys"), G ("chunk") or 1 ("none"); at least 1."""
    if norm == "keys":
        return seen.clamp(min=1)
    if norm == "chunk":
        return torch.full_like(seen, float(G))
    if norm == "none":
        return torch.ones_like(seen)
    raise unknown_relu2_norm(norm)


def offset_bias(rel_bias: Optional[Tensor], offsets: Tensor) -> Optional[Tensor]:
    """Learned bias b[i - j] from a (2G - 1,) table; offsets beyond +-(G-1) share the end values."""
    if rel_bias is None:
        return None
    G = (rel_bias.shape[0] + 1) // 2
    return acc(rel_bias)[offsets.clamp(-(G - 1), G - 1) + G - 1]


# -- reference -------------------------------------------------------------------
@own_precision
def naive(
    q, k, ql, kl, v, causal: bool, padding_mask: Optional[Tensor] = None, rel_bias: Optional[Tensor] = None,
    *, chunk_size: int, relu2_norm: str,
) -> Tensor:
    """Dense T x T reference of mixed chunk attention; pads anywhere (positions in real-token order)."""
    dtype = v.dtype
    q, k, ql, kl, v = map(acc, (q, k, ql, kl, v))
    B, T = q.shape[:2]
    G = chunk_size
    pos = real_positions(padding_mask, B, T, q.device)
    real = torch.ones(B, T, dtype=torch.bool, device=q.device) if padding_mask is None else ~padding_mask
    chunk = pos // G
    same = chunk[:, :, None] == chunk[:, None, :]
    visible = real[:, None, :] & real[:, :, None]
    earlier = chunk[:, None, :] < chunk[:, :, None]
    if causal:
        visible = visible & (pos[:, None, :] <= pos[:, :, None])
    lin_keys = (visible & earlier) if causal else visible
    bias = offset_bias(rel_bias, pos[:, :, None] - pos[:, None, :])
    quad_keys = same & visible
    quad = torch.where(quad_keys, relu2(q, k, bias), 0.0)
    quad = quad / relu2_divisor(relu2_norm, G, quad_keys.sum(-1, keepdim=True).to(quad.dtype))
    lin = torch.where(lin_keys, ql @ kl.transpose(1, 2), 0.0)
    n = lin_keys.sum(-1, keepdim=True).clamp(min=1)
    return ((quad + lin / n) @ v).to(dtype)


# -- chunked (training) form ------------------------------------------------------
@constant(maxsize=32)
def chunk_table(L: int, G: int, causal: bool, norm: str, device: torch.device,
                dtype: torch.dtype = torch.float32) -> Tensor:
    """(L, L) weights of a full chunk's relu^2 scores: [i, j] = 1 / c_i where
    query i sees key j (j <= i if causal), 0 elsewhere; c_i from relu2_divisor."""
    seen = lower_triangle(L, L, 0, device, dtype) if causal else torch.ones(L, L, device=device, dtype=dtype)
    i = torch.arange(L, device=device, dtype=dtype)
    keys = i + 1.0 if causal else torch.full_like(i, float(L))
    return seen / relu2_divisor(norm, G, keys[:, None])


@constant(maxsize=32)
def chunk_roots(L: int, G: int, causal: bool, norm: str, device: torch.device, dtype: torch.dtype,
                scale: float = 1.0) -> Tensor:
    """The square roots of chunk_table's weights, times `scale`: relu(x)^2 w = relu(x sqrt(w))^2,
    so the weights are taken before the square and in float16 nothing above the weight overflows."""
    table = chunk_table(L, G, causal, norm, device, torch.promote_types(dtype, torch.float32))
    return (table.sqrt() * scale).to(dtype)


def within_chunks(q: Tensor, k: Tensor, real_c: Optional[Tensor], rel_bias: Optional[Tensor], causal: bool,
                  G: int, norm: str) -> Tensor:
    """The quadratic part's weights (B, N, L, L), chunked q and k: relu(q k^T / sqrt(s) + b)^2 / c_i
    over the real keys query i sees in its chunk; c_i as `norm` says (relu2_divisor)."""
    L, s = q.shape[-2:]
    by_row = norm == "keys" and real_c is not None  # c_i then depends on each row's padding
    roots = functools.partial(chunk_roots, L, G, causal, "none" if by_row else norm, q.device, q.dtype)
    scores = q @ k.transpose(-1, -2)
    if rel_bias is None:  # 1/sqrt(s) joins the table
        A = F.relu(scores * roots(s ** -0.5)).square()
    else:
        within = torch.arange(L, device=q.device)
        bias = offset_bias(rel_bias, within[:, None] - within[None, :]).to(scores.dtype)
        A = F.relu(torch.add(bias, scores, alpha=s ** -0.5) * roots()).square()
    if real_c is None:
        return A
    keys = real_c.unsqueeze(-2)  # padded keys weigh nothing
    if by_row:
        real_c = acc(real_c)  # counts in float32: bfloat16 counts exactly only to 256
        seen = real_c.cumsum(-1) if causal else real_c.sum(-1, keepdim=True)
        keys = (keys / relu2_divisor(norm, G, seen).unsqueeze(-1)).to(A.dtype)
    return A * keys


@constant(maxsize=32)
def chunks_seen(N: int, causal: bool, device: torch.device, dtype: torch.dtype) -> Tensor:
    """[c, c'] = 1 where chunk c's queries see chunk c' in the linear part: c' < c
    (N, N) if causal; every chunk (1, N) otherwise, one row all chunks share."""
    return lower_triangle(N, N, -1, device, dtype) if causal else torch.ones(1, N, device=device, dtype=dtype)


@constant(maxsize=32)
def chunk_means(N: int, L: int, causal: bool, device: torch.device, dtype: torch.dtype) -> Tensor:
    """chunks_seen, each row divided by the number of tokens it covers (L per chunk,
    at least 1): the weights of the mean over the chunks a query sees, no padding."""
    seen = chunks_seen(N, causal, device, dtype)
    return seen / (seen.sum(-1, keepdim=True) * L).clamp(min=1.0)


def mean_weights(N: int, L: int, causal: bool, real: Optional[Tensor], device: torch.device,
                 dtype: torch.dtype) -> Tensor:
    """The weights of the mean over the real tokens of the chunks a chunk's queries see
    (`dtype` an accumulation precision): chunk_means (N or 1, N) without padding; with
    `real` (B, N, L), from its counts (B, N or 1, N)."""
    if real is None:
        return chunk_means(N, L, causal, device, dtype)
    seen = chunks_seen(N, causal, device, dtype)
    return seen / (real.to(dtype).sum(-1) @ seen.t()).clamp(min=1.0).unsqueeze(-1)


def seen_sums(kl: Tensor, v: Tensor, real: Optional[Tensor], causal: bool) -> Tensor:
    """What each chunk's queries read in the linear part, chunked k' and v (B, N, L, .):
    the mean of k' v^T over the real tokens of the chunks they see (the completed ones
    before their own, if causal; all of them otherwise), (B, N or 1, s, e), one shared
    by all chunks where they all see the same. The chunks' sums are weighted by one
    (N, N) product (O(N^2 s e)) in float32 (the weights of a long sequence's means are
    below float16's normal range); `real` (B, N, L) or None."""
    B, N, L, s = kl.shape
    KV = acc((kl.transpose(-1, -2) @ v).flatten(2))  # (B, N, s e)
    return (mean_weights(N, L, causal, real, KV.device, KV.dtype) @ KV).to(v.dtype).view(B, -1, s, v.shape[-1])


def across_chunks(ql: Tensor, kl: Tensor, v: Tensor, real: Optional[Tensor], causal: bool) -> Tensor:
    """The linear part of mixed chunk attention, chunked tensors (B, N, L, .): each
    query times what its chunk reads (seen_sums)."""
    KV = seen_sums(kl, v, real, causal)
    return ql.reshape(*KV.shape[:2], -1, ql.shape[-1]) @ KV  # a query's chunks as one block where all share KV


@own_precision
def mixed_chunk(
    q: Tensor, k: Tensor, ql: Tensor, kl: Tensor, v: Tensor,
    causal: bool, padding_mask: Optional[Tensor] = None, rel_bias: Optional[Tensor] = None,
    *, chunk_size: int, relu2_norm: str,
) -> Tensor:
    """FLASH mixed chunk attention, memory O(T G + T s e / G)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    dtype = v.dtype
    B, T = q.shape[:2]
    e, G = v.shape[-1], chunk_size
    order = None
    if padding_mask is not None and padding_mask.any():
        order = real_first(padding_mask)
        q, k, ql, kl, v = (gather_time(x, order) for x in (q, k, ql, kl, v))
        padding_mask = padding_mask.gather(1, order)
    # a sequence shorter than G is one chunk: tile it at its own length (the
    # scale stays 1/G), instead of padding every short sentence to G tokens
    L = min(G, T)
    N = -(-T // L)
    pad = N * L - T
    # which tokens are real, by chunk (None: all of them, and no mask is applied)
    real = None if padding_mask is None and not pad else q.new_ones(B, T, dtype=operand_dtype(q)) \
        if padding_mask is None else (~padding_mask).to(operand_dtype(q))

    def chunks(x: Tensor) -> Tensor:
        x = operand(x)
        return (F.pad(x, (0, 0, 0, pad)) if pad else x).view(B, N, L, x.shape[-1])

    real_c = None if real is None else chunks(real.unsqueeze(-1)).squeeze(-1)
    q, k, ql, kl, v = chunks(q), chunks(k), chunks(ql), chunks(kl), chunks(v)
    if real_c is not None:
        kl = kl * real_c.unsqueeze(-1)  # padded keys add nothing to the linear sums
    A = within_chunks(q, k, real_c, rel_bias, causal, G, relu2_norm)
    lin = across_chunks(ql, kl, v, real_c, causal)
    out = torch.baddbmm(lin.view(B * N, L, e), A.flatten(0, 1), v.flatten(0, 1)).view(B, N * L, e)[:, :T]
    if order is not None:
        out = scatter_time(out, order)
    return out.to(dtype)


# -- chunked form from Z, with its backward written out -------------------------------
def from_z_computes(T: int, chunk_size: int, causal: bool, padding_mask: Optional[Tensor],
                    rel_bias: Optional[Tensor]) -> bool:
    """Whether `from_z` computes the case: no relative bias, and either causal with
    padding only at the ends of rows (what comes after a token never reaches it: the
    real tokens' outputs are those of the rows cut before their padding), or non-causal
    over one chunk (T <= chunk_size; padding anywhere, its keys masked), or non-causal
    over whole chunks without padding. At most one read of the mask to the host."""
    if rel_bias is not None:
        return False
    if causal:
        return padding_mask is None or not bool((padding_mask[:, :-1] & ~padding_mask[:, 1:]).any())
    if T <= chunk_size:
        return True
    return T % chunk_size == 0 and (padding_mask is None or not bool(padding_mask.any()))


@own_precision
def from_z(z: Tensor, gamma: Tensor, beta: Tensor, v: Tensor, causal: bool, rope: bool,
           padding_mask: Optional[Tensor] = None, *, chunk_size: int, relu2_norm: str) -> Tensor:
    """`mixed_chunk` of the four heads q, k, q', k' = Z gamma_h + beta_h (each turned by
    RoPE at positions 0 .. T-1 if `rope`), for the case `from_z_computes` admits (a causal
    sequence is filled up to whole chunks with zeros after its end), with a backward
    written out: the heads' gradients land in one buffer, and RoPE's and the
    offset-scales' gradients take a few kernels (a GAU's backward through it runs about
    half the operators of autograd's through the composition). z (B, T, s), gamma and
    beta (4, s), v (B, T, e); padding_mask (B, T), True at padding, non-causal only
    (a causal row padded at its end needs none): padded keys weigh nothing. Over one
    chunk (T <= chunk_size) that is mixed_chunk's function at the real tokens: RoPE's
    turns at 0 .. T-1 differ from its turns at the real positions by a shift that
    every query and key share, which their products do not see. Over several chunks
    the chunks are cut at the positions as they are, where mixed_chunk cuts them
    after moving the real tokens first (so from_z_computes admits no padding there).
    Padded tokens' outputs are not those of `mixed_chunk`."""
    T = z.shape[1]
    if T % min(chunk_size, T) and not causal:
        raise ValueError(f"from_z: T={T} is not a whole number of chunks of {min(chunk_size, T)} (non-causal)")
    real = None
    if padding_mask is not None:
        if causal:
            raise ValueError("from_z: a causal row is padded at its end and takes no padding mask")
        real = (~padding_mask).to(operand_dtype(z))
    z, v = whole_chunks(chunk_size, z, v)
    out = _FromZ.apply(z, gamma, beta, v, causal, rope, chunk_size, relu2_norm, real)
    return out[:, :T] if out.shape[1] > T else out


def whole_chunks(chunk_size: int, *xs: Tensor) -> Tuple[Tensor, ...]:
    """Each x (B, T, .) filled up with zeros after the end to whole chunks of min(chunk_size, T)
    tokens (itself where it is one): in a causal sequence no earlier token sees them."""
    T = xs[0].shape[1]
    pad = -T % min(chunk_size, T)
    return tuple(F.pad(x, (0, 0, 0, pad)) for x in xs) if pad else xs


def key_roots(real: Tensor, G: int, norm: str, dtype: torch.dtype, scale: float) -> Tensor:
    """chunk_roots for non-causal chunks whose real keys `real` (B, N, L) marks, one
    weight a chunk, (B N, 1, 1): sqrt(1 / c) * scale, c from the chunk's count of real keys."""
    return (relu2_divisor(norm, G, acc(real).sum(-1)).rsqrt() * scale).to(dtype).view(-1, 1, 1)


class _FromZ(torch.autograd.Function):
    """Every product in Z's precision (operand): gamma, beta and V are brought to it. from_z
    holds autocast (fairseq's --amp) off for the forward (own_precision), and the backward
    holds it off too, so both keep that one precision."""

    @staticmethod
    def forward(ctx, z, gamma, beta, v, causal, rope, G, norm, real):
        ctx.dtypes = z.dtype, gamma.dtype, v.dtype
        dtype = operand_dtype(z)
        z, gamma, beta, v = (x.to(dtype) for x in (z, gamma, beta, v))
        (B, T, s), e = z.shape, v.shape[-1]
        L = min(G, T)
        N = T // L
        real_c = None if real is None else real.view(B, N, L)
        if real is not None:  # padded keys: zero values, so they add nothing to either part
            v = v * real.unsqueeze(-1)
        roots = functools.partial(chunk_roots, L, G, causal, norm, z.device, dtype) if real is None \
            else functools.partial(key_roots, real_c, G, norm, dtype)
        qk = torch.addcmul(beta[:, None, None], z, gamma[:, None, None])  # (4, B, T, s): each head contiguous
        if rope:
            qk = rotate(qk, first_turns(T, s, z.device))
        q, k, ql, kl = qk.view(4, B * N, L, s).unbind()
        vc = v.reshape(B * N, L, e)
        R = F.relu(torch.bmm(q, k.transpose(1, 2)).mul_(roots(s ** -0.5)))
        A = R.square()
        KV = seen_sums(kl.view(B, N, L, s), vc.view(B, N, L, e), real_c, causal)
        out = torch.baddbmm((ql.reshape(B, KV.shape[1], -1, s) @ KV).view(B * N, L, e), A, vc)
        ctx.save_for_backward(z, gamma, qk, v, R, A, KV, real_c)
        ctx.shape, ctx.rope, ctx.causal = (B, T, s, e, L, N), rope, causal
        ctx.roots = roots(2 * s ** -0.5)  # dA/dS = 2 R roots
        return out.view(B, T, e)

    @staticmethod
    def backward(ctx, da):
        with torch.autocast(da.device.type, enabled=False):
            dz, dgamma, dbeta, dv = _FromZ.gradients(ctx, da)
        (z_dtype, gamma_dtype, v_dtype), needed = ctx.dtypes, ctx.needs_input_grad
        return (dz.to(z_dtype) if needed[0] else None, dgamma.to(gamma_dtype) if needed[1] else None,
                dbeta.to(gamma_dtype) if needed[2] else None, dv.to(v_dtype), None, None, None, None, None)

    @staticmethod
    def gradients(ctx, da):
        z, gamma, qk, v, R, A, KV, real_c = ctx.saved_tensors
        B, T, s, e, L, N = ctx.shape
        da = da.to(v.dtype).reshape(B * N, L, e)
        vc = v.reshape(B * N, L, e)
        q, k, ql, kl = qk.view(4, B * N, L, s).unbind()
        grads = qk.new_empty(4, B * N, L, s)  # d q, d k, d q', d k' (turned), one buffer
        # quadratic part: A = relu(S sqrt(w) / sqrt(s))^2, S = q k^T
        dS = torch.bmm(da, vc.transpose(1, 2)).mul_(R).mul_(ctx.roots)
        dv = torch.bmm(A.transpose(1, 2), da)
        torch.bmm(dS, k, out=grads[0])
        torch.bmm(dS.transpose(1, 2), q, out=grads[1])
        # linear part: out += q' KV, KV the means of k'^T v over the chunks each chunk sees
        shared = da.view(B, KV.shape[1], -1, e)
        torch.matmul(shared, KV.transpose(-1, -2), out=grads[2].view(B, KV.shape[1], -1, s))
        means = mean_weights(N, L, ctx.causal, real_c, z.device, acc_dtype(v))
        dKV = means.transpose(-1, -2) @ acc(ql.reshape(B, KV.shape[1], -1, s).transpose(-1, -2) @ shared).flatten(2)
        dKV = dKV.to(v.dtype).view(B * N, s, e)
        torch.bmm(vc, dKV.transpose(1, 2), out=grads[3])
        dv.baddbmm_(kl, dKV)
        # the heads: turned back, then through Z gamma_h + beta_h
        dqk = grads.view(4, B, T, s)
        if ctx.rope:
            dqk = rotate(dqk, first_turns(T, s, z.device, back=True))
        needed = ctx.needs_input_grad
        dz = (dqk * gamma[:, None, None]).sum(0) if needed[0] else None
        dgamma = (dqk * z).sum((1, 2)) if needed[1] else None
        dbeta = dqk.sum((1, 2)) if needed[2] else None
        if real_c is not None:
            dv = dv * real_c.view(B * N, L, 1)
        return dz, dgamma, dbeta, dv.view(B, T, e)


@own_precision
def quadratic(
    q: Tensor, k: Tensor, v: Tensor, causal: bool,
    padding_mask: Optional[Tensor] = None, rel_bias: Optional[Tensor] = None, *, chunk_size: int, relu2_norm: str,
) -> Tensor:
    """FLASH-Quad's full relu^2 attention (no chunks), normalized as the quadratic
    part of mixed chunk attention ("keys": by the number of keys a query sees)."""
    dtype = v.dtype
    B, T = q.shape[:2]
    pos = real_positions(padding_mask, B, T, q.device)
    A = relu2(acc(q), acc(k), offset_bias(rel_bias, pos[:, :, None] - pos[:, None, :]))
    real = q.new_ones(B, T, dtype=acc_dtype(q)) if padding_mask is None else (~padding_mask).to(acc_dtype(q))
    A = A * real[:, None, :]
    if causal:
        A = A.tril()  # positions in a row keep their order, so tril is causal with left padding too
    seen = real.cumsum(-1) if causal else real.sum(-1, keepdim=True).expand(B, T)
    return ((A @ acc(v)) / relu2_divisor(relu2_norm, chunk_size, seen).unsqueeze(-1)).to(dtype)


# -- decoding step (causal mixed chunk) ---------------------------------------------
def empty_state(B: int, G: int, s: int, e: int, like: Tensor, slots: Optional[int] = None) -> State:
    """The state before the first token, its chunk buffers holding `slots` of the chunk's
    G slots (default first_slots: causal_step grows fewer than G as they fill, with_room).
    A state that holds fewer than G slots has no sum yet: causal_step sums it from the
    buffers when a row first completes a chunk (with_sum), as no query reads it before."""
    z, slots = acc(like), first_slots(G, like) if slots is None else slots
    state = {
        "k_chunk": z.new_zeros(B, slots, s),  # quadratic keys of the current chunk
        "kl_chunk": z.new_zeros(B, slots, s),  # linear keys k' of the current chunk
        "v_chunk": z.new_zeros(B, slots, e),  # values of the current chunk
        # real tokens so far: RoPE's position of the next one; of them, position % G are in the
        # current chunk (its fill) and the rest in completed chunks
        "position": torch.zeros(B, dtype=torch.long, device=like.device),
    }
    if slots >= G:
        state["kv_sum"] = z.new_zeros(B, s, e)  # sum of k' v^T over every real token so far
    return state


CHUNK_BUFFERS = ("k_chunk", "kl_chunk", "v_chunk")


def reorder(state: State, new_order: Tensor, G: int, spare: Optional[State] = None) -> State:
    """The state's rows in `new_order` (beam search). A chunk buffer is moved
    only over the filled_slots of what it holds (buffered): causal_step writes a
    slot before any query sees it and weights the slots past a row's fill by 0,
    so what lies there is never read. Without autograd, an order that keeps the batch size
    moves that prefix within the buffers instead of allocating new ones. Where
    every slot moves (off the CPU), a buffer is index-selected as the rest of
    the state is: one pass over it, not a selected copy copied back. What moves
    whole is written into spare's tensors where they fit it (common.rows_into)."""
    B = new_order.numel()
    n = filled_slots(buffered(state, G), G)
    in_place = B == state["position"].numel() and not torch.is_grad_enabled()
    prefixes = CHUNK_BUFFERS if n < state["k_chunk"].shape[1] else ()  # fewer than the slots held
    spare = spare or {}
    out = {name: rows_into(x, new_order, spare.get(name)) for name, x in state.items() if name not in prefixes}
    for name in prefixes:
        x = state[name]
        head = x[:, :n].index_select(0, new_order)
        buf = x if in_place else x.new_zeros(B, *x.shape[1:])
        buf[:, :n] = head
        out[name] = buf
    return out


def buffered(state: State, G: int) -> Tensor:
    """(B,) how many of each row's first slots hold tokens a later step reads: the current
    chunk's fill, or in a state without a sum every real token so far (at most G, all in
    the buffers, which the step that adds the sum reads; with_sum)."""
    return state["position"] if "kv_sum" not in state else state["position"].remainder(G)


def write_slot(buf: Tensor, x: Tensor, fill: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
    """buf (B, G, .) with x (B, .) in slot `fill` of each row (a padded row writes
    nothing); in place without autograd, as a KV cache is written."""
    B = x.shape[0]
    slot = fill.view(B, 1, 1).expand(B, 1, buf.shape[-1])
    if padding_mask is not None:
        x = torch.where(padding_mask[:, None], buf.gather(1, slot).squeeze(1), x)
    return update(buf, "scatter", writable(x, buf), 1, slot, x.unsqueeze(1))


def slot_weights(G: int, norm: str, device: torch.device) -> Tensor:
    """(G, G): row f weights the chunk's slots for a query at fill f: 1/c over
    slots 0..f (c from relu2_divisor), 0 past them (slots not written yet)."""
    return chunk_table(G, G, True, norm, device)


def earlier_slots(G: int, device: torch.device) -> Tensor:
    """(G, G): row f is 1 at the slots before f (the current chunk's tokens before this one), else 0."""
    return lower_triangle(G, G, -1, device, torch.float32)


def per_done(done: Tensor) -> Tensor:
    """(B,) 1 / done, and 0 where no chunk is completed yet (the linear part is then empty)."""
    return done.clamp(max=1) / done.clamp(min=1)


def filled_slots(fill: Tensor, G: int) -> int:
    """How many of the chunk's slots may hold a token (fill (B,), each row's). On the
    CPU, where reading a value back costs nothing (common.reads_back_free), the
    fullest row's fill: a beam of 48-token hypotheses has filled 48 of G = 256.
    Elsewhere (and for no rows) all G, so that decoding never waits for the device
    to hand a value back."""
    return int(fill.max()) if common.reads_back_free(fill) and fill.numel() else G


def slots_read(filled: int, G: int) -> int:
    """How many of the chunk's slots a step reads, of which `filled` (filled_slots) may
    hold a token: those and the one it writes (a slot past a row's fill weighs 0)."""
    return min(filled + 1, G)


def first_slots(G: int, like: Tensor) -> int:
    """How many slots a state allocates at first (empty_state's default): one where the fill is
    read back for free (the CPU), so that a short output (a translation in beam search)
    keeps the few slots it fills, and no s x e sum until it outgrows a chunk, not G slots
    and the sum a hypothesis; elsewhere all G, as the step then reads all G (slots_read)."""
    return 1 if common.reads_back_free(like) else G


def with_room(state: State, slots: int, G: int) -> State:
    """The state with chunk buffers of at least `slots` slots: buffers holding fewer grow,
    zeros appended, to the next power of two that holds them (at most G), so a chunk's
    buffers are copied O(log G) times as they fill."""
    have = state["k_chunk"].shape[1]
    if slots <= have:
        return state
    grown = min(G, 1 << (slots - 1).bit_length())
    return {**state, **{name: F.pad(state[name], (0, 0, 0, grown - have)) for name in CHUNK_BUFFERS}}


def with_sum(state: State) -> State:
    """The state with the sum S = sum_j k'_j v_j^T over every real token so far, (B, s, e):
    where it has none yet, summed from the chunk buffers, which then hold each row's real
    tokens in its first `position` slots (no row has completed a chunk)."""
    if "kv_sum" in state:
        return state
    kl, v = state["kl_chunk"], state["v_chunk"]
    real = torch.arange(kl.shape[1], device=kl.device) < state["position"][:, None]  # (B, slots)
    return {**state, "kv_sum": torch.bmm((kl * real.unsqueeze(-1)).transpose(1, 2), v)}


def step_scores(q: Tensor, k_chunk: Tensor, fill: Tensor, rel_bias: Optional[Tensor]) -> Tensor:
    """q k^T / sqrt(s) (+ b[fill - slot]) against the chunk's first slots (k_chunk (B, n, s)):
    (B, 1, n), one kernel."""
    scale = q.shape[-1] ** -0.5
    if rel_bias is None:  # beta = 0: the (unfilled) input is not read
        return torch.baddbmm(q.new_empty(1, 1, 1), q.unsqueeze(1), k_chunk.transpose(1, 2), beta=0.0, alpha=scale)
    bias = offset_bias(rel_bias, fill[:, None] - torch.arange(k_chunk.shape[1], device=q.device))
    return torch.baddbmm(bias.unsqueeze(1), q.unsqueeze(1), k_chunk.transpose(1, 2), alpha=scale)


@own_precision
def causal_step(
    q, k, ql, kl, v, state: Optional[State] = None, padding_mask: Optional[Tensor] = None,
    rel_bias: Optional[Tensor] = None, *, chunk_size: int, relu2_norm: str,
) -> Tuple[Tensor, State]:
    """One causal decoding step: q, k, ql, kl (B, s), v (B, e). The state holds at
    most G tokens plus one s x e sum, whatever the prefix length; its chunk buffers
    start with empty_state's slots and grow as they fill (with_room). The sum S holds
    k' v^T over every real token so far, and the linear part reads the completed
    chunks' share of it as S less the current chunk's tokens before this one:
        q' . (S - sum_{j<fill} k'_j v_j^T) = q' . S - sum_{j<fill} (q' . k'_j) v_j,
    an O(G (s + e)) correction folded into the quadratic part's weights, so a
    step reads and writes S once and a completed chunk needs no move. A state
    without S (a growing one, before any row completes a chunk) has no linear
    part to read, and gains S when a row completes its first chunk (with_sum).
    Of the chunk's slots the step reads those slots_read names: on a GPU all G,
    with no value read back to the host. A padded step (padding_mask True)
    leaves the state unchanged.

    Without autograd (decoding) the state is updated in place, as a KV cache is
    written: copying G tokens per step would cost as much as the attention."""
    G = chunk_size
    q, k, ql, kl, v = map(acc, (q, k, ql, kl, v))
    B = q.shape[0]
    state = state if state is not None else empty_state(B, G, q.shape[-1], v.shape[-1], v)
    fill = buffered(state, G)  # the current chunk's fill: a state without a sum has completed no chunk
    filled = filled_slots(fill, G)
    if "kv_sum" not in state and filled >= G:  # a row has completed its first chunk (or nothing is read back)
        state = with_sum(state)  # before this step's key is written over that chunk's first slot
        fill = buffered(state, G)
        filled = filled_slots(fill, G)
    seen = slots_read(filled, G)  # the slots a row's fill may reach
    state = with_room(state, seen, G)
    k_chunk, kl_chunk, v_chunk = (write_slot(state[name], x, fill, padding_mask)
                                  for name, x in (("k_chunk", k), ("kl_chunk", kl), ("v_chunk", v)))
    # quadratic over the chunk's tokens so far, linear over completed chunks
    scores = step_scores(q, k_chunk[:, :seen], fill, rel_bias)
    a = F.relu(scores).square() * slot_weights(G, relu2_norm, q.device)[fill, :seen].unsqueeze(1)
    if "kv_sum" not in state:
        out = torch.bmm(a, v_chunk[:, :seen]).squeeze(1)
    else:
        done = state["position"] - fill  # the tokens in completed chunks
        out = with_linear(a, ql, state["kv_sum"], kl_chunk[:, :seen], v_chunk[:, :seen], fill, done, G)
    return out, advance(state, k_chunk, kl_chunk, v_chunk, kl, v, padding_mask)


def with_linear(a: Tensor, ql: Tensor, kv_sum: Tensor, kl_chunk: Tensor, v_chunk: Tensor, fill: Tensor,
                done: Tensor, G: int) -> Tensor:
    """The step's output (B, e): the chunk's first n slots (B, n, .) weighted by `a` (B, 1, n),
    and the linear part over the completed chunks, q' . S less the chunk's tokens before this one."""
    ql_mean = (ql * per_done(done)[:, None]).unsqueeze(1)  # (B, 1, s): q' / n, 0 before a chunk completes
    lin = torch.bmm(ql_mean, kv_sum)
    earlier = torch.bmm(ql_mean, kl_chunk.transpose(1, 2))  # (q' . k'_j) / n over the chunk's slots
    a = torch.addcmul(a, earlier, earlier_slots(G, ql.device)[fill, :kl_chunk.shape[1]].unsqueeze(1), value=-1.0)
    return torch.baddbmm(lin, a, v_chunk).squeeze(1)


def advance(state: State, k_chunk, kl_chunk, v_chunk, kl, v, padding_mask) -> State:
    """The state after a step: this token's k' v^T into the sum, where it has one (Sec. 3.2:
    sum_j k'_j v_j^T)."""
    real = None if padding_mask is None else ~padding_mask
    out = {"k_chunk": k_chunk, "kl_chunk": kl_chunk, "v_chunk": v_chunk,
           "position": state["position"] + (1 if real is None else real)}
    if "kv_sum" in state:
        kl = kl if real is None else kl * real[:, None]
        out["kv_sum"] = update(state["kv_sum"], "baddbmm", writable(kl, v, state["kv_sum"]), kl.unsqueeze(2),
                               v.unsqueeze(1))
    return out
