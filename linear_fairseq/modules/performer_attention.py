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
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..ops import performer as K
from ..ops import performer_fla
from ..ops.common import triton_unavailable
from .attention import LinearAttention, Problem, State, first_problem, is_int, is_number, is_positive_int
from .backends import on_kernels, say_once
from .projections import load_apart, project_parts, stacked

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


class FavorFeatures(RandomFeatures):
    def forward(self, x):
        return K.favor_features(x, self.projection)

    def on_kernels(self, x):
        """The same features from ops.favor_triton's kernels (forward and gradient), where
        Triton imports; elsewhere from the torch function."""
        if triton_unavailable() or self.projection.requires_grad:
            return self(x)
        return performer_fla.favor_kernels().favor_features(x, self.projection)


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


class FeatureMap(NamedTuple):
    """A feature map phi: its module, and its own number of features m and
    normalizer clamp eps, which --num-features and --kernel-eps replace."""
    build: Callable[[int, int, int, int], nn.Module]  # (heads, head_dim, m, redraw_interval) -> module
    num_features: Callable[[int], int]  # head_dim -> m
    eps: float  # lower clamp of phi(q).z, in true scale
    about: str  # how m and eps are chosen


# rfa's sin/cos features can cancel to ~0 or below, and t2r's relu features can all vanish for a query
# (its gradient then grows like 1/phi(q).z): a clamp for both. elu + 1 and FAVOR+ (largest feature
# 1 after stabilization) never vanish: no clamp, which would only distort the ratio for them
# (an empty sum is still guarded).
FEATURE_MAPS = {
    "elu": FeatureMap(lambda h, d, m, r: EluFeatures(), lambda d: d, 0.0, "none: phi has the head's width"),
    "favor": FeatureMap(lambda h, d, m, r: FavorFeatures(d, m, r), lambda d: max(1, round(d * math.log(max(d, 2)))),
                        0.0, "m = d ln d (Performer's choice)"),
    "rfa": FeatureMap(lambda h, d, m, r: RFAFeatures(d, m, r), lambda d: d, 1e-6, "m = d sin/cos pairs"),
    "t2r": FeatureMap(lambda h, d, m, r: T2RFeatures(h, d, m), lambda d: 32, 1e-6, "m = 32 (T2R's choice)"),
}


# the causal training form: ops.performer (torch), ops.performer_fla (fla-core's
# Triton kernels), or auto: fla where the tensors are on CUDA and fla-core imports
KERNEL_BACKENDS = ("auto", "torch", "fla")


