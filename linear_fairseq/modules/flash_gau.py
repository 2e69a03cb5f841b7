"""FLASH's gated attention unit (GAU) and the fairseq layers built from it.

"Transformer Quality in Linear Time" (arXiv 2202.10447). A GAU replaces both
attention and feed-forward network of a transformer layer:

    n = norm(x);  U = SiLU(n W_u), V = SiLU(n W_v)  (width e = 2d)
    Z = SiLU(n W_z)  (width s = 128), shared by four per-dim scale+offset heads
    q, k, q', k' = Z * gamma_i + beta_i  (RoPE on each)
    out = x + (U * A(q, k, q', k', V)) W_o

with A the mixed chunk attention of ``ops.flash`` (or FLASH-Quad's full
relu^2 attention). Single head. The unit keeps fairseq's incremental-state
contract (``IncrementalState``): the decode state is bounded by the chunk size G.

The encoder-decoder decoder layer adds a pre-norm cross-attention over the
encoder output: by default the kernel family's attention with phi = elu + 1,
whose summary (S, z) is computed once per source and cached, so a decode step
does not depend on the source length; or fairseq's softmax attention
(--cross-attn softmax).
"""
import logging
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq.incremental_decoding_utils import with_incremental_state
from fairseq.modules import LayerNorm, MultiheadAttention
from torch import Tensor, nn

from ..errors import ConfigError
from ..families import Problem
from ..ops import flash as ops
from .attention import build_attention, first_problem, is_number, is_positive_int
from .backends import TRITON_BACKENDS, on_kernels, say_once
from .incremental import IncrementalState, State
from .projections import load_apart, stacked


class ScaleNorm(nn.Module):
    """x / |x| * g, one learned scalar g (Nguyen & Salazar 2019), FLASH's default norm."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.g = nn.Parameter(torch.tensor(float(dim) ** 0.5))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return ops.scale_norm(x, self.g, self.eps)


class OffsetScale(nn.Module):
    """`heads` cheap transforms of one shared Z: Z * gamma_h + beta_h, per dimension."""

    def __init__(self, dim: int, heads: int, gamma_mean: float = 0.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.empty(heads, dim))
        self.beta = nn.Parameter(torch.zeros(heads, dim))
        nn.init.normal_(self.gamma, mean=gamma_mean, std=0.02)

    def forward(self, z: Tensor) -> Tensor:
        """(..., s) -> (..., heads, s), in Z's precision (under autocast Z is half, the
        parameters float32), the precision the attention multiplies the heads in."""
        return torch.addcmul(self.beta.to(z.dtype), z.unsqueeze(-2), self.gamma.to(z.dtype))


def build_norm(kind: str, dim: int) -> nn.Module:
    return ScaleNorm(dim) if kind == "scalenorm" else LayerNorm(dim)


GAU_CHOICES = {"gau_attention": ("mixed", "quadratic"), "gau_norm": ("scalenorm", "layernorm"),
               "gau_scale_init": ("paper", "unit"), "gau_relu2_norm": ops.RELU2_NORMS,
               "gau_backend": TRITON_BACKENDS}


def gau_problems(options: dict, embed_dim: int, width: str = "d") -> List[Problem]:
    """The first value a GAU of width `embed_dim` cannot take (see first_problem;
    `width`: how the message names the width)."""
    o, d = options, embed_dim
    s, expansion, chunk = o["gau_s"], o["gau_expansion"], o["gau_chunk_size"]
    return first_problem((
        ("gau_chunk_size", chunk, lambda: is_positive_int(chunk), "must be a positive integer"),
        ("gau_s", s, lambda: is_positive_int(s), "must be a positive integer"),
        ("gau_expansion", expansion, lambda: is_number(expansion) and expansion > 0, "must be > 0"),
        ("gau_s", s, lambda: s <= d, f"must be <= {width}={d}"),  # rules across values after those of one
        ("gau_s", s, lambda: o["no_rope"] or s % 2 == 0, "must be even with RoPE (or turn RoPE off: --no-rope)"),
        ("gau_expansion", expansion, lambda: round(expansion * d) >= 1,
         f"gives width e={round(expansion * d)} at {width}={d}; it must be >= 1"),
        *((name, o[name], lambda name=name, allowed=allowed: o[name] in allowed, f"choose from {', '.join(allowed)}")
          for name, allowed in GAU_CHOICES.items()),
        ("gau_backend", o["gau_backend"], lambda: o["gau_backend"] != "triton" or o["gau_attention"] == "mixed",
         "decodes mixed chunk attention only (FLASH-Quad keeps every key): --gau-backend auto or torch"),
        ("gau_backend", o["gau_backend"], lambda: o["gau_backend"] != "triton" or s % 2 == 0,
         f"needs an even gau_s, not {s}: --gau-backend auto or torch"),
    ))


def fused_step():
    """The mixed chunk decoding step in one Triton kernel (ops.flash_triton, imported here: it needs Triton)."""
    from ..ops.flash_triton import gau_step
    return gau_step


def chunk_kernels():
    """ops.mixed_chunk_triton, the causal unit's training kernels (imported here: it needs Triton)."""
    from ..ops import mixed_chunk_triton
    return mixed_chunk_triton


