"""FAVOR+'s positive random features (``performer.favor_features``) as two Triton
kernels, the forward and its gradient, for training on CUDA: the feature map's
eight operators in one launch, and autograd's ten for its gradient in one more.

For rows x (N, d) and the projection W (m, d), with x' = x d^-1/4:

    a_r = w_r . x' - |x'|^2 / 2,   s = max_r a_r,   phi_r = exp(a_r - s),

returned as (phi, s - log(m) / 2), as the torch function returns them. The
largest exponent s is a constant (no gradient flows through it, as there), so
with da_r = dphi_r phi_r

    dx = d^-1/4 (sum_r da_r w_r - (sum_r da_r) x').

Both kernels compute in float32 and take the products with IEEE float32 inputs
(not TF32), as torch's float32 products are taken. A program takes BLOCK_N rows
and walks the features BLOCK_M at a time: twice in the forward (the exponents
written and their largest kept, then turned into the features in place),
once in the gradient. On CUDA it runs compiled; elsewhere only through
Triton's interpreter (TRITON_INTERPRET=1, which the tests use), which runs a
program's threads as one and so cannot check the barrier between the
forward's two walks.
"""
import math
from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_common import on_its_device

BLOCK_N = 16  # rows a program takes
BLOCK_M = 32  # features a step (compiled for sm_70 to sm_90: at most 204 registers a thread, no spill)


@triton.jit
def _rows(x, n, dims, N, d, sx_n, sx_d, x_scale):
    """x' of the program's rows (x float32), (BLOCK_N, BLOCK_D) (zeros outside x)."""
    inside = (n[:, None] < N) & (dims[None, :] < d)
    return tl.load(x + n[:, None] * sx_n + dims[None, :] * sx_d, mask=inside, other=0.0) * x_scale


@triton.jit
def _projection(W, rows, dims, m, d, sW_m, sW_d):
    """The projection's rows `rows`, (BLOCK_M, BLOCK_D) in float32 (zeros past m)."""
    inside = (rows[:, None] < m) & (dims[None, :] < d)
    return tl.load(W + rows[:, None] * sW_m + dims[None, :] * sW_d, mask=inside, other=0.0).to(tl.float32)


@triton.jit
def _exponents(xs, half, W, rows, dims, m, d, sW_m, sW_d):
    """a = w_r . x' - |x'|^2 / 2 for the features `rows`, -inf past m: (BLOCK_N, BLOCK_M)."""
    w = _projection(W, rows, dims, m, d, sW_m, sW_d)
    a = tl.dot(xs, tl.trans(w), input_precision="ieee") - half[:, None]
    return tl.where(rows[None, :] < m, a, -float("inf"))


@triton.jit
def _forward_kernel(
    x, W, phi, log_scale, N, m, d, sx_n, sx_d, sW_m, sW_d, sp_n, sp_m, x_scale, half_log_m,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    xs = _rows(x, n, dims, N, d, sx_n, sx_d, x_scale)
    half = tl.sum(xs * xs, axis=1) * 0.5
    top = tl.full((BLOCK_N,), -float("inf"), tl.float32)
    for m0 in range(0, m, BLOCK_M):  # the exponents into phi, and their largest
        rows = m0 + tl.arange(0, BLOCK_M)
        a = _exponents(xs, half, W, rows, dims, m, d, sW_m, sW_d)
        tl.store(phi + n[:, None] * sp_n + rows[None, :] * sp_m, a, mask=(n[:, None] < N) & (rows[None, :] < m))
        top = tl.maximum(top, tl.max(a, axis=1))
    tl.debug_barrier()  # the exponents written, then read back: phi = exp(a - top)
    for m0 in range(0, m, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        at = phi + n[:, None] * sp_n + rows[None, :] * sp_m
        inside = (n[:, None] < N) & (rows[None, :] < m)
        tl.store(at, tl.exp(tl.load(at, mask=inside, other=0.0) - top[:, None]), mask=inside)
    tl.store(log_scale + n, top - half_log_m, mask=n < N)


@triton.jit
def _backward_kernel(
    x, W, phi, dphi, dx, N, m, d, sx_n, sx_d, sW_m, sW_d, sp_n, sp_m, sg_n, sg_m, sdx_n, sdx_d, x_scale,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    xs = _rows(x, n, dims, N, d, sx_n, sx_d, x_scale)
    along = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)  # sum_r da_r w_r
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum_r da_r
    for m0 in range(0, m, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        inside = (n[:, None] < N) & (rows[None, :] < m)
        features = tl.load(phi + n[:, None] * sp_n + rows[None, :] * sp_m, mask=inside, other=0.0).to(tl.float32)
        grads = tl.load(dphi + n[:, None] * sg_n + rows[None, :] * sg_m, mask=inside, other=0.0).to(tl.float32)
        da = grads * features
        along += tl.dot(da, _projection(W, rows, dims, m, d, sW_m, sW_d), input_precision="ieee")
        total += tl.sum(da, axis=1)
    g = (along - total[:, None] * xs) * x_scale
    tl.store(dx + n[:, None] * sdx_n + dims[None, :] * sdx_d, g.to(dx.dtype.element_ty),
             mask=(n[:, None] < N) & (dims[None, :] < d))


def _launch(N: int, d: int) -> dict:
    return dict(grid=(triton.cdiv(N, BLOCK_N),),
                blocks=dict(BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M, BLOCK_D=max(16, triton.next_power_of_2(d))))


class _Favor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, projection):
        shape = x.shape
        # the rows in float32, in one copy (a strided view's rows need one anyway)
        rows = torch.empty(shape, device=x.device, dtype=torch.float32).copy_(x).view(-1, shape[-1])
        (N, d), m = rows.shape, projection.shape[0]
        phi = torch.empty(N, m, device=x.device, dtype=torch.float32)
        log_scale = torch.empty(N, device=x.device, dtype=torch.float32)
        launch = _launch(N, d)
        _forward_kernel[launch["grid"]](rows, projection, phi, log_scale, N, m, d, *rows.stride(),
                                        *projection.stride(), *phi.stride(), d ** -0.25, 0.5 * math.log(m),
                                        **launch["blocks"])
        ctx.save_for_backward(rows, projection, phi)
        ctx.shape, ctx.dtype = shape, x.dtype
        log_scale = log_scale.view(shape[:-1])
        ctx.mark_non_differentiable(log_scale)  # the largest exponent is a constant
        return phi.view(*shape[:-1], m), log_scale

    @staticmethod
    def backward(ctx, dphi, _):
        rows, projection, phi = ctx.saved_tensors
        (N, d), m = rows.shape, projection.shape[0]
        dphi = dphi.reshape(N, m)
        dx = torch.empty(N, d, device=rows.device, dtype=ctx.dtype)
        launch = _launch(N, d)
        _backward_kernel[launch["grid"]](rows, projection, phi, dphi, dx, N, m, d, *rows.stride(),
                                         *projection.stride(), *phi.stride(), *dphi.stride(), *dx.stride(),
                                         d ** -0.25, **launch["blocks"])
        return dx.view(ctx.shape), None


@on_its_device
def favor_features(x: Tensor, projection: Tensor) -> Tuple[Tensor, Tensor]:
    """``performer.favor_features`` on the kernels: x (..., d) of a dtype in KERNEL_DTYPES,
    projection (m, d) without a gradient -> (phi (..., m), log-scale (...)), both
    float32, as the torch function gives them for these inputs."""
    return _Favor.apply(x, projection)
