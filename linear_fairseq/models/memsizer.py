"""MemSizer models: ``memsizer_transformer`` (encoder-decoder), ``memsizer_lm``
(decoder-only) and presets named after fairseq's own.

Defaults are the settings of the paper (arXiv 2203.12644) as its authors ran
them: for MT, MemSizer in the decoder only (causal k=4, cross k=32, softmax
encoder) with init scales 8/8; for LM, k=32 with init scales 32/1. A default
here is the value a model gets: no argparse default overrides it.
"""
import re
from dataclasses import dataclass

from fairseq.models.transformer_lm import transformer_lm_baevski_wiki103, transformer_lm_gpt

from ..families import Family, Variant
from ..modules.backends import TRITON_BACKENDS
from ..modules.memsizer_attention import MemsizerAttention, memsizer_problems
from .family import register, role_choice
from .linear_transformer import MT_PRESETS
from .options import LinearLMConfig, LinearTransformerConfig, LocalOptions, choice, option

ATTENTION = role_choice("memsizer")


@dataclass
class MemsizerOptions(LocalOptions):
    decoder_self_attn: str = choice("memsizer", ATTENTION, "decoder self-attention")
    decoder_self_memory_size: int = option(4, "k, memory slots of the causal decoder self-attention")
    q_init_scale: float = option(8.0, "init gain of the key slots Phi is scale^-1/2")
    kv_init_scale: float = option(8.0, "init gain of W_l and W_r is scale^-1/2")
    memsizer_chunk_size: int = option(64, "chunk length of the causal training form (speed/memory only)")
    memsizer_backend: str = choice(
        "auto", TRITON_BACKENDS, "where the causal decoding step runs: triton, one Triton kernel a step from the "
        "projections to the output (CUDA); torch; auto, triton where it can run")


@dataclass
class MemsizerTransformerConfig(LinearTransformerConfig, MemsizerOptions):
    encoder_self_attn: str = choice("softmax", ATTENTION, "encoder self-attention")
    cross_attn: str = choice("memsizer", ATTENTION, "decoder cross-attention")
    encoder_self_memory_size: int = option(32, "k, memory slots of the encoder self-attention")
    cross_memory_size: int = option(32, "k, memory slots of the cross-attention")


@dataclass
class MemsizerLMConfig(LinearLMConfig, MemsizerOptions):
    decoder_self_memory_size: int = option(32, "k, memory slots of the causal self-attention")
    q_init_scale: float = option(32.0, "init gain of the key slots Phi is scale^-1/2")
    kv_init_scale: float = option(1.0, "init gain of W_l and W_r is scale^-1/2")


def memsizer_lm_wiki103(args):
    # the paper's WikiText-103 run (authors' lm_wikitext-103.sh): fairseq's
    # adaptive-input wiki103 LM with 32 MemSizer layers, layerdrop 0.2, dropout 0.2
    args.decoder_layers = getattr(args, "decoder_layers", 32)
    args.decoder_layerdrop = getattr(args, "decoder_layerdrop", 0.2)
    args.dropout = getattr(args, "dropout", 0.2)
    transformer_lm_baevski_wiki103(args)


def from_softmax(name: str, softmax: dict, fresh):
    """W_r of a MemSizer role from the softmax attention it replaces: its value
    projection followed by its output projection (MemSizer has no output
    projection, so W_r carries both). A self-attention holds W_r as the last rows
    of pkv_proj: its Phi and W_l rows stay as `fresh` has them."""
    match = re.fullmatch(r"(.*)\.(w_r|pkv_proj)\.(weight|bias)", name)
    if not match or f"{match[1]}.v_proj.weight" not in softmax:
        return None
    v, o = (softmax[f"{match[1]}.{p}_proj.weight"] for p in ("v", "out"))
    how = "W_r = out_proj(v_proj(x))"
    if match[3] == "weight":
        w_r = o @ v
    else:
        w_r = o @ softmax[f"{match[1]}.v_proj.bias"] + softmax[f"{match[1]}.out_proj.bias"]
    if match[2] == "w_r":
        return w_r, how
    stacked = fresh.clone()
    stacked[-len(w_r):] = w_r
    return stacked, f"{how}; Phi, W_l initialized"


LOCAL = ("--short-conv", "3", "--local-window", "5")  # test widths: odd and even, both far below the lengths
FAMILY = Family(
    "memsizer", "Linearizing Transformer with Key-Value Memory, arXiv 2203.12644",
    attention=MemsizerAttention, options=MemsizerOptions, mt_config=MemsizerTransformerConfig,
    lm_config=MemsizerLMConfig, role_options=("memory_size",), shared_options=("attention_dropout",),
    problems=memsizer_problems,
    mt_presets=MT_PRESETS, lm_presets={"wiki103": memsizer_lm_wiki103, "gpt": transformer_lm_gpt},
    variants={"mt_all": Variant("mt", ("--encoder-self-attn", "memsizer", "--encoder-self-memory-size", "8")),
              "mt_local": Variant("mt", ("--encoder-self-attn", "memsizer", *LOCAL)),
              "lm_local": Variant("lm", LOCAL),
              "lm_local_hybrid": Variant("lm", (*LOCAL, "--decoder-softmax-layers", "0"), growing_state=True)},
    bench_mt_args=("--decoder-ffn-embed-dim", "1702"), bench_lm_args=("--decoder-ffn-embed-dim", "1328"),
    targets={"decode_short": 1.3, "train": {8192: 3.0}, "seq2seq": {("mt", 2048): 2.0, ("sum", 400): 1.5}},
    from_softmax=from_softmax,
)
MemsizerTransformerModel, MemsizerLanguageModel = register(FAMILY)
