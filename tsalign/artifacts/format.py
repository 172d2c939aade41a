"""The persisted format of finished stages (tsalign/artifacts/FORMAT.md), and the view of a stage's config slice
that is hashed and compared.

format_v1.json is the snapshot of the format as experiments on users' disks were written: every stage's config
keys, outputs and `_work` names, and the manifest's fields. A finished stage is "done" while its recorded config
matches the current one, so a key that appears in every new config (a new option) would mark every finished
experiment "changed". hashed_config() therefore leaves out each key that is not in the v1 snapshot while it has
its schema default (tsalign.config.schema): adding an option with a default changes nothing finished, setting it
to anything else does. Keys in the snapshot are always kept, so a config of v1 keys hashes exactly as before.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from importlib import resources
from typing import Any

FORMAT_FILE = "format_v1.json"
# config slice keys that hold a schema section under another name: evaluate's judge is a teacher option,
# pdistill's greedy a part of the sampler
_SECTION_OF = {"judge": "teacher", "greedy": "sampler"}
_NOT_IN_SCHEMA = object()
_LEFT_OUT = object()
_NO_DEFAULT = object()  # a schema key declared MISSING (policy.name, policy.path): always hashed
_OMEGACONF_MISSING = "???"


@functools.lru_cache(maxsize=1)
def format_v1() -> dict:
    """The v1 snapshot, shipped inside the package (tests/test_format.py checks the code against it)."""
    return json.loads(resources.files(__package__).joinpath(FORMAT_FILE).read_text())


def v1_keys(stage: str) -> frozenset[str]:
    """Dotted paths of the config keys stage `stage` hashed in v1 (none for a stage added later)."""
    return frozenset(format_v1()["stages"].get(stage, {}).get("config", ()))


def _defaults_of(schema: type) -> dict:
    """A dataclass's defaults as a nested dict: a nested dataclass field is its class's defaults even when the
    field itself has none (policy, teacher, student); a field without a default (MISSING) is _NO_DEFAULT."""
    hints = typing.get_type_hints(schema)
    out = {}
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[f.name]):
            out[f.name] = _defaults_of(hints[f.name])
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        elif f.default is dataclasses.MISSING or (isinstance(f.default, str) and f.default == _OMEGACONF_MISSING):
            out[f.name] = _NO_DEFAULT
        else:
            out[f.name] = f.default
    return out


@functools.lru_cache(maxsize=1)
def schema_defaults() -> dict:
    """The schema default of every config key, by the path a stage's config slice gives it."""
    from tsalign.config.schema import TsalignConfig  # here, not on import: status reads manifests without it

    defaults = _defaults_of(TsalignConfig)
    return {**defaults, **{alias: defaults[section] for alias, section in _SECTION_OF.items()}}


def schema_node(path: str) -> Any:
    """The schema default of the key at dotted `path` of a config slice: _NO_DEFAULT for a key declared
    without one, _NOT_IN_SCHEMA for a key the schema does not declare (a slice's own key such as policy_used,
    or one inside a free-form mapping such as policy.tiny)."""
    node: Any = schema_defaults()
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return _NOT_IN_SCHEMA
        node = node[key]
    return node


def _as_hashed(value: Any) -> Any:
    """What config_hash sees of a value (enums as their values, tuples as lists): equality as the hash sees it."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def is_default(path: str, value: Any) -> bool:
    default = schema_node(path)
    return default is not _NO_DEFAULT and default is not _NOT_IN_SCHEMA and _as_hashed(value) == _as_hashed(default)


def _kept(value: Any, path: str, known: frozenset[str]) -> Any:
    """`value` without the keys below it that are new since v1 and at their default; _LEFT_OUT when `value`
    itself is such a key."""
    if path not in known and is_default(path, value):
        return _LEFT_OUT
    if not isinstance(value, dict):
        return value
    children = {k: _kept(v, f"{path}.{k}" if path else str(k), known) for k, v in value.items()}
    return {k: v for k, v in children.items() if v is not _LEFT_OUT}


def hashed_config(stage: str, config: dict) -> dict:
    """The part of a stage's config slice that its config hash, its `_work` stamp and is_done's comparison
    see: `config` minus the keys not in the v1 snapshot of `stage` whose value is their schema default.
    Identical to `config` when every key is a v1 key, so what finished before hashes as it always did."""
    return _kept(config, "", v1_keys(stage) | {""})


def config_paths(config: dict, prefix: str = "") -> list[str]:
    """Dotted paths of every key of `config`, its top level and the schema's sections below it, not the
    contents of free-form mappings (policy.tiny's model overrides are values, not format)."""
    paths = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        if prefix and schema_node(path) is _NOT_IN_SCHEMA:
            continue
        paths.append(path)
        if isinstance(value, dict):
            paths += config_paths(value, f"{path}.")
    return paths
