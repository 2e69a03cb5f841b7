"""The contract every linear attention family implements.

A family is one module class deriving from ``LinearAttention`` plus a builder
registered with ``register_attention``. The base class speaks fairseq's
``MultiheadAttention`` call signature (time-major tensors, ``key_padding_mask``,
``incremental_state``, ``static_kv``; returns ``(output, None)``), so it drops
into ``TransformerEncoderLayerBase`` / ``TransformerDecoderLayerBase`` through
their ``build_self_attention`` / ``build_encoder_attention`` hooks.

It owns the incremental state. A family fills in three computations, all
batch-first:

* ``summarize(source, padding_mask) -> state`` and ``read(x, state) -> out``:
  the non-causal form (encoder self-attention; cross-attention, whose state
  is computed once per source and cached while decoding).
* ``causal_parallel(x, padding_mask) -> out``: the causal training form.
* ``step(x_t, state, padding_mask_t) -> (out_t, state)``: one decoding step.

A state is a dict of tensors whose first dimension is the batch; its size may
not depend on the prefix length. ``reorder_incremental_state`` index-selects
every entry (``reorder_state``), which is all that beam search needs. While
decoding, a cross-attention summarizes each distinct source row once: beam
search hands it one copy of the source per hypothesis.
"""
from typing import Callable, Dict, List, Optional, Tuple

import torch
from fairseq.incremental_decoding_utils import with_incremental_state
from torch import Tensor, nn

from ..errors import ConfigError

State = Dict[str, Optional[Tensor]]
ROLES = ("encoder_self", "decoder_self", "cross")
Problem = Tuple[str, object, str]  # (option, value, why)


def is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def first_problem(rules) -> List[Problem]:
    """The first of (option, value, check, why) whose check fails, as a one-item
    list (later rules may assume the earlier ones hold), or []. A family's
    `<family>_problems` lists its rules once: its module raises on them, its
    models name the command-line options."""
    for name, value, ok, why in rules:
        if not ok():
            return [(name, value, why)]
    return []


