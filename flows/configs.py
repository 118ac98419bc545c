"""Run configs by name or path: the configs that ship with diffpipe (``quickstart``,
``volume3d``, ``shapes_text``, installed with the package) and any YAML file."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from diffusion_core.config import ConfigError, RunConfig, apply_overrides, load_config, parse_config

PACKAGE = "diffpipe.configs"


def packaged_configs() -> dict[str, Path]:
    """The configs installed with diffpipe, by name (the file's stem)."""
    folder = resources.files(PACKAGE)
    return {
        Path(entry.name).stem: Path(str(entry))
        for entry in folder.iterdir()
        if entry.name.endswith((".yaml", ".yml"))
    }


def config_path(name_or_path: str | Path) -> Path:
    """A config file: ``name_or_path`` itself when it is a file, else the packaged config of that
    name (``quickstart``); ConfigError naming both places otherwise."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    packaged = packaged_configs()
    if str(name_or_path) in packaged:
        return packaged[str(name_or_path)]
    raise ConfigError(
        f"{name_or_path}: config file not found (nor a packaged config: "
        f"{', '.join(sorted(packaged))})"
    )


def resolve_config(config: RunConfig | str | Path, overrides: dict[str, Any] | None) -> RunConfig:
    """A parsed config as it is (with ``overrides`` applied), or the config file or packaged
    config ``config`` names, loaded with ``overrides``."""
    if isinstance(config, RunConfig):
        if not overrides:
            return config
        return parse_config(apply_overrides(config.to_dict(), overrides), source="overrides")
    return load_config(config_path(config), overrides)
