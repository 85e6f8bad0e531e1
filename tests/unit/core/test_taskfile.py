"""The task file parser: both formats, any chunking, every error with the line its task starts on."""

from __future__ import annotations

import json

import pytest

from cloudtaskd.core.taskfile import ParsedTask, TaskFileError, TaskFileParser, parse_task


def parse(data: bytes, step: int | None = None, max_task_bytes: int = 1_048_576) -> list[ParsedTask]:
    parser = TaskFileParser(max_task_bytes)
    out: list[ParsedTask] = []
    step = step or max(len(data), 1)
    for i in range(0, len(data), step):
        out += parser.feed(data[i: i + step])
    return out + parser.finish()


def error(data: bytes, step: int | None = None, max_task_bytes: int = 1_048_576) -> TaskFileError:
    with pytest.raises(TaskFileError) as info:
        parse(data, step, max_task_bytes)
    assert str(info.value) == f"line {info.value.line}: {info.value.reason}"
    return info.value


# Values chosen to sit across chunk boundaries awkwardly: escapes, surrogate pairs, raw multi-byte
# characters (2, 3 and 4 bytes), brackets and quotes inside strings, numbers and literals.
DATA = [
    {"text": 'é ☃ 😀 \n "quoted" \\ [not] {a bracket}', "esc": "\u00e9\U0001f600", "C:\\dir\\": "}"},
    [1, -1.5e-3, 12345678901234, True, False, None, [], {}, [[{"deep": ["x"]}]]],
    None,
    "a" * 300,
]
TASKS = [
    {"id": "a", "data": DATA[0]},
    {"id": 7, "priority": 3, "timeout": 1.5, "max_attempts": 2},
    {"id": "c", "data": DATA[1]},
    {"id": -4, "data": DATA[3], "priority": -1000, "timeout": 30},
]


def build_array(*, indent: int, ensure_ascii: bool, newline: str) -> tuple[bytes, list[int]]:
    """A pretty-printed array of TASKS, and the byte offset just past each task's closing brace."""
    data, ends = b"[" + newline.encode(), []
    for i, task in enumerate(TASKS):
        data += json.dumps(task, indent=indent, ensure_ascii=ensure_ascii).replace("\n", newline).encode()
        ends.append(len(data))
        data += ("," if i < len(TASKS) - 1 else "").encode() + newline.encode()
    return data + b"]", ends


ARRAY, ARRAY_ENDS = build_array(indent=2, ensure_ascii=False, newline="\n")
ARRAY_ESCAPED_CRLF, ARRAY_ESCAPED_CRLF_ENDS = build_array(indent=1, ensure_ascii=True, newline="\r\n")
LINES = b'{"id": "a", "data": {"s": "\xc3\xa9\xf0\x9f\x98\x80"}}\r\n\r\n\n{"id": "b", "data": 1}\n{"id": 3}'
LINES_ENDS = [LINES.index(b"\n") + 1, LINES.index(b"1}\n") + 3]  # the last line ends only with the file


def test_array_gives_fields_and_the_line_each_task_starts_on() -> None:
    tasks = parse(ARRAY)
    assert [t.key for t in tasks] == ["a", "7", "c", "-4"]
    lines = ARRAY.decode().split("\n")
    assert [t.line for t in tasks] == [n for n, text in enumerate(lines, 1) if text == "{"]
    assert [json.loads(t.data_json) for t in tasks] == [DATA[0], None, DATA[1], DATA[3]]
    assert tasks[0].data_json == json.dumps(DATA[0], ensure_ascii=False, separators=(",", ":"))
    assert [(t.priority, t.timeout_s, t.max_attempts) for t in tasks] == [
        (0, None, None), (3, 1.5, 2), (0, None, None), (-1000, 30.0, None)]
    assert isinstance(tasks[3].timeout_s, float)


def test_json_lines_with_crlf_blank_lines_and_no_final_newline() -> None:
    tasks = parse(LINES)
    assert [(t.line, t.key) for t in tasks] == [(1, "a"), (4, "b"), (5, "3")]
    assert json.loads(tasks[0].data_json) == {"s": "é😀"}
    assert [t.data_json for t in tasks[1:]] == ["1", "null"]


