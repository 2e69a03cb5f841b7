"""MemSizer attention module (arXiv 2203.12644) behind the LinearAttention contract.

Keys are k learned memory slots Phi (per head); the source is written into a
(k x d) memory S = LN(X W_l)^T LN(X W_r) / sqrt(n). Heads share S and differ
only in how they address it ("lightweight multi-head"): the query's slot
weights are averaged over heads, so reading costs one head. There is no
output projection, as in the authors' implementation. A self-attention
computes x Phi^T, X W_l and X W_r as one matrix product (pkv_proj).
"""
from typing import List, Optional, Tuple

import torch
from fairseq.modules import LayerNorm
from torch import Tensor, nn

from ..errors import ConfigError
from ..ops import memsizer as M
from .attention import LinearAttention, Problem, State, first_problem, is_number, is_positive_int
from .backends import TRITON_BACKENDS, on_kernels
from .projections import load_apart, project_parts, stacked

PROJECTIONS = {"p": "phi", "k": "w_l", "v": "w_r"}  # a cross-attention's projections, by the part each gives


def memsizer_problems(options: dict, embed_dim: int = 0, width: str = "") -> List[Problem]:
    """The first value a MemSizer attention cannot take (see first_problem)."""
    k, q_scale, kv_scale, chunk, backend = (options[name] for name in (
        "memory_size", "q_init_scale", "kv_init_scale", "memsizer_chunk_size", "memsizer_backend"))
    return first_problem((
        ("memory_size", k, lambda: is_positive_int(k), "must be a positive integer"),
        ("q_init_scale", q_scale, lambda: is_number(q_scale) and q_scale > 0, "must be > 0"),
        ("kv_init_scale", kv_scale, lambda: is_number(kv_scale) and kv_scale > 0, "must be > 0"),
        ("memsizer_chunk_size", chunk, lambda: is_positive_int(chunk), "must be a positive integer"),
        ("memsizer_backend", backend, lambda: backend in TRITON_BACKENDS,
         f"choose from {', '.join(TRITON_BACKENDS)}"),
    ))


