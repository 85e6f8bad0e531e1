"""The task file parser: a JSON array or JSON Lines, fed in chunks, never held whole.

The format is told by the first non-blank byte (`[` array, `{` JSON Lines). Each task is
validated as it completes; an error names the line where its task starts. Duplicate ids are
not checked here: the database's unique index does that, and the caller maps it to a line.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from typing import Any

import orjson

MAX_ID_CHARS = 512
PRIORITY_RANGE = (-1000, 1000)
MAX_ATTEMPTS_RANGE = (1, 100)
TASK_KEYS = ("id", "data", "priority", "timeout", "max_attempts")
_WS = " \t\r\n"


class TaskFileError(ValueError):
    def __init__(self, line: int, reason: str) -> None:
        self.line = line
        self.reason = reason
        super().__init__(f"line {line}: {reason}")


@dataclass(slots=True)
class ParsedTask:
    line: int
    key: str
    data_json: str
    priority: int
    timeout_s: float | None
    max_attempts: int | None


def validate(obj: Any, line: int) -> ParsedTask:
    """One task object -> ParsedTask, or TaskFileError naming the line and the field."""
    if type(obj) is not dict:
        raise TaskFileError(line, f"expected a task object like {{\"id\": ..., \"data\": ...}}, got {_kind(obj)}")
    if len(obj) > 2 or "id" not in obj or (len(obj) == 2 and "data" not in obj):
        for key in obj:
            if key not in TASK_KEYS:
                raise TaskFileError(line, f"unknown key {key!r} (a task may have: {', '.join(TASK_KEYS)})")
    raw_id = obj.get("id")
    if type(raw_id) is str:
        if not raw_id or len(raw_id) > MAX_ID_CHARS:
            raise TaskFileError(line, f'"id" must be a non-empty string of at most {MAX_ID_CHARS} characters')
        key = raw_id
    elif type(raw_id) is int:
        key = str(raw_id)
    elif raw_id is None:
        raise TaskFileError(line, 'missing "id"')
    else:
        raise TaskFileError(line, f'"id" must be a string or an integer, got {_kind(raw_id)}')
    priority = obj.get("priority", 0)
    if type(priority) is not int or not PRIORITY_RANGE[0] <= priority <= PRIORITY_RANGE[1]:
        raise TaskFileError(line, f'"priority" must be an integer between {PRIORITY_RANGE[0]} and {PRIORITY_RANGE[1]}')
    timeout = obj.get("timeout")
    if timeout is not None and (type(timeout) not in (int, float) or not timeout > 0 or timeout == float("inf")):
        raise TaskFileError(line, '"timeout" must be a positive number of seconds')
    attempts = obj.get("max_attempts")
    if attempts is not None and (type(attempts) is not int
                                 or not MAX_ATTEMPTS_RANGE[0] <= attempts <= MAX_ATTEMPTS_RANGE[1]):
        raise TaskFileError(line, f'"max_attempts" must be an integer between {MAX_ATTEMPTS_RANGE[0]} and '
                                  f"{MAX_ATTEMPTS_RANGE[1]}")
    try:
        data_json = orjson.dumps(obj.get("data")).decode()
    except TypeError as exc:  # e.g. an integer beyond 64 bits from the stdlib decoder
        raise TaskFileError(line, f'"data" cannot be stored: {exc}') from None
    return ParsedTask(line, key, data_json, priority, float(timeout) if timeout is not None else None, attempts)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "true/false", type(None): "null"}.get(
        type(value), "a number")


class TaskFileParser:
    """feed(chunk) -> tasks completed by this chunk; finish() -> the rest (or an error if truncated)."""

    def __init__(self, max_task_bytes: int = 1_048_576) -> None:
        self.max_task_bytes = max_task_bytes
        self._mode: str | None = None
        # JSON Lines state: the incomplete last line, and the number of the next line.
        self._tail = b""
        self._line = 1
        # Array state: decoded text not yet consumed, and where we are in the grammar.
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self._text = ""
        self._expect = "open"  # open | first | element | comma | end
        self._json = json.JSONDecoder()

    def feed(self, chunk: bytes) -> list[ParsedTask]:
        if self._mode is None:
            head = (self._tail + chunk).lstrip(b" \t\r\n\xef\xbb\xbf")
            if not head:
                self._tail += chunk
                return []
            self._mode = "array" if head[:1] == b"[" else "lines"
            chunk, self._tail = self._tail + chunk, b""
            if self._mode == "lines" and head[:1] != b"{":
                first_line = 1 + (self._tail + chunk)[: len(chunk) - len(head)].count(b"\n")
                raise TaskFileError(first_line, "expected a JSON array ([...]) or JSON Lines ({...} per line)")
        if self._mode == "lines":
            return self._feed_lines(chunk)
        return self._feed_array(chunk, final=False)

    def finish(self) -> list[ParsedTask]:
        if self._mode is None:
            raise TaskFileError(1, "the file is empty")
        if self._mode == "lines":
            tail, self._tail = self._tail, b""
            return self._lines([tail]) if tail.strip() else []
        out = self._feed_array(b"", final=True)
        if self._expect != "end":
            raise TaskFileError(self._line, "the file ends inside the array (missing ']')")
        return out

    # ---- JSON Lines ----

    def _feed_lines(self, chunk: bytes) -> list[ParsedTask]:
        lines = (self._tail + chunk).split(b"\n")
        self._tail = lines.pop()
        if len(self._tail) > self.max_task_bytes:
            raise TaskFileError(self._line + len(lines), f"a task is larger than {self.max_task_bytes} bytes")
        return self._lines(lines)

    def _lines(self, lines: list[bytes]) -> list[ParsedTask]:
        out = []
        line = self._line
        loads = orjson.loads
        for raw in lines:
            if len(raw) > self.max_task_bytes:
                raise TaskFileError(line, f"a task is larger than {self.max_task_bytes} bytes")
            try:
                obj = loads(raw)
            except orjson.JSONDecodeError as exc:
                if not raw.strip():
                    line += 1
                    continue
                raise TaskFileError(line, f"not valid JSON: {_reason(exc, raw)}") from None
            out.append(validate(obj, line))
            line += 1
        self._line = line
        return out

    # ---- JSON array ----

    def _feed_array(self, chunk: bytes, *, final: bool) -> list[ParsedTask]:
        try:
            self._text += self._decoder.decode(chunk, final)
        except UnicodeDecodeError as exc:
            line = self._line + self._text.count("\n") + bytes(exc.object[: exc.start]).count(b"\n")
            raise TaskFileError(line, f"not valid UTF-8: {exc.reason}") from None
        text, pos, out = self._text, 0, []
        n = len(text)
        while True:
            # Skip blanks, counting lines.
            start = pos
            while pos < n and text[pos] in _WS:
                pos += 1
            self._line += text.count("\n", start, pos)
            if pos >= n:
                break
            ch = text[pos]
            if self._expect == "open":
                if ch != "[":
                    raise TaskFileError(self._line, "expected '[' to open the array")
                self._expect, pos = "first", pos + 1
            elif self._expect in ("first", "element"):
                if ch == "]" and self._expect == "first":
                    self._expect, pos = "end", pos + 1
                    continue
                if ch != "{":
                    what = "a trailing comma before ']'" if ch == "]" else f"{ch!r}"
                    raise TaskFileError(self._line, f"expected a task object, found {what}")
                try:
                    obj, end = self._json.raw_decode(text, pos)
                except json.JSONDecodeError as exc:
                    if not final and n - pos <= self.max_task_bytes:
                        break  # probably incomplete: wait for more bytes
                    if n - pos > self.max_task_bytes:
                        raise TaskFileError(self._line, f"a task is larger than {self.max_task_bytes} bytes") from None
                    raise TaskFileError(self._line + text.count("\n", pos, exc.pos),
                                        f"not valid JSON: {exc.msg}") from None
                out.append(validate(obj, self._line))
                self._line += text.count("\n", pos, end)
                self._expect, pos = "comma", end
            elif self._expect == "comma":
                if ch == ",":
                    self._expect, pos = "element", pos + 1
                elif ch == "]":
                    self._expect, pos = "end", pos + 1
                else:
                    raise TaskFileError(self._line, f"expected ',' or ']' after a task, found {ch!r}")
            else:
                raise TaskFileError(self._line, "unexpected content after the closing ']'")
        self._text = text[pos:]
        return out


def _reason(exc: Exception, raw: bytes) -> str:
    msg = str(exc)
    if "utf-8" in msg.lower() or "utf8" in msg.lower():
        return "not valid UTF-8"
    return msg
