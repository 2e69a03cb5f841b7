"""Where a module runs its kernels: the --*-backend options (auto, torch, or the kernels' own name)."""
import functools
import logging
from typing import Callable, Optional

from torch import Tensor

from ..errors import ConfigError
from ..ops.common import KERNEL_DTYPES, gpu_too_old, triton_unavailable

TRITON_BACKENDS = ("auto", "torch", "triton")  # the choices of an option whose kernels are Triton's
logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def say_once(line: str, level: int = logging.WARNING):
    """Log `line` the first time it is said (a backend's choice, told once per process)."""
    logger.log(level, line)


def on_kernels(option: str, backend: str, x: Tensor, kernels: str = "triton",
               unavailable: Callable[[], Optional[str]] = triton_unavailable, needs: str = "") -> bool:
    """Whether a module whose `option` (its field, e.g. gau_backend) is `backend` runs
    its `kernels` on x: never for torch; for auto and `kernels` where x is on a CUDA
    GPU Triton compiles for (gpu_too_old), `unavailable()` names no reason and x is of
    a dtype the kernels take (KERNEL_DTYPES; others, float64, run on torch). Asked for
    by name where they cannot run, it is one line naming why (then `needs`, what they
    need) and the way out."""
    if backend == "torch":
        return False
    why = (unavailable() or gpu_too_old(x.device.index)) if x.is_cuda else \
        f"the model runs on {x.device.type}, not CUDA"
    if why and backend == kernels:
        flag = "--" + option.replace("_", "-")
        raise ConfigError(f"{flag} {kernels}: {why}{needs} (or {flag} auto: {kernels} where it can run, torch "
                          f"elsewhere; for a trained model, --model-overrides \"{{'{option}': 'auto'}}\")")
    return why is None and x.dtype in KERNEL_DTYPES
