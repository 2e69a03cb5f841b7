"""FLASH models: ``flash_lm`` (a decoder of GAU layers) and ``flash_transformer``
(non-causal GAU encoder; causal GAU decoder with kernel cross-attention), with
presets named after fairseq's own at twice their layer count (a GAU layer
stands in for attention + FFN, as in the paper).

Two settings follow from the architecture when a model is built: with RoPE
(the default) fairseq's token positional embeddings are off, and a final norm
follows the stack of pre-norm GAUs (--encoder/decoder-normalize-before)."""
from argparse import Namespace
from dataclasses import dataclass

from fairseq.dataclass import FairseqDataclass
from fairseq.models.transformer import transformer_iwslt_de_en, transformer_wmt_en_de
from fairseq.models.transformer_lm import transformer_lm_baevski_wiki103, transformer_lm_gpt

from ..families import Family, Variant
from ..modules.flash_gau import GAU_CHOICES, GAUDecoderLayer, GAUEncoderLayer, gau_problems
from .family import register, role_choice
from .options import LinearLMConfig, LinearTransformerConfig, choice, option

GAU = role_choice("flash", softmax=False)


@dataclass
class FlashOptions(FairseqDataclass):
    decoder_self_attn: str = choice("flash", GAU, "decoder layers: gated attention units")
    gau_attention: str = choice(
        "mixed", GAU_CHOICES["gau_attention"], "FLASH mixed chunk attention (linear), or FLASH-Quad's full relu^2 "
        "attention")
    gau_chunk_size: int = option(256, "G, chunk length of mixed chunk attention")
    gau_s: int = option(128, "s, width of the shared Z (queries and keys)")
    gau_expansion: float = option(2.0, "e = expansion * d, width of U and V")
    gau_norm: str = choice("scalenorm", GAU_CHOICES["gau_norm"], "pre-norm of each GAU")
    no_rope: bool = option(False, "no rotary position embedding on queries and keys")
    gau_rel_pos_bias: bool = option(False, "learned relative position bias inside relu^2 (offsets up to G)")
    # unit and none train best on Multi30k and Austen validation (results/ablations-{mt,lm}.md)
    gau_scale_init: str = choice(
        "unit", GAU_CHOICES["gau_scale_init"], "init of the per-dimension scales of Q and K: N(1, 0.02), so "
        "q = k = Z at the start, or N(0, 0.02) as in the paper (paper)")
    gau_relu2_norm: str = choice(
        "none", GAU_CHOICES["gau_relu2_norm"], "relu^2 scores unscaled (none), divided by the number of keys a "
        "query sees (keys), or by G as in the paper (chunk)")
    gau_backend: str = choice(
        "auto", GAU_CHOICES["gau_backend"], "mixed chunk attention's causal training pass and decoding step: "
        "torch (any device), triton (Triton kernels, CUDA: five a training pass, one a step), or auto: triton "
        "where the model runs on CUDA (compute capability 7.0 or newer) and Triton imports (and, training, "
        "where the kernels fit the GPU at this gau_s), else torch")


@dataclass
class FlashTransformerConfig(LinearTransformerConfig, FlashOptions):
    encoder_self_attn: str = choice("flash", GAU, "encoder layers: gated attention units")
    cross_attn: str = choice(
        "kernel", ("kernel", "softmax"), "decoder cross-attention: elu+1 kernel attention (the source summary is "
        "cached once, so a decoding step does not depend on the source length) or fairseq's softmax attention")
    encoder_layers: int = option(12, "GAU layers in the encoder")
    decoder_layers: int = option(12, "GAU layers in the decoder")


@dataclass
class FlashLMConfig(LinearLMConfig, FlashOptions):
    decoder_layers: int = option(12, "GAU layers")


def derived_settings(args: Namespace) -> None:
    if not args.no_rope:
        args.no_token_positional_embeddings = True  # RoPE supplies the positions
    for side in ("encoder", "decoder"):
        if hasattr(args, f"{side}_normalize_before"):
            setattr(args, f"{side}_normalize_before", True)  # a final norm after pre-norm GAUs


def flash_preset(fairseq_arch, **layers):
    """fairseq's preset with twice its layers (unless given on the command line)."""
    def arch(args):
        for side, n in layers.items():
            setattr(args, f"{side}_layers", getattr(args, f"{side}_layers", 2 * n))
        fairseq_arch(args)
    return arch


TINY = ("--gau-s", "16", "--gau-chunk-size", "4")  # small chunks: decoding crosses many chunk boundaries
FAMILY = Family(
    "flash", "Transformer Quality in Linear Time, arXiv 2202.10447",
    layers=(GAUEncoderLayer, GAUDecoderLayer), options=FlashOptions, mt_config=FlashTransformerConfig,
    lm_config=FlashLMConfig, shared_options=("dropout",), problems=gau_problems, derive=derived_settings,
    mt_presets={"iwslt_de_en": flash_preset(transformer_iwslt_de_en, encoder=6, decoder=6),
                "wmt_en_de": flash_preset(transformer_wmt_en_de, encoder=6, decoder=6)},
    lm_presets={"wiki103": flash_preset(transformer_lm_baevski_wiki103, decoder=16),
                "gpt": flash_preset(transformer_lm_gpt, decoder=12)},
    smoke={"gau_s": 16}, tiny=TINY,
    variants={
        "mt_relbias": Variant("mt", ("--gau-rel-pos-bias",)),
        "lm_no_rope": Variant("lm", ("--no-rope",)),
        **{f"lm_{norm}": Variant("lm", ("--gau-relu2-norm", norm)) for norm in ("keys", "chunk")},  # default none
        "mt_softmax_cross": Variant("mt", ("--cross-attn", "softmax")),
        "mt_keys": Variant("mt", ("--gau-relu2-norm", "keys")),
        "lm_quad": Variant("lm", ("--gau-attention", "quadratic"), growing_state=True),
        "lm_quad_keys": Variant("lm", ("--gau-attention", "quadratic", "--gau-relu2-norm", "keys"), growing_state=True),
    },
    bench_mt_args=("--encoder-layers", "5", "--decoder-layers", "5"), bench_lm_args=("--decoder-layers", "8"),
    targets={"train": {8192: 2.5}},
)
FlashTransformerModel, FlashLanguageModel = register(FAMILY)
