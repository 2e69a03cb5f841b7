"""A toy family's attention module (docs/development.md's example), behind the
LinearAttention contract: projected values, their decayed running mean, an
output projection."""
from typing import List, Optional

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..ops import runmean as R
from .attention import LinearAttention, Problem, first_problem, is_number


def runmean_problems(options: dict, embed_dim: int = 0, width: str = "") -> List[Problem]:
    decay = options["runmean_decay"]
    return first_problem((("runmean_decay", decay, lambda: is_number(decay) and 0 < decay <= 1, "must be in (0, 1]"),))


class RunningMean(LinearAttention):
    def __init__(self, embed_dim, num_heads, *, runmean_decay: float, kv_dim=None, causal=False, cross=False):
        super().__init__(embed_dim, num_heads, causal=causal, cross=cross)
        for name, value, why in runmean_problems({"runmean_decay": runmean_decay}):
            raise ConfigError(f"RunningMean: {name}={value!r} {why}")
        self.decay = runmean_decay
        self.v_proj = nn.Linear(kv_dim or embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    @staticmethod
    def real(x: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
        return torch.ones(x.shape[:-1], dtype=torch.bool) if padding_mask is None else ~padding_mask

    def summarize(self, source, padding_mask):
        return R.summarize(self.v_proj(source), self.real(source, padding_mask))

    def read(self, x, state):
        return self.out_proj(R.read(state)).unsqueeze(1).expand_as(x)

    def causal_parallel(self, x, padding_mask):
        return self.out_proj(R.naive(self.v_proj(x), self.real(x, padding_mask), self.decay))

    def step(self, x, state, padding_mask):
        out, state = R.step(self.v_proj(x), self.real(x, padding_mask), state or None, self.decay)
        return self.out_proj(out), state
