"""fairseq transformer layers whose attention sub-layers come from a family.

Only the ``build_*_attention`` hooks are overridden; a role whose option is
"softmax" keeps fairseq's MultiheadAttention. A family that replaces the whole
layer (FLASH's GAU replaces attention and FFN) names its encoder and decoder
layer classes in its record (``Family.layers``); they are built as
``encoder(cfg, options, return_fc=...)`` and ``decoder(cfg, options,
no_encoder_attn)``, `options` being the family's module options.
"""
from fairseq.distributed import fsdp_wrap
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase
from fairseq.modules.checkpoint_activations import checkpoint_wrapper

from .attention import build_attention, family_of, module_options


class LinearEncoderLayer(TransformerEncoderLayerBase):
    def build_self_attention(self, embed_dim, cfg):
        attn = build_attention(cfg, "encoder_self", embed_dim, cfg.encoder.attention_heads)
        return attn if attn is not None else super().build_self_attention(embed_dim, cfg)


class LinearDecoderLayer(TransformerDecoderLayerBase):
    def build_self_attention(self, embed_dim, cfg, add_bias_kv=False, add_zero_attn=False):
        attn = build_attention(cfg, "decoder_self", embed_dim, cfg.decoder.attention_heads)
        if attn is None:
            return super().build_self_attention(embed_dim, cfg, add_bias_kv, add_zero_attn)
        return attn

    def build_encoder_attention(self, embed_dim, cfg):
        attn = build_attention(
            cfg, "cross", embed_dim, cfg.decoder.attention_heads, kv_dim=cfg.encoder.embed_dim
        )
        return attn if attn is not None else super().build_encoder_attention(embed_dim, cfg)


def softmax_layers(cfg, side: str) -> set:
    """The layer indices of --{side}-softmax-layers (checked where the model options enter)."""
    value = getattr(cfg, f"{side}_softmax_layers", None)
    return {int(i) for i in str(value).split(",")} if value is not None else set()


def encoder_layer(cfg, index: int, return_fc: bool = False):
    """Encoder layer `index`: fairseq's own where --encoder-softmax-layers lists it."""
    family = family_of(cfg, "encoder_self")
    if index in softmax_layers(cfg, "encoder"):
        layer = TransformerEncoderLayerBase(cfg, return_fc=return_fc)
    elif family is not None and family.layers:
        layer = family.layers[0](cfg, module_options(family, cfg, "encoder_self"), return_fc=return_fc)
    else:
        layer = LinearEncoderLayer(cfg, return_fc=return_fc)
    return wrap_layer(layer, cfg)


def decoder_layer(cfg, index: int, no_encoder_attn: bool = False):
    """Decoder layer `index`: fairseq's own where --decoder-softmax-layers lists it."""
    family = family_of(cfg, "decoder_self")
    if index in softmax_layers(cfg, "decoder"):
        layer = TransformerDecoderLayerBase(cfg, no_encoder_attn)
    elif family is not None and family.layers:
        layer = family.layers[1](cfg, module_options(family, cfg, "decoder_self"), no_encoder_attn)
    else:
        layer = LinearDecoderLayer(cfg, no_encoder_attn)
    return wrap_layer(layer, cfg)


def wrap_layer(layer, cfg):
    """Activation checkpointing and FSDP wrapping, as fairseq's own build_*_layer do."""
    if cfg.checkpoint_activations:
        layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
    min_params = 0 if cfg.checkpoint_activations else cfg.min_params_to_wrap
    return fsdp_wrap(layer, min_num_params=min_params)
