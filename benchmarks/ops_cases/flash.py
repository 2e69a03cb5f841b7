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


def z_inputs(B, T, dtype, device, seed=0, large=False):
    """Z (B, T, s), the heads' gamma and beta (4, s), v (B, T, e): what a GAU hands from_z."""
    s, e = (128, 512) if large else (32, 64)
    g = generator(device, seed)
    return [torch.randn(*shape, device=device, generator=g).to(dtype) for shape in
            ((B, T, s), (4, s), (4, s), (B, T, e))]


def heads(xs):
    """q, k, q', k' from Z (the offset-scales, RoPE at 0 .. T-1) and v: mixed_chunk's inputs."""
    z, gamma, beta, v = xs
    qk = Q.rotate(torch.addcmul(beta, z.unsqueeze(-2), gamma), Q.first_turns(z.shape[1], z.shape[-1], z.device)
                  .unsqueeze(-2))
    return [*qk.unbind(-2), v]


def cases(device):
    return [OpsCase(
        "flash", inputs, reference=lambda xs: Q.naive(*xs, True, **options(xs)),
        forms={"mixed_chunk": lambda xs: Q.mixed_chunk(*xs, True, **options(xs))},
        step=lambda xs: stepped(lambda x, state: Q.causal_step(*x, state, **options(xs)), xs, 1), leaves=5,
    ), OpsCase(  # a GAU's training form from Z, its backward written out
        "flash-gau", z_inputs, reference=lambda xs: Q.naive(*heads(xs), True, **options(xs)),
        forms={"from_z": lambda xs: Q.from_z(*xs, True, True, **options(xs))}, leaves=4,
    )]