def test_crlf_array_counts_lines_like_lf() -> None:
    lf = parse(ARRAY_ESCAPED_CRLF.replace(b"\r\n", b"\n"))
    assert parse(ARRAY_ESCAPED_CRLF) == lf
    starts = [n for n, text in enumerate(ARRAY_ESCAPED_CRLF.decode().split("\r\n"), 1) if text == "{"]
    assert [t.line for t in lf] == starts
    assert len(starts) == 4


@pytest.mark.parametrize(("data", "ends"), [(ARRAY, ARRAY_ENDS), (ARRAY_ESCAPED_CRLF, ARRAY_ESCAPED_CRLF_ENDS),
                                           (LINES, LINES_ENDS)], ids=["array", "array-crlf", "lines"])
def test_a_split_at_any_byte_gives_the_same_tasks_as_soon_as_they_are_complete(data: bytes, ends: list[int]) -> None:
    whole = parse(data)
    assert len(whole) >= 3
    for cut in range(len(data) + 1):
        parser = TaskFileParser()
        first = parser.feed(data[:cut])
        assert len(first) == sum(end <= cut for end in ends), f"split at byte {cut}"
        assert first + parser.feed(data[cut:]) + parser.finish() == whole, f"split at byte {cut}"
    for step in range(1, 40):
        parser, got = TaskFileParser(), []
        for i in range(0, len(data), step):
            got += parser.feed(data[i: i + step])
            assert len(got) == sum(end <= i + step for end in ends), f"chunks of {step} bytes, at byte {i}"
        assert got + parser.finish() == whole, f"chunks of {step} bytes"


def test_feed_returns_each_task_as_soon_as_its_chunk_completes_it() -> None:
    lines = TaskFileParser()
    assert [t.key for t in lines.feed(b'{"id": 1}\n{"id": 2}\n{"id"')] == ["1", "2"]
    assert lines.feed(b': 3}') == []  # the line may still go on
    assert [t.key for t in lines.feed(b"\n")] == ["3"]
    assert lines.finish() == []
    array = TaskFileParser()
    assert [t.key for t in array.feed(b'[{"id": 1}, {"id": "x]}')] == ["1"]
    assert [t.key for t in array.feed(b'"}, {"id"')] == ["x]}"]
    assert [t.key for t in array.feed(b': 3}]')] == ["3"]
    assert array.finish() == []


def test_integer_ids_become_decimal_strings_in_both_formats() -> None:
    assert [t.key for t in parse(b'{"id": 0}\n{"id": -17}\n{"id": 9223372036854775807}\n')] == [
        "0", "-17", "9223372036854775807"]
    assert [t.key for t in parse(b'[{"id": 0}, {"id": -17}]')] == ["0", "-17"]


@pytest.mark.parametrize("data", [b'{"id": 18446744073709551616}', b'[{"id": 18446744073709551616}]'])
def test_both_formats_refuse_an_integer_id_beyond_64_bits(data: bytes) -> None:
    # orjson reads it as a float; the array format must not quietly accept what JSON Lines refuses.
    assert '"id" must be a string or an integer' in error(data).reason


