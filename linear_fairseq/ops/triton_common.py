"""Pieces the Triton kernels share."""
import torch
import triton
import triton.language as tl

# the inputs the kernels take, and their products' operands (summed in float32): float32 in IEEE float32,
# float16 and bfloat16 rounded to their own precision for a GPU's tensor cores, as torch multiplies each
OPERANDS = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _dot(a, b, OP: tl.constexpr):
    """a b summed in float32, its operands rounded to OP (OPERANDS); float32 ones in IEEE."""
    if OP == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a.to(OP), b.to(OP))
