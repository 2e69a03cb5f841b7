"""Family-agnostic fairseq glue: configs, encoder/decoder and model base classes.

A family's models file subclasses ``LinearTransformerModel`` (encoder-decoder)
and ``LinearLanguageModel`` (decoder-only), adds its options to
``LinearTransformerConfig`` / fairseq's ``TransformerLanguageModelConfig``, and
registers presets. Nothing of fairseq's transformer is copied: the model
classes subclass fairseq's and swap in layers whose attention comes from the
family registry (``modules.attention``).
"""
import dataclasses
from argparse import Namespace
from typing import Any

from fairseq.dataclass import FairseqDataclass
from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models.transformer import (
    TransformerConfig,
    TransformerDecoderBase,
    TransformerEncoderBase,
    TransformerModel,
    transformer_iwslt_de_en,
    transformer_vaswani_wmt_en_de_big,
    transformer_wmt_en_de,
)
from fairseq.models.transformer_lm import (
    DEFAULT_MAX_TARGET_POSITIONS,
    TransformerLanguageModel,
    base_lm_architecture,
)
from fairseq.modules import AdaptiveInput
from fairseq import options
from omegaconf import OmegaConf

from ..errors import ConfigError
from ..modules.attention import ROLES, attention_kind
from ..modules.layers import decoder_layer, encoder_layer
from ..registry import register_model_architecture


# -- configs ----------------------------------------------------------------
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
        yield prefix + f.name, f.type, spec


# Every option of fairseq's `--arch transformer`, as a flat dataclass: model
# configs stored in checkpoints are then plain dicts (no pickled Namespace).
LinearTransformerConfig = dataclasses.make_dataclass(
    "LinearTransformerConfig", list(_flat_fields(TransformerConfig)), bases=(FairseqDataclass,)
)
LinearTransformerConfig.__module__ = __name__


def option(default, help: str):
    """A dataclass field with its --help text."""
    return dataclasses.field(default=default, metadata={"help": help})


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


def require_positive_int(args: Namespace, name: str) -> None:
    value = getattr(args, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise option_error(name, value, "must be a positive integer")


def require_positive(args: Namespace, name: str) -> None:
    value = getattr(args, name)
    if not isinstance(value, (int, float)) or not value > 0:
        raise option_error(name, value, "must be > 0")


def require_heads_divide(args: Namespace, side: str) -> None:
    dim, heads = getattr(args, f"{side}_embed_dim"), getattr(args, f"{side}_attention_heads")
    if heads < 1 or dim % heads != 0:
        raise ConfigError(
            f"--{side}-attention-heads={heads} must be a positive divisor of --{side}-embed-dim={dim}"
        )


# -- encoder / decoder ------------------------------------------------------
class LinearTransformerEncoder(TransformerEncoderBase):
    def build_encoder_layer(self, cfg):
        return encoder_layer(cfg, return_fc=self.return_fc)


class LinearTransformerDecoder(TransformerDecoderBase):
    def build_decoder_layer(self, cfg, no_encoder_attn=False):
        return decoder_layer(cfg, no_encoder_attn)

    def buffered_future_mask(self, tensor):
        # Linear causal attention (and a GAU) is causal by construction: skip fairseq's
        # T x T future mask, which would cost O(T^2) memory at long context.
        if attention_kind(self.cfg, "decoder_self") != "softmax":
            return None
        return super().buffered_future_mask(tensor)


# -- checkpoints that do not fit -----------------------------------------------
def _examples(names, n: int = 3) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def checkpoint_mismatch(model, state_dict) -> str:
    """Why `state_dict` does not load into `model`, in words: vocabulary, shapes, names."""
    mine = model.state_dict()
    reasons = []
    shapes = {k: (tuple(v.shape), tuple(mine[k].shape)) for k, v in state_dict.items()
              if k in mine and hasattr(v, "shape") and tuple(v.shape) != tuple(mine[k].shape)}
    vocab = [k for k in shapes if k.endswith(("embed_tokens.weight", "output_projection.weight"))]
    if vocab:
        (theirs, ours) = shapes[vocab[0]]
        reasons.append(
            f"the checkpoint's vocabulary has {theirs[0]} entries, this task's dictionary {ours[0]} "
            f"({vocab[0]}): use the data-bin (dictionary) the model was trained with"
        )
    other = {k: v for k, v in shapes.items() if k not in vocab}
    if other:
        k = sorted(other)[0]
        reasons.append(f"{len(other)} tensors differ in shape, e.g. {k}: {list(other[k][0])} in the checkpoint, "
                       f"{list(other[k][1])} here (other model sizes or options)")
    missing, unexpected = set(mine) - set(state_dict), set(state_dict) - set(mine)
    if missing or unexpected:
        reasons.append(
            f"the checkpoint lacks {len(missing)} entries this {type(model).__name__} has"
            + (f" ({_examples(missing)})" if missing else "")
            + f" and has {len(unexpected)} it does not" + (f" ({_examples(unexpected)})" if unexpected else "")
            + ": it was trained with another architecture or attention"
        )
    return "; ".join(reasons) or "the checkpoint's tensors do not match this model"


# -- models -----------------------------------------------------------------
class LinearModelMixin:
    """Option handling shared by the encoder-decoder and decoder-only models.
    A family may set ``derive_family(args)`` (settings that follow from others)
    and ``check_family(args, roles)`` (checks of its own options)."""

    roles = ROLES
    derive_family = None
    check_family = None

    @classmethod
    def prepare_args(cls, cfg) -> Namespace:
        args = as_namespace(cfg)
        if cls.derive_family is not None:
            cls.derive_family(args)
        cls.check_args(args)
        return args

    @classmethod
    def add_args(cls, parser):
        # options come from the registered dataclass, as for any dataclass model
        dc = getattr(cls, "__dataclass", None)
        if dc is not None:
            gen_parser_from_dataclass(parser, dc(), delete_default=True)

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        try:
            return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)
        except RuntimeError as err:  # torch's "Error(s) in loading state_dict", made readable
            raise ConfigError(f"cannot load the checkpoint into {type(self).__name__}: "
                              + checkpoint_mismatch(self, state_dict)) from err

    @classmethod
    def check_args(cls, args: Namespace) -> None:
        """Raise a ValueError naming the option and its value; families extend it."""
        for role in cls.roles:
            if attention_kind(args, role) != "softmax":
                require_heads_divide(args, "encoder" if role == "encoder_self" else "decoder")
        if getattr(args, "cross_self_attention", False):
            raise option_error("cross_self_attention", True, "is not supported with linear attention")
        if cls.check_family is not None:
            cls.check_family(args, [role for role in cls.roles if attention_kind(args, role) != "softmax"])


