"""The contract every linear attention family implements.

A family's attention is one module class deriving from ``LinearAttention``,
named in its ``families.Family`` record. The base class speaks fairseq's
``MultiheadAttention`` call signature (time-major tensors, ``key_padding_mask``,
``incremental_state``, ``static_kv``; returns ``(output, None)``), so it drops
into ``TransformerEncoderLayerBase`` / ``TransformerDecoderLayerBase`` through
their ``build_self_attention`` / ``build_encoder_attention`` hooks.

It owns the incremental state (``IncrementalState``). A family fills in four
computations, all batch-first:

* ``summarize(source, padding_mask) -> state`` and ``read(x, state) -> out``:
  the non-causal form (encoder self-attention; cross-attention, whose state
  is computed once per source and cached while decoding).
* ``causal_parallel(x, padding_mask) -> out``: the causal training form.
* ``step(x_t, state, padding_mask_t) -> (out_t, state)``: one decoding step.

A state's size may not depend on the prefix length. While decoding, a
cross-attention summarizes each distinct source row once: beam search hands it
one copy of the source per hypothesis.

A module's keyword arguments are its family's option names (the fields of the
family's options dataclass); ``build_attention`` reads them from a model config.
"""
import dataclasses
from typing import Dict, List, Optional, Tuple

import torch
from fairseq.incremental_decoding_utils import with_incremental_state
from torch import Tensor, nn

from .. import families
from ..errors import ConfigError
from ..families import Family, Problem
from .backends import TRITON_BACKENDS
from .incremental import IncrementalState, State, select_rows
from .local import ShortConv, SlidingWindow

ROLES = ("encoder_self", "decoder_self", "cross")


def is_positive_int(value) -> bool:
    return is_int(value) and value >= 1


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def first_problem(rules) -> List[Problem]:
    """The first of (option, value, check, why) whose check fails, as a one-item
    list (later rules may assume the earlier ones hold), or []. A family's
    `problems` (its record) lists its rules once: its module raises on them,
    its models name the command-line options."""
    for name, value, ok, why in rules:
        if not ok():
            return [(name, value, why)]
    return []


def local_problems(options: dict) -> List[Problem]:
    """The values --short-conv, --local-window and --local-backend cannot take (0: off)."""
    K, W, backend = options.get("short_conv", 0), options.get("local_window", 0), options.get("local_backend", "auto")
    return first_problem((
        ("short_conv", K, lambda: is_int(K) and K >= 0, "must be an integer >= 0 (0: no convolution)"),
        ("local_window", W, lambda: is_int(W) and W >= 0, "must be an integer >= 0 (0: no window)"),
        ("local_backend", backend, lambda: backend in TRITON_BACKENDS, f"choose from {', '.join(TRITON_BACKENDS)}"),
    ))


