"""Transform types by name, and the stage that runs each source's steps. A new transform is a
module here with one `Transform` subclass; adding its name below is all the core needs to know."""

import importlib

import attrs

from sidecar.batch import Batch
from sidecar.source_keys import SourceKeys
from sidecar.transforms.base import Transform
from sidecar.suggestions import did_you_mean

# type name -> (module, class)
TRANSFORM_TYPES = {
    "filter": ("sidecar.transforms.filter", "Filter"),
}

__all__ = ["TRANSFORM_TYPES", "Transform", "TransformSpec", "TransformStage", "TransformTypeUnknown", "transform_class"]


class TransformTypeUnknown(ValueError):
    pass


def transform_class(type_name: str) -> type[Transform]:
    if type_name not in TRANSFORM_TYPES:
        raise TransformTypeUnknown(f"unknown transform type {type_name!r} (known types: {', '.join(sorted(TRANSFORM_TYPES))}){did_you_mean(type_name, TRANSFORM_TYPES)}")
    module_name, class_name = TRANSFORM_TYPES[type_name]
    return getattr(importlib.import_module(module_name), class_name)


@attrs.frozen
class TransformSpec:
    source: str  # a source key, as in routing
    type: str
    settings: object
    where: object  # file:line of the step

    @property
    def label(self) -> str:
        return f"{self.source}[{self.type}]"


class TransformStage:
    """The steps of every source key, built once per configuration; `apply` runs a source's
    steps in order (those of its exact and glob keys, or of `default`, then those of `all`)."""

    def __init__(self, specs: tuple[TransformSpec, ...] = ()):
        self.specs = specs
        self._steps: SourceKeys[tuple[TransformSpec, Transform]] = SourceKeys((spec.source, (spec, transform_class(spec.type)(spec.settings))) for spec in specs)

    def __bool__(self) -> bool:
        return bool(self.specs)

    def steps_for(self, source: str) -> list[tuple[TransformSpec, Transform]]:
        return self._steps.for_source(source)

    def source_keys(self) -> list[str]:
        return self._steps.keys()

    def steps_under(self, key: str) -> list[tuple[TransformSpec, Transform]]:
        return [entry for source, entry in self._steps.entries if source == key]

    def apply(self, batch: Batch, removed: "callable") -> Batch:
        """`batch` after its source's steps; `removed(spec, count)` hears of each step's
        messages that went no further."""
        for spec, step in self.steps_for(batch.source):
            before = len(batch)
            batch = step.apply(batch)
            if len(batch) < before:
                removed(spec, before - len(batch))
            if not len(batch):
                break
        return batch