def require_task(model_cls, task, wanted: str, fix: str) -> None:
    """A model built for the wrong kind of task (an LM checkpoint given to
    translation, say) would decode garbage or fail deep in fairseq: say so."""
    from fairseq.tasks.language_modeling import LanguageModelingTask
    from fairseq.tasks.translation import TranslationTask

    kinds = {"translation": TranslationTask, "language_modeling": LanguageModelingTask}
    wrong = [name for name, kind in kinds.items() if name != wanted and isinstance(task, kind)]
    if wrong:
        raise ConfigError(f"{model_cls.__name__} is a {fix}, but the task is {wrong[0]}")


class LinearTransformerModel(LinearModelMixin, TransformerModel):
    """fairseq's encoder-decoder transformer with family attention per role
    (--encoder-self-attn, --decoder-self-attn, --cross-attn)."""

    @classmethod
    def build_model(cls, cfg, task):
        require_task(cls, task, "translation", "translation (encoder-decoder) model: use --task translation with "
                     "fairseq-generate or -interactive (not fairseq-eval-lm)")
        return super().build_model(cls.prepare_args(cfg), task)

    @classmethod
    def build_encoder(cls, cfg, src_dict, embed_tokens):
        return LinearTransformerEncoder(TransformerConfig.from_namespace(cfg), src_dict, embed_tokens)

    @classmethod
    def build_decoder(cls, cfg, tgt_dict, embed_tokens):
        cfg = TransformerConfig.from_namespace(cfg)
        return LinearTransformerDecoder(cfg, tgt_dict, embed_tokens, no_encoder_attn=cfg.no_cross_attention)


class LinearLanguageModel(LinearModelMixin, TransformerLanguageModel):
    """fairseq's transformer_lm with family attention in the decoder (--decoder-self-attn)."""

    roles = ("decoder_self",)

    @classmethod
    def build_model(cls, cfg, task):
        require_task(cls, task, "language_modeling", "language model: pass --task language_modeling "
                     "(fairseq-eval-lm, or fairseq-generate/-interactive with that flag)")
        args = as_namespace(cfg)
        base_lm_architecture(args)
        args = cls.prepare_args(args)
        if args.decoder_layers_to_keep:
            args.decoder_layers = len(args.decoder_layers_to_keep.split(","))
        if getattr(args, "max_target_positions", None) is None:
            args.max_target_positions = getattr(args, "tokens_per_sample", DEFAULT_MAX_TARGET_POSITIONS)
        if args.character_embeddings:
            raise option_error("character_embeddings", True, "is not supported by linear_fairseq LMs")
        if args.tie_adaptive_weights and not (
            args.adaptive_input
            and args.adaptive_input_factor == args.adaptive_softmax_factor
            and args.adaptive_softmax_cutoff == args.adaptive_input_cutoff
            and args.decoder_input_dim == args.decoder_output_dim
        ):
            raise option_error(
                "tie_adaptive_weights", True,
                "needs --adaptive-input with the adaptive softmax's factor and cutoff",
            )
        dictionary = task.source_dictionary
        if args.adaptive_input:
            embed_tokens = AdaptiveInput(
                len(dictionary),
                dictionary.pad(),
                args.decoder_input_dim,
                args.adaptive_input_factor,
                args.decoder_embed_dim,
                options.eval_str_list(args.adaptive_input_cutoff, type=int),
                args.quant_noise_pq,
                args.quant_noise_pq_block_size,
            )
        else:
            embed_tokens = cls.build_embedding(args, dictionary, args.decoder_input_dim)
        decoder = LinearTransformerDecoder(
            TransformerConfig.from_namespace(args), task.target_dictionary, embed_tokens, no_encoder_attn=True
        )
        return cls(decoder)


# -- presets ------------------------------------------------------------------
# fairseq's encoder-decoder sizes; every family registers <model>_<suffix>.
MT_PRESETS = {
    "iwslt_de_en": transformer_iwslt_de_en,
    "wmt_en_de": transformer_wmt_en_de,
    "vaswani_wmt_en_de_big": transformer_vaswani_wmt_en_de_big,
}


def register_presets(model_name: str, presets) -> None:
    """Register `{model_name}_{suffix}` for each (suffix, arch function)."""
    for suffix, arch in presets.items():
        register_model_architecture(model_name, f"{model_name}_{suffix}")(arch)
