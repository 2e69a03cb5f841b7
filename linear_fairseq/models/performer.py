"""Kernel-attention models: ``performer_transformer`` (encoder-decoder; each
attention role softmax or kernel), ``performer_lm`` (decoder-only), and
presets named after fairseq's own. The feature map is chosen by name with
--feature-map {elu,favor,rfa,t2r}."""
from dataclasses import dataclass
from typing import Optional

from fairseq.models.transformer_lm import transformer_lm_baevski_wiki103, transformer_lm_gpt

from ..families import Family, Variant
from ..modules.performer_attention import FEATURE_MAPS, KERNEL_BACKENDS, PerformerAttention, performer_problems
from .family import register, role_choice
from .linear_transformer import MT_PRESETS
from .options import LocalOptions, choice, option

ATTENTION = role_choice("performer")


def per_map(what: str) -> str:
    return "; ".join(f"{name} {getattr(fm, what)}" for name, fm in FEATURE_MAPS.items())


@dataclass
class PerformerOptions(LocalOptions):
    decoder_self_attn: str = choice("performer", ATTENTION, "decoder self-attention")
    feature_map: str = choice("favor", FEATURE_MAPS, "kernel feature map phi")
    num_features: Optional[int] = option(None, f"m, features per head (default, the feature map's: {per_map('about')})")
    redraw_interval: int = option(1000, "redraw favor/rfa random projections every N training updates; 0: never")
    rfa_gate: bool = option(False, "RFA's learned recency gate on the causal self-attention (any feature map)")
    kernel_eps: Optional[float] = option(
        None, f"lower clamp of the attention normalizer phi(q).z, in true scale (default, the feature map's: "
        f"{per_map('eps')})")
    kernel_chunk_size: int = option(64, "chunk length of the causal training form (speed/memory only)")
    kernel_backend: str = choice(
        "auto", KERNEL_BACKENDS, "causal forms: torch (any device), fla (Triton kernels, CUDA, pip install '.[gpu]': "
        "fla-core's chunked kernel to train, one fused kernel a decoding step), or auto: fla where the model runs on "
        "CUDA (compute capability 7.0 or newer) and fla-core imports, else torch")


def kernel(feature_map: str, *extra: str):
    """Test flags of a feature map (a few features, to keep the tiny models tiny)."""
    return ("--feature-map", feature_map, *(("--num-features", "16") if feature_map != "elu" else ()), *extra)


FAMILY = Family(
    "performer", "Transformers are RNNs, arXiv 2006.16236 (FAVOR+, RFA, T2R feature maps)",
    attention=PerformerAttention, options=PerformerOptions, problems=performer_problems,
    mt_presets=MT_PRESETS, lm_presets={"wiki103": transformer_lm_baevski_wiki103, "gpt": transformer_lm_gpt},
    variants={
        **{f"mt_{fm}": Variant("mt", kernel(fm)) for fm in FEATURE_MAPS if fm != "favor"},  # favor: the default
        "mt_rfa_gate": Variant("mt", kernel("rfa", "--rfa-gate")),
        "lm_t2r_gate": Variant("lm", kernel("t2r", "--rfa-gate")),
        "lm_favor_gate": Variant("lm", kernel("favor", "--rfa-gate")),
        "mt_local": Variant("mt", ("--short-conv", "4", "--local-window", "6")),
        "lm_local": Variant("lm", ("--short-conv", "2", "--local-window", "3")),
    },
    targets={"train": {8192: 1.5}},
)
PerformerTransformerModel, PerformerLanguageModel = register(FAMILY)
