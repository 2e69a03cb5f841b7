"""Model options: fairseq's transformer config as flat fields, option helpers,
and the checks a value gets where it enters (one line naming the option)."""
import dataclasses
from argparse import Namespace
from typing import Any, Optional

from fairseq.dataclass import FairseqDataclass
from fairseq.models.transformer import TransformerConfig
from fairseq.models.transformer_lm import TransformerLanguageModelConfig
from omegaconf import OmegaConf

from ..errors import ConfigError
from ..modules.backends import TRITON_BACKENDS


def _flat_fields(dc, prefix: str = ""):
    """fairseq's nested TransformerConfig as flat fields named like its CLI flags
    (encoder.embed_dim -> encoder_embed_dim), defaults and help included."""
    for f in dataclasses.fields(dc):
        if f.name == "_name":
            continue
        if isinstance(f.type, type) and dataclasses.is_dataclass(f.type):
            yield from _flat_fields(f.type, f"{prefix}{f.name}_")
            continue
        if f.default_factory is not dataclasses.MISSING:
            spec = dataclasses.field(default_factory=f.default_factory, metadata=f.metadata)
        else:
            default = f.default
            if isinstance(default, str) and default.startswith("${model."):
                # ${model.decoder.embed_dim} -> ${model.decoder_embed_dim}
                default = "${model." + default[len("${model.") :].replace(".", "_")
            spec = dataclasses.field(default=default, metadata=f.metadata)
        # fairseq annotates layers_to_keep as a list but reads it as "0,2" (LayerDrop pruning), as its CLI gives it
        kind = Optional[str] if f.name == "layers_to_keep" else f.type
        yield prefix + f.name, kind, spec


def option(default, help: str):
    """A dataclass field with its --help text."""
    return dataclasses.field(default=default, metadata={"help": help})


def choice(default: str, choices, help: str):
    """A field (type str) that takes one of `choices`: argparse offers and checks
    them, and a model checks them where its options enter (hydra, checkpoints),
    so a bad one is a line naming the option, whichever way it comes."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": tuple(choices)})


def choices_of(dc) -> dict:
    """{field: its choices} of a dataclass's choice fields."""
    return {f.name: f.metadata["choices"] for f in dataclasses.fields(dc) if "choices" in f.metadata}


@dataclasses.dataclass
class LocalOptions(FairseqDataclass):
    """Local precision beside a family's attention (modules/local.py), for every
    self-attention role the family fills; cross-attention reads the whole source."""
    short_conv: int = option(0, "K, width of a depthwise convolution over the attention's input (causal in the "
                                "decoder, centred in the encoder); 0: none")
    local_window: int = option(0, "W, exact softmax attention over the last W positions (the decoder) or the W//2 "
                                  "on each side (the encoder), added to the family's; 0: none")
    local_backend: str = choice("auto", TRITON_BACKENDS,
                                "where the window runs: triton, Triton kernels (CUDA) for its parallel form "
                                "(training) and its decoding step; torch; auto, triton where it can run")


def softmax_layers_option(side: str):
    return option(None, f"comma-separated {side} layer indices (from 0) that stay fairseq's softmax transformer "
                        "layers: a hybrid stack")


TRAIN_ATTENTION_ONLY = ("train_attention_only", bool, option(
    False, "only the parameters of the linear attention modules learn (the rest frozen): the first stage of "
    "fine-tuning a linearized softmax model"))

# Every option of fairseq's `--arch transformer`, as a flat dataclass (model
# configs stored in checkpoints are then plain dicts, no pickled Namespace),
# and the options every family shares (hybrid stacks, attention-only training).
LinearTransformerConfig = dataclasses.make_dataclass(
    "LinearTransformerConfig",
    [*_flat_fields(TransformerConfig),
     *((f"{side}_softmax_layers", Optional[str], softmax_layers_option(side)) for side in ("encoder", "decoder")),
     TRAIN_ATTENTION_ONLY],
    bases=(FairseqDataclass,),
)
LinearTransformerConfig.__module__ = __name__


@dataclasses.dataclass
class LinearLMConfig(TransformerLanguageModelConfig):
    """fairseq's transformer_lm options and the options every family shares."""
    decoder_softmax_layers: Optional[str] = softmax_layers_option("decoder")
    train_attention_only: bool = TRAIN_ATTENTION_ONLY[2]


def as_namespace(cfg: Any) -> Namespace:
    """A model config as an argparse Namespace (interpolations resolved), the form
    fairseq's transformer classes copy extra options from. It may come as a
    DictConfig (hydra, checkpoints), a Namespace, or a dataclass instance
    (fairseq's build_model turns a Namespace into one with from_namespace)."""
    if isinstance(cfg, Namespace):
        return cfg
    if dataclasses.is_dataclass(cfg):
        values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
        return Namespace(**{k: _resolve_model_ref(v, values) for k, v in values.items()})
    return Namespace(**OmegaConf.to_container(cfg, resolve=True))


def _resolve_model_ref(value: Any, values: dict) -> Any:
    """'${model.decoder_embed_dim}' -> the value of decoder_embed_dim (one level, as fairseq's defaults use)."""
    if isinstance(value, str) and value.startswith("${model.") and value.endswith("}"):
        return values.get(value[len("${model.") : -1], value)
    return value


def option_error(name: str, value: Any, why: str) -> ValueError:
    return ConfigError(f"--{name.replace('_', '-')}={value!r}: {why}")


def require_layer_indices(args: Namespace, side: str) -> None:
    """--{side}-softmax-layers: distinct indices of existing layers."""
    name, n = f"{side}_softmax_layers", getattr(args, f"{side}_layers")
    value = getattr(args, name, None)
    if value is None:
        return
    parts = str(value).split(",")
    if not all(p.strip().isdigit() and int(p) < n for p in parts) or len(set(map(int, parts))) < len(parts):
        raise option_error(name, value, f"must be distinct comma-separated layer indices in 0..{n - 1}")


def require_heads_divide(args: Namespace, side: str) -> None:
    dim, heads = getattr(args, f"{side}_embed_dim"), getattr(args, f"{side}_attention_heads")
    if heads < 1 or dim % heads != 0:
        raise ConfigError(
            f"--{side}-attention-heads={heads} must be a positive divisor of --{side}-embed-dim={dim}"
        )
