"""Kernel attention (arXiv 2006.16236), one case per feature map, for the device
check: the chunk loop, the chunkwise-parallel form and, on CUDA where fla-core
imports, the fla form and the fused decoding step (--kernel-backend fla)."""
import math

import torch

from linear_fairseq.ops import performer as K
from linear_fairseq.ops import performer_fla

from . import OpsCase, generator, stepped

EPS = 1e-6  # the normalizer clamp (--kernel-eps) of rfa and t2r
MAPS = ("elu", "favor", "rfa", "t2r")


def features(name, q, k, m, generator):
    """(phi_q, phi_k, key log-scale, query log-scale) of a feature map with m features,
    its random draws from `generator` (CPU), cast to q's device and dtype."""
    H, D = q.shape[1], q.shape[-1]
    like = lambda x: x.to(q)  # noqa: E731
    if name == "elu":
        return K.elu_features(q), K.elu_features(k), None, None
    if name == "favor":
        W = like(K.orthogonal_gaussian(m, D, generator))
        (pq, sq), (pk, s) = K.favor_features(q, W), K.favor_features(k, W)
        return pq, pk, s, sq
    if name == "rfa":
        W = like(torch.randn(m, D, generator=generator))
        return K.rfa_features(q, W), K.rfa_features(k, W), None, None
    if name == "t2r":
        w, b = like(torch.randn(H, m, D, generator=generator)), like(torch.randn(H, m, generator=generator))
        return K.t2r_features(q, w, b), K.t2r_features(k, w, b), None, None
    raise KeyError(name)


def inputs_of(name):
    def inputs(B, T, dtype, device, seed=0, large=False):
        """phi_q, phi_k, v (B, H, T, .), the key and query log-scales, the gate logits (rfa)."""
        H, D = (8, 64) if large else (2, 16)
        m = round(D * math.log(D)) if large else (256 if name == "rfa" else 64)
        g = generator(device, seed)
        q, k, v = (torch.randn(B, H, T, D, device=device, generator=g) for _ in range(3))
        gate = torch.randn(B, H, T, device=device, generator=g) * 2 if name == "rfa" else None
        pq, pk, s, sq = features(name, q, k, m, torch.Generator().manual_seed(seed))
        low = lambda x: None if x is None else x.to(dtype)  # noqa: E731
        return [low(pq), low(pk), low(v), low(s), gate, low(sq)]  # the gate's logits stay float32
    return inputs


def naive(pq, pk, v, padding_mask, s, gate, sq, eps):
    return K.naive(pq, pk, v, True, padding_mask, s, gate, q_log_scale=sq, eps=eps)


def step_of(causal_step):
    def step(x, state):
        pq, pk, v, s, gate, sq = x
        return causal_step(pq, pk, v, state, None, s, gate, sq, eps=EPS)
    return step


def cases(device):
    def form(f, **kw):
        return lambda xs: f(*xs[:3], None, *xs[3:], eps=EPS, **kw)

    forms = {"chunked": form(lambda *a, **kw: K.causal_chunked(*a, **kw)[0], chunk_size=64),
             "parallel": form(lambda *a, **kw: K.causal_parallel(*a, **kw)[0], chunk_size=64)}
    fused_step = None
    on_fla = torch.device(device).type == "cuda" and performer_fla.unavailable() is None
    if on_fla:
        fused_step = lambda xs: stepped(step_of(performer_fla.fused().causal_step), xs, 2)  # noqa: E731

    def forms_of(name):
        """The torch forms, and fla-core's where it runs (RFA's gate not where it would train wrongly)."""
        trouble = name == "rfa" and on_fla and performer_fla.gate_trouble(torch.device(device))
        return {**forms, "fla": form(performer_fla.causal)} if on_fla and not trouble else forms

    return [OpsCase(f"performer-{name}", inputs_of(name), reference=form(naive), forms=forms_of(name),
                    step=lambda xs: stepped(step_of(K.causal_step), xs, 2), fused_step=fused_step,
                    timed=("parallel", "fla")) for name in MAPS]
