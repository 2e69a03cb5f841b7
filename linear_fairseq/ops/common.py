"""Helpers the families' ops share (torch only)."""
import functools
import importlib
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

# A family's recurrent (or summarized-source) state: named tensors, batch first.
# Its ops create it (empty_state, summarize), take it and return the next one
# (causal_step); the modules keep it in fairseq's incremental state as it is.
State = Dict[str, Tensor]


def constant(maxsize: int):
    """Caches a function that builds a constant tensor (a mask, a table of weights)
    by its arguments, keeping `maxsize` of them. The tensor is built outside
    inference mode, so autograd may save it for backward wherever it is used
    later (an inference tensor cannot be saved)."""
    def wrap(build):
        @functools.lru_cache(maxsize=maxsize)
        @functools.wraps(build)
        def cached(*args, **kwargs) -> Tensor:
            with torch.inference_mode(False):
                return build(*args, **kwargs)
        return cached
    return wrap


def reads_back_free(x: Tensor) -> bool:
    """Whether reading a value of x back to the host costs nothing: on the CPU. On a GPU
    such a read waits for every kernel queued before it, so decoding reads none there."""
    return x.device.type == "cpu"


def strides(t: Optional[Tensor], n: int) -> Tuple[int, ...]:
    """t's strides, or n zeros for an absent tensor (a kernel argument that is not read)."""
    return t.stride() if t is not None else (0,) * n


def import_problem(module: str, name: str) -> Optional[str]:
    """Why `module` cannot be imported here, one line naming it `name` (None: it imports)."""
    try:
        importlib.import_module(module)
    except Exception as error:  # not installed, or no build for this machine
        detail = str(error).splitlines()[0] if str(error) else ""
        return f"{name} does not import ({type(error).__name__}{': ' + detail if detail else ''})"
    return None


@functools.lru_cache(maxsize=1)
def triton_unavailable() -> Optional[str]:
    """Why Triton kernels (ops/*_triton.py) cannot be used here (None: Triton imports)."""
    return import_problem("triton", "Triton")


TRITON_CAPABILITY = 70  # the oldest NVIDIA GPUs Triton compiles for (7.0), as torch.compile requires
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what every Triton kernel of the plugin takes


@functools.lru_cache(maxsize=None)
def compute_capability(index: int) -> int:
    """CUDA device `index`'s compute capability as one number (7.5 -> 75)."""
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def gpu_too_old(index: int) -> Optional[str]:
    """Why Triton kernels cannot run on CUDA device `index` (None: they can): one
    older than compute capability 7.0, for which Triton does not compile."""
    found = compute_capability(index)
    if found >= TRITON_CAPABILITY:
        return None
    return (f"{torch.cuda.get_device_name(index)} is of compute capability {found // 10}.{found % 10}; Triton "
            f"compiles for {TRITON_CAPABILITY // 10}.{TRITON_CAPABILITY % 10} and newer")


@constant(maxsize=64)
def lower_triangle(rows: int, cols: int, diagonal: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(rows, cols): 1 where column j <= row i + diagonal, 0 elsewhere."""
    return torch.ones(rows, cols, device=device, dtype=dtype).tril(diagonal)


def acc_dtype(x: Tensor) -> torch.dtype:
    """Accumulation precision: float32, or float64 for float64 (without converting x)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def acc(x: Tensor) -> Tensor:
    """x in its accumulation precision (acc_dtype); x itself when it is in it."""
    dtype = acc_dtype(x)
    return x if x.dtype == dtype else x.to(dtype)


HALF = (torch.float16, torch.bfloat16)


def operand_dtype(x: Tensor) -> torch.dtype:
    """A training form's matrix-product operand precision: float16 and bfloat16 stay
    as they are (a GPU multiplies them on its tensor cores, summing in float32, as
    fairseq's softmax attention does under --fp16 / --bf16); anything else acc_dtype."""
    return x.dtype if x.dtype in HALF else acc_dtype(x)


def operand(x: Tensor) -> Tensor:
    """x in its operand precision (operand_dtype)."""
    return x.to(operand_dtype(x))


def own_precision(op):
    """op with autocast (fairseq's --amp) held off while it runs: it computes in the
    precisions it chooses for the dtypes it is given (acc, operand), as it does for
    a model cast to half (--fp16, --bf16), and autograd records those products for
    the backward. Under autocast its products would take half operands and give
    half results where it sums in float32: kernel attention's elu + 1 form then
    divided 0 by 0 (its float32 floor is 0 in float16). The inputs keep the
    dtypes autocast gave them (the projections' half precision)."""
    @functools.wraps(op)
    def run(*args, **kwargs):
        device = first_device(*args, *kwargs.values())
        kind = "cpu" if device is None else device.type
        if not autocast_on(kind):
            return op(*args, **kwargs)
        with torch.autocast(kind, enabled=False):
            return op(*args, **kwargs)
    return run


def first_device(*values) -> Optional[torch.device]:
    """The device of the first tensor among `values`, or the first torch.device there (None: neither)."""
    return next((x if isinstance(x, torch.device) else x.device for x in values
                 if isinstance(x, (Tensor, torch.device))), None)


def autocast_on(device: str) -> bool:
    """Whether autocast is on for `device` ("cpu", "cuda"); True where torch cannot say
    per device (before 2.4), so that own_precision holds it off in any case."""
    try:
        return torch.is_autocast_enabled(device)
    except TypeError:
        return True


def writable(*tensors: Tensor) -> bool:
    """Whether a state may be updated in place: no autograd through it (decoding)."""
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def rows_into(x: Tensor, rows: Tensor, spare: Optional[Tensor]) -> Tensor:
    """x.index_select(0, rows), written into spare's first rows where it fits them (same
    dtype, device and trailing shape, at least as many rows, contiguous) and autograd
    follows neither: no new tensor to allocate (and, on the CPU, to fault in)."""
    n = rows.numel()
    fits = (spare is not None and spare.shape[1:] == x.shape[1:] and spare.shape[0] >= n
            and spare.dtype == x.dtype and spare.device == x.device and spare.is_contiguous()
            and writable(x, spare))
    return torch.index_select(x, 0, rows, out=spare[:n]) if fits else x.index_select(0, rows)


def update(x: Tensor, op: str, in_place: bool, *args, **kwargs) -> Tensor:
    """x.op(*args, **kwargs), written into x (x.op_) where `in_place`, else a new tensor."""
    return getattr(x, f"{op}_" if in_place else op)(*args, **kwargs)


def zero_padded(x: Tensor, padding_mask: Optional[Tensor], time_dim: int) -> Tensor:
    """x with its padded time steps set to 0. padding_mask (B, T) is True at
    padding; x has batch first and time at `time_dim`."""
    if padding_mask is None:
        return x
    shape = [1] * x.dim()
    shape[0], shape[time_dim] = x.shape[0], x.shape[time_dim]
    return x.masked_fill(padding_mask.view(shape), 0.0)
