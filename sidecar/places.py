"""Where each source's messages go, instance by instance (pure): `check`'s sample file paths,
object keys and log streams, and its warning when two backend instances write one place.

Names are the backends' own (sidecar.naming escapes each wire value into one name: `check
--source 'a/b'` shows `a%2Fb.jsonl`), and an endpoint's credentials are kept out of them.

Two instances sharing a file, an S3 prefix or a CloudWatch stream is a slip an operator does not
see otherwise: for one source it writes the messages both rules take twice (a per-source rule
beside an `all` rule whose template resolves to the same file), and for two sources it makes two
writers of one file, each rotating it on its own.
"""

import datetime as dt

import attrs

from sidecar.backends import backend_class
from sidecar.backends.base import Place
from sidecar.config.settings import BackendSpec
from sidecar.constants import MESSAGE_TYPES
from sidecar.redaction import without_secrets
from sidecar.routing import RouteTable, Target

# Stands for any source in the samples of rules under `all`, `default` or a glob.
ANY_SOURCE = "SOURCE"


def place_of(spec: BackendSpec, source: str, kind: str, moment: dt.datetime) -> Place | None:
    """Where `spec`'s instance puts `source`'s messages of type `kind` at `moment`; None for a
    type without the capability, or one not available in this build."""
    cls = backend_class(spec.type) if spec.available else None
    if cls is None or cls.place_of is None:
        return None
    place = cls.place_of(spec.settings, source, kind, moment)
    # An endpoint_url may carry credentials; without them it is still the same place.
    return None if place is None else Place(without_secrets(place.where), without_secrets(place.sample))


def takes(target: Target, kind: str) -> bool:
    """Whether some of `target`'s messages can be of type `kind`."""
    return not target.filters or any(f.types is None or kind in f.types for f in target.filters)


@attrs.frozen
class Writer:
    """One instance writing a place, for one source, with the message types it takes there."""

    target: Target
    source: str
    kinds: tuple[str, ...]


@attrs.frozen
class SharedPlace:
    where: str
    writers: tuple[Writer, ...]  # of two or more instances

    @property
    def twice(self) -> dict[str, tuple[str, ...]]:
        """source -> the message types of it that more than one instance writes here."""
        counts: dict[tuple[str, str], int] = {}
        for writer in self.writers:
            for kind in writer.kinds:
                counts[writer.source, kind] = counts.get((writer.source, kind), 0) + 1
        found: dict[str, list[str]] = {}
        for (source, kind), count in counts.items():
            if count > 1:
                found.setdefault(source, []).append(kind)
        return {source: tuple(sorted(kinds)) for source, kinds in found.items()}


def sources_to_try(table: RouteTable, extra: tuple[str, ...] = ()) -> list[str]:
    """The sources named by a rule or by the operator, and `ANY_SOURCE` when other keys exist."""
    names = [*table.source_names(), *(s for s in extra if s not in table.source_names())]
    if len(table.source_keys()) > len(table.source_names()):
        names.append(ANY_SOURCE)
    return names


def shared_places(table: RouteTable, sources: list[str], moment: dt.datetime) -> list[SharedPlace]:
    """Every place that more than one backend instance writes, over `sources` and all types."""
    writers: dict[str, dict[tuple[BackendSpec, str], tuple[Target, list[str]]]] = {}
    for source in sources:
        for target in table.targets_for(source):
            for kind in sorted(MESSAGE_TYPES):
                place = place_of(target.spec, source, kind, moment) if takes(target, kind) else None
                if place is not None:
                    writers.setdefault(place.where, {}).setdefault((target.spec, source), (target, []))[1].append(kind)
    return [
        SharedPlace(where, tuple(Writer(target, source, tuple(kinds)) for (_spec, source), (target, kinds) in by_writer.items()))
        for where, by_writer in writers.items()
        if len({spec for spec, _source in by_writer}) > 1
    ]


def _rules_of(writer: Writer) -> str:
    return ", ".join(f"{rule.source}: {rule.where}" for rule in writer.target.rules)


def warnings_for(shared: list[SharedPlace]) -> list[list[str]]:
    """Per shared place, the lines of one warning: the place, each instance with the rules
    (file:line) that make it, and what it costs with the fix."""
    warnings = []
    for place in shared:
        lines = [f"{len(place.writers)} backend instances write {place.where}:"]
        lines += [f"{w.target.spec.label} for {w.source} ({_rules_of(w)})" for w in place.writers]
        twice = place.twice
        if twice:
            costs = [f"{source}'s {'messages' if set(kinds) == MESSAGE_TYPES else ' and '.join(kinds) + ' messages'}" for source, kinds in twice.items()]
            lines.append(f"{'; '.join(costs)} are written there twice: drop one of the rules, or give one its own path, prefix or stream")
        else:
            lines.append("two writers of one place, each batching (and for a file rotating) on its own: give the rules the same settings, so that they share one instance, or each its own path, prefix or stream")
        warnings.append(lines)
    return warnings
