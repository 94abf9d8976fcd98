"""Text in and out of the job config: ``--set`` values, validation errors as one line, the user's UTF-8 files.

Kept apart from the schema (``distzo.common.config``, which re-exports these, and ``configsections``) so that it stays one page.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from distzo.common.errors import BadInput


class ConfigError(BadInput):
    """A config that does not parse or validate; the message names the field."""


def parse_settings(items: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-4", ...]`` (``--set`` values) -> ``{"train.lr": 1e-4}``; values are read as YAML
    (numbers, booleans, lists, null). A malformed item raises ConfigError naming it."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. --set train.lr=1e-4")
        try:
            out[key] = yaml.safe_load(text) if text.strip() else text
        except yaml.YAMLError:
            out[key] = text  # not YAML: the text itself (the field says whether a string is allowed)
    return out


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])  # empty: a check across sections (its message names them)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `zoctl config` prints every field with its default)"
        got = err.get("input")
        secret = loc.startswith("security.token")
        shown = "" if err["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) or secret \
            else f" (got {_short(repr(got), 80)})"
        lines.append(f"{loc}: {msg}{shown}" if loc else f"{msg}{shown}")
    more = f"; and {len(lines) - 5} more" if len(lines) > 5 else ""
    return "invalid config: " + "; ".join(_short(line, 300) for line in lines[:5]) + more


def _short(text: str, limit: int) -> str:
    """Error details never grow with the input."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_utf8(path: Path, what: str) -> str:
    """A user's text file; not UTF-8 is a ConfigError naming the file and the first bad byte's offset."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {str(path)!r} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None
