"""Write the configuration reference, generated from ``diffusion_core/config.py``, and the table
of environment variables, generated from ``diffusion_core/settings.py``, into the README between
their markers: ``python docs/config_reference.py`` (the test suite checks that the README's tables
are the generated ones)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from diffusion_core.config import RunConfig
from diffusion_core.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
ENV_START, ENV_END = "<!-- environment-reference:start -->", "<!-- environment-reference:end -->"


def _section(annotation: Any) -> type[BaseModel] | None:
    """The config section a field holds (unwrapping ``X | None``), or None for a plain value."""
    if get_origin(annotation) is tuple:
        return None
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _items(annotation: Any) -> type[BaseModel] | None:
    """The section type of a ``tuple[Section, ...]`` field's items."""
    args = get_args(annotation)
    if get_origin(annotation) is tuple and args and _section(args[0]) is not None:
        return _section(args[0])
    return None


def _markdown(text: str) -> str:
    return text.replace("``", "`").replace("|", "\\|")


def _type_text(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    if origin is Literal:
        return " \\| ".join(str(a) for a in args)
    if origin is tuple:
        return f"list of {_type_text(args[0])}s"
    if origin is dict:
        return "mapping"
    if args:  # X | None
        return " or ".join(_type_text(a) for a in args if a is not type(None)) + " (optional)"
    return getattr(annotation, "__name__", str(annotation))


def _default_text(value: Any) -> str:
    if value is PydanticUndefined:
        return "required"
    if value is None:
        return "unset"
    if isinstance(value, BaseModel):
        return "{" + ", ".join(f"{k}: {_default_text(v)}" for k, v in value) + "}"
    if isinstance(value, tuple):
        names = [getattr(v, "name", None) for v in value]
        shown = names if all(names) else [_default_text(v) for v in value]
        return "[" + ", ".join(str(v) for v in shown) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, str) else str(value)


def reference_rows(
    model: type[BaseModel] = RunConfig, prefix: str = ""
) -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) of every setting under ``model``, nested sections
    flattened to dotted keys (``train.lr``) and list items as ``key[].field``."""
    rows: list[tuple[str, str, str, str]] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        section, items = _section(field.annotation), _items(field.annotation)
        if section is not None:
            rows += reference_rows(section, f"{key}.")
            continue
        doc = " ".join((field.description or "").split())
        default = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
        rows.append((key, _type_text(field.annotation), _default_text(default), doc))
        if items is not None:
            rows += reference_rows(items, f"{key}[].")
    return rows


def reference_markdown() -> str:
    """The configuration reference as a markdown table."""
    lines = ["| key | type | default | what it sets |", "| --- | --- | --- | --- |"]
    for key, kind, default, doc in reference_rows():
        cells = [f"`{key}`", kind, f"`{default}`", _markdown(doc)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _env_default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" for v in value)
    return str(value)


def environment_rows() -> list[tuple[str, str, str]]:
    """(variable, default, description) of every environment variable diffpipe reads."""
    return [
        (str(field.alias), _env_default(field.default), " ".join((field.description or "").split()))
        for field in Settings.model_fields.values()
    ]


def environment_markdown() -> str:
    """The environment variables as a markdown table."""
    lines = ["| variable | default | what it sets |", "| --- | --- | --- |"]
    for name, default, doc in environment_rows():
        lines.append(f"| `{name}` | `{default}` | {_markdown(doc)} |")
    return "\n".join(lines) + "\n"


def _between(text: str, start: str, end: str, table: str) -> str:
    """``text`` with ``table`` between the markers ``start`` and ``end`` (both must be there)."""
    head, found_start, rest = text.partition(start)
    _, found_end, tail = rest.partition(end)
    if not found_start or not found_end:
        raise SystemExit(f"{README}: needs the lines {start} and {end}")
    return f"{head}{start}\n{table}{end}{tail}"


def with_reference(text: str) -> str:
    """``text`` with both generated tables between their markers."""
    text = _between(text, START, END, reference_markdown())
    return _between(text, ENV_START, ENV_END, environment_markdown())


if __name__ == "__main__":
    README.write_text(with_reference(README.read_text()))
    sys.exit(0)
