"""FLASH's gated attention unit (GAU) and the fairseq layers built from it.

"Transformer Quality in Linear Time" (arXiv 2202.10447). A GAU replaces both
attention and feed-forward network of a transformer layer:

    n = norm(x);  U = SiLU(n W_u), V = SiLU(n W_v)  (width e = 2d)
    Z = SiLU(n W_z)  (width s = 128), shared by four per-dim scale+offset heads
    q, k, q', k' = Z * gamma_i + beta_i  (RoPE on each)
    out = x + (U * A(q, k, q', k', V)) W_o

with A the mixed chunk attention of ``ops.flash`` (or FLASH-Quad's full
relu^2 attention). Single head. The unit keeps the LinearAttention contract's
incremental state: the decode state is bounded by the chunk size G.

The encoder-decoder decoder layer adds a pre-norm cross-attention over the
encoder output: by default kernel attention with phi = elu + 1, whose summary
(S, z) is computed once per source and cached (``PerformerAttention``,
cross=True), so a decode step does not depend on the source length; or
fairseq's softmax attention (--cross-attn softmax).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq.modules import LayerNorm, MultiheadAttention
from torch import Tensor, nn

from ..errors import ConfigError
from ..ops import flash as ops
from .attention import LinearAttention, State, first_problem, is_positive_int
from .layers import register_layers
from .performer_attention import PerformerAttention


class ScaleNorm(nn.Module):
    """x / |x| * g, one learned scalar g (Nguyen & Salazar 2019), FLASH's default norm."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.g = nn.Parameter(torch.tensor(float(dim) ** 0.5))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return x / x.norm(dim=-1, keepdim=True).clamp(min=self.eps) * self.g


class OffsetScale(nn.Module):
    """`heads` cheap transforms of one shared Z: Z * gamma_h + beta_h, per dimension."""

    def __init__(self, dim: int, heads: int, gamma_mean: float = 0.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.empty(heads, dim))
        self.beta = nn.Parameter(torch.zeros(heads, dim))
        nn.init.normal_(self.gamma, mean=gamma_mean, std=0.02)

    def forward(self, z: Tensor) -> Tensor:
        """(..., s) -> (..., heads, s)"""
        return z.unsqueeze(-2) * self.gamma + self.beta


def build_norm(kind: str, dim: int) -> nn.Module:
    return ScaleNorm(dim) if kind == "scalenorm" else LayerNorm(dim)


def gau_problems(dim: int, *, s, expansion, chunk_size, rope: bool, mode, norm, scale_init, relu2_norm,
                 width: str = "d") -> list:
    """(option, value, why) for each value a GAU of width `dim` cannot take: the
    one home of these rules. The unit raises on the first; the FLASH models
    check them as options, naming the command-line flags (`width`: how the
    message names `dim`)."""
    rules = (
        ("chunk_size", chunk_size, lambda: is_positive_int(chunk_size), "must be a positive integer"),
        ("s", s, lambda: is_positive_int(s), "must be a positive integer"),
        ("expansion", expansion, lambda: expansion > 0, "must be > 0"),
        ("s", s, lambda: s <= dim, f"must be <= {width}={dim}"),  # rules across values after those of one
        ("s", s, lambda: not rope or s % 2 == 0, "must be even with RoPE (or turn RoPE off: --no-rope)"),
        ("expansion", expansion, lambda: round(expansion * dim) >= 1,
         f"gives width e={round(expansion * dim)} at {width}={dim}; it must be >= 1"),
        ("mode", mode, lambda: mode in ("mixed", "quadratic"), "choose mixed or quadratic"),
        ("norm", norm, lambda: norm in ("scalenorm", "layernorm"), "choose scalenorm or layernorm"),
        ("scale_init", scale_init, lambda: scale_init in ("paper", "unit"), "choose paper or unit"),
        ("relu2_norm", relu2_norm, lambda: relu2_norm in ops.RELU2_NORMS, f"choose from {', '.join(ops.RELU2_NORMS)}"),
    )
    return first_problem(rules)


