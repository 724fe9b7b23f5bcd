"""TOML and YAML config files of `molf train`: their options as a flat dict (`TrainConfig.from_mapping`
takes it)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .._core import ConfigError

__all__ = ["load_config_file"]

# YAML 1.2 spells floats without a dot too (1e-3); PyYAML's YAML 1.1 resolver reads those as strings.
_YAML12_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789"))
    return Loader


def load_config_file(path: str | os.PathLike) -> dict:
    """The options in a TOML (.toml) or YAML (.yaml/.yml) file, as a dict. YAML numbers in
    exponent form without a dot (`lr: 1e-3`) are numbers, as in YAML 1.2 and TOML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config {str(path)!r}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        import tomllib

        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config {str(path)!r}: invalid TOML: {exc}") from None
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(
                f"config {str(path)!r}: YAML needs PyYAML (pip install pyyaml), or use a .toml config"
            ) from None
        try:
            values = yaml.load(path.read_text(encoding="utf-8"), Loader=_yaml_loader())  # noqa: S506 (a SafeLoader)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {str(path)!r}: invalid YAML: {' '.join(str(exc).split())}") from None
        values = {} if values is None else values
    else:
        raise ConfigError(f"config {str(path)!r}: unknown format {suffix!r}; expected .toml, .yaml or .yml")
    if not isinstance(values, dict):
        raise ConfigError(f"config {str(path)!r}: expected a table of options, got {type(values).__name__}")
    return values
