"""Source types by name: the ways messages come in. A new source is a module here with one
`Source` subclass; adding its name below is all the core needs to know of it."""

import importlib

from sidecar.sources.base import CannotListen, Intake, Source
from sidecar.suggestions import did_you_mean

# type name -> (module, class)
SOURCE_TYPES = {
    "tcp": ("sidecar.sources.tcp", "TcpSource"),
    "forward": ("sidecar.sources.forward", "ForwardSource"),
    "otlp": ("sidecar.sources.otlp", "OtlpSource"),
}

__all__ = ["CannotListen", "Intake", "Source", "SourceTypeUnknown", "source_class"]


class SourceTypeUnknown(ValueError):
    pass


def source_class(type_name: str) -> type[Source]:
    if type_name not in SOURCE_TYPES:
        raise SourceTypeUnknown(f"unknown source type {type_name!r} (known types: {', '.join(sorted(SOURCE_TYPES))}){did_you_mean(type_name, SOURCE_TYPES)}")
    module_name, class_name = SOURCE_TYPES[type_name]
    return getattr(importlib.import_module(module_name), class_name)