@with_incremental_state
class LinearAttention(IncrementalState, nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, *, causal: bool = False, cross: bool = False,
                 short_conv: int = 0, local_window: int = 0, local_backend: str = "auto"):
        """short_conv, local_window, local_backend: local precision for a self-attention
        (modules/local.py; 0: off); cross-attention takes neither."""
        super().__init__()
        if embed_dim < 1 or num_heads < 1 or embed_dim % num_heads != 0:
            raise ConfigError(
                f"{type(self).__name__}: num_heads={num_heads} must be a positive divisor "
                f"of embed_dim={embed_dim}"
            )
        if causal and cross:
            raise ConfigError("cross-attention cannot be causal")
        local = {"short_conv": short_conv, "local_window": local_window, "local_backend": local_backend}
        for name, value, why in local_problems(local):
            raise ConfigError(f"{type(self).__name__}: {name}={value!r} {why}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.causal = causal
        self.encoder_decoder_attention = cross
        self.short_conv = ShortConv(embed_dim, short_conv, causal) if short_conv and not cross else None
        self.window = (SlidingWindow(embed_dim, num_heads, local_window, causal, local_backend)
                       if local_window and not cross else None)

    # -- what a family implements (batch-first tensors) --------------------
    def summarize(self, source: Tensor, padding_mask: Optional[Tensor]) -> State:
        raise NotImplementedError

    def read(self, x: Tensor, state: State) -> Tensor:
        raise NotImplementedError

    def causal_parallel(self, x: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
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
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.to(torch.bool)
        if incremental_state is not None and self.causal and not self.encoder_decoder_attention:
            return self._decode(query, key_padding_mask, incremental_state), None  # steps on time-major rows
        x = query.transpose(0, 1)
        if self.encoder_decoder_attention:
            out = self._cross(x, key, key_padding_mask, incremental_state)
        else:
            out = self._self(x, key_padding_mask)
        weights = None
        if self.encoder_decoder_attention and need_weights and self.alignment:
            weights = self.attention_weights(x, key.transpose(0, 1), key_padding_mask).float()
            weights = weights.transpose(0, 1) if need_head_weights else weights.mean(1)  # as MultiheadAttention
        return out.transpose(0, 1), weights

    def _self(self, x: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
        """Self-attention over the whole input: the family's form, with local precision."""
        if self.short_conv is not None:
            x = self.short_conv(x, padding_mask)
        if self.causal:
            out = self.causal_parallel(x, padding_mask)
        else:
            out = self.read(x, self.summarize(x, padding_mask))
        return out if self.window is None else out + self.window(x, padding_mask).to(out.dtype)

    LOCAL = ("local_conv", *(f"local_{name}" for name in SlidingWindow.STATE))  # the state entries of local precision

    def decode_step(self, x: Tensor, state: State, padding_mask: Optional[Tensor]) -> Tuple[Tensor, State]:
        """One decoding step: the family's `step`, with local precision."""
        if self.short_conv is None and self.window is None:
            return self.step(x, state, padding_mask)
        own = {name: value for name, value in state.items() if name not in self.LOCAL}
        local = {}
        if self.short_conv is not None:
            x, local["local_conv"] = self.short_conv.step(x, state.get("local_conv"), padding_mask)
        out, own = self.step(x, own, padding_mask)
        if self.window is not None:
            window = {name: state[f"local_{name}"] for name in SlidingWindow.STATE} if "local_k" in state else None
            extra, window = self.window.step(x, window, padding_mask)
            out = out + extra.to(out.dtype)
            local.update({f"local_{name}": value for name, value in window.items()})
        return out, {**own, **local}

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

# -- building a family's attention from a model config ------------------------
def attention_kind(cfg, role: str) -> str:
    """The option ``--{role}-attn`` (e.g. --decoder-self-attn); "softmax" if absent."""
    return str(getattr(cfg, f"{role}_attn", "softmax"))


def option_names(family: Family) -> Tuple[str, ...]:
    """The module's keyword arguments: its per-role options (--<role>-<name>), the
    family's other option fields (the --*-attn choices aside), and the fairseq
    options it reads."""
    fields = () if family.options is None else dataclasses.fields(family.options)
    per_role = tuple(f"{role}_" for role in ROLES)
    own = tuple(f.name for f in fields if not f.name.endswith("_attn") and not f.name.startswith(("_", *per_role)))
    return family.role_options + own + family.shared_options


def option_flag(family: Family, name: str, role: str) -> str:
    """The configuration field that holds module argument `name` for `role`."""
    return f"{role}_{name}" if name in family.role_options else name


def module_options(family: Family, cfg, role: str, **given) -> Dict[str, object]:
    """The keyword arguments of `family`'s module for `role`: `given`, else the
    model config's value, else the family's options dataclass default."""
    defaults = {} if family.options is None else {
        f.name: f.default for f in dataclasses.fields(family.options) if f.default is not dataclasses.MISSING}
    out = {}
    for name in option_names(family):
        flag = option_flag(family, name, role)
        out[name] = given[name] if name in given else getattr(cfg, flag, defaults.get(flag))
    return out


def named_problems(family: Family, options: dict, role: str, embed_dim: int, width: str) -> List[Problem]:
    """family.problems with each option named as its configuration field."""
    found = local_problems(options)
    if family.problems is not None:
        found += family.problems(options, embed_dim=embed_dim, width=width)
    return [(option_flag(family, name, role), value, why) for name, value, why in found[:1]]


def family_of(cfg, role: str) -> Optional[Family]:
    """The family behind --{role}-attn, or None for softmax."""
    kind = attention_kind(cfg, role)
    if kind == "softmax":
        return None
    if kind not in families.FAMILIES:
        option = "--" + f"{role}_attn".replace("_", "-")
        raise ConfigError(f"{option}={kind!r} is not a known attention; choose from softmax, "
                          f"{', '.join(families.FAMILIES)}")
    return families.FAMILIES[kind]


def build_attention(
    cfg, role: str, embed_dim: int, num_heads: int, kv_dim: Optional[int] = None, kind: Optional[str] = None,
    **given,
) -> Optional[nn.Module]:
    """The linear attention module for `role` (of family `kind`, else --{role}-attn),
    or None where the role keeps softmax. `given` options override the config's."""
    family = families.get(kind) if kind else family_of(cfg, role)
    if family is None:
        return None
    return family.attention(embed_dim, num_heads, kv_dim=kv_dim or embed_dim, causal=role == "decoder_self",
                            cross=role == "cross", **module_options(family, cfg, role, **given))
