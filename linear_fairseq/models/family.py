"""Registering a family: everything fairseq needs, derived from its record.

``register(family)`` adds the record to ``families.FAMILIES`` (the list every
tool reads) and registers the fairseq models ``<name>_transformer`` and
``<name>_lm`` with the record's config dataclasses, and their presets
``<model>_<suffix>``. The model classes are fairseq's transformer models with
the family's layers (``linear_transformer``); they check the family's options
with its ``problems`` and derive its settings with ``derive``.
"""
from fairseq.dataclass import ChoiceEnum
from fairseq.models import MODEL_REGISTRY, register_model, register_model_architecture

from .. import families
from ..errors import ConfigError
from ..families import Family
from .linear_transformer import LinearLanguageModel, LinearTransformerModel


def role_choice(name: str, softmax: bool = True):
    """The choices of a --*-attn option of family `name`'s models."""
    return ChoiceEnum((["softmax"] if softmax else []) + [name])


def register(family: Family):
    """Register `family`; returns its encoder-decoder and language model classes
    (for the Python API: ``<Class>.from_pretrained``)."""
    taken = MODEL_REGISTRY.get(family.mt_model)
    if taken is not None:  # fairseq's registries are global: a second copy of the plugin cannot register
        raise ConfigError(f"model {family.mt_model} is already registered by {taken.__module__}: the plugin is "
                          f"imported twice, as {taken.__module__.split('.')[0]} and {__name__.split('.')[0]}; "
                          "import it under one name (--user-dir the folder Python imports it from)")
    families.add(family)
    classes = []
    camel = "".join(part.capitalize() for part in family.name.split("_"))
    for kind, base, config, presets in (
        ("mt", LinearTransformerModel, family.mt_config, family.mt_presets),
        ("lm", LinearLanguageModel, family.lm_config, family.lm_presets),
    ):
        name = family.model(kind)
        module = family.options.__module__  # the family's models file
        cls = type(camel + base.__name__[len("Linear"):], (base,), {"family": family, "__module__": module})
        classes.append(register_model(name, dataclass=config)(cls))
        for suffix, arch in presets.items():
            register_model_architecture(name, f"{name}_{suffix}")(arch)
    return tuple(classes)
