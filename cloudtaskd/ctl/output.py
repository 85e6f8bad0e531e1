"""How commands print: JSON for scripts, small aligned tables for people."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from agent import jsonx
from cloudtaskd.config import Config
from cloudtaskd.ctl.client import ApiClient
from cloudtaskd.ctl.progress import format_duration


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
        self.out.write(jsonx.dumps(obj) + "\n")

    def say(self, text: str) -> None:
        self.out.write(text + "\n")

    def note(self, text: str) -> None:
        """Side remarks go to stderr so stdout stays clean for what a script may parse."""
        self.err.write(f"cloudtaskctl: {text}\n")
        self.err.flush()


def _numeric(cell: str) -> bool:
    return cell.replace(".", "", 1).replace("/", "", 1).replace("%", "", 1).isdigit()


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell; numeric columns right-aligned so digits line up."""
    cells = [[("-" if c is None else str(c)) for c in row] for row in rows]
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