class GatedAttentionUnit(LinearAttention):
    def __init__(
        self,
        dim: int,
        *,
        causal: bool,
        s: int,
        expansion: float,
        chunk_size: int,
        mode: str,
        rope: bool,
        rel_pos_bias: bool,
        norm: str,
        dropout: float,
        scale_init: str,
        relu2_norm: str,
    ):
        """Every option is required: the defaults live in the model options
        (linear_fairseq/models/flash.py, FlashOptions)."""
        super().__init__(dim, 1, causal=causal)
        e = int(round(expansion * dim))
        for name, value, why in gau_problems(dim, s=s, expansion=expansion, chunk_size=chunk_size, rope=rope,
                                             mode=mode, norm=norm, scale_init=scale_init, relu2_norm=relu2_norm):
            raise ConfigError(f"GatedAttentionUnit: {name}={value!r} {why}")
        self.s, self.e, self.chunk_size, self.mode, self.rope = s, e, chunk_size, mode, rope
        self.relu2_norm = relu2_norm
        self.norm = build_norm(norm, dim)
        self.to_uv = nn.Linear(dim, 2 * e)
        self.to_z = nn.Linear(dim, s)
        # gamma ~ N(0, 0.02) as in the paper, or N(1, 0.02): q = k = Z at the start (--gau-scale-init)
        self.offset_scale = OffsetScale(s, 4 if mode == "mixed" else 2, 1.0 if scale_init == "unit" else 0.0)
        self.rel_bias = nn.Parameter(torch.zeros(2 * chunk_size - 1)) if rel_pos_bias else None
        self.to_out = nn.Linear(e, dim)
        self.dropout = nn.Dropout(dropout)

    @property
    def options(self) -> dict:
        """The keyword options every ops form takes."""
        return {"chunk_size": self.chunk_size, "relu2_norm": self.relu2_norm}

    def gates(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """U, V (width e) and Z (width s) from the normalized input."""
        n = self.norm(x)
        u, v = F.silu(self.to_uv(n)).chunk(2, dim=-1)
        return u, v, F.silu(self.to_z(n))

    def queries_keys(self, z: Tensor, positions: Tensor):
        qk = self.offset_scale(z)  # (..., heads, s): all heads rotate by the same positions
        if self.rope:
            qk = ops.rope(qk, positions.unsqueeze(-1))
        return qk.unbind(dim=-2)

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None, incremental_state=None) -> Tensor:
        """x: (T, B, d) -> x + GAU(x), time-major like fairseq's layers."""
        h = x.transpose(0, 1)
        if padding_mask is not None:
            padding_mask = padding_mask.to(torch.bool)
        if incremental_state is not None and self.causal:
            out = self._decode(h, padding_mask, incremental_state)
        else:
            out = self.parallel(h, padding_mask)
        return x + self.dropout(out).transpose(0, 1)

    def parallel(self, h: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
        u, v, z = self.gates(h)
        positions = ops.real_positions(padding_mask, h.shape[0], h.shape[1], h.device)
        qk = self.queries_keys(z, positions)
        if self.mode == "mixed":
            a = ops.mixed_chunk(*qk, v, self.causal, padding_mask, self.rel_bias, **self.options)
        else:
            a = ops.quadratic(*qk, v, self.causal, padding_mask, self.rel_bias, **self.options)
        return self.to_out(u * a.to(u.dtype))

    def step(self, h: Tensor, state: State, padding_mask: Optional[Tensor]) -> Tuple[Tensor, State]:
        B = h.shape[0]
        u, v, z = self.gates(h)
        if self.mode == "quadratic":
            return self._quadratic_step(u, v, z, state, padding_mask)
        if not state:
            state = ops.empty_state(B, self.chunk_size, self.s, self.e, v)
        position = state["n_done"].long() + state["fill"]  # real tokens so far
        qk = self.queries_keys(z, position)
        a, state = ops.causal_step(*qk, v, state, padding_mask, self.rel_bias, **self.options)
        return self.to_out(u * a.to(u.dtype)), state

    def reorder_state(self, state: State, new_order: Tensor) -> State:
        if self.mode == "quadratic":
            return super().reorder_state(state, new_order)
        return ops.reorder(state, new_order)

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


def build_gau(cfg, dim: int, causal: bool) -> GatedAttentionUnit:
    """Options read from the model config: --gau-attention, --gau-s, --gau-expansion,
    --gau-chunk-size, --no-rope, --gau-rel-pos-bias, --gau-norm, --gau-scale-init,
    --gau-relu2-norm, --dropout."""
    return GatedAttentionUnit(
        dim,
        causal=causal,
        s=int(cfg.gau_s),
        expansion=float(cfg.gau_expansion),
        chunk_size=int(cfg.gau_chunk_size),
        mode=str(cfg.gau_attention),
        rope=not cfg.no_rope,
        rel_pos_bias=bool(cfg.gau_rel_pos_bias),
        norm=str(cfg.gau_norm),
        dropout=cfg.dropout,
        scale_init=str(cfg.gau_scale_init),
        relu2_norm=str(cfg.gau_relu2_norm),
    )


class GAUEncoderLayer(nn.Module):
    """One non-causal GAU; called like fairseq's TransformerEncoderLayerBase."""

    def __init__(self, cfg, return_fc: bool = False):
        super().__init__()
        self.gau = build_gau(cfg, cfg.encoder.embed_dim, causal=False)

    def forward(self, x, encoder_padding_mask: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None):
        return self.gau(x, encoder_padding_mask)

    def upgrade_state_dict_named(self, state_dict, name):
        pass


def build_cross_attention(cfg, dim: int) -> nn.Module:
    """--cross-attn: kernel (elu+1, PerformerAttention) or softmax (fairseq's
    MultiheadAttention, as its decoder layers build it); both cache what they
    need of the source in the incremental state."""
    heads, source_dim = cfg.decoder.attention_heads, cfg.encoder.embed_dim
    if str(cfg.cross_attn) == "softmax":
        return MultiheadAttention(dim, heads, kdim=source_dim, vdim=source_dim, dropout=cfg.attention_dropout,
                                  encoder_decoder_attention=True)
    return PerformerAttention(dim, heads, feature_map="elu", num_features=None, redraw_interval=0, gate=False,
                              chunk_size=1, eps=None, kv_dim=source_dim, cross=True)  # chunks: causal form only


class GAUDecoderLayer(nn.Module):
    """A causal GAU, then (encoder-decoder models) cross-attention over the
    encoder output; called like fairseq's TransformerDecoderLayerBase."""

    def __init__(self, cfg, no_encoder_attn: bool = False):
        super().__init__()
        dim = cfg.decoder.embed_dim
        self.gau = build_gau(cfg, dim, causal=True)
        self.cross_attn = None
        if not no_encoder_attn:
            self.cross_norm = build_norm(str(cfg.gau_norm), dim)
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


for _key in ("flash", "gau"):  # gau: the key's earlier name, in older checkpoints
    register_layers(_key, encoder=GAUEncoderLayer, decoder=GAUDecoderLayer)