class MemsizerAttention(LinearAttention):
    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        memory_size: int,
        q_init_scale: float,
        kv_init_scale: float,
        memsizer_chunk_size: int,
        memsizer_backend: str = "auto",
        attention_dropout: float = 0.0,
        kv_dim: Optional[int] = None,
        causal: bool = False,
        cross: bool = False,
        **local,
    ):
        """The options as models/memsizer.py's dataclass names them (and where their
        defaults live); memory_size is the role's --<role>-memory-size.
        `local`: local precision's options (LinearAttention)."""
        super().__init__(embed_dim, num_heads, causal=causal, cross=cross, **local)
        options = dict(memory_size=memory_size, q_init_scale=q_init_scale, kv_init_scale=kv_init_scale,
                       memsizer_chunk_size=memsizer_chunk_size, memsizer_backend=memsizer_backend)
        for name, value, why in memsizer_problems(options):
            raise ConfigError(f"MemsizerAttention: {name}={value!r} {why}")
        kv_dim = kv_dim or embed_dim
        self.memory_size = memory_size
        self.chunk_size, self.memsizer_backend = memsizer_chunk_size, memsizer_backend
        phi = nn.Linear(embed_dim, num_heads * memory_size)  # key slots Phi_h, one set per head
        w_l = nn.Linear(kv_dim, memory_size)  # source -> keys K (n x k)
        w_r = nn.Linear(kv_dim, embed_dim)  # source -> values V (n x d)
        self.k_norm = LayerNorm(memory_size)
        self.v_norm = LayerNorm(embed_dim)
        self.dropout = nn.Dropout(attention_dropout)
        nn.init.xavier_uniform_(phi.weight, gain=q_init_scale**-0.5)
        nn.init.xavier_uniform_(w_l.weight, gain=kv_init_scale**-0.5)
        nn.init.xavier_uniform_(w_r.weight, gain=kv_init_scale**-0.5)
        for linear in (phi, w_l, w_r):
            nn.init.zeros_(linear.bias)
        self.widths = (num_heads * memory_size, memory_size, embed_dim)
        # self-attention projects one input: one matrix product (modules/projections.py)
        if cross:
            self.phi, self.w_l, self.w_r = phi, w_l, w_r
        else:
            self.pkv_proj = stacked(phi, w_l, w_r)

    def project(self, x: Tensor, names: str) -> Tuple[Tensor, ...]:
        """x's projections `names`, a run of "pkv": p the slot logits x Phi^T (all heads'),
        k = x W_l and v = x W_r before their norms; one matrix product of pkv_proj's rows
        in self-attention."""
        if self.encoder_decoder_attention:
            return tuple(getattr(self, PROJECTIONS[name])(x) for name in names)
        return project_parts(self.pkv_proj, x, self.widths, "pkv".index(names), len(names))

    def upgrade_state_dict_named(self, state_dict, name: str):
        """fairseq's loading hook: a self-attention's phi, w_l and w_r kept apart load into pkv_proj."""
        if not self.encoder_decoder_attention:
            load_apart(state_dict, name, tuple(PROJECTIONS.values()), "pkv_proj")

    def heads(self, logits: Tensor) -> Tensor:
        """The slot logits of each head h, x Phi_h^T: (..., H, k)."""
        return logits.unflatten(-1, (self.num_heads, self.memory_size))

    def slot_weights(self, logits: Tensor) -> Tensor:
        """p = mean_h softmax(x Phi_h^T), with attention dropout on the weights."""
        return self.dropout(M.slot_weights(self.heads(logits)))

    def keys_values(self, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        """K = LN(X W_l), V = LN(X W_r)."""
        return self.k_norm(k), self.v_norm(v)

    def summarize(self, source: Tensor, padding_mask: Optional[Tensor]) -> State:
        K, V = self.keys_values(*self.project(source, "kv"))
        return M.source_memory(K, V, padding_mask)

    def read(self, x: Tensor, state: State) -> Tensor:
        return M.read_memory(self.slot_weights(*self.project(x, "p")), state, x.dtype)

    def causal_parallel(self, x: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
        logits, k, v = self.project(x, "pkv")
        K, V = self.keys_values(k, v)
        return M.causal_chunked(self.slot_weights(logits), K, V, padding_mask, chunk_size=self.chunk_size)

    def attention_weights(self, x: Tensor, source: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
        raise ConfigError("--print-alignment: MemSizer's cross-attention reads k memory slots, not source "
                          "positions, so it gives no alignment; decode without --print-alignment, or use a model "
                          "with softmax cross-attention (--cross-attn softmax, the recommended placement)")

    def step(self, x: Tensor, state: State, padding_mask: Optional[Tensor]) -> Tuple[Tensor, State]:
        logits, k, v = self.project(x, "pkv")
        dropped = self.training and self.dropout.p > 0  # dropout acts on the heads' mean
        if not dropped and self.runs_on_triton(x) and not torch.is_grad_enabled():
            return kernel().causal_step(self.heads(logits), k, v, self.k_norm, self.v_norm, state or None,
                                        padding_mask)
        K, V = self.keys_values(k, v)
        p = self.slot_weights(logits) if dropped else M.slot_probs(self.heads(logits))  # the op averages the heads
        return M.causal_step(p, K, V, state or None, padding_mask)

    def runs_on_triton(self, x: Tensor) -> bool:
        """Whether the decoding step runs on ops.memsizer_triton's kernel (--memsizer-backend;
        in float32, bfloat16, float16); `triton` where it cannot run is one line naming why."""
        return on_kernels("memsizer_backend", self.memsizer_backend, x)


def kernel():
    """ops.memsizer_triton, the decoding step's kernel (imported here: it needs Triton)."""
    from ..ops import memsizer_triton
    return memsizer_triton
