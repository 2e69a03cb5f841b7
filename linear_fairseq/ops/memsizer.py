"""MemSizer attention as pure tensor functions (no fairseq imports).

"Linearizing Transformer with Key-Value Memory" (Zhang & Cai, EMNLP 2022,
arXiv 2203.12644). Notation follows the paper:

    p   = mean_h softmax(x Phi_h^T)          slot weights of a query, (k,)
    K   = LN(X W_l)                          source keys, (n, k)
    V   = LN(X W_r)                          source values, (n, d)
    S   = K^T V / sqrt(n)                    the key-value memory, (k, d)
    out = p S

The causal form keeps one memory per prefix: S_i = i^{-1/2} sum_{j<=i} k_j v_j^T.
Every function here is batch-first: p (B, T, k), K (B, n, k), V (B, n, d).
A padding mask is (B, n) and True at padded positions; padded keys are
dropped and n counts real tokens only, so padding never changes the output
at real positions. Sums are accumulated in float32 (float64 if given float64).

Three forms of the same computation:
  * ``naive``          quadratic reference, O(T^2) memory: what the tests trust.
  * ``causal_chunked`` the training form, memory linear in T.
  * ``causal_step``    one decoding step on a (k, d) running memory.
``source_memory`` + ``read_memory`` are the non-causal form (encoder
self-attention and cross-attention), where S is computed once per source.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import State, acc, acc_dtype, constant, lower_triangle, own_precision, writable, zero_padded

# State of the causal form: {"S": (B, k, d) unscaled running sum of k_j v_j^T, fp32;
# "n": (B,) real tokens so far}; of the non-causal form: {"S": K^T V / sqrt(n)}.


def slot_probs(logits: Tensor) -> Tensor:
    """Each head's softmax over the k memory slots: logits (..., H, k) -> (..., H, k)."""
    return acc(logits).softmax(dim=-1)


def slot_weights(logits: Tensor) -> Tensor:
    """p = mean over heads of softmax over the k memory slots; logits (..., H, k)."""
    return slot_probs(logits).mean(dim=-2)


def _real_tokens(padding_mask: Optional[Tensor], like: Tensor) -> Tensor:
    """1.0 at real positions, 0.0 at padding: (B, T)."""
    B, T = like.shape[:2]
    if padding_mask is None:
        return like.new_ones(B, T, dtype=acc_dtype(like))
    return (~padding_mask).to(acc_dtype(like))


