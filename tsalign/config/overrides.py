"""Overrides Hydra cannot compose, as one line: `tsalign model=lama` or `tsalign seed=abc` would otherwise end in
Hydra's message over six to twenty lines (the config search path, the schema's class names, HYDRA_FULL_ERROR).

The CLI composes the command line's overrides once before Hydra runs (~0.1 s); where they compose, Hydra then
runs as always. A multirun (`-m`, whose sweeps compose per job) and a command line naming another config
(`-cn`, `-cp`, `-cd`) are left to Hydra's own report.
"""

from __future__ import annotations

import contextlib
import io

import hydra
from hydra.errors import MissingConfigException, OverrideParseException

# the lines of Hydra's and OmegaConf's messages that name internals, not the fix
_NOISE = ("Config search path", "provider=", "full_key:", "reference_type=", "object_type=", "See https://hydra.cc")


def one_line(error: Exception) -> str:
    """A composition error as one line: a missing option's choices, a key that is not in the schema, a value its type
    refuses, or what Hydra says (its lines joined, internals left out)."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    if isinstance(error, MissingConfigException) and error.options and error.missing_cfg_file:
        group, _, name = str(error.missing_cfg_file).rpartition("/")
        if group:
            return f"{group}={name} is not an option of {group}: one of {', '.join(sorted(error.options))} (conf/{group}/)"
    cause = error.__cause__
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key:
        return f"{cause.full_key} is not a key of the config (a typo? `tsalign --cfg job` prints them all)"
    if isinstance(cause, OmegaConfBaseException) and str(error).startswith("Error merging override "):
        return f"{str(error).removeprefix('Error merging override ')}: {str(cause).strip().splitlines()[0]}"
    lines = [line.strip() for line in str(error).splitlines()]
    text = " ".join(line for line in lines if line and not line.startswith(_NOISE))
    if isinstance(error, OverrideParseException):
        text += " (Hydra's override grammar: key=value, +key=value to add a key, key='a,b' for a string)"
    return text


def composition_error(argv: list[str], config_dir: str) -> str | None:
    """One line saying why argv's overrides do not compose with conf/, or None (they do, or Hydra decides)."""
    try:  # Hydra's own command-line parser (internal: where a Hydra upgrade moves it, Hydra reports as it did)
        from hydra._internal.utils import get_args_parser
    except ImportError:
        return None
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # Hydra's own parse, next, reports what argparse refuses
            args, unknown = get_args_parser().parse_known_args(argv)
    except SystemExit:
        return None
    if unknown or args.multirun or args.config_name or args.config_path or args.config_dir or args.help or args.hydra_help:
        return None
    try:
        with hydra.initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            hydra.compose("config", args.overrides, return_hydra_config=True)
    except Exception as e:  # noqa: BLE001 -- every composition error is the command line's, said in one line
        return one_line(e)
    return None
