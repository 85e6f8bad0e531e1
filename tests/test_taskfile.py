"""The task file parser: both formats, any chunking, every error with its line."""

from __future__ import annotations

import json

import pytest

from cloudtaskd.taskfile import ParsedTask, TaskFileError, TaskFileParser


def parse(data: bytes, step: int | None = None, **kw: int) -> list[ParsedTask]:
    parser = TaskFileParser(**kw)
    out: list[ParsedTask] = []
    if step is None:
        out += parser.feed(data)
    else:
        for i in range(0, len(data), step):
            out += parser.feed(data[i: i + step])
    return out + parser.finish()


ARRAY = json.dumps([
    {"id": "a", "data": {"text": "é ☃ \n [not a bracket]"}},
    {"id": 7, "priority": 3, "timeout": 1.5, "max_attempts": 2},
    {"id": "c", "data": [1, {"x": None}]},
], indent=2, ensure_ascii=False).encode()
LINES = b'{"id": "a", "data": {"s": "\xc3\xa9"}}\r\n\n{"id": "b", "data": 1}\n{"id": 3}'


def test_array_fields_and_start_lines() -> None:
    tasks = parse(ARRAY)
    assert [t.key for t in tasks] == ["a", "7", "c"]
    assert [t.line for t in tasks] == [2, 8, 14]
    assert json.loads(tasks[0].data_json) == {"text": "é ☃ \n [not a bracket]"}
    assert (tasks[1].priority, tasks[1].timeout_s, tasks[1].max_attempts, tasks[1].data_json) == (3, 1.5, 2, "null")


def test_json_lines_with_crlf_and_blank_lines_and_no_final_newline() -> None:
    tasks = parse(LINES)
    assert [(t.key, t.line) for t in tasks] == [("a", 1), ("b", 3), ("3", 4)]
    assert json.loads(tasks[0].data_json) == {"s": "é"}


@pytest.mark.parametrize("data", [ARRAY, LINES], ids=["array", "lines"])
def test_any_chunking_gives_the_same_tasks(data: bytes) -> None:
    whole = parse(data)
    for step in range(1, len(data) + 1):
        assert parse(data, step) == whole, f"chunks of {step} bytes"


@pytest.mark.parametrize(("data", "line", "reason"), [
    (b"", 1, "empty"),
    (b"  \n ", 1, "empty"),
    (b"hello", 1, "expected a JSON array"),
    (b'[{"id": 1},\n]', 2, "trailing comma"),
    (b'[{"id": 1}\n', 2, "missing ']'"),
    (b'[{"id": 1}] {"id": 2}', 1, "after the closing"),
    (b'[{"id": 1}\n {"id": 2}]', 2, "expected ',' or ']'"),
    (b'[\n\n 5]', 3, "expected a task object"),
    (b'[{"id": 1},\n{"id": 2,\n "data": tru}]', 3, "not valid JSON"),
    (b'{"id": "a"}\n{"data": 1}\n', 2, 'missing "id"'),
    (b'{"id": "a"}\n{"id": "b", "colour": 1}\n', 2, "unknown key 'colour'"),
    (b'{"id": ""}\n', 1, '"id" must be a non-empty string'),
    (b'{"id": 1.5}\n', 1, '"id" must be a string or an integer'),
    (b'{"id": true}\n', 1, '"id" must be a string or an integer'),
    (b'{"id": 1, "priority": 5000}\n', 1, '"priority" must be an integer'),
    (b'{"id": 1, "timeout": -1}\n', 1, '"timeout" must be a positive number'),
    (b'{"id": 1, "max_attempts": 0}\n', 1, '"max_attempts" must be an integer'),
    (b'{"id": 1}\n[1]\n', 2, "expected a task object"),
    (b'{"id": 1}\n{"id": \n', 2, "not valid JSON"),
    (b'{"id": 1}\n{"id": "\xff"}\n', 2, "not valid UTF-8"),
    (b'[{"id": 1},\n{"id": "\xff"}]', 2, "not valid UTF-8"),
])
def test_errors_name_the_line(data: bytes, line: int, reason: str) -> None:
    for step in (None, 3):
        with pytest.raises(TaskFileError) as info:
            parse(data, step)
        assert info.value.line == line, (step, str(info.value))
        assert reason in info.value.reason
        assert str(info.value).startswith(f"line {line}: ")


@pytest.mark.parametrize("data", [
    b'{"id": 1, "data": "' + b"x" * 300 + b'"}\n',
    b'[{"id": 1, "data": "' + b"x" * 300 + b'"}]',
    b'{"id": 1, "data": "' + b"x" * 300,  # no newline at all: must not buffer without bound
])
def test_a_task_larger_than_the_limit_is_refused(data: bytes) -> None:
    with pytest.raises(TaskFileError, match="larger than 200 bytes"):
        parse(data, 64, max_task_bytes=200)


def test_large_json_lines_stream_in_chunks() -> None:
    data = b"".join(b'{"id": "t%d", "data": {"n": %d}}\n' % (i, i) for i in range(50_000))
    parser = TaskFileParser()
    seen = 0
    for i in range(0, len(data), 65536):
        seen += len(parser.feed(data[i: i + 65536]))
    seen += len(parser.finish())
    assert seen == 50_000
