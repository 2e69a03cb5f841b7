"""Pieces the Triton kernels share."""
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .common import KERNEL_DTYPES, compute_capability, first_device

# the inputs the kernels take, and their products' operands (summed in float32): float32 in IEEE float32,
# float16 and bfloat16 rounded to their own precision for a GPU's tensor cores, as torch multiplies each
OPERANDS = dict(zip(KERNEL_DTYPES, (tl.float32, tl.bfloat16, tl.float16)))


@triton.jit
def _dot(a, b, OP: tl.constexpr):
    """a b summed in float32, its operands rounded to OP (OPERANDS); float32 ones in IEEE."""
    if OP == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a.to(OP), b.to(OP))


@triton.jit
def _silu(x):
    """SiLU, x * sigmoid(x)."""
    return x * tl.sigmoid(x)


def capability(x: torch.Tensor) -> Optional[int]:
    """The compute capability of x's GPU as one number (7.5 -> 75); None off CUDA."""
    return compute_capability(x.device.index) if x.is_cuda else None


def on_its_device(launcher):
    """launcher run with the CUDA device of its first tensor (or torch.device) argument
    current: Triton launches a kernel on the current device, which fairseq's CLIs set
    for each worker, but a model moved to another GPU in Python leaves as it was."""
    @functools.wraps(launcher)
    def run(*args, **kwargs):
        device = first_device(*args, *kwargs.values())
        if device is None or device.type != "cuda" or device.index in (None, torch.cuda.current_device()):
            return launcher(*args, **kwargs)
        with torch.cuda.device(device):
            return launcher(*args, **kwargs)
    return run
