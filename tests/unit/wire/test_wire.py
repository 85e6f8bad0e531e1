"""The wire codec (cloudtask_wire): each fast encoder equals the general encoding of its message, parsed
back, with orjson and with the standard library's json (an instance's Python has no orjson); parse
errors name the field; the package ships with the agent and imports on every Python an instance runs;
the daemon stands on it, not on the agent."""

from __future__ import annotations

import ast
import asyncio
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudtask_wire import frames, jsonx
from cloudtask_wire.frames import (
    DONE_HEAD,
    DONE_TAIL,
    ack_fields,
    done_frame,
    fail_frames,
    grant_frames,
    handback_frames,
    lease_frame,
    pack,
    success_item,
    task_entry,
    task_ref,
)
from cloudtask_wire.messages import (
    MAX_ERROR_CHARS,
    Complete,
    Fail,
    Failure,
    Grant,
    GrantedTask,
    Handback,
    LeaseRequest,
    ProtocolError,
    Success,
    encode,
    parse_agent_message,
    parse_daemon_message,
)
from tests import paths
from tests.conftest import interpreters, python_version

ROOT = paths.ROOT
BIG = 2 * 1024 * 1024  # a task or result bigger than one default-sized frame holds twice

DATA: list[Any] = [
    None,
    {"n": 1, "xs": [1.5, -2, True, None]},
    {"text": "żółw 🐢 \u2028 \"quoted\" \\ back\nslash \u0001", "日本": ["語", "\U0001f600"]},
    "x" * BIG,
    [{"deep": [[[{"k": "v"}]]]}] * 50,
    2**62,
]
KEYS = ["k1", "clé-ü-🚀", "a\"b\\c\n", "k" * 512]
TIMEOUTS: list[float | None] = [None, 30.0, 0.25]