@with_incremental_state
class LinearAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, *, causal: bool = False, cross: bool = False):
        super().__init__()
        if embed_dim < 1 or num_heads < 1 or embed_dim % num_heads != 0:
            raise ConfigError(
                f"{type(self).__name__}: num_heads={num_heads} must be a positive divisor "
                f"of embed_dim={embed_dim}"
            )
        if causal and cross:
            raise ConfigError("cross-attention cannot be causal")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.causal = causal
        self.encoder_decoder_attention = cross

    # -- what a family implements (batch-first tensors) --------------------
    def summarize(self, source: Tensor, padding_mask: Optional[Tensor]) -> State:
        raise NotImplementedError

    def read(self, x: Tensor, state: State) -> Tensor:
        raise NotImplementedError

    def causal_parallel(self, x: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
        raise NotImplementedError

    def step(self, x: Tensor, state: State, padding_mask: Optional[Tensor]) -> Tuple[Tensor, State]:
        raise NotImplementedError

    gives_weights = False  # whether attention_weights computes weights (else it says why not)

    def attention_weights(self, x: Tensor, source: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
        """The weight each query of x (B, T, C) gives each source position (B, n, C):
        (B, H, T, n), for fairseq-generate --print-alignment and calibration. A
        family whose attention has such weights computes them (gives_weights);
        the others say so."""
        raise ConfigError(f"--print-alignment: {type(self).__name__} has no weights over source positions, so "
                          "it gives no alignment; decode without --print-alignment, or use softmax cross-attention "
                          "(--cross-attn softmax)")

    # -- fairseq's generation hook: --print-alignment asks for the cross-attention weights
    alignment = False

    def make_generation_fast_(self, need_attn: bool = False, **kwargs):
        self.alignment = need_attn

    # -- fairseq's MultiheadAttention contract ----------------------------
    def forward(
        self,
        query: Tensor,
        key: Optional[Tensor] = None,
        value: Optional[Tensor] = None,
        key_padding_mask: Optional[Tensor] = None,
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
        need_weights: bool = False,
        static_kv: bool = False,
        attn_mask: Optional[Tensor] = None,
        before_softmax: bool = False,
        need_head_weights: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        # attn_mask is fairseq's future mask: causal families are causal by
        # construction, and encoders pass none. Attention weights are formed only
        # for --print-alignment (cross-attention; `alignment`).
        x = query.transpose(0, 1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.to(torch.bool)
        if self.encoder_decoder_attention:
            out = self._cross(x, key, key_padding_mask, incremental_state)
        elif not self.causal:
            out = self.read(x, self.summarize(x, key_padding_mask))
        elif incremental_state is None:
            out = self.causal_parallel(x, key_padding_mask)
        else:
            out = self._decode(x, key_padding_mask, incremental_state)
        weights = None
        if self.encoder_decoder_attention and need_weights and self.alignment:
            weights = self.attention_weights(x, key.transpose(0, 1), key_padding_mask).float()
            weights = weights.transpose(0, 1) if need_head_weights else weights.mean(1)  # as MultiheadAttention
        return out.transpose(0, 1), weights

    def _cross(self, x, source, padding_mask, incremental_state) -> Tensor:
        state = self._get_input_buffer(incremental_state)
        if not state:
            source = source.transpose(0, 1)
            if incremental_state is None:
                return self.read(x, self.summarize(source, padding_mask))
            state = self._summarize_distinct(source, padding_mask)
            self._set_input_buffer(incremental_state, state)
        return self.read(x, state)

    def _summarize_distinct(self, source: Tensor, padding_mask: Optional[Tensor]) -> State:
        """summarize(), computed once for each run of equal consecutive rows
        (source and padding) and copied to the run's rows."""
        same = (source[1:] == source[:-1]).flatten(1).all(1)
        if padding_mask is not None:
            same &= (padding_mask[1:] == padding_mask[:-1]).all(1)
        if not bool(same.any()):
            return self.summarize(source, padding_mask)
        first = torch.cat([same.new_ones(1), ~same])
        rows = first.cumsum(0) - 1
        return select_rows(self.summarize(source[first], None if padding_mask is None else padding_mask[first]), rows)

    def _decode(self, x, padding_mask, incremental_state) -> Tensor:
        state = self._get_input_buffer(incremental_state)
        # fairseq feeds one token per step; longer inputs are stepped through.
        T = x.size(1)
        if padding_mask is not None:
            padding_mask = padding_mask[:, -T:]
        outs = []
        for t in range(T):
            mask_t = None if padding_mask is None else padding_mask[:, t]
            out_t, state = self.step(x[:, t], state, mask_t)
            outs.append(out_t)
        self._set_input_buffer(incremental_state, state)
        return outs[0].unsqueeze(1) if T == 1 else torch.stack(outs, dim=1)

    # -- incremental state helpers (as in fairseq's MultiheadAttention) ----
    def _get_input_buffer(self, incremental_state) -> State:
        result = self.get_incremental_state(incremental_state, "attn_state")
        return result if result is not None else {}

    def _set_input_buffer(self, incremental_state, buffer: State):
        return self.set_incremental_state(incremental_state, "attn_state", buffer)

    @torch.jit.export
    def reorder_incremental_state(self, incremental_state, new_order: Tensor):
        """Follow beam search: reorder every state tensor along the batch dimension.
        fairseq reorders after every step, greedy search included; an identity
        order is skipped, so a step can keep writing into the state it owns.
        A cross-attention state is reordered only when the batch shrinks (a
        sentence finished): until then beam search moves rows within a sentence,
        whose rows all hold the same summary of its source (as fairseq's
        MultiheadAttention skips its static key/value cache)."""
        buffer = self._get_input_buffer(incremental_state)
        if buffer and self.encoder_decoder_attention and batch_size(buffer) == new_order.numel():
            return incremental_state
        if buffer and not is_identity(new_order, buffer):
            incremental_state = self._set_input_buffer(incremental_state, self.reorder_state(buffer, new_order))
        return incremental_state

    def reorder_state(self, state: State, new_order: Tensor) -> State:
        """The state's rows in `new_order`; a family whose state has slots it
        never reads overrides this to move less."""
        return select_rows(state, new_order)


def select_rows(state: State, rows: Tensor) -> State:
    """Every state tensor's rows `rows` (batch dimension first)."""
    return {name: None if value is None else value.index_select(0, rows) for name, value in state.items()}


def batch_size(state: State) -> int:
    return next(v.shape[0] for v in state.values() if v is not None)


def is_identity(new_order: Tensor, state: State) -> bool:
    """True when `new_order` is 0..B-1 over a state of batch size B."""
    n = new_order.numel()
    return n == batch_size(state) and bool((new_order == torch.arange(n, device=new_order.device)).all())


# -- family registry ------------------------------------------------------
# A builder receives the model's config (fairseq TransformerConfig carrying the
# family's own options as attributes), the role, and the sizes.
Builder = Callable[..., nn.Module]
ATTENTION_FAMILIES: Dict[str, Builder] = {}


def register_attention(name: str):
    def wrap(builder: Builder) -> Builder:
        ATTENTION_FAMILIES[name] = builder  # idempotent: re-import replaces itself
        return builder

    return wrap


def attention_kind(cfg, role: str) -> str:
    """The option ``--{role}-attn`` (e.g. --decoder-self-attn); "softmax" if absent."""
    return str(getattr(cfg, f"{role}_attn", "softmax"))


def build_attention(
    cfg, role: str, embed_dim: int, num_heads: int, kv_dim: Optional[int] = None
) -> Optional[nn.Module]:
    """The linear attention module for ``role``, or None where the role keeps softmax."""
    kind = attention_kind(cfg, role)
    if kind == "softmax":
        return None
    if kind not in ATTENTION_FAMILIES:
        option = "--" + f"{role}_attn".replace("_", "-")
        raise ConfigError(
            f"{option}={kind!r} is not a known attention; "
            f"choose from softmax, {', '.join(sorted(ATTENTION_FAMILIES))}"
        )
    return ATTENTION_FAMILIES[kind](
        cfg, role=role, embed_dim=embed_dim, num_heads=num_heads, kv_dim=kv_dim or embed_dim
    )
