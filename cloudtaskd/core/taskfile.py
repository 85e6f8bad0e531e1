"""The task file parser: a JSON array or JSON Lines, fed in chunks, never held whole.

The format is told by the first non-blank byte (`[` array, `{` JSON Lines). Each task is
validated as it completes; an error names the line where its task starts. Duplicate ids are
not checked here: the database's unique index does that, and the caller maps it to a line.

Both formats decode each task with orjson, so they accept exactly the same values (no NaN, no
lone surrogates, integers beyond 64 bits become floats) whichever format the user picked.
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass
from typing import Any, Final

import orjson

# The default of queue.max_task_bytes: the largest task an upload accepts. Agents the daemon starts
# read frames of at least this plus protocol.TASK_FRAME_MARGIN_BYTES, so an accepted task is deliverable.
DEFAULT_MAX_TASK_BYTES: Final = 1_048_576
MAX_ID_CHARS: Final = 512
MIN_PRIORITY, MAX_PRIORITY = -1000, 1000
MIN_ATTEMPTS, MAX_ATTEMPTS = 1, 100
TASK_KEYS: Final = frozenset({"id", "data", "priority", "timeout", "max_attempts"})
_KEYS_HELP: Final = "id, data, priority, timeout, max_attempts"

_BOM: Final = b"\xef\xbb\xbf"  # tolerated at the very start: Windows tools write it
_BLANK_BYTES: Final = b" \t\r\n"
_SKIP_BLANKS = re.compile(r"[ \t\r\n]*").match
# Outside a string only brackets and quotes matter for finding where an element ends.
_FIND_STRUCTURAL = re.compile(r'[{}\[\]"]').search
_SKIP_STRING_CHARS = re.compile(r'[^"\\]*').match
# A task that reaches the size limit with its brackets unbalanced is reported as invalid JSON if raw_decode
# fails further than this from the end of the text; a failure nearer the end may just be where the text stops.
_TRUNCATION_SLACK_CHARS: Final = 16

# Array grammar states: what the scanner expects after skipping blanks.
_FIRST, _ELEMENT, _COMMA, _END = range(4)


class TaskFileError(ValueError):
    """A task file was refused; `line` is where the offending task starts, `field` the task's key at
    fault when one is (id, data, priority, timeout, max_attempts, or an unknown one)."""

    def __init__(self, line: int, reason: str, field: str | None = None) -> None:
        self.line = line
        self.reason = reason
        self.field = field
        super().__init__(f"line {line}: {reason}")


@dataclass(slots=True)
class ParsedTask:
    line: int
    key: str
    data_json: str
    priority: int
    timeout_s: float | None
    max_attempts: int | None


def to_task(obj: Any, line: int) -> ParsedTask:
    """A decoded task object -> ParsedTask, or TaskFileError naming the line and the field."""
    if type(obj) is not dict:
        raise TaskFileError(line, f'expected a task object like {{"id": ..., "data": ...}}, found {_kind(obj)}')
    key = obj.get("id")
    if type(key) is int:
        key = str(key)
    elif type(key) is not str or not key or len(key) > MAX_ID_CHARS:
        raise _id_error(obj, line)
    size = len(obj)
    # Fast paths for the common shapes; anything else gets the full check below.
    if size == 1:
        return ParsedTask(line, key, "null", 0, None, None)
    if size == 2 and "data" in obj:
        return ParsedTask(line, key, _data_json(obj["data"], line), 0, None, None)
    _check_keys(obj, line)
    priority = obj.get("priority", 0)
    if type(priority) is not int or not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise TaskFileError(line, f'"priority" must be an integer between {MIN_PRIORITY} and {MAX_PRIORITY}',
                            "priority")
    timeout = obj.get("timeout")
    # orjson never yields NaN or infinity, so "> 0" is the whole test for a usable number.
    if timeout is not None and (type(timeout) not in (int, float) or not timeout > 0):
        raise TaskFileError(line, '"timeout" must be a positive number of seconds', "timeout")
    attempts = obj.get("max_attempts")
    if attempts is not None and (type(attempts) is not int or not MIN_ATTEMPTS <= attempts <= MAX_ATTEMPTS):
        raise TaskFileError(line, f'"max_attempts" must be an integer between {MIN_ATTEMPTS} and {MAX_ATTEMPTS}',
                            "max_attempts")
    return ParsedTask(line, key, _data_json(obj.get("data"), line), priority,
                      None if timeout is None else float(timeout), attempts)


def parse_task(body: bytes, max_task_bytes: int = DEFAULT_MAX_TASK_BYTES) -> ParsedTask:
    """One task object sent alone (POST /v1/jobs/{id}/tasks as application/json, a standing queue's
    enqueue): the fields of one line of a task file, checked the same way, except that "id" may be
    left out (the key is then "", and the daemon names the task by its row id). TaskFileError (line 1)
    names the field at fault."""
    if len(body) > max_task_bytes:
        raise TaskFileError(1, f"the task is larger than {max_task_bytes} bytes, the limit for one task")
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise TaskFileError(1, _json_reason(exc, 1, whole_line=True)) from None
    if type(obj) is dict and "id" not in obj:
        task = to_task({**obj, "id": "-"}, 1)  # every other field as a file's line is checked
        task.key = ""
    else:
        task = to_task(obj, 1)
    size = len(task.data_json.encode())
    if size > max_task_bytes:
        raise TaskFileError(1, f'the task\'s "data" takes {size} bytes once stored, more than {max_task_bytes}'
                               " bytes, the limit for one task", "data")
    return task


def _data_json(data: Any, line: int) -> str:
    try:
        return orjson.dumps(data).decode()
    except orjson.JSONEncodeError:  # orjson writes less nesting than it reads
        raise TaskFileError(line, '"data" is nested too deeply to store', "data") from None


def _check_keys(obj: dict[str, Any], line: int) -> None:
    for name in obj:
        if name not in TASK_KEYS:
            raise TaskFileError(line, f"unknown key {name!r} (a task may have: {_KEYS_HELP})", name)


def _id_error(obj: dict[str, Any], line: int) -> TaskFileError:
    _check_keys(obj, line)  # a misspelt "id" is better reported as the unknown key it is
    if "id" not in obj:
        return TaskFileError(line, 'missing "id"', "id")
    key = obj["id"]
    if type(key) is str:
        return TaskFileError(line, f'"id" must be a non-empty string of at most {MAX_ID_CHARS} characters', "id")
    return TaskFileError(line, f'"id" must be a string or an integer, found {_kind(key)}', "id")


def _kind(value: Any) -> str:
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "true/false", type(None): "null"}
    return kinds.get(type(value), "a number")


def _json_reason(exc: json.JSONDecodeError, line: int, *, whole_line: bool) -> str:
    """orjson's message, with its position turned from "within this text" into "within the file"."""
    if "not valid UTF-8" in exc.msg:
        return "not valid UTF-8"
    where = line + exc.lineno - 1
    if where != line:
        return f"not valid JSON: {exc.msg} at line {where} column {exc.colno}"
    # An array element may start mid-line, so its first line's columns are not the file's.
    return f"not valid JSON: {exc.msg} at column {exc.colno}" if whole_line else f"not valid JSON: {exc.msg}"


