"""Local precision for a family's self-attention (--short-conv K, --local-window W).

``ShortConv``: a depthwise convolution of width K over the attention's input,
causal in the decoder (its last K-1 inputs are decoding state) and centred in
the encoder. It starts as the identity (the current input's tap 1, the others
0), so a model gains it without changing at initialization.

``SlidingWindow``: exact softmax attention over the last W positions (the
decoder; its last W keys and values are decoding state) or the W//2 on each
side (the encoder), with its own projections, added to the family's output.
Its heads are scaled by a learned per-head weight before the output
projection: a mix rather than one normalizer over both branches, because not
every family has a normalizer to share (MemSizer reads a memory, not a
normalized sum over positions).

Cross-attention reads the whole source and takes neither.

Where the model runs on CUDA (--local-backend auto or triton), the window runs
on Triton kernels (ops/local_triton.py): its parallel form (forward and
backward) and, causal, one kernel a decoding step.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ..ops import local as L
from .backends import on_kernels
from .incremental import State
from .projections import load_apart, stacked


class ShortConv(nn.Module):
    def __init__(self, dim: int, width: int, causal: bool):
        super().__init__()
        self.causal = causal
        self.weight = nn.Parameter(torch.zeros(dim, width))
        with torch.no_grad():
            self.weight[:, width - 1 if causal else (width - 1) // 2] = 1.0  # the identity

    def forward(self, x: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
        return L.conv(x, self.weight, self.causal, padding_mask)

    def step(self, x: Tensor, state: Optional[Tensor], padding_mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        return L.conv_step(x, self.weight, state, padding_mask)


class SlidingWindow(nn.Module):
    STATE = L.WINDOW_STATE  # the names of step's state entries

    def __init__(self, dim: int, num_heads: int, width: int, causal: bool, local_backend: str):
        super().__init__()
        self.num_heads, self.width, self.causal, self.local_backend = num_heads, width, causal, local_backend
        q_proj, k_proj, v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))
        self.head_weight = nn.Parameter(torch.ones(num_heads))
        for proj in (q_proj, k_proj, v_proj):
            nn.init.xavier_uniform_(proj.weight, gain=2**-0.5)  # as fairseq's MultiheadAttention
        nn.init.xavier_uniform_(self.out_proj.weight)
        self.qkv_proj = stacked(q_proj, k_proj, v_proj)  # one matrix product for the three

    def qkv(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(B, ..., C) -> q, k, v, each (B, H, ..., d)"""
        return self.qkv_proj(x).unflatten(-1, (3, self.num_heads, -1)).movedim(-3, 0).movedim(-2, 2).unbind(0)

    def merge(self, out: Tensor) -> Tensor:
        """(B, H, ..., d), scaled per head -> (B, ..., C)"""
        return self.project(out * self.head_weight.view(-1, *([1] * (out.dim() - 2))).to(out.dtype))

    def project(self, out: Tensor) -> Tensor:
        """(B, H, ..., d) -> (B, ..., C)"""
        return self.out_proj(out.movedim(1, -2).flatten(-2))

    def forward(self, x: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
        if self.runs_on_triton(x):  # q, k, v as the projection lays them out
            qkv = self.qkv_proj(x).unflatten(-1, (3, self.num_heads, -1))
            return self.merge(kernels().window(qkv, self.width, self.causal, padding_mask).transpose(1, 2))
        return self.merge(L.window(*self.qkv(x), self.width, self.causal, padding_mask))

    def step(self, x: Tensor, state: Optional[State], padding_mask: Optional[Tensor]) -> Tuple[Tensor, State]:
        if self.runs_on_triton(x) and not torch.is_grad_enabled():  # heads scaled
            out, state = kernels().window_step(*self.qkv(x), state, self.width, padding_mask, self.head_weight)
            return self.project(out), state
        out, state = L.window_step(*self.qkv(x), state, self.width, padding_mask)
        return self.merge(out), state

    def runs_on_triton(self, x: Tensor) -> bool:
        """Whether the window runs on ops.local_triton's kernels (--local-backend; in float32,
        bfloat16, float16): the parallel form and the decoding step (which scales the heads
        too); `triton` where they cannot run is one line naming why."""
        return on_kernels("local_backend", self.local_backend, x)

    def upgrade_state_dict_named(self, state_dict, name: str):
        """fairseq's loading hook: q_proj, k_proj and v_proj kept apart load into qkv_proj."""
        load_apart(state_dict, name)


def kernels():
    """ops.local_triton, the window's kernels (imported here: it needs Triton)."""
    from ..ops import local_triton
    return local_triton