@pytest.mark.parametrize(("data", "line", "reason"), [
    # the file as a whole
    (b"", 1, "the file is empty"),
    (b"  \r\n\n ", 1, "the file is empty"),
    (b"\n\nhello", 3, "expected a JSON array"),
    # array grammar
    (b'[{"id": 1},\n]', 2, "trailing comma"),
    (b'[{"id": 1},\n,{"id": 2}]', 2, "found ','"),
    (b'[{"id": 1}\n {"id": 2}]', 2, "expected ',' or ']'"),
    (b'[{"id": 1}] {"id": 2}', 1, "after the closing ']'"),
    (b'[{"id": 1}]\n\n  x', 3, "after the closing ']'"),
    (b'[\n\n 5]', 3, "expected a task object"),
    (b'[\n "a"]', 2, "expected a task object"),
    (b'[{"id": 1},\n{"id": 2,\n "data": tru}]', 2, "not valid JSON: Expecting value at line 3"),
    (b'[{"id": 1, "data": NaN}]', 1, "not valid JSON"),  # JSON Lines refuses it too
    (b'[{"id": "\\ud800"}]', 1, "not valid JSON"),  # a lone surrogate cannot be stored
    # truncated files
    (b'[{"id": 1}\n', 2, "missing ']'"),
    (b'[\n{"id": 1},\n', 3, "missing ']'"),
    (b'[{"id": 1},\n {"id": "ab', 2, "the file ends inside this task"),
    (b'[{"id": 1},\n {"id": \n', 2, "the file ends inside this task"),
    (b'{"id": 1}\n{"id": \n', 2, "not valid JSON"),
    (b'{"id": 1}\n{"id": 2', 2, "not valid JSON"),
    # task validation, JSON Lines
    (b'{"id": "a"}\n{"data": 1}\n', 2, 'missing "id"'),
    (b'{"id": "a"}\n{"id": "b", "colour": 1}\n', 2, "unknown key 'colour'"),
    (b'{"ID": "a"}\n', 1, "unknown key 'ID'"),
    (b'{"id": ""}\n', 1, '"id" must be a non-empty string'),
    (b'{"id": "' + b"x" * 513 + b'"}\n', 1, "at most 512 characters"),
    (b'{"id": 1.5}\n', 1, '"id" must be a string or an integer'),
    (b'{"id": true}\n', 1, '"id" must be a string or an integer'),
    (b'{"id": null}\n', 1, '"id" must be a string or an integer, found null'),
    (b'{"id": 1, "priority": 1001}\n', 1, '"priority" must be an integer between -1000 and 1000'),
    (b'{"id": 1, "priority": 1.0}\n', 1, '"priority" must be an integer'),
    (b'{"id": 1, "timeout": -1}\n', 1, '"timeout" must be a positive number'),
    (b'{"id": 1, "timeout": 0}\n', 1, '"timeout" must be a positive number'),
    (b'{"id": 1, "timeout": "5"}\n', 1, '"timeout" must be a positive number'),
    (b'{"id": 1, "max_attempts": 0}\n', 1, '"max_attempts" must be an integer between 1 and 100'),
    (b'{"id": 1, "max_attempts": 101}\n', 1, '"max_attempts" must be an integer between 1 and 100'),
    (b'{"id": 1}\n[1]\n', 2, "expected a task object"),
    (b'{"id": 1}\n{"id": 2} {"id": 3}\n', 2, "not valid JSON"),
    # task validation inside a pretty-printed array names the line the task starts on
    (b'[\n  {"id": 1},\n  {\n    "id": 2,\n    "priority": 5000\n  }\n]', 3, '"priority" must be an integer'),
    (b'[\n  {\n    "data": 1\n  }\n]', 2, 'missing "id"'),
    # invalid UTF-8
    (b'{"id": 1}\n{"id": "\xff"}\n', 2, "not valid UTF-8"),
    (b'[{"id": 1},\n{"id": "\xff"}]', 2, "not valid UTF-8"),
    (b'[{"id": 1},\n\n\xe2\x98', 3, "not valid UTF-8"),  # the file ends inside a character
])
@pytest.mark.parametrize("step", [None, 1, 3], ids=["whole", "1-byte", "3-byte"])
def test_errors_name_the_line_and_the_reason(data: bytes, line: int, reason: str, step: int | None) -> None:
    exc = error(data, step)
    assert (exc.line, reason in exc.reason) == (line, True), str(exc)


@pytest.mark.parametrize(("data", "line", "reason"), [
    (b'{"id": 1, "priority": 5000}\n{"id": 2, "data": "' + b"x" * 300 + b'"}\n', 1, '"priority"'),
    (b'{"id": 1}\n{"id": 2, "max_attempts": 0}\n{"id": 3, "data": "' + b"x" * 300, 2, '"max_attempts"'),
    (b'[{"id": 1},\n{"id": 2, "priority": 5000},\n{"id": "\xff"}]', 2, '"priority"'),
    (b'[{"id": 1},\n{"id": 2,, "data": 1},\n{"id": "\xff"}]', 2, "not valid JSON"),
])
def test_the_first_error_in_the_file_is_the_one_reported(data: bytes, line: int, reason: str) -> None:
    exc = error(data, max_task_bytes=200)
    assert (exc.line, reason in exc.reason) == (line, True), str(exc)