class TaskFileParser:
    """Feed bytes with feed(chunk) -> list[ParsedTask] (tasks completed by this chunk), then finish() ->
    list[ParsedTask] (raises TaskFileError if the file is truncated, e.g. an unclosed array or a last line that
    is not valid JSON).

    Memory is bounded by the chunk size plus one task: a task longer than max_task_bytes is refused as soon
    as that much of it has arrived, and work per byte stays constant however the sender splits its chunks.
    """

    def __init__(self, max_task_bytes: int = DEFAULT_MAX_TASK_BYTES) -> None:
        self.max_task_bytes = max_task_bytes
        self._mode = ""  # "" until the first non-blank byte, then "lines" or "array"
        self._line = 1  # line of the first byte not yet consumed
        self._head = b""  # before detection: a BOM split across chunks
        self._seen_start = False  # whether the BOM check is done
        # JSON Lines: the unfinished last line, kept as pieces so a slow sender costs no re-copying.
        self._tail: list[bytes] = []
        self._tail_bytes = 0
        # Array: text of an element that has started but not ended, and the bracket state across it.
        self._utf8 = codecs.getincrementaldecoder("utf-8")("strict")
        self._json = json.JSONDecoder()
        self._state = _FIRST
        self._open: list[str] = []
        self._open_chars = 0
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def feed(self, chunk: bytes) -> list[ParsedTask]:
        if self._mode == "lines":
            return self._feed_lines(chunk)
        if self._mode == "array":
            return self._feed_array(chunk, final=False)
        return self._detect(chunk)

    def finish(self) -> list[ParsedTask]:
        if self._mode == "lines":
            tail = b"".join(self._tail)
            self._tail, self._tail_bytes = [], 0
            return self._parse_lines([tail])
        if self._mode == "array":
            out = self._feed_array(b"", final=True)
            if self._state != _END:
                raise TaskFileError(self._line, "the file ends before the array is closed (missing ']')")
            return out
        if self._head:  # a lone fragment of a BOM
            raise TaskFileError(self._line, "expected a JSON array ('[' ...) or JSON Lines ('{' ... per line)")
        raise TaskFileError(1, "the file is empty: expected a JSON array or JSON Lines of tasks")

    # ---- format detection ----

    def _detect(self, chunk: bytes) -> list[ParsedTask]:
        buf = self._head + chunk
        if not self._seen_start:
            if len(buf) < len(_BOM) and _BOM.startswith(buf):
                self._head = buf
                return []
            self._seen_start, self._head = True, b""
            if buf.startswith(_BOM):
                buf = buf[len(_BOM):]
        body = buf.lstrip(_BLANK_BYTES)
        # Leading blanks are dropped, not kept, so a file of blanks cannot grow memory.
        self._line += buf.count(b"\n", 0, len(buf) - len(body))
        if not body:
            return []
        if body[:1] == b"{":
            self._mode = "lines"
            return self._feed_lines(body)
        if body[:1] == b"[":
            self._mode = "array"
            return self._feed_array(body[1:], final=False)
        raise TaskFileError(self._line, "expected a JSON array ('[' ...) or JSON Lines ('{' ... per line)")

    # ---- JSON Lines ----

    def _feed_lines(self, chunk: bytes) -> list[ParsedTask]:
        if b"\n" not in chunk:
            self._tail.append(chunk)
            self._tail_bytes += len(chunk)
            if self._tail_bytes > self.max_task_bytes:
                raise self._too_large(self._line)
            return []
        if self._tail:
            self._tail.append(chunk)
            chunk = b"".join(self._tail)
        lines = chunk.split(b"\n")
        tail = lines.pop()
        self._tail, self._tail_bytes = ([tail] if tail else []), len(tail)
        limit = self.max_task_bytes
        if len(chunk) > limit:
            for i, raw in enumerate(lines):
                if len(raw) > limit:
                    self._parse_lines(lines[:i])  # an earlier error in the file is reported first
                    raise self._too_large(self._line)
        out = self._parse_lines(lines)
        if len(tail) > limit:
            raise self._too_large(self._line)
        return out

    def _parse_lines(self, lines: list[bytes]) -> list[ParsedTask]:
        out: list[ParsedTask] = []
        append, loads, line = out.append, orjson.loads, self._line
        quarter = self.max_task_bytes // 4
        for raw in lines:
            try:
                obj = loads(raw)
            except orjson.JSONDecodeError as exc:
                if raw.strip(_BLANK_BYTES):  # blank lines (CRLF ones too) are allowed; only they fail here
                    raise TaskFileError(line, _json_reason(exc, line, whole_line=True)) from None
            else:
                task = to_task(obj, line)
                if len(task.data_json) > quarter:
                    self._check_stored(task)
                append(task)
            line += 1
        self._line = line
        return out

    # ---- JSON array ----

    def _feed_array(self, chunk: bytes, *, final: bool) -> list[ParsedTask]:
        try:
            piece = self._utf8.decode(chunk, final)
        except UnicodeDecodeError as exc:
            # Parse the valid part first so that an earlier error in the file wins.
            self._take_text(bytes(exc.object[: exc.start]).decode(), final=False)
            raise TaskFileError(self._line, f"not valid UTF-8 ({exc.reason})") from None
        return self._take_text(piece, final=final)

    def _take_text(self, piece: str, *, final: bool) -> list[ParsedTask]:
        if self._open:
            # Only the new text is examined while an element is open: re-decoding the whole element on
            # each chunk would make a sender of tiny chunks cost quadratic time.
            self._open.append(piece)
            self._open_chars += len(piece)
            if self._track(piece, 0) < 0 and not final:
                if self._open_chars > self.max_task_bytes:
                    raise self._open_too_large("".join(self._open))
                return []
            piece = "".join(self._open)
            self._open, self._open_chars = [], 0
        return self._scan(piece, final)

    def _scan(self, text: str, final: bool) -> list[ParsedTask]:
        out: list[ParsedTask] = []
        raw_decode, loads = self._json.raw_decode, orjson.loads
        line, state, pos, n = self._line, self._state, 0, len(text)
        while True:
            end = _SKIP_BLANKS(text, pos).end()  # type: ignore[union-attr]  # "*" always matches
            if end != pos:
                line += text.count("\n", pos, end)
                pos = end
            if pos >= n:
                break
            ch = text[pos]
            if state == _COMMA:
                if ch == ",":
                    state, pos = _ELEMENT, pos + 1
                elif ch == "]":
                    state, pos = _END, pos + 1
                else:
                    raise TaskFileError(line, f"expected ',' or ']' after a task, found {ch!r}")
            elif state == _END:
                raise TaskFileError(line, f"unexpected {ch!r} after the closing ']' of the array")
            elif ch == "{":
                try:
                    end = raw_decode(text, pos)[1]
                except json.JSONDecodeError as exc:
                    if self._track(text, pos, fresh=True) >= 0 or final:
                        where = line + text.count("\n", pos, exc.pos)
                        note = f" at line {where}" if where != line else ""
                        if self._depth:
                            note = " (the file ends inside this task)"
                        raise TaskFileError(line, f"not valid JSON: {exc.msg}{note}") from None
                    # Ran out of text: keep the element's start and wait for the rest.
                    self._open, self._open_chars = [text[pos:]], n - pos
                    if self._open_chars > self.max_task_bytes:
                        self._line = line
                        raise self._open_too_large(text[pos:]) from None
                    break
                except RecursionError:
                    raise TaskFileError(line, "not valid JSON: nested too deeply") from None
                except ValueError:  # Python refuses to convert integers of more than 4300 digits
                    raise TaskFileError(line, "not valid JSON: a number has too many digits") from None
                # raw_decode finds the element's end; orjson decodes it so both formats agree on values.
                raw = text[pos:end].encode()
                if len(raw) > self.max_task_bytes:
                    raise self._too_large(line)
                try:
                    obj = loads(raw)
                except orjson.JSONDecodeError as exc:
                    raise TaskFileError(line, _json_reason(exc, line, whole_line=False)) from None
                task = to_task(obj, line)
                if len(task.data_json) > self.max_task_bytes // 4:
                    self._check_stored(task)
                out.append(task)
                line += text.count("\n", pos, end)
                state, pos = _COMMA, end
            elif ch == "]" and state == _FIRST:
                state, pos = _END, pos + 1
            elif ch == "]":
                raise TaskFileError(line, "expected a task object, found a trailing comma before ']'")
            else:
                raise TaskFileError(line, f"expected a task object ('{{'), found {ch!r}")
        self._line, self._state = line, state
        return out

    def _track(self, text: str, pos: int, *, fresh: bool = False) -> int:
        """Follow brackets and strings of the open element through text[pos:]; return the index just past the
        element's end, or -1 if it has not ended. Exact for valid JSON, and linear: one regex step per
        bracket, quote or escape."""
        if fresh:
            self._depth, self._in_string, self._escaped = 0, False, False
        depth, in_string, escaped, n = self._depth, self._in_string, self._escaped, len(text)
        while pos < n:
            if in_string:
                if escaped:
                    escaped, pos = False, pos + 1
                    continue
                pos = _SKIP_STRING_CHARS(text, pos).end()  # type: ignore[union-attr]  # "*" always matches
                if pos < n:
                    if text[pos] == "\\":
                        escaped = True
                    else:
                        in_string = False
                    pos += 1
                continue
            m = _FIND_STRUCTURAL(text, pos)
            if m is None:
                break
            ch, pos = m.group(), m.end()
            if ch == '"':
                in_string = True
            elif ch in "{[":
                depth += 1
            else:
                depth -= 1
                if depth <= 0:
                    self._depth, self._in_string, self._escaped = 0, False, False
                    return pos
        self._depth, self._in_string, self._escaped = depth, in_string, escaped
        return -1

    def _open_too_large(self, text: str) -> TaskFileError:
        # Brackets that never balance look like an endless task; say so when the parser can tell.
        try:
            self._json.raw_decode(text)
        except json.JSONDecodeError as exc:
            if exc.pos < len(text) - _TRUNCATION_SLACK_CHARS and not exc.msg.startswith("Unterminated string"):
                return TaskFileError(self._line, f"not valid JSON: {exc.msg}")
        except RecursionError:
            return TaskFileError(self._line, "not valid JSON: nested too deeply")
        except ValueError:
            return TaskFileError(self._line, "not valid JSON: a number has too many digits")
        return self._too_large(self._line)

    def _check_stored(self, task: ParsedTask) -> None:
        """The data as stored (and sent to agents) within the limit too: re-encoding can grow it
        (1e5 is stored as 100000.0), and the agents' frame limit is sized from max_task_bytes."""
        size = len(task.data_json.encode())
        if size > self.max_task_bytes:
            raise TaskFileError(task.line, f'the task\'s "data" takes {size} bytes once stored, more than '
                                           f"{self.max_task_bytes} bytes, the limit for one task")

    def _too_large(self, line: int) -> TaskFileError:
        return TaskFileError(line, f"the task is larger than {self.max_task_bytes} bytes, the limit for one task")