def performer_problems(options: dict, embed_dim: int = 0, width: str = "") -> List[Problem]:
    """The first value a kernel attention cannot take (see first_problem); None
    for num_features or kernel_eps stands for the feature map's own."""
    fm, m, eps = options["feature_map"], options["num_features"], options["kernel_eps"]
    redraw, chunk = options["redraw_interval"], options["kernel_chunk_size"]
    return first_problem((
        ("feature_map", fm, lambda: fm in FEATURE_MAPS, f"choose from {', '.join(FEATURE_MAPS)}"),
        ("num_features", m, lambda: m is None or is_positive_int(m), "must be a positive integer"),
        ("num_features", m, lambda: fm != "elu" or m is None, "elu has no features to choose (phi has the head's "
                                                             "width)"),
        ("redraw_interval", redraw, lambda: is_int(redraw) and redraw >= 0, "must be an integer >= 0"),
        ("kernel_eps", eps, lambda: eps is None or (is_number(eps) and eps >= 0), "must be >= 0"),
        ("kernel_chunk_size", chunk, lambda: is_positive_int(chunk), "must be a positive integer"),
        ("kernel_backend", options["kernel_backend"], lambda: options["kernel_backend"] in KERNEL_BACKENDS,
         f"choose from {', '.join(KERNEL_BACKENDS)}"),
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
        rfa_gate: bool,
        kernel_eps: Optional[float],
        kernel_chunk_size: int,
        kernel_backend: str = "auto",
        kv_dim: Optional[int] = None,
        causal: bool = False,
        cross: bool = False,
        **local,
    ):
        """The options as models/performer.py's dataclass names them (and where their
        defaults live); num_features and kernel_eps None: the feature map's own.
        `local`: local precision's options (LinearAttention)."""
        super().__init__(embed_dim, num_heads, causal=causal, cross=cross, **local)
        options = dict(feature_map=feature_map, num_features=num_features, redraw_interval=redraw_interval,
                       kernel_eps=kernel_eps, kernel_chunk_size=kernel_chunk_size, kernel_backend=kernel_backend)
        for name, value, why in performer_problems(options):
            raise ConfigError(f"PerformerAttention: {name}={value!r} {why}")
        phi = FEATURE_MAPS[feature_map]
        m = phi.num_features(self.head_dim) if num_features is None else num_features
        kv_dim = kv_dim or embed_dim
        self.feature_map_name, self.chunk_size, self.kernel_backend = feature_map, kernel_chunk_size, kernel_backend
        self.eps = phi.eps if kernel_eps is None else kernel_eps
        q_proj = nn.Linear(embed_dim, embed_dim)
        k_proj, v_proj = nn.Linear(kv_dim, embed_dim), nn.Linear(kv_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.phi = phi.build(num_heads, self.head_dim, m, redraw_interval)
        # RFA's recency gate g_t = sigmoid(w_h . x_t + b_h), one per head (causal only)
        self.gate = nn.Linear(embed_dim, num_heads) if rfa_gate and causal else None
        for proj in (q_proj, k_proj, v_proj):
            nn.init.xavier_uniform_(proj.weight, gain=2**-0.5)  # as fairseq's MultiheadAttention
        nn.init.xavier_uniform_(self.out_proj.weight)
        # self-attention projects one input: one matrix product (modules/projections.py)
        if cross:
            self.q_proj, self.k_proj, self.v_proj = q_proj, k_proj, v_proj
        else:
            self.qkv_proj = stacked(q_proj, k_proj, v_proj)

    def project(self, x: Tensor, names: str) -> Tuple[Tensor, ...]:
        """x's projections `names`, a run of "qkv" ("q", "kv", "qkv", ...): one
        matrix product of qkv_proj's rows in self-attention."""
        if self.encoder_decoder_attention:
            return tuple(getattr(self, f"{name}_proj")(x) for name in names)
        return project_parts(self.qkv_proj, x, (self.embed_dim,) * 3, "qkv".index(names), len(names))

    def upgrade_state_dict_named(self, state_dict, name: str):
        """fairseq's loading hook: a self-attention's q_proj, k_proj and v_proj kept apart load into qkv_proj."""
        if not self.encoder_decoder_attention:
            load_apart(state_dict, name)

    # (B, T, C) -> (B, H, T, d) and back
    def heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def merge(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        return self.out_proj(x.transpose(1, 2).flatten(2).to(dtype))

    def features(self, projected: Tensor):
        """phi and its log-scale (or None) of a query or key projection (B, T, C), per head."""
        return self.phi(self.heads(projected))

    def gate_logits(self, x: Tensor) -> Optional[Tensor]:
        return None if self.gate is None else self.gate(x).transpose(1, 2)  # (B, H, T)

    gives_weights = True

    def attention_weights(self, x: Tensor, source: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
        """The weight each query of x (B, T, C) gives each key of source (B, n, C),
        (B, H, T, n), computed quadratically (for inspection and calibration; the
        forms above never build it). padding_mask (B, n) marks padded keys."""
        (q,), (k,) = self.project(x, "q"), self.project(source, "k")
        phi_q, q_scale = self.features(q)
        phi_k, log_scale = self.features(k)
        gate = self.gate_logits(source) if self.causal else None
        return K.weights(phi_q, phi_k, self.causal, padding_mask, log_scale, gate, q_scale, eps=self.eps)

    def summarize(self, source: Tensor, padding_mask: Optional[Tensor]) -> State:
        k, v = self.project(source, "kv")
        phi_k, log_scale = self.features(k)
        return K.summarize(phi_k, self.heads(v), padding_mask, log_scale)

    def read(self, x: Tensor, state: State) -> Tensor:
        phi_q, q_scale = self.features(*self.project(x, "q"))
        out = K.read(phi_q, state, x.dtype, q_scale, eps=self.eps)
        return self.merge(out, x.dtype)

    def causal_parallel(self, x: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
        # the queries' and the keys' features in one call, on a pair axis after time: (B, H, T, 2, m)
        qkv = self.qkv_proj(x).unflatten(-1, (3, self.num_heads, self.head_dim))  # (B, T, 3, H, d)
        on_triton = self.runs_on_triton(x)
        pair, v = qkv.split([2, 1], dim=2)  # split: its backward is one concatenation
        pair = pair.permute(0, 3, 1, 2, 4)
        phi, scale = self.phi.on_kernels(pair) if on_triton and isinstance(self.phi, FavorFeatures) else self.phi(pair)
        (phi_q, phi_k), (q_scale, log_scale) = phi.unbind(-2), (None, None) if scale is None else scale.unbind(-1)
        args = (phi_q, phi_k, v.squeeze(2).transpose(1, 2), padding_mask, log_scale, self.gate_logits(x), q_scale)
        if on_triton and self.gate_trains_on_fla(x):
            out = performer_fla.causal(*args, eps=self.eps)
        else:
            out, _ = K.causal_parallel(*args, chunk_size=self.chunk_size, eps=self.eps)
        return self.merge(out, x.dtype)

    def runs_on_triton(self, x: Tensor) -> bool:
        """Whether the causal forms run on Triton (--kernel-backend): training on fla-core's
        kernel, decoding (without autograd) on ops.performer_triton's step;
        `fla` where it cannot is one line naming why."""
        return on_kernels("kernel_backend", self.kernel_backend, x, "fla", performer_fla.unavailable,
                          "; fla-core's kernels need CUDA and `pip install '.[gpu]'`")

    def gate_trains_on_fla(self, x: Tensor) -> bool:
        """Whether the gate, if any, can train on fla-core's kernel on x's GPU (performer_fla.
        gate_trouble); where it cannot, `fla` is one line naming why and `auto` trains the
        causal form on torch, saying so once (decoding stays on ops.performer_triton's step)."""
        why = self.gate is not None and performer_fla.gate_trouble(x.device)
        if why and self.kernel_backend == "fla":
            raise ConfigError(f"--kernel-backend fla: {why} (or --kernel-backend auto: RFA's gate then trains "
                              f"on torch)")
        if why:
            say_once(f"--kernel-backend auto: {why}; RFA's gate trains on torch")
        return not why

    def step(self, x: Tensor, state: State, padding_mask: Optional[Tensor]) -> Tuple[Tensor, State]:
        # q, k, v of one step as a sequence of three (B, 3, C)
        qkv = self.qkv_proj(x).unflatten(-1, (3, self.embed_dim))
        gate = None if self.gate is None else self.gate(x)
        v = qkv[:, 2].view(x.shape[0], self.num_heads, self.head_dim)
        fused = performer_fla.fused() if self.runs_on_triton(x) and not torch.is_grad_enabled() else None
        if fused is not None and isinstance(self.phi, FavorFeatures):  # the features in the same kernel
            q, k = qkv[:, :2].unflatten(-1, (self.num_heads, self.head_dim)).unbind(1)
            out, state = fused.favor_step(q, k, v, self.phi.projection, state or None, padding_mask, gate,
                                          eps=self.eps)
            return self.out_proj(out.flatten(1).to(x.dtype)), state
        # the query's and the key's features in one call: (B, H, 2, m)
        phi, scale = self.features(qkv[:, :2])
        at = lambda t, i: None if t is None else t[:, :, i]  # noqa: E731
        causal_step = K.causal_step if fused is None else fused.causal_step
        out, state = causal_step(phi[:, :, 0], phi[:, :, 1], v, state or None, padding_mask,
                                 at(scale, 1), gate, at(scale, 0), eps=self.eps)
        return self.out_proj(out.flatten(1).to(x.dtype)), state
