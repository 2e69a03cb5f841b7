"""Each family's math on generated inputs, for the device check
(benchmarks/gpu_ops_check.py): one module per family, named as the family
(`benchmarks/ops_cases/<name>.py`), whose `cases(device)` returns its
`OpsCase`s. The check walks the registered families; one without a module is
listed in its report as having none."""
import importlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

Tensors = List[Tensor]


@dataclass(frozen=True)
class OpsCase:
    """One piece of a family's math (its attention, or one feature map of it)."""
    name: str  # the report's family column: the family, or family-variant ("performer-favor")
    # (B, T, dtype, device, seed, large) -> inputs, generated in float32 then cast; the first
    # `leaves` are differentiated. large: the sizes of the precision and speed checks
    inputs: Callable[..., Tensors]
    reference: Callable[[Tensors], Tensor]  # the quadratic reference
    forms: Dict[str, Callable[[Tensors], Tensor]]  # the training forms, differentiable
    step: Optional[Callable[[Tensors], Tensor]] = None  # the decoding recurrence over all of T
    fused_step: Optional[Callable[[Tensors], Tensor]] = None  # the same on a Triton kernel, where one runs
    leaves: int = 3
    timed: Tuple[str, ...] = field(default=())  # the forms timed on CUDA (default: all)


def for_family(name: str) -> Optional[Callable[[torch.device], List[OpsCase]]]:
    """`cases` of benchmarks/ops_cases/<name>.py, or None where the family has no module."""
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{name}":
            raise
        return None
    return module.cases


def generator(device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def stepped(step: Callable, xs: Tensors, time_dim: int) -> Tensor:
    """The outputs of `step(x_t..., state) -> (out, state)` over every t, stacked on time_dim."""
    state, outs = None, []
    with torch.no_grad():
        for t in range(xs[0].shape[time_dim]):
            out, state = step([None if x is None else x.select(time_dim, t) for x in xs], state)
            outs.append(out)
    return torch.stack(outs, time_dim)