@pytest.mark.parametrize("cut", [20, 30, 36, 100])
def test_a_syntax_error_is_refused_as_soon_as_its_task_has_arrived(cut: int) -> None:
    # Not mistaken for a task still arriving, which would wait for the end of the file (or the size limit).
    data = b'[{"id": 0},\n{"id": 1, "data": tru},\n' + b",\n".join(b'{"id": %d}' % i for i in range(2, 30))
    parser = TaskFileParser()
    with pytest.raises(TaskFileError) as info:
        parser.feed(data[:cut])
        parser.feed(data[cut:])
    assert (info.value.line, info.value.reason) == (2, "not valid JSON: Expecting value")


def test_brackets_that_never_balance_are_reported_as_invalid_json() -> None:
    data = b'[{"id": 0, "data": [}, ' + b", ".join(b'{"id": %d}' % i for i in range(1, 500)) + b"]"
    for step in (None, 5):
        exc = error(data, step, max_task_bytes=1000)
        assert (exc.line, exc.reason.startswith("not valid JSON")) == (1, True), str(exc)


@pytest.mark.parametrize(("data", "line"), [
    (b'{"id": 1}\n{"id": 2, "data": "' + b"x" * 300 + b'"}\n', 2),
    (b'{"id": 1}\n\n{"id": 2, "data": "' + b"x" * 300, 3),  # no newline at all: must not buffer without bound
    (b'[{"id": 1},\n {"id": 2, "data": "' + b"x" * 300 + b'"}]', 2),
    (b'[{"id": 1},\n {"id": 2, "data": "' + b"x" * 100_000, 2),  # refused long before the file ends
    (b'[{"id": 1},\n {"id": 2, "data": "' + "é".encode() * 150 + b'"}]', 2),  # counted in bytes, not characters
], ids=["lines", "lines-unending", "array", "array-unending", "array-multibyte"])
@pytest.mark.parametrize("step", [None, 64])
def test_a_task_larger_than_the_limit_is_refused(data: bytes, line: int, step: int | None) -> None:
    exc = error(data, step, max_task_bytes=200)
    assert (exc.line, "larger than 200 bytes" in exc.reason) == (line, True), str(exc)


def test_a_task_exactly_at_the_limit_is_accepted() -> None:
    task = b'{"id": 1, "data": "' + b"x" * 100 + b'"}'
    assert [t.key for t in parse(task + b"\n", 16, max_task_bytes=len(task))] == ["1"]
    assert [t.key for t in parse(b"[" + task + b"]", 16, max_task_bytes=len(task))] == ["1"]
    with pytest.raises(TaskFileError, match="larger than"):
        parse(task + b"\n", 16, max_task_bytes=len(task) - 1)


@pytest.mark.parametrize("array", [False, True], ids=["lines", "array"])
def test_data_that_grows_past_the_limit_once_stored_is_refused(array: bool) -> None:
    """The limit holds for the data as stored and sent to agents too (their frame limit is sized from
    it): 1e5 is stored as 100000.0, so a line under the limit can hold data over it."""
    numbers = b"[" + b",".join([b"1e5"] * 250) + b"]"  # 1,000 bytes written, 2,250 stored
    task = b'{"id": "n", "data": ' + numbers + b"}"
    small = b'{"id": "s", "data": 1}'
    data = b"[" + small + b",\n" + task + b"]" if array else small + b"\n" + task + b"\n"
    assert len(task) < 1100
    exc = error(data, max_task_bytes=1100)
    assert exc.line == 2 and exc.reason == ('the task\'s "data" takes 2251 bytes once stored, more than 1100 bytes, '
                                            "the limit for one task")
    assert [t.key for t in parse(data, max_task_bytes=2251)] == ["s", "n"]


def test_an_oversize_task_is_refused_before_the_rest_of_the_file_is_read() -> None:
    parser = TaskFileParser(max_task_bytes=1000)
    parser.feed(b'{"id": 1, "data": "')
    with pytest.raises(TaskFileError, match=r"line 1: .*larger than 1000"):
        for _ in range(100):
            parser.feed(b"x" * 100)


def test_a_leading_byte_order_mark_is_tolerated_even_when_split() -> None:
    assert [t.key for t in parse(b'\xef\xbb\xbf[{"id": 1}]', 1)] == ["1"]
    assert [(t.line, t.key) for t in parse(b'\xef\xbb\xbf\n{"id": 1}\n', 1)] == [(2, "1")]
    assert "expected a JSON array" in error(b"\xef\xbb").reason


