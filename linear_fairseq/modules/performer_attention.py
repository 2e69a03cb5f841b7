"""Kernel attention module behind the LinearAttention contract: multi-head
attention with softmax(q k^T) replaced by phi(q) phi(k)^T, phi chosen by name.

  elu    elu(x) + 1 ("Transformers are RNNs", arXiv 2006.16236)
  favor  Performer FAVOR+ positive orthogonal random features (Choromanski et al., ICLR 2021)
  rfa    random Fourier (sin/cos) features, optional recency gate (Peng et al., ICLR 2021)
  t2r    learned feature map relu(W x + b) (Kasai et al., EMNLP 2021)

Random projections are buffers: saved in checkpoints and identical in eval
and after reloading. They are redrawn only in training, every
`redraw_interval` updates (0: never).
"""
import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..ops import performer as K
from .attention import LinearAttention, Problem, State, first_problem, is_number, is_positive_int, register_attention

FEATURE_MAPS = ("elu", "favor", "rfa", "t2r")


def default_num_features(feature_map: str, head_dim: int) -> int:
    """elu: none (phi has the head's width); favor: d ln d (Performer's choice);
    rfa: d sin/cos pairs; t2r: 32 (T2R's choice)."""
    return {"elu": head_dim, "favor": max(1, round(head_dim * math.log(max(head_dim, 2)))),
            "rfa": head_dim, "t2r": 32}[feature_map]


def default_eps(feature_map: str) -> float:
    """The normalizer's clamp, in true scale. rfa's sin/cos features can cancel to
    ~0 or below, and t2r's relu features can all vanish for a query (its
    gradient then grows like 1/phi(q).z): 1e-6 for both. elu + 1 and FAVOR+
    (largest feature 1/sqrt(m) after stabilization) never vanish: no clamp,
    which for them would only distort the ratio (only an empty sum is guarded)."""
    return 1e-6 if feature_map in ("rfa", "t2r") else 0.0


class EluFeatures(nn.Module):
    """Each feature module returns (phi(x), its log-scale or None)."""

    def forward(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        return K.elu_features(x), None


class RandomFeatures(nn.Module):
    """A random projection (m x d) kept as a buffer. In training it is redrawn
    every `redraw_interval` updates: fairseq's trainer calls set_num_updates
    after each. Redraw n comes from a generator seeded with (seed, n), seed a
    buffer too, so every distributed worker draws the same projection whatever
    its batches, --update-freq does not change the schedule, and a run resumed
    from a checkpoint draws what the uninterrupted run drew."""

    def __init__(self, head_dim: int, num_features: int, redraw_interval: int):
        super().__init__()
        self.head_dim, self.num_features, self.redraw_interval = head_dim, num_features, redraw_interval
        self.register_buffer("projection", self.draw(None))
        self.register_buffer("seed", torch.randint(2**31 - 1, (), dtype=torch.long))

    def draw(self, generator: Optional[torch.Generator]) -> Tensor:
        return K.orthogonal_gaussian(self.num_features, self.head_dim, generator)

    @torch.no_grad()
    def set_num_updates(self, num_updates: int) -> None:
        if self.training and self.redraw_interval > 0 and num_updates > 0 and num_updates % self.redraw_interval == 0:
            generator = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + num_updates)
            self.projection.copy_(self.draw(generator).to(self.projection))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "seed", self.seed.clone())  # checkpoints from before the seed buffer
        state_dict.pop(prefix + "training_calls", None)  # ... and with the per-forward counter
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class FavorFeatures(RandomFeatures):
    def forward(self, x):
        return K.favor_features(x, self.projection)


class RFAFeatures(RandomFeatures):
    def draw(self, generator: Optional[torch.Generator]) -> Tensor:
        return torch.randn(self.num_features, self.head_dim, generator=generator)  # w ~ N(0, I): Gaussian kernel, sigma = 1

    def forward(self, x):
        return K.rfa_features(x, self.projection), None


class T2RFeatures(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, num_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_heads, num_features, head_dim))
        self.bias = nn.Parameter(torch.zeros(num_heads, num_features))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x):
        return K.t2r_features(x, self.weight, self.bias), None


def performer_problems(*, feature_map, num_features, redraw_interval, chunk_size, eps) -> List[Problem]:
    """The values a kernel attention cannot take (see first_problem); None for
    num_features or eps stands for the feature map's own."""
    return first_problem((
        ("feature_map", feature_map, lambda: feature_map in FEATURE_MAPS, f"choose from {', '.join(FEATURE_MAPS)}"),
        ("num_features", num_features, lambda: num_features is None or is_positive_int(num_features),
         "must be a positive integer"),
        ("num_features", num_features, lambda: feature_map != "elu" or num_features is None,
         "elu has no features to choose (phi has the head's width)"),
        ("redraw_interval", redraw_interval,
         lambda: isinstance(redraw_interval, int) and not isinstance(redraw_interval, bool) and redraw_interval >= 0,
         "must be an integer >= 0"),
        ("eps", eps, lambda: eps is None or (is_number(eps) and eps >= 0), "must be >= 0"),
        ("chunk_size", chunk_size, lambda: is_positive_int(chunk_size), "must be a positive integer"),
    ))


