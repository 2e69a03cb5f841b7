"""Family-agnostic fairseq glue: the encoder, decoder and model base classes.

``models.family.register`` makes each family's models from
``LinearTransformerModel`` (encoder-decoder) and ``LinearLanguageModel``
(decoder-only), with the family's record as ``family``. They subclass
fairseq's and swap in layers whose attention comes from the family named by
each --*-attn option (``modules.layers``).
"""
import functools
from argparse import Namespace

from fairseq.models.transformer import (
    TransformerConfig,
    TransformerDecoderBase,
    TransformerEncoderBase,
    TransformerModel,
    transformer_iwslt_de_en,
    transformer_vaswani_wmt_en_de_big,
    transformer_wmt_en_de,
)
from fairseq.models.transformer_lm import TransformerLanguageModel
from fairseq.dataclass.utils import gen_parser_from_dataclass

from ..checkpoints import checkpoint_mismatch
from ..errors import ConfigError
from ..families import Family
from ..modules.attention import ROLES, attention_kind, module_options, named_problems
from ..modules.incremental import IncrementalState, keeps_rows
from ..modules.layers import decoder_layer, encoder_layer, softmax_layers
from . import lazy_source
from .options import as_namespace, choices_of, option_error, require_heads_divide, require_layer_indices


# -- encoder / decoder ------------------------------------------------------
def next_index(module) -> int:
    """fairseq builds a stack's layers in order, one build_*_layer call each: the
    index of the layer being built."""
    module.layers_built = getattr(module, "layers_built", 0) + 1
    return module.layers_built - 1


class LinearTransformerEncoder(TransformerEncoderBase):
    def build_encoder_layer(self, cfg):
        return encoder_layer(cfg, next_index(self), return_fc=self.return_fc)

    def reorder_encoder_out(self, encoder_out, new_order):
        # the source's rows move only where the decoder reads them (lazy_source)
        out = super().reorder_encoder_out(lazy_source.eager_part(encoder_out), new_order)
        return {**out, **lazy_source.lazy_entries(encoder_out, new_order)}


class LinearTransformerDecoder(TransformerDecoderBase):
    def build_decoder_layer(self, cfg, no_encoder_attn=False):
        return decoder_layer(cfg, next_index(self), no_encoder_attn)

    @functools.cached_property
    def causal_by_construction(self) -> bool:
        """Linear causal attention (and a GAU) needs no future mask, unless softmax layers are mixed in."""
        return attention_kind(self.cfg, "decoder_self") != "softmax" and not softmax_layers(self.cfg, "decoder")

    @functools.cached_property
    def cross_attentions(self) -> list:
        return [m for m in self.layers.modules() if getattr(m, "encoder_decoder_attention", False)]

    def extract_features_scriptable(self, prev_output_tokens, encoder_out, incremental_state=None, *args, **kwargs):
        if encoder_out is not None and lazy_source.source_needed(self.cross_attentions, incremental_state):
            encoder_out = lazy_source.gathered(encoder_out)
        return super().extract_features_scriptable(prev_output_tokens, encoder_out, incremental_state, *args, **kwargs)

    def reorder_incremental_state_scripting(self, incremental_state, new_order):
        # every module's state stays as it is where the order keeps the rows in place
        if not keeps_rows(incremental_state, new_order):
            super().reorder_incremental_state_scripting(incremental_state, new_order)

    def buffered_future_mask(self, tensor):
        # skip fairseq's T x T future mask where it is not needed: O(T^2) memory at long context
        if self.causal_by_construction:
            return None
        return super().buffered_future_mask(tensor)


# -- models -----------------------------------------------------------------
class LinearModelMixin:
    """Option handling shared by the encoder-decoder and decoder-only models:
    the family's settings that follow from others (``Family.derive``), then the
    checks of every option where it enters."""

    roles = ROLES
    family: Family = None

    @classmethod
    def prepare_args(cls, cfg) -> Namespace:
        args = as_namespace(cfg)
        if cls.family.derive is not None:
            cls.family.derive(args)
        cls.check_args(args)
        return args

    @classmethod
    def add_args(cls, parser):
        # options come from the registered dataclass, as for any dataclass model
        dc = getattr(cls, "__dataclass", None)
        if dc is not None:
            gen_parser_from_dataclass(parser, dc(), delete_default=True)
            choices = choices_of(dc)
            for action in parser._actions:  # argparse offers and checks the choice fields' choices
                action.choices = choices.get(action.dest, action.choices)

    @classmethod
    def set_trainable(cls, model, args: Namespace):
        """--train-attention-only: freeze every parameter outside the family's
        attention modules (a GAU counts whole)."""
        if getattr(args, "train_attention_only", False):
            learn = {id(p) for m in model.modules() if isinstance(m, IncrementalState) for p in m.parameters()}
            if not learn:
                raise option_error("train_attention_only", True, "this model has no linear attention to train "
                                   "(every role and layer is softmax)")
            for p in model.parameters():
                p.requires_grad_(id(p) in learn)
        return model

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        try:
            return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)
        except RuntimeError as err:  # torch's "Error(s) in loading state_dict", made readable
            raise ConfigError(f"cannot load the checkpoint into {type(self).__name__}: "
                              + checkpoint_mismatch(self, state_dict)) from err

    @classmethod
    def check_args(cls, args: Namespace) -> None:
        """Raise a ValueError naming the option and its value."""
        for name, allowed in choices_of(getattr(cls, "__dataclass")).items():
            value = getattr(args, name, None)
            if value is not None and value not in allowed:  # hydra, a checkpoint: argparse did not see it
                raise option_error(name, value, f"choose from {', '.join(allowed)}")
        for role in cls.roles:
            if attention_kind(args, role) != "softmax":
                require_heads_divide(args, "encoder" if role == "encoder_self" else "decoder")
        for side in ("encoder", "decoder") if "encoder_self" in cls.roles else ("decoder",):
            require_layer_indices(args, side)
        if getattr(args, "cross_self_attention", False):
            raise option_error("cross_self_attention", True, "is not supported with linear attention")
        for role in cls.roles:
            if attention_kind(args, role) == cls.family.name:
                cls.check_family_options(args, role)

    @classmethod
    def check_family_options(cls, args: Namespace, role: str) -> None:
        """The family's rules (Family.problems) for `role`, named as command-line options."""
        side = "encoder" if role == "encoder_self" else "decoder"
        options = module_options(cls.family, args, role)
        dim = getattr(args, f"{side}_embed_dim")
        for name, value, why in named_problems(cls.family, options, role, dim, width=f"--{side}-embed-dim"):
            raise option_error(name, value, why)


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
        args = cls.prepare_args(cfg)
        return cls.set_trainable(super().build_model(args, task), args)

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
        args = cls.prepare_args(as_namespace(cfg))  # the options as given, as fairseq's own build_model takes them
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
        # fairseq's transformer_lm settles the derived sizes and builds the embeddings; its decoder is
        # then replaced by one whose layers come from the family registry
        stock = super().build_model(args, task)
        decoder = LinearTransformerDecoder(
            TransformerConfig.from_namespace(args), task.target_dictionary, stock.decoder.embed_tokens,
            no_encoder_attn=True,
        )
        return cls.set_trainable(cls(decoder), args)


# -- presets ------------------------------------------------------------------
# fairseq's encoder-decoder sizes, which a family may register as <model>_<suffix>.
MT_PRESETS = {
    "iwslt_de_en": transformer_iwslt_de_en,
    "wmt_en_de": transformer_wmt_en_de,
    "vaswani_wmt_en_de_big": transformer_vaswani_wmt_en_de_big,
}
