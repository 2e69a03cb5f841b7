"""FLASH's mixed chunk attention (arXiv 2202.10447) for the device check."""
import torch

from linear_fairseq.ops import flash as Q

from . import OpsCase, generator, stepped



def options(xs):
    """G = 64 below T = 1024 (so the parity lengths span several chunks), else the default 256."""
    return {"chunk_size": 64 if xs[0].shape[1] < 1024 else 256, "relu2_norm": "keys"}


def inputs(B, T, dtype, device, seed=0, large=False):
    """q, k, q', k' (B, T, s) and v (B, T, e)."""
    s, e = (128, 512) if large else (32, 64)
    g = generator(device, seed)
    return [torch.randn(B, T, n, device=device, generator=g).to(dtype) for n in (s, s, s, s, e)]


def cases(device):
    return [OpsCase(
        "flash", inputs, reference=lambda xs: Q.naive(*xs, True, **options(xs)),
        forms={"mixed_chunk": lambda xs: Q.mixed_chunk(*xs, True, **options(xs))},
        step=lambda xs: stepped(lambda x, state: Q.causal_step(*x, state, **options(xs)), xs, 1), leaves=5,
    )]
