"""Idempotent wrappers around fairseq's model registration.

fairseq raises "Cannot register duplicate model" when a registering module runs
twice, which happens when the package is imported under two names (a test
that imports ``linear_fairseq`` and a ``--user-dir`` pointing at a copy, or a
worker that re-imports the user dir). A second registration of the same
class or architecture name is a no-op here; a different class under a taken
name is still an error.
"""
from fairseq.models import ARCH_MODEL_NAME_REGISTRY, MODEL_REGISTRY
from fairseq.models import register_model as _register_model
from fairseq.models import register_model_architecture as _register_arch


def register_model(name, dataclass=None):
    def wrap(cls):
        existing = MODEL_REGISTRY.get(name)
        if existing is None:
            return _register_model(name, dataclass)(cls)
        if existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"model name {name!r} is already taken by {existing.__module__}.{existing.__qualname__}")
        return existing

    return wrap


def register_model_architecture(model_name, arch_name):
    def wrap(fn):
        owner = ARCH_MODEL_NAME_REGISTRY.get(arch_name)
        if owner is None:
            return _register_arch(model_name, arch_name)(fn)
        if owner != model_name:
            raise ValueError(f"architecture {arch_name!r} already belongs to model {owner!r}")
        return fn

    return wrap
