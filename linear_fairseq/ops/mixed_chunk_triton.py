"""FLASH's causal gated attention unit between its two projections, as Triton
kernels (forward and backward) for training on CUDA.

From X = [U, V, Z], the unit's input projection before its SiLU, the kernels
compute Y = SiLU(U) * A with A the causal mixed chunk attention of
``ops.flash.from_z`` over V = SiLU(V) and the four heads q, k, q', k' =
SiLU(Z) gamma_h + beta_h, each turned by RoPE at its position. The heads and
the activations are computed inside the kernels and never stored. With chunks
of L tokens, chunk n's queries read

    A_i  = sum_{j <= i in chunk n} relu(q_i . k_j r_i)^2 v_j + q'_i . KV_n,
    KV_n = sum_{j in chunks before n} k'_j v_j^T / (n L)   (0 for n = 0),

r_i = s^-1/2 c_i^-1/2 with c_i from ``relu2_norm`` (``ops.flash.relu2_divisor``).

The linear part is chunkwise parallel, as the quadratic part: every chunk's
own sum, k'^T v over its tokens, is computed at once (one program per chunk
and block of value columns), and one in-place cumulative sum over the chunks
(float32, (B, N, 2, s/2, e): the heads' even and odd dimensions apart) gives
each chunk the sum of those before it. No kernel walks the sequence, so the
work a program does in order is one chunk's, at any T.

The forward runs two kernels and the cumulative sum: the chunks' own sums,
then one program per (chunk, block of queries) writing Y and A; it computes
its squared scores once, keeps them in its tiles of a scratch (in its
products' operand type, 4 L bytes a token in float32 and 2 L in half
precision), and reads them back for each tile of value columns. The
backward runs three and one more cumulative sum: each chunk's term
q'_n^T dA_n / (n L), dA = dY SiLU(U), written last chunk first so that the
cumulative sum leaves in each slot the gradient of a chunk's sum,
dKV_m = sum_{n > m} q'_n^T dA_n / (n L); one program per block of queries
(dq', dq); one per block of keys (dk, dk', then dV, the linear part's share
k'_j dKV_m plus the quadratic one from the squared scores it computed for
dk and kept as the forward keeps its own, through the SiLU's derivative,
and dU = dY A SiLU'(U)). Each turns its heads' gradients back through RoPE
and the offset-scale into dZ (the key kernel's last share takes the SiLU's
derivative) and writes its rows' shares of dgamma and dbeta, which one sum
joins. dU, dV and dZ land in one buffer, X's gradient. Scores are recomputed
where the backward needs them, so the pass keeps X, A and the cumulated
sums.

Products sum in float32; their operands are float32 (IEEE, not TF32) for
float32 inputs, and in the inputs' own precision for float16 and bfloat16,
as torch's matmuls take them (OPERANDS). A pass's programs take blocks of
BLOCK_T tokens with NUM_WARPS warps, one of TILES: on a GPU the one whose pass
it timed fastest at the unit's sizes (`fitted`).
Causal, no padding inside a row (a row padded at its end is cut before its
padding), T filled up to whole chunks with zeros (SiLU(0) = 0: no earlier
token sees them). On CUDA the kernels run compiled; elsewhere only through
Triton's interpreter (TRITON_INTERPRET=1, which the tests use), which runs a
program's threads as one and so cannot check the barriers before a program
reads back what its threads wrote (its share of dZ, the kept squares).
"""
import functools
import math
import time
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.errors import OutOfResources

from .common import constant
from .flash import RELU2_NORMS, first_turns, unknown_relu2_norm, whole_chunks
from .triton_common import OPERANDS, _dot, _silu, on_its_device


class Tiles(NamedTuple):
    """How a pass launches its kernels: BLOCK_T, the chunk's tokens a program takes at a time (its
    block of queries or keys, and each block of the other it walks), and the warps a program runs."""
    BLOCK_T: int
    NUM_WARPS: int

    def __str__(self):
        return f"{self.BLOCK_T} tokens x {self.NUM_WARPS} warps"


# The tiles a GPU chooses between (`fitted`: the fastest pass at the unit's sizes); the first is the
# interpreter's. Compiled for sm_70 to sm_90 at s = 128 (benchmarks.triton_compile), each keeps its
# tiles in at most 255 registers a thread, with at most 40 bytes of stack (the query kernel in float32
# at 32 tokens); tiles of 64 tokens spill hundreds of bytes. The float32 forward at 32 tokens needs
# more shared memory than sm_86 and sm_89 give a block: those GPUs leave it out. Value columns: 16 a
# step where a sum runs over them, and where a program keeps them, 32 a tile of the forward's outputs
# and of the key kernel's dV (64 spills in half precision on sm_90). The forward and the key kernel
# compute their squared scores once and keep them for their loops over value columns.
TILES = (Tiles(16, 8), Tiles(16, 4), Tiles(32, 8))
BLOCK_E = 16  # value columns a step of a sum over them
BLOCK_V = 32  # value columns of a forward program's outputs
BLOCK_DV = 32  # value columns of the key kernel's dV a step holds


# -- pieces the kernels share ----------------------------------------------------------
@triton.jit
def _silu_grad(x):
    sig = tl.sigmoid(x)
    return sig * (1.0 + x * (1.0 - sig))


@triton.jit
def _pairs(x, t, pairs, ok, P, sx_t, sx_c):
    """Rows t of x (one batch row's (T, 2P)) as their (even, odd) dimensions, float32 (BLOCK_T, BLOCK_P)."""
    inside = ok[:, None] & (pairs[None, :] < P)
    at = x + t[:, None] * sx_t + 2 * pairs[None, :] * sx_c
    return (tl.load(at, mask=inside, other=0.0).to(tl.float32),
            tl.load(at + sx_c, mask=inside, other=0.0).to(tl.float32))