@with_incremental_state
class GatedAttentionUnit(IncrementalState, nn.Module):
    def __init__(
        self,
        dim: int,
        *,
        causal: bool,
        gau_attention: str,
        gau_chunk_size: int,
        gau_s: int,
        gau_expansion: float,
        gau_norm: str,
        no_rope: bool,
        gau_rel_pos_bias: bool,
        gau_scale_init: str,
        gau_relu2_norm: str,
        gau_backend: str,
        dropout: float,
    ):
        """The options as models/flash.py's dataclass names them (and where their
        defaults live), every one required."""
        super().__init__()
        options = dict(gau_attention=gau_attention, gau_chunk_size=gau_chunk_size, gau_s=gau_s,
                       gau_expansion=gau_expansion, gau_norm=gau_norm, no_rope=no_rope,
                       gau_scale_init=gau_scale_init, gau_relu2_norm=gau_relu2_norm, gau_backend=gau_backend)
        for name, value, why in gau_problems(options, dim):
            raise ConfigError(f"GatedAttentionUnit: {name}={value!r} {why}")
        self.embed_dim, self.causal = dim, causal
        self.s, self.e, self.chunk_size = gau_s, int(round(gau_expansion * dim)), gau_chunk_size
        self.mode, self.rope, self.relu2_norm = gau_attention, not no_rope, gau_relu2_norm
        self.gau_backend = gau_backend
        self.norm = build_norm(gau_norm, dim)
        to_uv, to_z = nn.Linear(dim, 2 * self.e), nn.Linear(dim, self.s)
        # gamma ~ N(0, 0.02) as in the paper, or N(1, 0.02): q = k = Z at the start (--gau-scale-init)
        self.offset_scale = OffsetScale(self.s, 4 if self.mode == "mixed" else 2,
                                        1.0 if gau_scale_init == "unit" else 0.0)
        self.rel_bias = nn.Parameter(torch.zeros(2 * gau_chunk_size - 1)) if gau_rel_pos_bias else None
        self.to_out = nn.Linear(self.e, dim)
        self.dropout_p = dropout
        self.to_uvz = stacked(to_uv, to_z)  # U, V and Z from one matrix product (modules/projections.py)

    @property
    def options(self) -> dict:
        """The keyword options every ops form takes."""
        return {"chunk_size": self.chunk_size, "relu2_norm": self.relu2_norm}

    def activated(self, uvz: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """U, V and Z from their projection: its SiLU, split."""
        return F.silu(uvz).split((self.e, self.e, self.s), dim=-1)

    def queries_keys(self, z: Tensor, positions: Optional[Tensor]):
        """The heads of Z (..., s), turned by RoPE at `positions` ((B, T) or (B,));
        None: 0 .. T-1 along Z's time axis (dim 1), the turns from a cached table."""
        qk = self.offset_scale(z)  # (..., heads, s): all heads turn by the same positions
        if self.rope:
            qk = ops.rope(qk, positions.unsqueeze(-1)) if positions is not None \
                else ops.rotate(qk, ops.first_turns(z.shape[1], self.s, z.device).unsqueeze(-2))
        return qk.unbind(dim=-2)

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None, incremental_state=None) -> Tensor:
        """x: (T, B, d) -> x + GAU(x), time-major like fairseq's layers."""
        if padding_mask is not None:
            padding_mask = padding_mask.to(torch.bool)
        if incremental_state is not None and self.causal:
            out = self._decode(x, padding_mask, incremental_state)  # steps on time-major rows
        else:
            out = self.parallel(x.transpose(0, 1), padding_mask).transpose(0, 1)
        if self.training:
            out = F.dropout(out, self.dropout_p)
        return x + out

    def parallel(self, h: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
        uvz = self.to_uvz(self.norm(h))
        if self.mode == "mixed" and ops.from_z_computes(h.shape[1], self.chunk_size, self.causal, padding_mask,
                                                        self.rel_bias):
            return self.to_out(self.from_z(h, uvz, padding_mask))
        u, v, z = self.activated(uvz)
        positions = None if padding_mask is None else ops.real_positions(padding_mask, *h.shape[:2], h.device)
        qk = self.queries_keys(z, positions)
        if self.mode == "mixed":
            a = ops.mixed_chunk(*qk, v, self.causal, padding_mask, self.rel_bias, **self.options)
        else:
            a = ops.quadratic(*qk, v, self.causal, padding_mask, self.rel_bias, **self.options)
        return self.to_out(u * a.to(u.dtype))

    def from_z(self, h: Tensor, uvz: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
        """SiLU(U) times mixed chunk attention from SiLU(Z) (ops.flash.from_z), given their
        projection: a causal pass on the Triton kernels where the unit runs on them
        (runs_on_triton: on the projection, whose dtype autocast may have changed)."""
        gamma, beta = self.offset_scale.gamma, self.offset_scale.beta
        fused = self.causal and self.runs_on_triton(uvz)
        tiles = self.kernel_tiles(uvz) if fused else None
        if tiles:
            return chunk_kernels().gated(uvz, gamma, beta, self.rope, e=self.e, **self.options, tiles=tiles)
        u, v, z = self.activated(uvz)
        mask = None if self.causal else padding_mask  # a causal row is padded at its end: no mask needed
        return u * ops.from_z(z, gamma, beta, v, self.causal, self.rope, mask, **self.options).to(u.dtype)

    def step(self, h: Tensor, state: State, padding_mask: Optional[Tensor]) -> Tuple[Tensor, State]:
        uvz = self.to_uvz(self.norm(h))
        if self.runs_on_triton(h) and not torch.is_grad_enabled():  # the SiLU and the split in the kernel
            ua, state = fused_step()(uvz, self.offset_scale.gamma, self.offset_scale.beta, state or None,
                                     padding_mask, self.rel_bias, e=self.e, rope=self.rope, **self.options)
            return self.to_out(ua), state
        u, v, z = self.activated(uvz)
        if self.mode == "quadratic":
            return self._quadratic_step(u, v, z, state, padding_mask)
        if not state:
            state = ops.empty_state(h.shape[0], self.chunk_size, self.s, self.e, v)
        qk = self.queries_keys(z, state["position"])
        a, state = ops.causal_step(*qk, v, state, padding_mask, self.rel_bias, **self.options)
        return self.to_out(u * a.to(u.dtype)), state

    def runs_on_triton(self, h: Tensor) -> bool:
        """Whether mixed chunk attention runs on Triton kernels (--gau-backend): the decoding
        step on ops.flash_triton's, the causal parallel pass on ops.mixed_chunk_triton's;
        `triton` where they cannot run is one line naming why."""
        if self.mode != "mixed" or self.s % 2:  # --gau-backend triton there: refused when built
            return False
        return on_kernels("gau_backend", self.gau_backend, h)

    def kernel_tiles(self, uvz: Tensor):
        """The tiles the training kernels run with on this GPU at the unit's sizes (ops.mixed_chunk_triton.
        fitted, which times them there once and is told here once), or None where none runs: then
        `triton` is one line naming why and `auto` trains on torch, saying so once."""
        fit = self.kernel_fit(uvz.device, uvz.dtype)
        if fit.why and self.gau_backend == "triton":
            raise ConfigError(f"--gau-backend triton: {fit.why}; a smaller --gau-s, or --gau-backend auto (then "
                              f"the unit trains on torch)")
        if fit.why:
            say_once(f"--gau-backend auto: {fit.why}; the unit trains on torch")
        elif fit.ms:
            say_once(f"FLASH's training kernels ({uvz.dtype}, gau_s={self.s}, e={self.e}) on this GPU: {fit.tiles}, "
                     f"the fastest pass of " + ", ".join(f"{t} ({ms:.2f} ms)" for t, ms in fit.ms), logging.INFO)
        return fit.tiles

    def kernel_fit(self, device: torch.device, dtype: torch.dtype):
        """ops.mixed_chunk_triton.fitted for the unit's sizes, on `device` in `dtype`."""
        return chunk_kernels().fitted(device, self.s, self.e, dtype, self.offset_scale.gamma.dtype, self.rope,
                                      **self.options)

    def upgrade_state_dict_named(self, state_dict, name: str):
        """fairseq's loading hook: to_uv and to_z kept apart load into to_uvz."""
        load_apart(state_dict, name, ("to_uv", "to_z"), "to_uvz")

    def reorder_state(self, state: State, new_order: Tensor, spare: Optional[State] = None) -> State:
        if self.mode == "quadratic":
            return super().reorder_state(state, new_order, spare)
        return ops.reorder(state, new_order, self.chunk_size, spare)

    def _quadratic_step(self, u, v, z, state: State, padding_mask) -> Tuple[Tensor, State]:
        """FLASH-Quad decoding keeps every key and value (like softmax attention's cache)."""
        B = u.shape[0]
        real = torch.ones(B, dtype=torch.bool, device=u.device) if padding_mask is None else ~padding_mask
        n = state["n"] if state else torch.zeros(B, dtype=torch.long, device=u.device)
        q, k = self.queries_keys(z, n)
        keep = lambda name, x: x.unsqueeze(1) if not state else torch.cat([state[name], x.unsqueeze(1)], 1)  # noqa: E731
        keys, values, pos, mask = keep("k", k), keep("v", v), keep("pos", n), keep("pad", ~real)
        bias = ops.offset_bias(self.rel_bias, n[:, None] - pos)
        scores = ops.relu2(q.unsqueeze(1), keys, None if bias is None else bias.unsqueeze(1))
        seen = (~mask).sum(-1, keepdim=True).to(scores.dtype)
        divisor = ops.relu2_divisor(self.relu2_norm, self.chunk_size, seen)
        a = (scores.masked_fill(mask.unsqueeze(1), 0.0) @ values).squeeze(1) / divisor
        state = {"k": keys, "v": values, "pos": pos, "pad": mask, "n": n + real.long()}
        return self.to_out(u * a.to(u.dtype)), state


class GAUEncoderLayer(nn.Module):
    """One non-causal GAU; called like fairseq's TransformerEncoderLayerBase.
    `options`: the GAU's keyword arguments."""

    def __init__(self, cfg, options: dict, return_fc: bool = False):
        super().__init__()
        self.gau = GatedAttentionUnit(cfg.encoder.embed_dim, causal=False, **options)

    def forward(self, x, encoder_padding_mask: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None):
        return self.gau(x, encoder_padding_mask)

    def upgrade_state_dict_named(self, state_dict, name):
        pass


def build_cross_attention(cfg, dim: int) -> nn.Module:
    """--cross-attn: kernel (the kernel family's attention with phi = elu + 1) or
    softmax (fairseq's MultiheadAttention, as its decoder layers build it); both
    cache what they need of the source in the incremental state."""
    heads, source_dim = cfg.decoder.attention_heads, cfg.encoder.embed_dim
    if str(cfg.cross_attn) == "softmax":
        return MultiheadAttention(dim, heads, kdim=source_dim, vdim=source_dim, dropout=cfg.attention_dropout,
                                  encoder_decoder_attention=True)
    return build_attention(cfg, "cross", dim, heads, kv_dim=source_dim, kind="performer", feature_map="elu")


class GAUDecoderLayer(nn.Module):
    """A causal GAU, then (encoder-decoder models) cross-attention over the
    encoder output; called like fairseq's TransformerDecoderLayerBase."""

    def __init__(self, cfg, options: dict, no_encoder_attn: bool = False):
        super().__init__()
        dim = cfg.decoder.embed_dim
        self.gau = GatedAttentionUnit(dim, causal=True, **options)
        self.cross_attn = None
        if not no_encoder_attn:
            self.cross_norm = build_norm(options["gau_norm"], dim)
            self.cross_attn = build_cross_attention(cfg, dim)
            self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x,
        encoder_out: Optional[Tensor] = None,
        encoder_padding_mask: Optional[Tensor] = None,
        incremental_state=None,
        prev_self_attn_state=None,
        prev_attn_state=None,
        self_attn_mask: Optional[Tensor] = None,
        self_attn_padding_mask: Optional[Tensor] = None,
        need_attn: bool = False,
        need_head_weights: bool = False,
    ):
        x = self.gau(x, self_attn_padding_mask, incremental_state)
        attn = None
        if self.cross_attn is not None and encoder_out is not None:
            h, attn = self.cross_attn(
                self.cross_norm(x), encoder_out, encoder_out, key_padding_mask=encoder_padding_mask,
                incremental_state=incremental_state, static_kv=True,
                need_weights=need_attn and self.alignment, need_head_weights=need_head_weights,
            )
            x = x + self.dropout(h)
        return x, attn, None

    alignment = False  # the cross-attention's weights are returned only for --print-alignment

    def make_generation_fast_(self, need_attn: bool = False, **kwargs):
        self.alignment = need_attn