@constant(maxsize=16)
def _first_scales(T: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.arange(1, T + 1, device=device, dtype=dtype).rsqrt().unsqueeze(-1)


def causal_scale(padding_mask: Optional[Tensor], like: Tensor) -> Tensor:
    """i^{-1/2} with i = number of real tokens up to and including each position:
    (B, T, 1), or without padding (T, 1), a cached table every row shares."""
    if padding_mask is None:
        return _first_scales(like.shape[1], like.device, acc_dtype(like))
    count = _real_tokens(padding_mask, like).cumsum(dim=1)
    return count.clamp(min=1.0).rsqrt().unsqueeze(-1)


@own_precision
def naive(
    p: Tensor, K: Tensor, V: Tensor, causal: bool, padding_mask: Optional[Tensor] = None
) -> Tensor:
    """Quadratic reference: out_i = s_i sum_j [j visible from i] (p_i . k_j) v_j."""
    dtype = V.dtype
    p, K, V = acc(p), zero_padded(acc(K), padding_mask, 1), acc(V)
    scores = p @ K.transpose(1, 2)  # (B, T, n)
    if causal:
        scores = scores.tril()
        scale = causal_scale(padding_mask, p)
    else:
        n = _real_tokens(padding_mask, K).sum(dim=1)
        scale = n.clamp(min=1.0).rsqrt().view(-1, 1, 1)
    return ((scores @ V) * scale).to(dtype)


@own_precision
def source_memory(K: Tensor, V: Tensor, padding_mask: Optional[Tensor] = None) -> State:
    """{S}: S = K^T V / sqrt(n_real), float32 (B, k, d)."""
    K = zero_padded(acc(K), padding_mask, 1)
    n = _real_tokens(padding_mask, K).sum(dim=1)
    return {"S": (K.transpose(1, 2) @ acc(V)) * n.clamp(min=1.0).rsqrt().view(-1, 1, 1)}


@own_precision
def read_memory(p: Tensor, state: State, dtype: torch.dtype) -> Tensor:
    """out = p S for every query; p (B, T, k), S (B, k, d)."""
    return (acc(p) @ state["S"]).to(dtype)


@own_precision
def causal_chunked(
    p: Tensor,
    K: Tensor,
    V: Tensor,
    padding_mask: Optional[Tensor] = None,
    *,
    chunk_size: int,
) -> Tensor:
    """Causal MemSizer in chunks of G tokens: exact, with memory O(T k d / G + T G).

    Inside a chunk the (G x G) scores are masked to be causal; across chunks
    each chunk reads the memory of all earlier chunks, their K_c^T V_c summed by
    one product with a strictly lower-triangular (N, N) matrix (O(N^2 k d), a
    launch count independent of T). A sequence shorter than G is one chunk of its
    own length; a longer one is filled up to whole chunks with zeros only where
    G does not divide T.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    B, T, k = p.shape
    d = V.shape[-1]
    G = min(chunk_size, T)
    N = -(-T // G)  # number of chunks
    pad = N * G - T  # zero rows at the end: they add nothing to any sum
    dtype = V.dtype
    scale = causal_scale(padding_mask, p)
    K = zero_padded(acc(K), padding_mask, 1)

    def chunks(x: Tensor) -> Tensor:
        x = acc(x)
        return (F.pad(x, (0, 0, 0, pad)) if pad else x).reshape(B * N, G, x.shape[-1])

    p_c, K_c, V_c = chunks(p), chunks(K), chunks(V)
    # the memory of each chunk, K_c^T V_c, and of all chunks before it
    S_c = torch.bmm(K_c.transpose(1, 2), V_c).view(B, N, k * d)
    S_before = (lower_triangle(N, N, -1, S_c.device, S_c.dtype) @ S_c).view(B * N, k, d)
    # p_i S_before + sum_{j<=i, same chunk} (p_i . k_j) v_j
    scores = torch.bmm(p_c, K_c.transpose(1, 2)).tril()
    out = torch.baddbmm(torch.bmm(p_c, S_before), scores, V_c).view(B, N * G, d)
    return ((out[:, :T] if pad else out) * scale).to(dtype)


def empty_state(B: int, k: int, d: int, like: Tensor) -> State:
    S = like.new_zeros(B, k, d, dtype=acc_dtype(like))
    return {"S": S, "n": S.new_zeros(B)}


@own_precision
def causal_step(
    p: Tensor,
    K: Tensor,
    V: Tensor,
    state: Optional[State] = None,
    padding_mask: Optional[Tensor] = None,
) -> Tuple[Tensor, State]:
    """One decoding step. p: (B, k) slot weights, or (B, H, k) each head's slot
    probabilities (slot_probs), averaged here; K: (B, k); V: (B, d); state {S, n}
    (None: empty).

    Returns (out, state) with S = sum_j k_j v_j^T and n = number of real tokens so far.
    A padded step (padding_mask True) leaves S and n unchanged. Without autograd
    (decoding) the state is updated in place.
    """
    B, k = K.shape
    dtype = V.dtype
    state = state if state is not None else empty_state(B, k, V.shape[-1], K)
    S, n = state["S"], state["n"]
    K, V = acc(K), acc(V)
    if padding_mask is not None:
        K = K.masked_fill(padding_mask[:, None], 0.0)
    # S_i = S_{i-1} + k_i v_i^T (unscaled); n_i = n_{i-1} + 1
    real = 1.0 if padding_mask is None else (~padding_mask).to(n.dtype)
    if not writable(K, V, S):
        S, n = torch.baddbmm(S, K.unsqueeze(-1), V.unsqueeze(-2)), n + real
    else:
        S.baddbmm_(K.unsqueeze(-1), V.unsqueeze(-2))
        n.add_(real)
    # out_i = p_i S_i / sqrt(i); without padding this step's token makes i >= 1
    scale = (n if padding_mask is None else n.clamp(min=1.0)).rsqrt()
    return (scaled_mean(acc(p), scale) @ S).squeeze(1).to(dtype), {"S": S, "n": n}


def scaled_mean(p: Tensor, scale: Tensor) -> Tensor:
    """scale_b * mean over heads of p: p (B, k) or (B, H, k), scale (B,) -> (B, 1, k),
    as one batched product (B, 1, H) @ (B, H, k)."""
    P = p if p.dim() == 3 else p.unsqueeze(1)
    B, H = P.shape[:2]
    return torch.baddbmm(P[:, :1], scale.view(B, 1, 1).expand(B, 1, H), P, beta=0.0, alpha=1.0 / H)