@triton.jit
def _turns(turns, t, pairs, ok, P, st_t, st_p, ROPE: tl.constexpr):
    """RoPE's (cos, sin) at rows t from the table (T, P, 2); (1, 0) without RoPE."""
    inside = ok[:, None] & (pairs[None, :] < P)
    if ROPE:
        at = turns + t[:, None] * st_t + pairs[None, :] * st_p
        return tl.load(at, mask=inside, other=1.0), tl.load(at + 1, mask=inside, other=0.0)
    return tl.where(inside, 1.0, 1.0), tl.where(inside, 0.0, 0.0)


@triton.jit
def _gamma(gamma, h, pairs, P, sg_h, sg_c):
    """gamma_h as its (even, odd) dimensions, float32 (BLOCK_P,)."""
    has = pairs < P
    return (tl.load(gamma + h * sg_h + 2 * pairs * sg_c, mask=has, other=0.0).to(tl.float32),
            tl.load(gamma + h * sg_h + (2 * pairs + 1) * sg_c, mask=has, other=0.0).to(tl.float32))


@triton.jit
def _head(z_even, z_odd, cos, sin, gamma, beta, h, pairs, ok, P, sg_h, sg_c, ROPE: tl.constexpr):
    """Head h = Z gamma_h + beta_h at the rows (turned by RoPE), zero at rows not `ok`."""
    g_even, g_odd = _gamma(gamma, h, pairs, P, sg_h, sg_c)
    b_even, b_odd = _gamma(beta, h, pairs, P, sg_h, sg_c)
    x_even = z_even * g_even[None, :] + b_even[None, :]
    x_odd = z_odd * g_odd[None, :] + b_odd[None, :]
    if ROPE:
        x_even, x_odd = x_even * cos - x_odd * sin, x_even * sin + x_odd * cos
    keep = ok[:, None] & (pairs[None, :] < P)
    return tl.where(keep, x_even, 0.0), tl.where(keep, x_odd, 0.0)


@triton.jit
def _at(z, turns, gamma, beta, t, pairs, ok, P, sx_t, sx_c, st_t, st_p, sg_h, sg_c, ha, hb, ROPE: tl.constexpr):
    """SiLU(Z) at rows t (even, odd), RoPE's (cos, sin) there, and heads ha and hb of those rows."""
    z_even, z_odd = _pairs(z, t, pairs, ok, P, sx_t, sx_c)
    z_even, z_odd = _silu(z_even), _silu(z_odd)
    cos, sin = _turns(turns, t, pairs, ok, P, st_t, st_p, ROPE)
    a_even, a_odd = _head(z_even, z_odd, cos, sin, gamma, beta, ha, pairs, ok, P, sg_h, sg_c, ROPE)
    b_even, b_odd = _head(z_even, z_odd, cos, sin, gamma, beta, hb, pairs, ok, P, sg_h, sg_c, ROPE)
    return z_even, z_odd, cos, sin, a_even, a_odd, b_even, b_odd


@triton.jit
def _turned_back(d_even, d_odd, cos, sin, ROPE: tl.constexpr):
    """A head's gradient through RoPE: each pair turned back by its angle."""
    if ROPE:
        return d_even * cos + d_odd * sin, d_odd * cos - d_even * sin
    return d_even, d_odd


@triton.jit
def _root(i, scale, NORM: tl.constexpr):
    """r_i of queries at chunk offsets i: scale / sqrt(i + 1) for NORM 0 (relu2_norm "keys", scale
    s^-1/2), else the constant `scale` (s^-1/2 G^-1/2 for "chunk", s^-1/2 for "none")."""
    if NORM == 0:
        return scale / tl.sqrt((i + 1).to(tl.float32))
    return tl.where(i >= 0, scale, 0.0)


@triton.jit
def _relu(q_even, q_odd, k_even, k_odd, root, i, j, L, OP: tl.constexpr):
    """relu(q_i . k_j r_i) where key j is seen by query i (j <= i < L), else 0: (BLOCK_T, BLOCK_T)."""
    scores = _dot(q_even, tl.trans(k_even), OP) + _dot(q_odd, tl.trans(k_odd), OP)
    seen = (j[None, :] <= i[:, None]) & (i[:, None] < L)
    return tl.where(seen, tl.maximum(scores * root[:, None], 0.0), 0.0)


@triton.jit
def _block(x, t, cols, ok, e, sx_t, sx_e):
    """Rows t, columns `cols` of one batch row's (T, e), float32 (BLOCK_T, BLOCK_E)."""
    return tl.load(x + t[:, None] * sx_t + cols[None, :] * sx_e, mask=ok[:, None] & (cols[None, :] < e),
                   other=0.0).to(tl.float32)


@triton.jit
def _values(v, t, cols, ok, e, sx_t, sx_c):
    """SiLU(V) at rows t, columns `cols`."""
    return _silu(_block(v, t, cols, ok, e, sx_t, sx_c))


@triton.jit
def _grads(dy, u, t, cols, ok, e, sy_t, sy_e, sx_t, sx_c):
    """dA = dY SiLU(U) at rows t, columns `cols`."""
    return _block(dy, t, cols, ok, e, sy_t, sy_e) * _silu(_block(u, t, cols, ok, e, sx_t, sx_c))


@triton.jit
def _slot_at(sums, k, pairs, cols, P, e, sk_n, sk_p, sk_e):
    """Where slot k of a batch row's (N, s, e) sums holds its even rows at columns `cols` (the odd
    rows sk_h further), and which of them exist (none where k < 0)."""
    inside = (k >= 0) & (pairs[:, None] < P) & (cols[None, :] < e)
    return sums + k * sk_n + pairs[:, None] * sk_p + cols[None, :] * sk_e, inside