class PerformerAttention(LinearAttention):
    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        feature_map: str,
        num_features: Optional[int],
        redraw_interval: int,
        gate: bool,
        chunk_size: int,
        eps: Optional[float],
        kv_dim: Optional[int] = None,
        causal: bool = False,
        cross: bool = False,
    ):
        """The options as the models' dataclasses define them (models/performer.py,
        where their defaults live); num_features and eps None: the feature map's own."""
        super().__init__(embed_dim, num_heads, causal=causal, cross=cross)
        for name, value, why in performer_problems(feature_map=feature_map, num_features=num_features,
                                                   redraw_interval=redraw_interval, chunk_size=chunk_size, eps=eps):
            raise ConfigError(f"PerformerAttention: {name}={value!r} {why}")
        m = default_num_features(feature_map, self.head_dim) if num_features is None else num_features
        eps = default_eps(feature_map) if eps is None else eps
        kv_dim = kv_dim or embed_dim
        self.feature_map_name, self.chunk_size, self.eps = feature_map, chunk_size, eps
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(kv_dim, embed_dim)
        self.v_proj = nn.Linear(kv_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.phi = {
            "elu": lambda: EluFeatures(),
            "favor": lambda: FavorFeatures(self.head_dim, m, redraw_interval),
            "rfa": lambda: RFAFeatures(self.head_dim, m, redraw_interval),
            "t2r": lambda: T2RFeatures(num_heads, self.head_dim, m),
        }[feature_map]()
        # RFA's recency gate g_t = sigmoid(w_h . x_t + b_h), one per head (causal only)
        self.gate = nn.Linear(embed_dim, num_heads) if gate and causal else None
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight, gain=2**-0.5)  # as fairseq's MultiheadAttention
        nn.init.xavier_uniform_(self.out_proj.weight)

    # (B, T, C) -> (B, H, T, d) and back
    def heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def merge(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        return self.out_proj(x.transpose(1, 2).flatten(2).to(dtype))

    def features(self, x: Tensor, proj: nn.Linear):
        return self.phi(self.heads(proj(x)))

    def gate_logits(self, x: Tensor) -> Optional[Tensor]:
        return None if self.gate is None else self.gate(x).transpose(1, 2)  # (B, H, T)

    gives_weights = True

    def attention_weights(self, x: Tensor, source: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
        """The weight each query of x (B, T, C) gives each key of source (B, n, C),
        (B, H, T, n), computed quadratically (for inspection and calibration; the
        forms above never build it). padding_mask (B, n) marks padded keys."""
        phi_q, q_scale = self.features(x, self.q_proj)
        phi_k, log_scale = self.features(source, self.k_proj)
        gate = self.gate_logits(source) if self.causal else None
        return K.weights(phi_q, phi_k, self.causal, padding_mask, log_scale, gate, q_scale, eps=self.eps)

    def summarize(self, source: Tensor, padding_mask: Optional[Tensor]) -> State:
        phi_k, log_scale = self.features(source, self.k_proj)
        return K.summarize(phi_k, self.heads(self.v_proj(source)), padding_mask, log_scale)

    def read(self, x: Tensor, state: State) -> Tensor:
        phi_q, q_scale = self.features(x, self.q_proj)
        out = K.read(phi_q, state, x.dtype, q_scale, eps=self.eps)
        return self.merge(out, x.dtype)

    def causal_parallel(self, x: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
        phi_q, q_scale = self.features(x, self.q_proj)
        phi_k, log_scale = self.features(x, self.k_proj)
        out, _ = K.causal_parallel(
            phi_q, phi_k, self.heads(self.v_proj(x)), padding_mask, log_scale, self.gate_logits(x), q_scale,
            chunk_size=self.chunk_size, eps=self.eps,
        )
        return self.merge(out, x.dtype)

    def step(self, x: Tensor, state: State, padding_mask: Optional[Tensor]) -> Tuple[Tensor, State]:
        # the query's and the key's features in one call: (B, 2, C) -> (B, H, 2, m)
        phi, scale = self.phi(self.heads(torch.stack([self.q_proj(x), self.k_proj(x)], dim=1)))
        at = lambda t, i: None if t is None else t[:, :, i]  # noqa: E731
        gate = None if self.gate is None else self.gate(x)
        v = self.v_proj(x).view(x.shape[0], self.num_heads, self.head_dim)
        out, state = K.causal_step(phi[:, :, 0], phi[:, :, 1], v, state or None, padding_mask,
                                   at(scale, 1), gate, at(scale, 0), eps=self.eps)
        return self.out_proj(out.flatten(1).to(x.dtype)), state


@register_attention("performer")
def build_performer(cfg, *, role: str, embed_dim: int, num_heads: int, kv_dim: int) -> PerformerAttention:
    """Options read from the model config: --feature-map, --num-features,
    --redraw-interval, --rfa-gate, --kernel-eps, --kernel-chunk-size."""
    num_features, eps = cfg.num_features, cfg.kernel_eps
    return PerformerAttention(
        embed_dim,
        num_heads,
        feature_map=str(cfg.feature_map),
        num_features=None if num_features is None else int(num_features),
        kv_dim=kv_dim,
        causal=role == "decoder_self",
        cross=role == "cross",
        gate=bool(cfg.rfa_gate),
        redraw_interval=int(cfg.redraw_interval),
        chunk_size=int(cfg.kernel_chunk_size),
        eps=None if eps is None else float(eps),
    )