# A big task sent a byte at a time, full of brackets and escapes. Tests assert no wall-clock figure
# (shared machines); were the parser to re-read the pending task per byte (quadratic), this would
# run for minutes and the per-test timeout would fail it.
@pytest.mark.parametrize(("opening", "repeats"), [(b"[", 50_000), (b"", 250_000)], ids=["array", "lines"])
def test_a_slow_sender_byte_by_byte(opening: bytes, repeats: int) -> None:
    data = opening + b'{"id": "x", "data": "' + b'}]\\"' * repeats + b'"}' + (b"]" if opening else b"\n")
    parser = TaskFileParser()
    got = [t for i in range(len(data)) for t in parser.feed(data[i: i + 1])] + parser.finish()
    assert [t.key for t in got] == ["x"]


@pytest.mark.parametrize("fmt", ["array", "lines"])
def test_a_large_file_streams_in_chunks(fmt: str) -> None:
    items = [b'{"id": "t%d", "data": {"n": %d}}' % (i, i) for i in range(50_000)]
    data = b"[\n" + b",\n".join(items) + b"\n]" if fmt == "array" else b"\n".join(items) + b"\n"
    parser = TaskFileParser()
    tasks: list[ParsedTask] = []
    for i in range(0, len(data), 65536):
        tasks += parser.feed(data[i: i + 65536])
    tasks += parser.finish()
    assert [t.key for t in tasks] == [f"t{i}" for i in range(50_000)]
    assert tasks[-1].data_json == '{"n":49999}'
    assert tasks[-1].line == (50_001 if fmt == "array" else 50_000)


# ---- one task alone (a standing queue's enqueue: taskfile.parse_task) ---------------------------


def test_a_single_task_is_read_as_one_line_of_a_file_with_its_id_optional() -> None:
    task = parse_task(b'{"id": "a", "data": {"n": 1}, "priority": 3, "timeout": 2, "max_attempts": 4}')
    assert (task.key, task.data_json, task.priority, task.timeout_s, task.max_attempts) == ("a", '{"n":1}', 3, 2.0, 4)
    assert parse_task(b'{"id": 7}').key == "7"
    # Without an id: the key is left to the daemon (the task's number); the rest is checked all the same.
    auto = parse_task(b' {"data": [1, 2]} \n')
    assert (auto.key, auto.data_json, auto.line) == ("", "[1,2]", 1)
    assert parse_task(b"{}").data_json == "null"


@pytest.mark.parametrize(("body", "field", "reason"), [
    (b'{"id": "a", "prio": 1}', "prio", "unknown key 'prio'"),
    (b'{"prio": 1}', "prio", "unknown key 'prio'"),
    (b'{"priority": 2000}', "priority", '"priority" must be an integer between -1000 and 1000'),
    (b'{"timeout": 0}', "timeout", '"timeout" must be a positive number'),
    (b'{"max_attempts": "3"}', "max_attempts", '"max_attempts" must be an integer'),
    (b'{"id": ""}', "id", '"id" must be a non-empty string'),
    (b'{"id": [1]}', "id", '"id" must be a string or an integer, found an array'),
    (b'[{"id": "a"}]', None, "expected a task object"),
    (b'{"id": "a"} {"id": "b"}', None, "not valid JSON"),
    (b"", None, "not valid JSON"),
])
def test_a_bad_single_task_names_its_field(body: bytes, field: str | None, reason: str) -> None:
    with pytest.raises(TaskFileError) as caught:
        parse_task(body)
    assert caught.value.field == field and caught.value.reason.startswith(reason), caught.value.reason


def test_a_single_task_over_the_size_limit_is_refused() -> None:
    with pytest.raises(TaskFileError, match="larger than 100 bytes"):
        parse_task(b'{"data": "' + b"x" * 100 + b'"}', max_task_bytes=100)
    # Stored bigger than sent (1e5 is stored as 100000.0): the stored size counts.
    with pytest.raises(TaskFileError, match="once stored") as caught:
        parse_task(b'{"data": [' + b",".join([b"1e5"] * 20) + b"]}", max_task_bytes=120)
    assert caught.value.field == "data"
