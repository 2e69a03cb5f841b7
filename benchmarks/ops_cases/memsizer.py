"""MemSizer's causal form (arXiv 2203.12644) for the device check."""
import torch

from linear_fairseq.ops import memsizer as M

from . import OpsCase, generator, stepped


def inputs(B, T, dtype, device, seed=0, large=False):
    """Slot weights p (B, T, k), keys (B, T, k), values (B, T, d)."""
    k, d = (32, 512) if large else (8, 32)
    g = generator(device, seed)
    p = M.slot_weights(torch.randn(B, T, 4, k, device=device, generator=g))
    return [x.to(dtype) for x in (p, torch.randn(B, T, k, device=device, generator=g),
                                  torch.randn(B, T, d, device=device, generator=g))]


def cases(device):
    return [OpsCase(
        "memsizer", inputs, reference=lambda xs: M.naive(*xs, causal=True),
        forms={"chunked": lambda xs: M.causal_chunked(*xs, chunk_size=64)},
        step=lambda xs: stepped(lambda x, state: M.causal_step(*x, state), xs, 1),
    )]
