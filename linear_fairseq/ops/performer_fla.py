"""Causal kernel attention on fla-core's Triton kernels (CUDA only).

The function of ``performer.causal_parallel``, computed by fla-core's
``chunk_simple_gla`` (flash-linear-attention; ``pip install '.[gpu]'``), which
takes q, k, v of shape (B, T, H, .) and per-head log-decays g (B, T, H) and
returns, with G_i = g_1 + ... + g_i,

    o_i = sum_{j<=i} exp(G_i - G_j) q_i . k_j v_j.

Kernel attention maps onto it as: q = phi(q); g = log g_t, RFA's gate (none:
no decay); k_j = phi(k_j) exp(a_j - c), a_j the key's log-weight (FAVOR+'s
log-scale, log(1 - g_j) under the gate, -inf at padding) and c its largest
value in the sequence, per head; v_j = [v_j, 1], so the last column of o is
the normalizer phi(q_i).z_i. Then out = num / max(den, floor), the floor
being eps in true scale exactly as in the torch forms (`clamp_floor` with the
offset c).

Where the two can differ: the torch forms keep the sums relative to a running
maximum of the log-weights, this form relative to one maximum per sequence,
so a key whose log-weight lies more than about 87 below the largest one of
its sequence (float32 and bfloat16 inputs alike; fp16 models run this form in
float32) underflows to weight 0, and a query that sees only such keys gets
the floor. FAVOR+'s log-scales differ by tens at most for unit-scale inputs.
And on sm_80 and newer fla-core's kernels multiply float32 inputs with TF32
operands (Triton's default for ``tl.dot``; 10-bit mantissas), where the torch
forms take IEEE float32.

Two limits of fla-core's kernels shape the inputs. Their 16-bit backward reads
an odd number of feature or value columns out of bounds (fla-core 0.6 refuses
them), and [v, 1] has d + 1 columns: q, k and [v, 1] get a zero column where
their width is odd (it adds 0 to every product), and the output loses it. And
on Hopper GPUs (compute capability 9.x) Triton 3.4.0 to 3.7.0 compiles the
backward of the gated kernel wrongly (fla-core issue 640; fla-core raises
there), so RFA's gate does not train on this form on them (`gate_trouble`).
"""
import functools
import re
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import acc, compute_capability, import_problem, own_precision
from .performer import LOWEST, _column, clamp_floor, key_log_weights, normalized, with_ones


@functools.lru_cache(maxsize=1)
def unavailable() -> Optional[str]:
    """Why fla-core's kernel cannot be used here (None: it imports)."""
    return import_problem("fla.ops.simple_gla", "fla-core")


# Triton versions whose build of fla-core's gated backward is wrong on Hopper: [first, last)
GATE_MISCOMPILED = ((3, 4, 0), (3, 7, 1))


def version(text: str) -> tuple:
    """The first three numbers of a version string: "3.6.0+git1a2b" -> (3, 6, 0)."""
    return tuple(int(n) for n in re.findall(r"\d+", text)[:3])


def gate_trouble(device: torch.device, triton_version: Optional[str] = None) -> Optional[str]:
    """Why RFA's gate cannot train on fla-core's kernel on `device` (None: it can):
    a Hopper GPU with a Triton that compiles the gated backward wrongly."""
    if device.type != "cuda" or compute_capability(device.index) // 10 != 9:
        return None
    if triton_version is None:
        import triton
        triton_version = triton.__version__
    first, last = GATE_MISCOMPILED
    if not first <= version(triton_version) < last:
        return None
    return (f"on {torch.cuda.get_device_name(device.index)} (compute capability 9.x) Triton {triton_version} "
            f"builds fla-core's gated backward wrongly (fla-core issue 640); Triton 3.7.1 or newer builds it right")


def kernel():
    from fla.ops.simple_gla import chunk_simple_gla
    return chunk_simple_gla


def fused():
    """ops.performer_triton, the decoding step in one Triton kernel (imported here: it needs Triton)."""
    from . import performer_triton
    return performer_triton


def favor_kernels():
    """ops.favor_triton, FAVOR+'s feature map as Triton kernels (imported here: it needs Triton)."""
    from . import favor_triton
    return favor_triton


def even(x: Tensor) -> Tensor:
    """x with a zero column after its last where its width is odd (contiguous either way)."""
    return F.pad(x, (0, 1)) if x.shape[-1] % 2 else x.contiguous()


def fla_inputs(phi_q: Tensor, phi_k: Tensor, v: Tensor, padding_mask, log_scale, gate_logits):
    """q, k, v (B, T, H, .) of even widths and g (B, T, H) or None, as described above,
    and the offset c (B, H, 1)."""
    a, lg = key_log_weights(phi_k.shape[:3], acc(phi_k), padding_mask, log_scale, gate_logits)
    c = a.amax(-1, keepdim=True).clamp(min=LOWEST).detach()
    k = acc(phi_k) * torch.exp(a - c).unsqueeze(-1)
    dtype = torch.bfloat16 if v.dtype == torch.bfloat16 else torch.float32  # fp16: too narrow for the sums
    time_major = lambda x: even(x.transpose(1, 2).to(dtype))  # noqa: E731
    g = None if lg is None else lg.transpose(1, 2).float().contiguous()
    v1 = with_ones(v.transpose(1, 2), (v.shape[-1] + 1) % 2).to(dtype)  # even([v, 1]), written time-major
    return time_major(phi_q), time_major(k), v1, g, c


@own_precision
def causal(
    phi_q: Tensor, phi_k: Tensor, v: Tensor, padding_mask: Optional[Tensor] = None,
    log_scale: Optional[Tensor] = None, gate_logits: Optional[Tensor] = None, q_log_scale: Optional[Tensor] = None,
    *, eps: float, chunk_simple_gla=None,
) -> Tensor:
    """Causal kernel attention (shapes as in ops.performer) by `chunk_simple_gla`
    (default: fla-core's). Returns out (B, H, T, d) in v's dtype."""
    q, k, v1, g, c = fla_inputs(phi_q, phi_k, v, padding_mask, log_scale, gate_logits)
    o, _ = (chunk_simple_gla or kernel())(q, k, v1, g=g, scale=1.0)
    floor = clamp_floor(eps, c.unsqueeze(-1), _column(q_log_scale))  # a column, as normalized takes it
    return normalized(acc(o[..., :v.shape[-1] + 1]).transpose(1, 2), floor).to(v.dtype)