@triton.jit
def _slot(sums, k, pairs, cols, P, e, sk_n, sk_h, sk_p, sk_e):
    """Slot k of a batch row's (N, s, e) sums at columns `cols` as its even and odd rows (BLOCK_P each);
    zeros where k < 0."""
    at, inside = _slot_at(sums, k, pairs, cols, P, e, sk_n, sk_p, sk_e)
    return tl.load(at, mask=inside, other=0.0), tl.load(at + sk_h, mask=inside, other=0.0)


@triton.jit
def _write_slot(sums, k, pairs, cols, P, e, sk_n, sk_h, sk_p, sk_e, even, odd):
    """Slot k of a batch row's (N, s, e) sums from its even and odd rows at columns `cols`."""
    at, inside = _slot_at(sums, k, pairs, cols, P, e, sk_n, sk_p, sk_e)
    tl.store(at, even, mask=inside)
    tl.store(at + sk_h, odd, mask=inside)


@triton.jit
def _mean_before(sums, means, n, pairs, cols, P, e, sk_n, sk_h, sk_p, sk_e):
    """KV_n: the chunks before n summed (slot n - 1 of the forward's cumulated sums) times means[n]."""
    mean = tl.load(means + n)
    even, odd = _slot(sums, n - 1, pairs, cols, P, e, sk_n, sk_h, sk_p, sk_e)
    return even * mean, odd * mean


@triton.jit
def _grad_after(dsums, n, N, pairs, cols, P, e, sk_n, sk_h, sk_p, sk_e):
    """dKV_n: the gradient of chunk n's sum, the terms of the chunks after n summed (slot N - 2 - n of
    the backward's cumulated terms, written last chunk first; zeros for the last chunk)."""
    return _slot(dsums, N - 2 - n, pairs, cols, P, e, sk_n, sk_h, sk_p, sk_e)


@triton.jit
def _sums(parts, z_even, z_odd, d_even, d_odd, h, pairs, P, sp_s, sp_h, sp_c):
    """A head's gradient d_h summed over the rows: d_h z into parts' dgamma row h, d_h into its dbeta row."""
    has = pairs < P
    at = parts + h * sp_h + 2 * pairs * sp_c
    tl.store(at, tl.sum(d_even * z_even, axis=0), mask=has)
    tl.store(at + sp_c, tl.sum(d_odd * z_odd, axis=0), mask=has)
    tl.store(at + sp_s, tl.sum(d_even, axis=0), mask=has)
    tl.store(at + sp_s + sp_c, tl.sum(d_odd, axis=0), mask=has)


@triton.jit
def _into_z(dz, parts, z, turns, gamma, d_even, d_odd, h, t, pairs, ok, P, sx_t, sx_c, st_t, st_p, sg_h, sg_c,
            sd_t, sd_c, sp_s, sp_h, sp_c, ROPE: tl.constexpr, SHARE: tl.constexpr):
    """Head h's gradient at the rows, turned back through RoPE, then through the offset-scale: its sums
    into parts (_sums), and d_h gamma_h into dZ, the first SHARE (0) written, a later one (1) added to
    what is there, the last (2) added and taken through the SiLU's derivative at Z."""
    pre_even, pre_odd = _pairs(z, t, pairs, ok, P, sx_t, sx_c)
    cos, sin = _turns(turns, t, pairs, ok, P, st_t, st_p, ROPE)
    d_even, d_odd = _turned_back(d_even, d_odd, cos, sin, ROPE)
    _sums(parts, _silu(pre_even), _silu(pre_odd), d_even, d_odd, h, pairs, P, sp_s, sp_h, sp_c)
    g_even, g_odd = _gamma(gamma, h, pairs, P, sg_h, sg_c)
    grad_even = d_even * g_even[None, :]
    grad_odd = d_odd * g_odd[None, :]
    inside = ok[:, None] & (pairs[None, :] < P)
    at = dz + t[:, None] * sd_t + 2 * pairs[None, :] * sd_c
    if SHARE > 0:
        tl.debug_barrier()  # this program's earlier share, written by any of its threads, read back
        grad_even += tl.load(at, mask=inside, other=0.0).to(tl.float32)
        grad_odd += tl.load(at + sd_c, mask=inside, other=0.0).to(tl.float32)
    if SHARE == 2:
        grad_even *= _silu_grad(pre_even)
        grad_odd *= _silu_grad(pre_odd)
    tl.store(at, grad_even.to(dz.dtype.element_ty), mask=inside)
    tl.store(at + sd_c, grad_odd.to(dz.dtype.element_ty), mask=inside)


@triton.jit
def _zeros(ROWS: tl.constexpr, COLS: tl.constexpr):
    """Two float32 accumulators, a head's even and odd dimensions (or a sum's even and odd rows)."""
    return tl.zeros((ROWS, COLS), dtype=tl.float32), tl.zeros((ROWS, COLS), dtype=tl.float32)


@triton.jit
def _block_of_chunk(N, BLOCK_T: tl.constexpr):
    """A chunk program's batch row, chunk and tokens (offsets in the chunk): program (b N + n, block)."""
    return tl.program_id(0) // N, tl.program_id(0) % N, tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)


