"""FLASH models: ``flash_lm`` (a decoder of GAU layers) and ``flash_transformer``
(non-causal GAU encoder; causal GAU decoder with kernel cross-attention), with
presets named after fairseq's own at twice their layer count (a GAU layer
stands in for attention + FFN, as in the paper).

Two settings follow from the architecture when a model is built: with RoPE
(the default) fairseq's token positional embeddings are off, and a final norm
follows the stack of pre-norm GAUs (--encoder/decoder-normalize-before)."""
from argparse import Namespace
from dataclasses import dataclass

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models.transformer import transformer_iwslt_de_en, transformer_wmt_en_de
from fairseq.models.transformer_lm import transformer_lm_baevski_wiki103, transformer_lm_gpt

from ..modules import flash_gau as gau  # registers the "flash" layers
from ..ops.flash import RELU2_NORMS
from ..families import Family, register_family
from ..registry import register_model
from .linear_transformer import LinearLanguageModel, LinearTransformerModel, register_presets
from .options import LinearLMConfig, LinearTransformerConfig, option, option_error

# "gau" is the key's earlier spelling, still in checkpoints trained before it was renamed
GAU = ChoiceEnum(["flash", "gau"])


@dataclass
class FlashOptions(FairseqDataclass):
    decoder_self_attn: GAU = option("flash", "decoder layers: gated attention units (gau: the same, the earlier name)")
    gau_attention: ChoiceEnum(["mixed", "quadratic"]) = option(
        "mixed", "FLASH mixed chunk attention (linear), or FLASH-Quad's full relu^2 attention"
    )
    gau_chunk_size: int = option(256, "G, chunk length of mixed chunk attention")
    gau_s: int = option(128, "s, width of the shared Z (queries and keys)")
    gau_expansion: float = option(2.0, "e = expansion * d, width of U and V")
    gau_norm: ChoiceEnum(["scalenorm", "layernorm"]) = option("scalenorm", "pre-norm of each GAU")
    no_rope: bool = option(False, "no rotary position embedding on queries and keys")
    gau_rel_pos_bias: bool = option(False, "learned relative position bias inside relu^2 (offsets up to G)")
    # unit and none train best on Multi30k and Austen validation (results/ablations-{mt,lm}.md)
    gau_scale_init: ChoiceEnum(["paper", "unit"]) = option(
        "unit", "init of the per-dimension scales of Q and K: N(1, 0.02), so q = k = Z at the start, or "
        "N(0, 0.02) as in the paper (paper)"
    )
    gau_relu2_norm: ChoiceEnum(list(RELU2_NORMS)) = option(
        "none", "relu^2 scores unscaled (none), divided by the number of keys a query sees (keys), or by G "
        "as in the paper (chunk)"
    )


@dataclass
class FlashTransformerConfig(LinearTransformerConfig, FlashOptions):
    encoder_self_attn: GAU = option("flash", "encoder layers: gated attention units (gau: the same, the earlier name)")
    cross_attn: ChoiceEnum(["kernel", "softmax"]) = option(
        "kernel", "decoder cross-attention: elu+1 kernel attention (the source summary is cached once, so a "
        "decoding step does not depend on the source length) or fairseq's softmax attention"
    )
    encoder_layers: int = option(12, "GAU layers in the encoder")
    decoder_layers: int = option(12, "GAU layers in the decoder")


@dataclass
class FlashLMConfig(LinearLMConfig, FlashOptions):
    decoder_layers: int = option(12, "GAU layers")


def check_flash_args(args: Namespace, roles) -> None:
    """The GAU's rules (modules/flash_gau.py, gau_problems) for each side with GAU
    layers, named as command-line options."""
    for side in ("encoder", "decoder"):
        if f"{side}_self" not in roles:
            continue
        found = gau.gau_problems(
            getattr(args, f"{side}_embed_dim"), s=args.gau_s, expansion=args.gau_expansion,
            chunk_size=args.gau_chunk_size, rope=not args.no_rope, mode=args.gau_attention, norm=args.gau_norm,
            scale_init=args.gau_scale_init, relu2_norm=args.gau_relu2_norm, width=f"--{side}-embed-dim")
        for name, value, why in found:
            raise option_error(OPTION.get(name, f"gau_{name}"), value, why)


OPTION = {"mode": "gau_attention", "norm": "gau_norm"}  # the GAU's argument names that differ from gau_<name>


def derived_settings(args: Namespace) -> None:
    if not args.no_rope:
        args.no_token_positional_embeddings = True  # RoPE supplies the positions
    for side in ("encoder", "decoder"):
        if hasattr(args, f"{side}_normalize_before"):
            setattr(args, f"{side}_normalize_before", True)  # a final norm after pre-norm GAUs


@register_model("flash_transformer", dataclass=FlashTransformerConfig)
class FlashTransformerModel(LinearTransformerModel):
    derive_family = staticmethod(derived_settings)
    check_family = staticmethod(check_flash_args)


@register_model("flash_lm", dataclass=FlashLMConfig)
class FlashLanguageModel(LinearLanguageModel):
    derive_family = staticmethod(derived_settings)
    check_family = staticmethod(check_flash_args)


def flash_preset(fairseq_arch, **layers):
    """fairseq's preset with twice its layers (unless given on the command line)."""
    def arch(args):
        for side, n in layers.items():
            setattr(args, f"{side}_layers", getattr(args, f"{side}_layers", 2 * n))
        fairseq_arch(args)
    return arch


register_family(Family(
    "flash", "flash_transformer", "flash_lm", "Transformer Quality in Linear Time, arXiv 2202.10447",
    bench_mt_args=("--encoder-layers", "5", "--decoder-layers", "5"), bench_lm_args=("--decoder-layers", "8"),
))
register_presets("flash_transformer", {
    "iwslt_de_en": flash_preset(transformer_iwslt_de_en, encoder=6, decoder=6),
    "wmt_en_de": flash_preset(transformer_wmt_en_de, encoder=6, decoder=6),
})
register_presets("flash_lm", {
    "wiki103": flash_preset(transformer_lm_baevski_wiki103, decoder=16),
    "gpt": flash_preset(transformer_lm_gpt, decoder=12),
})
