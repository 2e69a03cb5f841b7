"""Kernel-attention models: ``performer_transformer`` (encoder-decoder; each
attention role softmax or kernel), ``performer_lm`` (decoder-only), and
presets named after fairseq's own. The feature map is chosen by name with
--feature-map {elu,favor,rfa,t2r}."""
from argparse import Namespace
from dataclasses import dataclass
from typing import Optional

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models.transformer_lm import transformer_lm_baevski_wiki103, transformer_lm_gpt

from ..modules.performer_attention import FEATURE_MAPS, performer_problems  # registers the "performer" attention
from ..families import Family, register_family
from ..registry import register_model
from .linear_transformer import MT_PRESETS, LinearLanguageModel, LinearTransformerModel, register_presets
from .options import LinearLMConfig, LinearTransformerConfig, option, option_error

ATTENTION = ChoiceEnum(["softmax", "performer"])


@dataclass
class PerformerOptions(FairseqDataclass):
    decoder_self_attn: ATTENTION = option("performer", "decoder self-attention")
    feature_map: ChoiceEnum(list(FEATURE_MAPS)) = option("favor", "kernel feature map phi")
    num_features: Optional[int] = option(
        None, "m, features per head (default: favor d ln d, rfa d, t2r 32; elu has none)"
    )
    redraw_interval: int = option(
        1000, "redraw favor/rfa random projections every N training updates; 0: never"
    )
    rfa_gate: bool = option(False, "RFA's learned recency gate on the causal self-attention")
    kernel_eps: Optional[float] = option(
        None, "lower clamp of the attention normalizer phi(q).z, in true scale (default: rfa and t2r 1e-6, "
        "whose features can cancel or vanish; elu and favor none)"
    )
    kernel_chunk_size: int = option(64, "chunk length of the causal training form (speed/memory only)")


@dataclass
class PerformerTransformerConfig(LinearTransformerConfig, PerformerOptions):
    encoder_self_attn: ATTENTION = option("performer", "encoder self-attention")
    cross_attn: ATTENTION = option("performer", "decoder cross-attention")


@dataclass
class PerformerLMConfig(LinearLMConfig, PerformerOptions):
    pass


def check_performer_args(args: Namespace, roles) -> None:
    """The module's rules (performer_problems), named as command-line options,
    when any role uses kernel attention."""
    if not roles:
        return
    found = performer_problems(feature_map=args.feature_map, num_features=args.num_features,
                               redraw_interval=args.redraw_interval, chunk_size=args.kernel_chunk_size, eps=args.kernel_eps)
    for name, value, why in found:
        raise option_error({"eps": "kernel_eps", "chunk_size": "kernel_chunk_size"}.get(name, name), value, why)


@register_model("performer_transformer", dataclass=PerformerTransformerConfig)
class PerformerTransformerModel(LinearTransformerModel):
    check_family = staticmethod(check_performer_args)


@register_model("performer_lm", dataclass=PerformerLMConfig)
class PerformerLanguageModel(LinearLanguageModel):
    check_family = staticmethod(check_performer_args)


register_family(Family(
    "performer", "performer_transformer", "performer_lm", "Transformers are RNNs, arXiv 2006.16236 (FAVOR+, RFA, T2R feature maps)",
    bench_mt_args=(), bench_lm_args=(),
))
register_presets("performer_transformer", MT_PRESETS)
register_presets("performer_lm", {"wiki103": transformer_lm_baevski_wiki103, "gpt": transformer_lm_gpt})