@triton.jit
def _own_squares(squares, sq_n, BLOCK_T: tl.constexpr):
    """A chunk program's rows of a (programs, blocks, BLOCK_T^2) scratch of squared scores, and the
    offsets of one (BLOCK_T, BLOCK_T) tile in them."""
    squares += (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * sq_n
    return squares, tl.arange(0, BLOCK_T)[:, None] * BLOCK_T + tl.arange(0, BLOCK_T)[None, :]


@triton.jit
def _columns_of_chunk(N, BLOCK_E: tl.constexpr):
    """A chunk-sum program's batch row, chunk and value columns: program (b N + n, block)."""
    return tl.program_id(0) // N, tl.program_id(0) % N, tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)


@triton.jit
def _chunk_sum(z, r, w, turns, gamma, beta, n, L, cols, pairs, P, e, mean, sx_t, sx_c, st_t, st_p, sg_h, sg_c,
               sw_t, sw_e, OP: tl.constexpr, ROPE: tl.constexpr, GRADS: tl.constexpr, BLOCK_T: tl.constexpr,
               BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr):
    """Chunk n's sum over its tokens of h_j R_j^T at columns `cols`, as h's even and odd rows: h = k'
    and R = SiLU(V) (r = V); with GRADS h = q' and R = dA mean = dY SiLU(U) mean (r = U, w = dY)."""
    h = 2 if GRADS else 3  # q' or k'
    even, odd = _zeros(BLOCK_P, BLOCK_E)
    for t0 in range(0, L, BLOCK_T):
        i = t0 + tl.arange(0, BLOCK_T)
        t = n * L + i
        _, _, _, _, h_even, h_odd, _, _ = _at(z, turns, gamma, beta, t, pairs, i < L, P, sx_t, sx_c, st_t, st_p,
                                              sg_h, sg_c, h, h, ROPE)
        if GRADS:
            right = _grads(w, r, t, cols, i < L, e, sw_t, sw_e, sx_t, sx_c) * mean
        else:
            right = _values(r, t, cols, i < L, e, sx_t, sx_c)
        even += _dot(tl.trans(h_even), right, OP)
        odd += _dot(tl.trans(h_odd), right, OP)
    return even, odd


# -- forward ------------------------------------------------------------------------------
@triton.jit
def _chunk_sums_kernel(
    z, v, turns, gamma, beta, sums, L, N, P, e,
    sx_b, sx_t, sx_c, st_t, st_p, sg_h, sg_c, sk_b, sk_n, sk_h, sk_p, sk_e,
    OP: tl.constexpr, ROPE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Chunk n's own sum of k'_j v_j^T, for a block of value columns, into its slot n."""
    b, n, cols = _columns_of_chunk(N, BLOCK_E)
    pairs = tl.arange(0, BLOCK_P)
    sum_even, sum_odd = _chunk_sum(z + b * sx_b, v + b * sx_b, v, turns, gamma, beta, n, L, cols, pairs, P, e, 1.0,
                                   sx_t, sx_c, st_t, st_p, sg_h, sg_c, 0, 0, OP, ROPE, False, BLOCK_T, BLOCK_P, BLOCK_E)
    _write_slot(sums + b * sk_b, n, pairs, cols, P, e, sk_n, sk_h, sk_p, sk_e, sum_even, sum_odd)


@triton.jit
def _forward_kernel(
    u, z, v, turns, gamma, beta, sums, means, a, y, squares, L, N, P, e, scale,
    sx_b, sx_t, sx_c, st_t, st_p, sg_h, sg_c, sk_b, sk_n, sk_h, sk_p, sk_e, sy_b, sy_t, sy_e, sq_n, sq_j,
    OP: tl.constexpr, ROPE: tl.constexpr, NORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """A and Y = SiLU(U) A for a block of a chunk's queries: q' KV_n, plus the relu^2 scores against
    the chunk's keys up to the block's last query times their values. The squared scores are computed
    once, kept in the program's rows of `squares` (one (BLOCK_T, BLOCK_T) tile a block of keys), and
    read back for each tile of BLOCK_V value columns."""
    b, n, i = _block_of_chunk(N, BLOCK_T)
    pairs = tl.arange(0, BLOCK_P)
    u, z, v = u + b * sx_b, z + b * sx_b, v + b * sx_b  # U, V and Z of the program's batch row
    ok = i < L
    t = n * L + i
    _, _, _, _, q_even, q_odd, ql_even, ql_odd = _at(z, turns, gamma, beta, t, pairs, ok, P, sx_t, sx_c, st_t, st_p,
                                                     sg_h, sg_c, 0, 2, ROPE)
    root = _root(i, scale, NORM)
    squares, tile = _own_squares(squares, sq_n, BLOCK_T)
    for j0 in range(0, tl.program_id(1) * BLOCK_T + BLOCK_T, BLOCK_T):
        j = j0 + tl.arange(0, BLOCK_T)
        _, _, _, _, k_even, k_odd, _, _ = _at(z, turns, gamma, beta, n * L + j, pairs, j < L, P, sx_t, sx_c,
                                              st_t, st_p, sg_h, sg_c, 1, 1, ROPE)
        r = _relu(q_even, q_odd, k_even, k_odd, root, i, j, L, OP)
        tl.store(squares + (j0 // BLOCK_T) * sq_j + tile, r * r)
    tl.debug_barrier()  # the squares, written by any of the program's threads, read back
    for e0 in range(0, e, BLOCK_V):
        cols = e0 + tl.arange(0, BLOCK_V)
        kv_even, kv_odd = _mean_before(sums + b * sk_b, means, n, pairs, cols, P, e, sk_n, sk_h, sk_p, sk_e)
        acc = _dot(ql_even, kv_even, OP) + _dot(ql_odd, kv_odd, OP)
        for j0 in range(0, tl.program_id(1) * BLOCK_T + BLOCK_T, BLOCK_T):
            j = j0 + tl.arange(0, BLOCK_T)
            acc += _dot(tl.load(squares + (j0 // BLOCK_T) * sq_j + tile),
                        _values(v, n * L + j, cols, j < L, e, sx_t, sx_c), OP)
        at = b * sy_b + t[:, None] * sy_t + cols[None, :] * sy_e
        inside = ok[:, None] & (cols[None, :] < e)
        tl.store(a + at, acc.to(a.dtype.element_ty), mask=inside)
        tl.store(y + at, (_values(u, t, cols, ok, e, sx_t, sx_c) * acc).to(y.dtype.element_ty), mask=inside)


# -- backward -----------------------------------------------------------------------------
@triton.jit
def _chunk_grads_kernel(
    u, z, turns, gamma, beta, dy, dsums, means, L, N, P, e,
    sx_b, sx_t, sx_c, st_t, st_p, sg_h, sg_c, sy_b, sy_t, sy_e, sk_b, sk_n, sk_h, sk_p, sk_e,
    OP: tl.constexpr, ROPE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Chunk n's term of the gradient of the sums before it, q'_n^T dA_n means[n] with dA = dY SiLU(U),
    for a block of value columns, into slot N - 1 - n (the last chunk's first)."""
    b, n, cols = _columns_of_chunk(N, BLOCK_E)
    pairs = tl.arange(0, BLOCK_P)
    own_even, own_odd = _chunk_sum(z + b * sx_b, u + b * sx_b, dy + b * sy_b, turns, gamma, beta, n, L, cols, pairs, P,
                                   e, tl.load(means + n), sx_t, sx_c, st_t, st_p, sg_h, sg_c, sy_t, sy_e, OP, ROPE,
                                   True, BLOCK_T, BLOCK_P, BLOCK_E)
    _write_slot(dsums + b * sk_b, N - 1 - n, pairs, cols, P, e, sk_n, sk_h, sk_p, sk_e, own_even, own_odd)


@triton.jit
def _score_grads(dy, u, v, ti, tj, i_ok, j_ok, e, sy_t, sy_e, sx_t, sx_c, OP: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """dA_i . v_j over every value column: (BLOCK_T, BLOCK_T)."""
    grads = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for e0 in range(0, e, BLOCK_E):
        cols = e0 + tl.arange(0, BLOCK_E)
        grads += _dot(_grads(dy, u, ti, cols, i_ok, e, sy_t, sy_e, sx_t, sx_c),
                      tl.trans(_values(v, tj, cols, j_ok, e, sx_t, sx_c)), OP)
    return grads


@triton.jit
def _queries_kernel(
    u, z, v, turns, gamma, beta, sums, means, dy, dz, parts, L, N, P, e, scale,
    sx_b, sx_t, sx_c, st_t, st_p, sg_h, sg_c, sk_b, sk_n, sk_h, sk_p, sk_e, sy_b, sy_t, sy_e,
    sd_b, sd_t, sd_c, sp_n, sp_s, sp_h, sp_c,
    OP: tl.constexpr, ROPE: tl.constexpr, NORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """dq and dq' of a block of a chunk's queries, through RoPE and the offset-scale into dZ (their
    share, written) and the block's rows of parts."""
    b, n, i = _block_of_chunk(N, BLOCK_T)
    pairs = tl.arange(0, BLOCK_P)
    u, z, v = u + b * sx_b, z + b * sx_b, v + b * sx_b  # U, V and Z of the program's batch row
    dy += b * sy_b
    ok = i < L
    t = n * L + i
    dz += b * sd_b
    parts += (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * sp_n
    dql_even, dql_odd = _zeros(BLOCK_T, BLOCK_P)
    for e0 in range(0, e, BLOCK_E):
        cols = e0 + tl.arange(0, BLOCK_E)
        grads = _grads(dy, u, t, cols, ok, e, sy_t, sy_e, sx_t, sx_c)
        kv_even, kv_odd = _mean_before(sums + b * sk_b, means, n, pairs, cols, P, e, sk_n, sk_h, sk_p, sk_e)
        dql_even += _dot(grads, tl.trans(kv_even), OP)
        dql_odd += _dot(grads, tl.trans(kv_odd), OP)
    _into_z(dz, parts, z, turns, gamma, dql_even, dql_odd, 2, t, pairs, ok, P, sx_t, sx_c, st_t, st_p, sg_h, sg_c,
            sd_t, sd_c, sp_s, sp_h, sp_c, ROPE, 0)
    _, _, _, _, q_even, q_odd, _, _ = _at(z, turns, gamma, beta, t, pairs, ok, P, sx_t, sx_c, st_t, st_p, sg_h,
                                          sg_c, 0, 0, ROPE)
    root = _root(i, scale, NORM)
    dq_even, dq_odd = _zeros(BLOCK_T, BLOCK_P)
    for j0 in range(0, tl.program_id(1) * BLOCK_T + BLOCK_T, BLOCK_T):
        j = j0 + tl.arange(0, BLOCK_T)
        _, _, _, _, k_even, k_odd, _, _ = _at(z, turns, gamma, beta, n * L + j, pairs, j < L, P, sx_t, sx_c,
                                              st_t, st_p, sg_h, sg_c, 1, 1, ROPE)
        r = _relu(q_even, q_odd, k_even, k_odd, root, i, j, L, OP)
        ds = _score_grads(dy, u, v, t, n * L + j, ok, j < L, e, sy_t, sy_e, sx_t, sx_c, OP, BLOCK_T, BLOCK_E) \
            * r * (2 * root)[:, None]
        dq_even += _dot(ds, k_even, OP)
        dq_odd += _dot(ds, k_odd, OP)
    _into_z(dz, parts, z, turns, gamma, dq_even, dq_odd, 0, t, pairs, ok, P, sx_t, sx_c, st_t, st_p, sg_h, sg_c,
            sd_t, sd_c, sp_s, sp_h, sp_c, ROPE, 1)


@triton.jit
def _keys_kernel(
    u, z, v, turns, gamma, beta, a, dsums, dy, dz, du, dv, parts, squares, L, N, P, e, scale,
    sx_b, sx_t, sx_c, st_t, st_p, sg_h, sg_c, sa_b, sa_t, sa_e, sk_b, sk_n, sk_h, sk_p, sk_e, sy_b, sy_t, sy_e,
    sd_b, sd_t, sd_c, sp_n, sp_s, sp_h, sp_c, sq_n, sq_i,
    OP: tl.constexpr, ROPE: tl.constexpr, NORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dk, dk', dV and dU of a block of a chunk's keys; dk and dk' through RoPE and the offset-scale
    added to the queries' share of dZ (then through the SiLU), and into the block's rows of parts.
    The squared scores against each later block of queries are kept in the program's rows of
    `squares` (one (BLOCK_T, BLOCK_T) tile a block of queries) for dV's loop to read back."""
    b, n, j = _block_of_chunk(N, BLOCK_T)
    pairs = tl.arange(0, BLOCK_P)
    u, z, v = u + b * sx_b, z + b * sx_b, v + b * sx_b  # U, V and Z of the program's batch row
    dy += b * sy_b
    dsums += b * sk_b
    ok = j < L
    t = n * L + j
    _, _, _, _, k_even, k_odd, _, _ = _at(z, turns, gamma, beta, t, pairs, ok, P, sx_t, sx_c, st_t, st_p, sg_h,
                                          sg_c, 1, 1, ROPE)
    squares, tile = _own_squares(squares, sq_n, BLOCK_T)
    dk_even, dk_odd = _zeros(BLOCK_T, BLOCK_P)
    for i0 in range(tl.program_id(1) * BLOCK_T, L, BLOCK_T):
        i = i0 + tl.arange(0, BLOCK_T)
        _, _, _, _, q_even, q_odd, _, _ = _at(z, turns, gamma, beta, n * L + i, pairs, i < L, P, sx_t, sx_c,
                                              st_t, st_p, sg_h, sg_c, 0, 0, ROPE)
        root = _root(i, scale, NORM)
        r = _relu(q_even, q_odd, k_even, k_odd, root, i, j, L, OP)
        tl.store(squares + (i0 // BLOCK_T) * sq_i + tile, r * r)
        ds = _score_grads(dy, u, v, n * L + i, t, i < L, ok, e, sy_t, sy_e, sx_t, sx_c, OP, BLOCK_T, BLOCK_E) \
            * r * (2 * root)[:, None]
        dk_even += _dot(tl.trans(ds), q_even, OP)
        dk_odd += _dot(tl.trans(ds), q_odd, OP)
    dz += b * sd_b
    parts += (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * sp_n
    _into_z(dz, parts, z, turns, gamma, dk_even, dk_odd, 1, t, pairs, ok, P, sx_t, sx_c, st_t, st_p, sg_h, sg_c,
            sd_t, sd_c, sp_s, sp_h, sp_c, ROPE, 1)
    dkl_even, dkl_odd = _zeros(BLOCK_T, BLOCK_P)
    for e0 in range(0, e, BLOCK_E):
        cols = e0 + tl.arange(0, BLOCK_E)
        values = _values(v, t, cols, ok, e, sx_t, sx_c)
        dkv_even, dkv_odd = _grad_after(dsums, n, N, pairs, cols, P, e, sk_n, sk_h, sk_p, sk_e)
        dkl_even += _dot(values, tl.trans(dkv_even), OP)
        dkl_odd += _dot(values, tl.trans(dkv_odd), OP)
    _into_z(dz, parts, z, turns, gamma, dkl_even, dkl_odd, 3, t, pairs, ok, P, sx_t, sx_c, st_t, st_p, sg_h, sg_c,
            sd_t, sd_c, sp_s, sp_h, sp_c, ROPE, 2)
    _, _, _, _, kl_even, kl_odd, _, _ = _at(z, turns, gamma, beta, t, pairs, ok, P, sx_t, sx_c, st_t, st_p, sg_h,
                                            sg_c, 3, 3, ROPE)
    tl.debug_barrier()  # the squares, written by any of the program's threads, read back
    for e0 in range(0, e, BLOCK_DV):  # dV: the linear part's share k' dKV_n plus A^T dA, through the SiLU
        cols = e0 + tl.arange(0, BLOCK_DV)
        dkv_even, dkv_odd = _grad_after(dsums, n, N, pairs, cols, P, e, sk_n, sk_h, sk_p, sk_e)
        grads = _dot(kl_even, dkv_even, OP) + _dot(kl_odd, dkv_odd, OP)
        for i0 in range(tl.program_id(1) * BLOCK_T, L, BLOCK_T):
            i = i0 + tl.arange(0, BLOCK_T)
            grads += _dot(tl.trans(tl.load(squares + (i0 // BLOCK_T) * sq_i + tile)),
                          _grads(dy, u, n * L + i, cols, i < L, e, sy_t, sy_e, sx_t, sx_c), OP)
        rows = b * sd_b + t[:, None] * sd_t + cols[None, :] * sd_c
        written = ok[:, None] & (cols[None, :] < e)
        tl.store(dv + rows, (grads * _silu_grad(_block(v, t, cols, ok, e, sx_t, sx_c))).to(dv.dtype.element_ty),
                 mask=written)
        pre = _block(u, t, cols, ok, e, sx_t, sx_c)  # dU = dY A SiLU'(U)
        tl.store(du + rows, (_block(dy, t, cols, ok, e, sy_t, sy_e) * _block(a + b * sa_b, t, cols, ok, e, sa_t, sa_e)
                             * _silu_grad(pre)).to(du.dtype.element_ty), mask=written)


# -- the autograd function ------------------------------------------------------------------
def operands(dtype: torch.dtype) -> tl.dtype:
    """The products' operand type for inputs of `dtype` (OPERANDS). Triton's interpreter
    multiplies no bfloat16 (its products come out wrong), so under it bfloat16 inputs
    multiply in float32."""
    if dtype == torch.bfloat16 and not isinstance(_dot, triton.runtime.JITFunction):
        return tl.float32
    return OPERANDS[dtype]


@constant(maxsize=16)
def mean_scales(N: int, L: int, device: torch.device) -> Tensor:
    """(N,) float32: 1 / (n L), the weight of chunk n's mean over the chunks before it; 0 for n = 0."""
    n = torch.arange(N, device=device, dtype=torch.float32)
    return torch.where(n > 0, 1.0 / (n * L).clamp(min=1.0), 0.0)


class _Shapes:
    """The sizes, blocks and tables a pass over X (B, T, 2e + s) launches with."""

    def __init__(self, x: Tensor, e: int, G: int, norm: str, rope: bool, tiles: Tiles):
        (self.B, self.T, width), self.e, self.tiles = x.shape, e, tiles
        self.s = width - 2 * e
        self.L = min(G, self.T)
        self.N = self.T // self.L
        self.turns = torch.view_as_real(first_turns(self.T, self.s, x.device)) if rope else x  # x: never read
        self.turn_strides = self.turns.stride()[:2] if rope else (0, 0)
        self.means = mean_scales(self.N, self.L, x.device)
        self.NORM = RELU2_NORMS.index(norm)  # _root's NORM: 0 keys, 1 chunk, 2 none
        self.scale = (self.s * (G if norm == "chunk" else 1)) ** -0.5
        op = operands(x.dtype)
        self.blocks = dict(OP=op, BLOCK_T=tiles.BLOCK_T, BLOCK_P=max(16, triton.next_power_of_2(self.s // 2)),
                           num_warps=tiles.NUM_WARPS)  # each launch's constants and warps
        self.kept = torch.float32 if op == tl.float32 else x.dtype  # squared scores, kept as products take them
        self.sizes = (self.L, self.N, self.s // 2, e)

    def parts(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """U, V and Z: views of X's columns."""
        return x[..., :self.e], x[..., self.e:2 * self.e], x[..., 2 * self.e:]

    def by_chunk(self) -> tuple:
        return self.B * self.N, triton.cdiv(self.L, self.tiles.BLOCK_T)

    def squares(self, x: Tensor) -> Tensor:
        """A scratch of squared scores for the forward's and the key kernel's programs: one (BLOCK_T,
        BLOCK_T) tile for each block of the chunk, in dV's or A's operand type."""
        chunks, blocks = self.by_chunk()
        return torch.empty(chunks * blocks, blocks, self.tiles.BLOCK_T ** 2, device=x.device, dtype=self.kept)

    def by_sum(self) -> tuple:
        return self.B * self.N, triton.cdiv(self.e, BLOCK_E)

    def sums(self, x: Tensor) -> Tensor:
        """A (B, N, s, e) float32 sum for each chunk, a head's even and odd dimensions apart."""
        return torch.empty(self.B, self.N, 2, self.s // 2, self.e, device=x.device, dtype=torch.float32)


class _GatedMixedChunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gamma, beta, rope, e, G, norm, tiles):
        n = _Shapes(x, e, G, norm, rope, tiles)
        u, v, z = n.parts(x)
        gamma, beta = gamma.contiguous(), beta.contiguous()
        sums = n.sums(x)
        a, y = (torch.empty(n.B, n.T, e, device=x.device, dtype=x.dtype) for _ in range(2))
        heads = (n.turns, gamma, beta)
        strides = (*x.stride(), *n.turn_strides, *gamma.stride())
        _chunk_sums_kernel[n.by_sum()](
            z, v, *heads, sums, *n.sizes, *strides, *sums.stride(), ROPE=rope, **n.blocks, BLOCK_E=BLOCK_E)
        sums.cumsum_(1)  # slot n: chunks 0 .. n summed
        squares = n.squares(x)
        _forward_kernel[n.by_chunk()](
            u, z, v, *heads, sums, n.means, a, y, squares, *n.sizes, n.scale, *strides, *sums.stride(), *y.stride(),
            *squares.stride()[:2], ROPE=rope, NORM=n.NORM, **n.blocks, BLOCK_V=BLOCK_V)
        ctx.save_for_backward(x, gamma, beta, sums, a)
        ctx.options = e, G, norm, rope, tiles
        return y

    @staticmethod
    def backward(ctx, dy):
        x, gamma, beta, sums, a = ctx.saved_tensors
        e, G, norm, rope, tiles = ctx.options
        n = _Shapes(x, e, G, norm, rope, tiles)
        u, v, z = n.parts(x)
        dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        du, dv, dz = n.parts(dx)
        dsums = n.sums(x)
        parts = torch.empty(math.prod(n.by_chunk()), 2, 4, n.s, device=x.device,
                            dtype=torch.float32)  # shares of dgamma, dbeta
        squares = n.squares(x)
        heads = (n.turns, gamma, beta)
        strides = (*x.stride(), *n.turn_strides, *gamma.stride())
        _chunk_grads_kernel[n.by_sum()](
            u, z, *heads, dy, dsums, n.means, *n.sizes, *strides, *dy.stride(), *dsums.stride(), ROPE=rope,
            **n.blocks, BLOCK_E=BLOCK_E)
        dsums.cumsum_(1)  # slot k: the terms of chunks N - 1 - k .. N - 1 summed
        _queries_kernel[n.by_chunk()](
            u, z, v, *heads, sums, n.means, dy, dz, parts, *n.sizes, n.scale, *strides, *sums.stride(),
            *dy.stride(), *dx.stride(), *parts.stride(), ROPE=rope, NORM=n.NORM, **n.blocks, BLOCK_E=BLOCK_E)
        _keys_kernel[n.by_chunk()](
            u, z, v, *heads, a, dsums, dy, dz, du, dv, parts, squares, *n.sizes, n.scale, *strides, *a.stride(),
            *dsums.stride(), *dy.stride(), *dx.stride(), *parts.stride(), *squares.stride()[:2], ROPE=rope,
            NORM=n.NORM, **n.blocks, BLOCK_E=BLOCK_E, BLOCK_DV=BLOCK_DV)
        dgamma, dbeta = parts.sum(0)
        return dx, dgamma.to(gamma.dtype), dbeta.to(beta.dtype), None, None, None, None, None


@on_its_device
def gated(x: Tensor, gamma: Tensor, beta: Tensor, rope: bool, *, e: int, chunk_size: int,
          relu2_norm: str, tiles: Tiles = TILES[0]) -> Tensor:
    """SiLU(U) times the causal mixed chunk attention of ``ops.flash.from_z`` over
    SiLU(V) and the heads of SiLU(Z), for a sequence without padding inside its rows,
    on the kernels launched with `tiles`: x = [U, V, Z] (B, T, 2e + s), s even, of a
    dtype in KERNEL_DTYPES; gamma and beta (4, s). Returns (B, T, e) in x's dtype."""
    if relu2_norm not in RELU2_NORMS:
        raise unknown_relu2_norm(relu2_norm)
    T = x.shape[1]
    x, = whole_chunks(chunk_size, x)
    y = _GatedMixedChunk.apply(x, gamma, beta, rope, e, chunk_size, relu2_norm, tiles)
    return y[:, :T] if y.shape[1] > T else y


class Fit(NamedTuple):
    """The tiles a unit's passes launch with (None where none can run: `why`, one line), and the
    milliseconds of one timed pass with each of TILES that ran (none off CUDA)."""
    tiles: Optional[Tiles]
    why: Optional[str] = None
    ms: Tuple[Tuple[Tiles, float], ...] = ()


@functools.lru_cache(maxsize=None)
@on_its_device
def fitted(device: torch.device, s: int, e: int, dtype: torch.dtype, gamma_dtype: torch.dtype, rope: bool, *,
           chunk_size: int, relu2_norm: str) -> Fit:
    """The tiles the kernels run with on `device` at these sizes, found once for each GPU and
    sizes: on CUDA the fastest of TILES in one forward and backward pass (`timed`), those that
    cannot run there left out; elsewhere (Triton's interpreter, nothing to time) the first."""
    if device.type != "cuda":
        return Fit(TILES[0])
    return fastest(TILES, functools.partial(timed, device=device, s=s, e=e, dtype=dtype, gamma_dtype=gamma_dtype,
                                            rope=rope, chunk_size=chunk_size, relu2_norm=relu2_norm), s)


def fastest(candidates, time_of, s: int) -> Fit:
    """The candidate with the least `time_of(tiles)` (ms), leaving out those it finds cannot run
    (OutOfResources: a GPU that gives a block less shared memory than the tiles of a wide s
    take); where none can, why the last could not. Where the GPU has no memory left to time
    them in, the first candidate not found out of resources, untimed."""
    ms, why, short, no_memory = [], None, [], False
    for tiles in candidates:
        try:
            ms.append((tiles, time_of(tiles)))
        except OutOfResources as error:
            short.append(tiles)
            why = (f"FLASH's training kernels need {error.name}: {error.required}, where this GPU gives a block "
                   f"{error.limit} (gau_s={s})")
        except torch.OutOfMemoryError:
            no_memory = True
            break
    if no_memory:
        torch.cuda.empty_cache()  # what the timed pass held
        return Fit(next(t for t in candidates if t not in short))
    if not ms:
        return Fit(None, why)
    return Fit(min(ms, key=lambda pair: pair[1])[0], None, tuple(ms))


def timed(tiles: Tiles, *, device: torch.device, s: int, e: int, dtype: torch.dtype, gamma_dtype: torch.dtype,
          rope: bool, chunk_size: int, relu2_norm: str, tokens: int = 8192, row: int = 2048, repeats: int = 3) -> float:
    """Milliseconds of one forward and backward pass on `tiles` over `tokens` tokens (rows of
    `row` tokens or two chunks, whichever is longer) of inputs drawn from their own generator;
    a first pass, which compiles the kernels, is not counted. Autograd runs whatever mode the
    caller is in (no_grad, inference_mode: a model's first pass may be an evaluation)."""
    T = max(2 * chunk_size, row)
    with torch.inference_mode(False), torch.enable_grad():
        g = torch.Generator(device).manual_seed(0)
        x = torch.randn(max(1, tokens // T), T, 2 * e + s, device=device, dtype=dtype, generator=g).requires_grad_()
        gamma, beta = (torch.randn(4, s, device=device, dtype=gamma_dtype, generator=g).requires_grad_()
                       for _ in range(2))

        def one_pass():
            y = gated(x, gamma, beta, rope, e=e, chunk_size=chunk_size, relu2_norm=relu2_norm, tiles=tiles)
            torch.autograd.grad(y, (x, gamma, beta), torch.ones_like(y))

        one_pass()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            one_pass()
        synchronize(device)
    return (time.perf_counter() - start) * 1e3 / repeats


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