@pytest.fixture(params=["orjson", "stdlib"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Both JSON backends: the daemon has orjson, an instance's runtime does not."""
    if request.param == "stdlib":
        monkeypatch.setattr(jsonx, "_orjson", None)
    elif jsonx._orjson is None:
        pytest.skip("orjson is not installed")
    yield request.param


def granted(n: int = len(DATA)) -> list[GrantedTask]:
    return [GrantedTask(1000 + i, i + 1, KEYS[i % len(KEYS)], DATA[i % len(DATA)], TIMEOUTS[i % len(TIMEOUTS)])
            for i in range(n)]


def entries(tasks: list[GrantedTask]) -> list[str]:
    # As lease_many has them: the data is the stored JSON text, spliced in.
    return [task_entry(t.id, t.token, t.key, t.timeout_s, jsonx.dumps(t.data)) for t in tasks]


def successes() -> list[Success]:
    return [Success(10 + i, i + 1, d, 0.000123 * (i + 1)) for i, d in enumerate(DATA)]


def failures() -> list[Failure]:
    return [Failure(20, 1, "Traceback: ValueError: żółw 🐢\n  line 3", True, 1.5),
            Failure(21, 7, "e" * (MAX_ERROR_CHARS + 10), False, 0.0),
            Failure(22, 2, "", True, 1e6)]


def test_a_grant_of_task_entries_is_the_grant_message(backend: str) -> None:
    tasks = granted()
    fast, oversize = grant_frames(entries(tasks), 64 * 1024 * 1024)
    assert oversize == [] and len(fast) == 1
    assert parse_daemon_message(fast[0]) == parse_daemon_message(encode(Grant(tasks))) == Grant(tasks)


def test_acks_carried_in_a_grant_are_the_grant_messages_acks(backend: str) -> None:
    tasks = granted(3)
    fast, _ = grant_frames(entries(tasks), 64 * 1024 * 1024, ack_fields([5, 6], [9]))
    assert parse_daemon_message(fast[0]) == parse_daemon_message(encode(Grant(tasks, [5, 6], [9])))


def test_a_grant_split_across_frames_carries_the_same_tasks_in_order(backend: str) -> None:
    tasks = granted(24)
    fast, oversize = grant_frames(entries(tasks), BIG + 64 * 1024, ack_fields([1], []))
    assert oversize == [] and len(fast) > 1
    parsed = [parse_daemon_message(f) for f in fast]
    assert all(isinstance(g, Grant) for g in parsed)
    assert [t for g in parsed for t in g.tasks] == tasks  # type: ignore[union-attr]
    assert parsed[0].ok == [1] and all(g.ok == [] for g in parsed[1:])  # type: ignore[union-attr]


def test_task_ref_reads_back_the_entrys_id_and_token(backend: str) -> None:
    for t, entry in zip(granted(), entries(granted()), strict=True):
        assert task_ref(entry) == (t.id, t.token)
    with pytest.raises(ValueError, match="not a task entry"):
        task_ref('{"token":1,"id":2}')


@pytest.mark.parametrize("n", [1, 64, 100_000])
def test_a_lease_frame_is_the_lease_request(backend: str, n: int) -> None:
    assert parse_agent_message(lease_frame(n)) == parse_agent_message(encode(LeaseRequest(n))) == LeaseRequest(n)


@pytest.mark.parametrize("credit", [0, 3])
def test_a_done_frame_is_the_complete_message(backend: str, credit: int) -> None:
    results = successes()
    assert parse_agent_message(done_frame(results, credit)) == parse_agent_message(encode(Complete(results, credit)))
    assert parse_agent_message(done_frame(results, credit)) == Complete(results, credit)


def test_done_items_packed_into_frames_carry_the_same_results(backend: str) -> None:
    results = successes() * 3
    fast = pack(DONE_HEAD, [success_item(s) for s in results], DONE_TAIL, BIG + 64 * 1024)
    assert len(fast) > 1
    parsed = [parse_agent_message(f) for f in fast]
    assert [s for m in parsed for s in m.results] == results  # type: ignore[union-attr]


def test_fail_frames_are_the_fail_message(backend: str) -> None:
    fs = failures()
    fast = fail_frames(fs, 4 * 1024 * 1024)
    assert len(fast) == 1
    general = parse_agent_message(encode(Fail(fs)))
    assert parse_agent_message(fast[0]) == general
    assert isinstance(general, Fail) and len(general.failures[1].error) == MAX_ERROR_CHARS  # the daemon cuts


def test_handback_frames_are_the_handback_message(backend: str) -> None:
    leases = [(1, 2), (2**62, 2**62), (7, 1)]
    reason = "interruption: żółw 🐢 \"spot\""
    fast = handback_frames(leases, reason, 4 * 1024 * 1024)
    assert len(fast) == 1
    assert parse_agent_message(fast[0]) == parse_agent_message(encode(Handback(leases, reason)))
    many = handback_frames([(i, 1) for i in range(2000)], reason, 4096)
    assert len(many) > 1 and all(len(f.encode()) <= 4096 - frames.FRAME_OVERHEAD for f in many)
    back = [parse_agent_message(f) for f in many]
    assert [ref for m in back for ref in m.leases] == [(i, 1) for i in range(2000)]  # type: ignore[union-attr]


@pytest.mark.parametrize(("frame", "field"), [
    ('{"t":"done","results":[{"id":1,"token":1,"result":null,"duration_s":0},'
     '{"id":2,"token":1,"result":1,"duration_s":"slow"}]}', "results[1].duration_s"),
    ('{"t":"done","results":[{"id":1,"token":1,"duration_s":0}]}', "results[0].result"),
    ('{"t":"done","results":[{"id":-1,"token":1,"result":1,"duration_s":0}]}', "results[0].id"),
    ('{"t":"fail","failures":[{"id":1,"token":2.0,"error":"","retryable":true,"duration_s":0}]}',
     "failures[0].token"),
    ('{"t":"done","results":[7]}', "results[0]"),
    ('{"t":"done","results":{}}', "results"),
    ('{"t":"done","results":[],"n":100001}', "n"),
    ('{"t":"fail","failures":[{"id":1,"token":1,"error":"e","retryable":"yes","duration_s":0}]}',
     "failures[0].retryable"),
    ('{"t":"fail","failures":[{"id":1,"token":1,"error":5,"retryable":true,"duration_s":0}]}', "failures[0].error"),
    ('{"t":"handback","leases":[[1,2],[3]],"reason":"r"}', "leases[1]"),
    ('{"t":"handback","leases":[],"reason":null}', "reason"),
    ('{"t":"hb","leases":[[1,true]]}', "leases[0]"),
    ('{"t":"lease","n":0.5}', "n"),
    ('{"t":"hello","version":1,"instance":"i","token":"t","slots":0,"held":[]}', "slots"),
    ('{"t":"hello","version":1,"instance":"i","token":"t","slots":1,"held":[],"max_message_bytes":10}',
     "max_message_bytes"),
    ('{"t":"notice","kind":"fire","source":"aws","deadline":null,"detail":""}', "kind"),
    ('{"t":"nope"}', "t"),
    ("[1]", "message"),
])
def test_a_parse_error_names_the_field(frame: str, field: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_agent_message(frame)
    assert info.value.field == field and str(info.value).startswith(f"{field}: ")


def test_a_daemon_frame_missing_a_key_names_it() -> None:
    with pytest.raises(ProtocolError, match="heartbeat_s") as info:
        parse_daemon_message('{"t":"welcome","lease_ttl_s":60,"kept":[],"dropped":[],"version":1}')
    assert info.value.field == "heartbeat_s"


def test_the_agent_package_ships_the_wire_codec() -> None:
    from cloudtaskd.fleet.bootstrap import agent_package

    names = set(tarfile.open(fileobj=io.BytesIO(agent_package())).getnames())
    for module in ("__init__", "messages", "frames", "jsonx", "workerspec", "compat"):
        assert f"cloudtask_wire/{module}.py" in names
    assert "agent/connection.py" in names and not any(n.startswith("cloudtaskd/") for n in names)


_ON_INSTANCE = """
import json, sys
from cloudtask_wire import frames, jsonx
from cloudtask_wire.messages import Success, encode, parse_agent_message, parse_daemon_message
jsonx._orjson = None  # an instance's runtime has no orjson (this interpreter may)
data = {"text": "\\u017c\\u00f3\\u0142w \\U0001f422 \\u2028", "n": [1, 2.5, None]}
grant = frames.grant_frames([frames.task_entry(7, 2, "cl\\u00e9", 3.5, jsonx.dumps(data))], 1 << 20,
                            frames.ack_fields([1], [2]))[0][0]
done = frames.done_frame([Success(7, 2, data, 0.5)], 4)
assert parse_agent_message(done) == parse_agent_message(encode(parse_agent_message(done)))
print(json.dumps({"grant": grant, "done": done}))
"""


@pytest.mark.parametrize("python", interpreters())
async def test_the_codec_imports_and_encodes_alike_on_every_instance_python(tmp_path: Path, python: str) -> None:
    """From the agent package alone (as an instance unpacks it), without orjson: the frames it writes
    parse to the same messages as the daemon's."""
    from cloudtaskd.fleet.bootstrap import agent_package

    if python_version(python) < (3, 9):
        pytest.skip(f"{python} is older than the 3.9 an instance needs")
    with tarfile.open(fileobj=io.BytesIO(agent_package())) as tar:
        tar.extractall(tmp_path / "agentpkg", filter="data")
    # -I: isolated (no user site, no PYTHONPATH from here), so nothing but the package and the stdlib.
    run = await asyncio.create_subprocess_exec(
        python, "-I", "-c", f"import sys; sys.path.insert(0, {str(tmp_path / 'agentpkg')!r})\n" + _ON_INSTANCE,
        cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(run.communicate(), 60)
    assert run.returncode == 0, err.decode()
    got = json.loads(out)
    data = {"text": "żółw 🐢 \u2028", "n": [1, 2.5, None]}
    assert parse_daemon_message(got["grant"]) == Grant([GrantedTask(7, 2, "clé", data, 3.5)], [1], [2])
    assert parse_agent_message(got["done"]) == Complete([Success(7, 2, data, 0.5)], 4)


def test_the_daemon_stands_on_the_wire_codec_not_on_the_agent() -> None:
    """cloudtaskd imports agent.* only for the worker bundle's unpacking rules (agent/bundle.py, run
    on both sides), never for the wire."""
    found = []
    for path in sorted((ROOT / "cloudtaskd").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "agent":
                names = [f"agent.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            found += [f"{path.relative_to(ROOT).as_posix()}: {n}" for n in names
                      if n.startswith("agent.") and n != "agent.bundle"]
    assert found == []
