"""Reading one field of config.yaml: its type checked, its os.environ/ references resolved, its secrets collected,
and the ConfigError that names the file and the field (never quoting a secret)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any

from passthru.errors import ConfigError

ENV_REF = re.compile(r"os\.environ/([A-Za-z_][A-Za-z0-9_]*)")
DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


class FieldReader:
    """Field checks that know the file name (for messages) and collect every secret they resolve."""

    def __init__(self, source: str, environ: Mapping[str, str]) -> None:
        self.source = source
        self.environ = environ
        self.secrets: set[str] = set()
        self.from_environment: set[str] = set()  # whole values that an os.environ/ reference went into

    def error(self, field: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.source}: {field}: {problem}" if field else f"{self.source}: {problem}")

    def string(self, value: Any, field: str, *, secret: bool = False) -> str:
        """A string with os.environ/NAME resolved; `secret` marks the whole value as one to mask."""
        return self.resolve(value, field, secret=secret)[0]

    def resolve(self, value: Any, field: str, *, secret: bool = False) -> tuple[str, str]:
        """(value, shown): the string with os.environ/NAME resolved, and with each resolved part masked."""
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise self.error(field, f"must be a string, not {kind(value)}")
        text = str(value)
        missing = [name for name in ENV_REF.findall(text) if name not in self.environ]
        if missing:
            raise self.error(field, f"environment variable {missing[0]} is not set")

        def sub(match: re.Match[str]) -> str:
            resolved = self.environ[match.group(1)]
            if resolved:
                self.secrets.add(resolved)
            return resolved

        resolved = ENV_REF.sub(sub, text)
        if resolved != text:
            self.from_environment.add(resolved)
        # A literal value is masked too when it is long enough to be a credential; masking a short one such as
        # "1" would mangle every log line, and header values are never logged in the first place.
        if secret and (resolved != text or len(resolved) >= 8):
            self.secrets.add(resolved)
        return resolved, ENV_REF.sub("***", text)

    def known(self, entry: Mapping[str, Any], fields: tuple[str, ...], where: str) -> None:
        """Refuse a key of `entry` that is none of `fields`, naming the closest one (a misspelling is no default)."""
        for key in entry:
            if key not in fields:
                close = difflib.get_close_matches(str(key), fields, n=1)
                hint = f" (did you mean {close[0]}?)" if close else f" (known fields: {', '.join(fields)})"
                raise self.error(f"{where}.{key}", f"unknown field{hint}")

    def boolean(self, entry: Mapping[str, Any], key: str, where: str) -> bool:
        value = entry.get(key, False)
        if not isinstance(value, bool):
            hint = " (write true or false without quotes)" if isinstance(value, str) else ""
            raise self.error(f"{where}.{key}", f"must be true or false, not {kind(value)}{hint}")
        return value

    def number(self, value: Any, field: str, *, positive: bool = False) -> float:
        """A finite number, zero or more (more than zero with `positive`).

        YAML 1.1, which PyYAML reads, takes `1e-6` and `2.5e6` for strings (a float needs a dot and a signed
        exponent): a string that is a plain decimal number is read as the number it says, as LiteLLM reads it.
        """
        if isinstance(value, str) and DECIMAL.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(field, f"must be a number, not {kind(value)}")
        if value < 0 or (positive and value == 0) or value != value or value == float("inf"):
            raise self.error(field, "must be a positive number" if positive else "must be zero or more")
        return float(value)

    def integer(self, value: Any, field: str, *, least: int = 0) -> int:
        """A whole number, `least` or more: YAML's 3, not 3.0 or "3"."""
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(field, f"must be a whole number, not {kind(value)}")
        if value < least:
            raise self.error(field, f"must be {least} or more")
        return value

    def mapping(self, entry: dict[str, Any], key: str, where: str, *, secret: bool) -> list[tuple[str, str]]:
        value = entry.get(key) or {}
        if not isinstance(value, dict):
            raise self.error(f"{where}.{key}", f"must be a mapping of names to values, not {kind(value)}")
        pairs = []
        for name, item in value.items():
            field = f"{where}.{key}.{name}"
            if not isinstance(name, str) or not name:
                raise self.error(f"{where}.{key}", f"has a name that is not a string: {name!r}")
            text = self.string(item, field, secret=secret)
            if "\r" in text or "\n" in text or "\0" in text:
                raise self.error(field, "must not contain line breaks or NUL")
            pairs.append((name, text))
        return pairs


def kind(value: Any) -> str:
    """How a message names a value's type; a long string is not quoted (it may be a secret)."""
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return f"the string {value!r}" if len(value) <= 20 else "a string"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__
