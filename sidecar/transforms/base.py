"""What a transform is: a step between enrichment and routing that takes one source's batch
and gives back the batch the backends get.

A step never changes the batch it is given (the live index and the HTTP tap hold it too): it
returns it unchanged, or a new one. The steps for a source come from the `transforms:` section,
under the same source keys as routing; they run in order, on the native and the Python path
alike, since both hand the stage the same `Batch`.
"""

from typing import ClassVar

import attrs

from sidecar.batch import Batch


class Transform:
    """Base of every transform. A subclass sets `type_name` and `Settings` (a frozen attrs class
    read from the config with file:line errors) and implements `apply`."""

    type_name: ClassVar[str]
    Settings: ClassVar[type]

    def __init__(self, settings):
        self.settings = settings

    def apply(self, batch: Batch) -> Batch:
        raise NotImplementedError

    def describe(self) -> str:
        """For `check`: the step's settings that are set."""
        return " ".join(f"{k}={v}" for k, v in attrs.asdict(self.settings).items() if v is not None) or "defaults"
