"""How numbers in URLs and on cloudtaskctl's command line are read: ASCII digits, one spelling each.

Python's int() takes far more than a proxy, an access rule or a log search would expect of
`/v1/jobs/7`: surrounding spaces (`%207`), a sign (`+7`), underscores (`0_7`), leading zeros
(`007`) and any script's digits (U+FF17 full-width seven, U+0667 Arabic-Indic seven). Every one
of those reached job 7. Here a number has exactly one spelling, so a rule written about the path
holds for the daemon.
"""

from __future__ import annotations

import re

# [0-9], never \d: \d matches every Unicode decimal digit.
_WHOLE = re.compile(r"0|[1-9][0-9]*")
_DECIMAL = re.compile(r"(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")  # also what str(float) writes
MAX_DIGITS = 19  # 2**63 - 1, SQLite's largest integer, has 19; more is out of every range, and int() of
# thousands of digits is slow or refused


def whole_number(raw: str) -> int | None:
    """The number `raw` spells as a canonical whole number (`0`, `7`, `1234`), else None."""
    if len(raw) > MAX_DIGITS or _WHOLE.fullmatch(raw) is None:
        return None
    return int(raw)


def decimal_number(raw: str) -> float | None:
    """The number `raw` spells in plain ASCII decimal (`0.5`, `12`, `1e-05`; no sign, space or `_`), else None."""
    if len(raw) > 64 or _DECIMAL.fullmatch(raw) is None:
        return None
    return float(raw)
