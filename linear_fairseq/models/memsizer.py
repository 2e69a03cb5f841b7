"""MemSizer models: ``memsizer_transformer`` (encoder-decoder), ``memsizer_lm``
(decoder-only) and presets named after fairseq's own.

Defaults are the settings of the paper (arXiv 2203.12644) as its authors ran
them: for MT, MemSizer in the decoder only (causal k=4, cross k=32, softmax
encoder) with init scales 8/8; for LM, k=32 with init scales 32/1. A default
here is the value a model gets: no argparse default overrides it.
"""
from argparse import Namespace
from dataclasses import dataclass, field

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models.transformer import (
    transformer_iwslt_de_en,
    transformer_vaswani_wmt_en_de_big,
    transformer_wmt_en_de,
)
from fairseq.models.transformer_lm import (
    TransformerLanguageModelConfig,
    transformer_lm_baevski_wiki103,
    transformer_lm_gpt,
)

from ..modules import memsizer_attention  # noqa: F401  registers the "memsizer" attention
from ..modules.attention import attention_kind
from ..registry import register_model, register_model_architecture
from .linear_transformer import (
    LinearLanguageModel,
    LinearTransformerConfig,
    LinearTransformerModel,
    require_positive,
    require_positive_int,
)

ATTENTION = ChoiceEnum(["softmax", "memsizer"])


def _opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class MemsizerOptions(FairseqDataclass):
    decoder_self_attn: ATTENTION = _opt("memsizer", "decoder self-attention")
    decoder_self_memory_size: int = _opt(4, "k, memory slots of the causal decoder self-attention")
    q_init_scale: float = _opt(8.0, "init gain of the key slots Phi is scale^-1/2")
    kv_init_scale: float = _opt(8.0, "init gain of W_l and W_r is scale^-1/2")
    memsizer_chunk_size: int = _opt(64, "chunk length of the causal training form (speed/memory only)")


@dataclass
class MemsizerTransformerConfig(LinearTransformerConfig, MemsizerOptions):
    encoder_self_attn: ATTENTION = _opt("softmax", "encoder self-attention")
    cross_attn: ATTENTION = _opt("memsizer", "decoder cross-attention")
    encoder_self_memory_size: int = _opt(32, "k, memory slots of the encoder self-attention")
    cross_memory_size: int = _opt(32, "k, memory slots of the cross-attention")


@dataclass
class MemsizerLMConfig(TransformerLanguageModelConfig, MemsizerOptions):
    decoder_self_memory_size: int = _opt(32, "k, memory slots of the causal self-attention")
    q_init_scale: float = _opt(32.0, "init gain of the key slots Phi is scale^-1/2")
    kv_init_scale: float = _opt(1.0, "init gain of W_l and W_r is scale^-1/2")


def check_memsizer_args(args: Namespace, roles) -> None:
    used = [role for role in roles if attention_kind(args, role) == "memsizer"]
    for role in used:
        require_positive_int(args, f"{role}_memory_size")
    if used:
        require_positive(args, "q_init_scale")
        require_positive(args, "kv_init_scale")
        require_positive_int(args, "memsizer_chunk_size")


@register_model("memsizer_transformer", dataclass=MemsizerTransformerConfig)
class MemsizerTransformerModel(LinearTransformerModel):
    @classmethod
    def check_args(cls, args):
        super().check_args(args)
        check_memsizer_args(args, cls.roles)


@register_model("memsizer_lm", dataclass=MemsizerLMConfig)
class MemsizerLanguageModel(LinearLanguageModel):
    @classmethod
    def check_args(cls, args):
        super().check_args(args)
        check_memsizer_args(args, cls.roles)


# -- presets: fairseq's transformer sizes, MemSizer defaults from the config --
@register_model_architecture("memsizer_transformer", "memsizer_transformer_iwslt_de_en")
def memsizer_transformer_iwslt_de_en(args):
    transformer_iwslt_de_en(args)


@register_model_architecture("memsizer_transformer", "memsizer_transformer_wmt_en_de")
def memsizer_transformer_wmt_en_de(args):
    transformer_wmt_en_de(args)


@register_model_architecture("memsizer_transformer", "memsizer_transformer_vaswani_wmt_en_de_big")
def memsizer_transformer_vaswani_wmt_en_de_big(args):
    transformer_vaswani_wmt_en_de_big(args)


@register_model_architecture("memsizer_lm", "memsizer_lm_wiki103")
def memsizer_lm_wiki103(args):
    # the paper's WikiText-103 run (authors' lm_wikitext-103.sh): fairseq's
    # adaptive-input wiki103 LM with 32 MemSizer layers, layerdrop 0.2, dropout 0.2
    args.decoder_layers = getattr(args, "decoder_layers", 32)
    args.decoder_layerdrop = getattr(args, "decoder_layerdrop", 0.2)
    args.dropout = getattr(args, "dropout", 0.2)
    transformer_lm_baevski_wiki103(args)


@register_model_architecture("memsizer_lm", "memsizer_lm_gpt")
def memsizer_lm_gpt(args):
    transformer_lm_gpt(args)
