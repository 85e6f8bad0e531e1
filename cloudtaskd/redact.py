"""The secret values this process knows, kept out of text meant for people and out of children.

`config.load_config` registers every non-empty `Secret` it loads. From then on `redact()` replaces
them with <SECRET> wherever they appear: every log line (logs.py runs each rendered line through
it, the standard library's records from aiohttp and asyncssh included), every `CloudtaskError`
message, an instance's `last_error`. This is the second line of defence: `Secret` already prints
as <SECRET> in a repr, but `str()`, an f-string or a cloud SDK's own error text shows the value.

Standard library only: errors.py and the store import it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

REDACTED = "<SECRET>"
# Shorter values are not searched for in text: they would match ordinary words and garble every
# line. Such a value is still shown as <SECRET> wherever the Secret itself is logged.
MIN_REDACT_CHARS = 6

# Longest first: a secret that contains another is replaced whole. A tuple, swapped whole on
# register(), so a reader never sees it half-built.
_needles: tuple[str, ...] = ()


def register(value: str) -> None:
    """Hide this value from now on, also as repr() and JSON write it inside a string (escaped
    quotes and backslashes, \\uXXXX): the forms a log line or a message may hold it in."""
    global _needles
    value = str.__str__(value)  # a Secret's own text
    if len(value) < MIN_REDACT_CHARS:
        return
    forms = set()
    for text in (value, repr(value)[1:-1]):
        forms |= {text, json.dumps(text)[1:-1], json.dumps(text, ensure_ascii=False)[1:-1]}
    _needles = tuple(sorted(set(_needles) | forms, key=len, reverse=True))


def registered() -> bool:
    return bool(_needles)


def redact(text: str) -> str:
    """text with every registered secret replaced by <SECRET>; the same object when none occurs."""
    for needle in _needles:
        if needle in text:
            text = text.replace(needle, REDACTED)
    return text


def without_secrets(env: Mapping[str, str]) -> dict[str, str]:
    """An environment for a child process, less every variable holding a registered secret: a
    local agent's worker runs the user's code, which has no business with the daemon's credentials."""
    return {k: v for k, v in env.items() if not any(needle in v for needle in _needles)}


def forget_all() -> None:
    """Tests only: start from nothing registered."""
    global _needles
    _needles = ()
