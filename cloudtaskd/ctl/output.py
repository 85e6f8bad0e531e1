"""How commands print: JSON for scripts, small aligned tables for people."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from cloudtask_wire import jsonx
from cloudtaskd.config import Config
from cloudtaskd.ctl.client import ApiClient
from cloudtaskd.ctl.progress import format_duration

# What must never reach a terminal as it is: C0 controls (ESC starts the sequences that clear a
# screen, move the cursor or retitle the window; NUL, BEL, CR hide or overwrite text), DEL, the C1
# controls (U+009B is a one-character CSI on some terminals), and the Unicode controls that reorder
# or break text (U+202E shows "exe.txt" as "txt.exe"). Ids, names, errors and logs come from task
# files, workers and clouds, so every one of them goes through `printable` before it is shown.
_BIDI = "\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_CONTROLS = re.compile(f"[\x00-\x1f\x7f-\x9f{_BIDI}]")
_CONTROLS_KEEPING_LINES = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f{_BIDI}]")  # all but \t and \n
# In JSON text every C0 control is escaped already (the JSON grammar requires it); these are not,
# and can only stand inside strings there, so escaping them changes no value.
_JSON_UNESCAPED_CONTROLS = re.compile(f"[\x7f-\x9f{_BIDI}]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object, *, lines: bool = False) -> str:
    """`text` with every control character written as a visible escape (ESC as `\\x1b`, U+202E as
    `\\u202e`); with `lines`, newlines and tabs are kept (a log, a multi-line message)."""
    return (_CONTROLS_KEEPING_LINES if lines else _CONTROLS).sub(_escape, str(text))


def json_line(obj: Any) -> str:
    """`obj` as compact JSON that is safe on a terminal and decodes to exactly the same value."""
    return _JSON_UNESCAPED_CONTROLS.sub(lambda m: f"\\u{ord(m.group()):04x}", jsonx.dumps(obj))


@dataclass(frozen=True)
class Ctx:
    """What every command gets: the parsed config and where to write."""

    config: Config
    json: bool
    out: TextIO
    err: TextIO
    # The daemon's TCP listener instead of its socket (--url / CLOUDTASK_URL), with its bearer
    # token (never on the command line: CLOUDTASK_API_TOKEN or --token-file) and its CA.
    url: str = ""
    token: str = field(default="", repr=False)
    ca_file: Path | None = None

    def client(self) -> ApiClient:
        return ApiClient(self.config.socket_path, url=self.url, token=self.token, ca_file=self.ca_file)

    def emit_json(self, obj: Any) -> None:
        self.out.write(json_line(obj) + "\n")

    def say(self, text: str) -> None:
        # The last line of defence: a field that must stay on its line is escaped where it is
        # formatted (a table cell, an event), and nothing that reaches here is written raw.
        self.out.write(printable(text, lines=True) + "\n")

    def note(self, text: str) -> None:
        """Side remarks go to stderr so stdout stays clean for what a script may parse."""
        self.err.write(f"cloudtaskctl: {printable(text, lines=True)}\n")
        self.err.flush()


def _numeric(cell: str) -> bool:
    return cell.replace(".", "", 1).replace("/", "", 1).replace("%", "", 1).isdigit()


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell; numeric columns right-aligned so digits line up."""
    cells = [[("-" if c is None else printable(c)) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    right = [bool(cells) and all(_numeric(r[i]) or r[i] == "-" for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right, strict=True)).rstrip()

    return "\n".join([line(list(headers)), *(line(r) for r in cells)])


def ago(ts: float | None, now: float | None = None) -> str:
    if ts is None:
        return "-"
    return format_duration((now if now is not None else time.time()) - ts) + " ago"


def shorten(text: Any, limit: int) -> str:
    if text is None:
        return "-"
    s = " ".join(str(text).split())  # one line per row, whatever the error text holds
    return s if len(s) <= limit else s[: max(0, limit - 3)] + "..."
