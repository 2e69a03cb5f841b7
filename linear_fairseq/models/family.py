"""Registering a family: everything fairseq needs, derived from its record.

``register(family)`` adds the record to ``families.FAMILIES`` (the list every
tool reads) and registers the fairseq models ``<name>_transformer`` and
``<name>_lm`` with the record's config dataclasses, and their presets
``<model>_<suffix>``. The model classes are fairseq's transformer models with
the family's layers (``linear_transformer``); they check the family's options
with its ``problems`` and derive its settings with ``derive``.
"""
import dataclasses

from fairseq.models import MODEL_REGISTRY, register_model, register_model_architecture

from .. import families
from ..errors import ConfigError
from ..families import Family
from .linear_transformer import LinearLanguageModel, LinearTransformerModel
from .options import LinearLMConfig, LinearTransformerConfig, choice


def role_choice(name: str, softmax: bool = True) -> tuple:
    """The choices of a --*-attn option of family `name`'s models."""
    return (("softmax",) if softmax else ()) + (name,)


def camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def default_configs(family: Family) -> Family:
    """`family` with the configs of a family whose options take the same defaults
    in both model kinds, every attention role its own, where it names none."""
    if family.mt_config is not None:
        return family
    name, options = family.name, family.options
    roles = [(f"{role}_attn", str, choice(name, role_choice(name), what)) for role, what in (
        ("encoder_self", "encoder self-attention"), ("cross", "decoder cross-attention"))]
    mt = dataclasses.make_dataclass(f"{camel(name)}TransformerConfig", roles, bases=(LinearTransformerConfig, options))
    lm = dataclasses.make_dataclass(f"{camel(name)}LMConfig", [], bases=(LinearLMConfig, options))
    for config in (mt, lm):
        config.__module__ = options.__module__
    return dataclasses.replace(family, mt_config=mt, lm_config=lm)


def register(family: Family):
    """Register `family`; returns its encoder-decoder and language model classes
    (for the Python API: ``<Class>.from_pretrained``). A family that names no
    configs gets ``default_configs``."""
    family = default_configs(family)
    taken = MODEL_REGISTRY.get(family.mt_model)
    if taken is not None:  # fairseq's registries are global: a second copy of the plugin cannot register
        raise ConfigError(f"model {family.mt_model} is already registered by {taken.__module__}: the plugin is "
                          f"imported twice, as {taken.__module__.split('.')[0]} and {__name__.split('.')[0]}; "
                          "import it under one name (--user-dir the folder Python imports it from)")
    families.add(family)
    classes = []
    for kind, base, config, presets in (
        ("mt", LinearTransformerModel, family.mt_config, family.mt_presets),
        ("lm", LinearLanguageModel, family.lm_config, family.lm_presets),
    ):
        name = family.model(kind)
        module = family.options.__module__  # the family's models file
        cls = type(camel(family.name) + base.__name__[len("Linear"):], (base,), {"family": family, "__module__": module})
        classes.append(register_model(name, dataclass=config)(cls))
        for suffix, arch in presets.items():
            register_model_architecture(name, f"{name}_{suffix}")(arch)
    return tuple(classes)
