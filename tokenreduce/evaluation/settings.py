"""Settings (a method and its options) as written on command lines: ``tome:r=8,prop_attn=False``."""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Any, Iterator


@dataclass(frozen=True)
class Setting:
    """One row of a comparison: a method name and the options given for it."""

    method: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if not self.options:
            return self.method
        return f"{self.method}(" + ",".join(f"{k}={v!r}" for k, v in self.options.items()) + ")"

    @property
    def reduces(self) -> bool:
        return self.method != "none"


COMMAND_LINE_WORDS = {"true": True, "false": False, "none": None, "null": None}


def parse_value(text: str) -> Any:
    """A value as typed on a command line: a Python literal (``13``, ``0.7``,
    ``[1, 2]``, ``(8, -0.5)``, ``True``), else the string.

    Also what shells and habits produce: a number or literal inside quotes
    (``"8"``, as a quoting shell passes it on) is that number, ``true`` /
    ``false`` / ``none`` / ``null`` in any case are the Python constants, and
    leading zeros are allowed (``08``). Only the tools read options this way;
    ``tokenreduce.apply`` itself takes Python values as they are.
    """
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        word = text.strip()
        if word.lower() in COMMAND_LINE_WORDS:
            return COMMAND_LINE_WORDS[word.lower()]
        if word.isascii() and word.isdigit():  # 08: literal_eval refuses leading zeros
            return int(word)
        return text
    if isinstance(value, str) and value.strip() != text.strip():  # it was quoted: read what is inside
        inner = parse_value(value)
        return value if isinstance(inner, str) else inner
    return value


def parse_assignments(text: str) -> dict[str, Any]:
    """``"r=8,prop_attn=False,keep=[1,2]"`` → dict; commas inside brackets or quotes stay."""
    options: dict[str, Any] = {}
    for part in _split_top_level(text):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"option {part!r} must look like name=value (lists in brackets: locations=[3,6,9])")
        options[name.strip()] = parse_value(value.strip())
    return options


def _split_top_level(text: str) -> Iterator[str]:
    depth, quote, start = 0, None, 0
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            yield text[start:i]
            start = i + 1
    if text[start:].strip():
        yield text[start:]


def parse_setting(text: str) -> Setting:
    """``"tome"``, ``"tome:r=8"``, ``"evit:keep_rate=0.7,drop_loc=[3,6,9]"``, ``"none"``."""
    method, _, options = text.partition(":")
    if not method.strip():
        raise ValueError(f"setting {text!r} must start with a method name, e.g. tome:r=8")
    return Setting(method.strip(), parse_assignments(options) if options.strip() else {})


def validate_setting(setting: Setting, methods: dict[str, dict[str, Any]]) -> None:
    """Raise ValueError naming an unknown method or option and what is allowed."""
    if not setting.reduces:
        if setting.options:
            raise ValueError(f"setting {setting.label!r}: 'none' takes no options")
        return
    if setting.method not in methods:
        raise ValueError(f"unknown method {setting.method!r}; available: none, {', '.join(methods)}")
    allowed = methods[setting.method]
    unknown = sorted(set(setting.options) - set(allowed))
    if unknown:
        listing = ", ".join(f"{k} (default {v!r})" for k, v in allowed.items())
        raise ValueError(f"unknown option(s) {unknown} for method {setting.method!r}; allowed: {listing}")
