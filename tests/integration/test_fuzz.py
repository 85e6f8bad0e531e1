"""Fuzzing the daemon's two doors with hypothesis, against a real daemon.

The agent websocket: after a hello, frames of every message type of cloudtask_wire/messages.py with hostile
field values (integers out of range and of the wrong type, NaN and infinities, unicode, strings near
the field and frame limits, JSON nested past what can be stored, unknown task ids, another agent's
leases, stale tokens, duplicates), random JSON, invalid UTF-8, binary and oversized frames, bad
hellos and garbage before the hello. The control API: every route the daemon serves, read from its
router so that a new route is fuzzed without a change here, with random methods, path parameters,
query strings, headers and bodies (broken JSON, huge bodies, broken archives, task files with a
broken line).

Checked after each example: the daemon's supervised tasks live and /v1/health answers; nothing was
logged at error level (a crashed dispatch round, an unhandled handler exception); every job's counters
match its tasks and SQLite's integrity check passes; leases another agent holds are exactly as they
were (fencing); a well-behaved agent, a real agent process, still gets leases and completes tasks;
a bad frame closed its connection with the documented code; an API error is a 4xx in the documented
JSON shape (429 and the store's 503/507 aside); tasks accepted before the fuzzing are all intact.

The daemon runs in the test's event loop, so its log is captured in-process; hypothesis runs in a
worker thread and hands each step to the loop. CI mode runs a fixed number of derandomized examples
(repeatable); soak mode (--soak or CLOUDTASK_SOAK=1) many more, randomized.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import itertools
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import tarfile
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import orjson
import pytest
from aiohttp import web
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from cloudtask_wire import messages as protocol
from cloudtaskd.config import ApiConfig, LocalProviderConfig, ProvidersConfig
from cloudtaskd.core.tables import tasks as queue
from cloudtaskd.daemon import Daemon
from tests.conftest import UnixApi, agent_ssl, make_config, wait_for
from tests.integration.test_daemon_e2e import PY_WORKER
from tests.procs import ROOT, bundle

# pytest-timeout reads its marker before any fixture runs, so soak mode is told from the command line.
SOAK = os.environ.get("CLOUDTASK_SOAK") == "1" or "--soak" in sys.argv
pytestmark = pytest.mark.timeout(6 * 3600 if SOAK else 150)

MAX_FRAME = 64 * 1024  # agents.max_message_bytes here: frames near the limit stay cheap to build
LEASE_TTL_S = 120.0  # the victim's leases must outlive a soak run's gaps between heartbeats
I62 = 2**62
T = TypeVar("T")


# ---- the harness: a daemon in this loop, hypothesis in a thread -------------------------------------------


class _ErrorRecords(logging.Handler):
    """Standard-library records at ERROR and above: aiohttp's "Error handling request", asyncio's
    "Task exception was never retrieved"."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()} {record.exc_text or ''}")


@dataclass
class Logs:
    """What the daemon logged while inside error_log(): structlog's events, and the standard library's
    records at error level."""

    events: list[dict[str, Any]]
    records: _ErrorRecords

    def errors(self) -> list[Any]:
        return [e for e in self.events if e.get("log_level") in ("error", "exception", "critical")] + [
            *self.records.records]


@contextlib.contextmanager
def error_log() -> Iterator[Logs]:
    handler = _ErrorRecords()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with capture_logs() as events:
            yield Logs(events, handler)
    finally:
        root.removeHandler(handler)


@dataclass
class Harness:
    daemon: Daemon
    api: UnixApi
    http: aiohttp.ClientSession
    loop: asyncio.AbstractEventLoop
    logs: Logs
    digests: dict[str, str] = field(default_factory=dict)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run a step on the daemon's loop from hypothesis' thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def state(self) -> str:
        """The daemon's and the clients' connection counts, for a failure's message."""
        hub = self.daemon.hub
        return (f"hub sockets {len(hub.sockets)}, authenticated {sum(map(len, hub.by_instance.values()))}, "
                f"sessions {len(self.daemon.dispatcher.sessions)}, client connections in use "
                f"{len(getattr(self.http.connector, '_acquired', ()))}")

    async def check_alive(self) -> None:
        d = self.daemon
        assert not d.failed.is_set(), "a supervised background task died"
        assert not [t.get_name() for t in d._tasks if t.done()], "a background task ended"
        status, body = await self.api.request("GET", "/v1/health")
        assert status == 200 and body["ok"] is True, (status, body)
        assert self.logs.errors() == [], self.logs.errors()

    async def check_views(self, job_ids: list[int]) -> None:
        """What the fuzzing left behind still reads back as strict JSON through every read-only view (a
        NaN or an infinity from hostile numbers would be written by json.dumps, and refused by clients)."""
        paths = ["/v1/jobs", "/v1/instances?all=1", "/v1/cost", "/v1/status", "/v1/interruptions",
                 "/v1/events?tail=2000", "/v1/catalog", "/v1/prices"]
        for job in job_ids:
            paths += [f"/v1/jobs/{job}", f"/v1/jobs/{job}/tasks?limit=10000", f"/v1/jobs/{job}/cost",
                      f"/v1/jobs/{job}/results", f"/v1/jobs/{job}/results?top=100"]
        for path in paths:
            async with self.api.session.get(f"http://cloudtaskd{path}") as resp:
                raw = await resp.read()
                assert resp.status == 200, (path, resp.status, raw[:300])
                lines = raw.splitlines() if resp.content_type == "application/x-ndjson" else [raw]
                for line in lines:
                    orjson.loads(line)  # strict: no NaN, no Infinity
        async with self.api.session.get("http://cloudtaskd/metrics") as resp:
            assert resp.status == 200

    async def check_store(self) -> None:
        def read(db: Any) -> tuple[list[str], list[Any]]:
            return queue.check_counters(db), [tuple(r) for r in db.execute("PRAGMA integrity_check")]
        problems, integrity = await self.daemon.store.read(read)
        assert problems == [], problems
        assert integrity == [("ok",)], integrity


def fuzz_config(tmp_path: Path) -> Any:
    config = make_config(tmp_path, lease_ttl_s=LEASE_TTL_S, idle_timeout_s=3600.0)
    return replace(
        config,
        # No provider: the scaler launches nothing, every agent here is one the test runs.
        providers=ProvidersConfig(local=LocalProviderConfig(enabled=False, max_instances=0)),
        agents=replace(config.agents, max_message_bytes=MAX_FRAME),
        # The fuzzer sends requests as fast as it can: the limiter would answer most of them 429.
        api=ApiConfig(rate_limit_per_s=1e6, rate_burst=1_000_000),
        scaling=replace(config.scaling, tick_s=0.2),
    )


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    d = Daemon(fuzz_config(tmp_path), shutdown_grace_s=1)
    with error_log() as logs:
        await d.start()
        api = UnixApi(d.config.socket_path)
        http = aiohttp.ClientSession()
        h = Harness(d, api, http, asyncio.get_running_loop(), logs)
        try:
            for name in ("probe", "victim", "fuzz"):
                # One pool each: a digest per bundle, so the fuzzer's pool never leases their tasks.
                status, worker = await api.request("POST", "/v1/workers", data=bundle({**PY_WORKER, "pool": name}))
                assert status == 200, worker
                h.digests[name] = worker["digest"]
            yield h
        finally:
            await http.close()
            await api.close()
            await d.stop()
    assert logs.errors() == [], logs.errors()


def hypothesis_settings(soak: bool, ci_examples: int, soak_examples: int) -> settings:
    return settings(
        max_examples=soak_examples if soak else ci_examples,
        deadline=None,
        derandomize=not soak,  # CI: the same examples every run
        database=None,
        suppress_health_check=list(HealthCheck),  # one daemon for every example, on purpose
        # No shrinking: the daemon's state moves on between examples, so a replay rarely fails the same
        # way (hypothesis calls that flaky); the failing example is reported as it was drawn.
        phases=[Phase.explicit, Phase.generate],
        print_blob=True,
    )


async def register(h: Harness, pool: str, slots: int = 4) -> dict[str, Any]:
    status, inst = await h.api.request("POST", "/v1/instances", json={"worker": h.digests[pool], "slots": slots})
    assert status == 201, inst
    return dict(inst)


async def submit(h: Harness, pool: str, tasks: list[dict[str, Any]], job_id: int | None = None) -> int:
    if job_id is None:
        status, job = await h.api.request("POST", "/v1/jobs", json={"name": pool, "worker": h.digests[pool]})
        assert status == 201, job
        job_id = int(job["id"])
    body = "".join(json.dumps(t) + "\n" for t in tasks).encode()
    status, out = await h.api.request("POST", f"/v1/jobs/{job_id}/tasks", data=body)
    assert status == 200 and out == {"accepted": len(tasks)}, (status, out)
    return job_id


# ---- the other agents: one that holds leases (the victim), one that works (a real agent process) ----------


class Victim:
    """An agent that leases a few tasks and holds them, heartbeating: the fuzzer is told their ids and
    tokens, and none of them may move while it fuzzes."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.refs: list[tuple[int, int]] = []
        self.inst: dict[str, Any] = {}
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._beat: asyncio.Task[None] | None = None

    async def start(self, n: int = 4) -> None:
        await submit(self.h, "victim", [{"id": f"v{i}", "data": {"n": i}} for i in range(n)])
        self.inst = await register(self.h, "victim")
        self.ws = await self.h.http.ws_connect(self.inst["url"], ssl=agent_ssl(self.inst))
        await self.ws.send_str(protocol.encode(protocol.Hello(self.inst["id"], self.inst["token"], 4, [])))
        assert json.loads((await self.ws.receive(timeout=10)).data)["t"] == "welcome"
        await self.ws.send_str(protocol.encode(protocol.LeaseRequest(n)))
        grant = json.loads((await self.ws.receive(timeout=10)).data)
        assert grant["t"] == "grant" and len(grant["tasks"]) == n, grant
        self.refs = [(t["id"], t["token"]) for t in grant["tasks"]]
        self._beat = asyncio.get_running_loop().create_task(self._heartbeats())

    async def _heartbeats(self) -> None:
        assert self.ws is not None
        while True:
            await asyncio.sleep(LEASE_TTL_S / 10)
            await self.ws.send_str(protocol.encode(protocol.Heartbeat(list(self.refs))))

    async def check_untouched(self) -> None:
        """Each held lease is still leased, on its attempt, to this instance, with no result."""
        rows = await self.h.daemon.store.fetchall(
            "SELECT id, state, attempt, instance_id, result, error, failures FROM tasks"
            " WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id", (json.dumps([r[0] for r in self.refs]),))
        got = [(r["id"], r["state"], r["attempt"], r["instance_id"], r["result"], r["error"], r["failures"])
               for r in rows]
        assert got == [(i, "leased", tok, self.inst["id"], None, None, 0) for i, tok in self.refs], got

    async def finish(self) -> None:
        """The victim completes its tasks: its own reports still land (the fence let the right one in)."""
        assert self.ws is not None and self._beat is not None
        self._beat.cancel()
        await self.ws.send_str(protocol.encode(protocol.Complete(
            [protocol.Success(i, tok, {"victim": i}, 0.0) for i, tok in self.refs])))

        async def acked() -> Any:
            assert self.ws is not None
            msg = json.loads((await self.ws.receive(timeout=10)).data)
            return msg if msg["t"] == "ack" else None
        ack = await wait_for(acked, message="the victim's ack")
        assert ack["ok"] == [i for i, _ in self.refs] and ack["refused"] == [], ack
        await self.ws.close()


class GoodAgent:
    """A real agent process (agent/main.py) on the probe pool: it must keep working through all this."""

    def __init__(self, h: Harness, workdir: Path) -> None:
        self.h = h
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.job_id: int | None = None
        self.inst: dict[str, Any] = {}
        self.sent = 0

    async def start(self) -> None:
        self.inst = await register(self.h, "probe", slots=2)
        self.workdir.mkdir()
        ca = self.workdir / "ca.pem"
        ca.write_text(self.inst["ca_cert"])
        worker_dir = self.h.daemon.config.state_path / "workers" / self.h.digests["probe"]
        with (self.workdir / "agent.log").open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent.main", "--url", self.inst["url"], "--instance", self.inst["id"],
                 "--worker-dir", str(worker_dir), "--slots", "2", "--ca-file", str(ca)],
                stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir, stdin=subprocess.DEVNULL,
                env={**os.environ, "CLOUDTASK_AGENT_TOKEN": self.inst["token"], "PYTHONPATH": str(ROOT)})
        await self.probe()

    async def probe(self, n: int = 2) -> None:
        """New tasks for the good agent, run to success by it."""
        tasks = [{"id": f"p{self.sent + i}", "data": {"n": self.sent + i}} for i in range(n)]
        self.job_id = await submit(self.h, "probe", tasks, self.job_id)
        self.sent += n

        async def done() -> bool:
            _, job = await self.h.api.request("GET", f"/v1/jobs/{self.job_id}")
            return bool(job["counts"]["succeeded"] == self.sent)
        await wait_for(done, timeout=30, interval=0.01, message=f"the good agent's probe tasks ({self.log()})")

    async def check_results(self) -> None:
        """Every probe task ran once, on the good agent, with its worker's own result (none forged)."""
        rows = await self.h.daemon.store.fetchall(
            "SELECT key, state, result, instance_id, failures FROM tasks WHERE job_id = ?", (self.job_id,))
        assert len(rows) == self.sent
        for r in rows:
            n = int(r["key"][1:])
            assert (r["state"], json.loads(r["result"]), r["instance_id"], r["failures"]) == (
                "succeeded", {"double": 2 * n}, self.inst["id"], 0), dict(r)

    def log(self) -> str:
        path = self.workdir / "agent.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# ---- agent frames: values, messages, and what the daemon must do with each ------------------------------


@dataclass(frozen=True)
class Raw:
    """JSON text spliced in verbatim: literals json.dumps cannot write (1e400, NaN in a field, deep nests)."""

    text: str


RAW_LITERALS = ("NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1E2", "-0", "-0.0", "1e-400", "00", "1.",
                ".5", "+1", "0x10", "123456789012345678901234567890", "18446744073709551616", "4611686018427387904",
                "4611686018427387905")
MISSING = object()  # a field left out
KINDS = ("hello", "lease", "hb", "done", "fail", "handback", "draining", "notice")


def deep(depth: int, brace: bool) -> Raw:
    return Raw('{"a":' * depth + "1" + "}" * depth if brace else "[" * depth + "]" * depth)


json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
json_values = st.recursive(
    json_scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12)
raws = st.sampled_from([Raw(t) for t in RAW_LITERALS]) | st.builds(
    deep, st.sampled_from([100, 250, 254, 255, 256, 600, 1020, 1021, 1022, 1023, 1024, 3000]), st.booleans())
texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "\x00", "\u202e\u0301", "\ud800", "\udfff", "\U0001f600" * 5, "é" * 33, "\n\r\t\"\\"]),
    st.sampled_from([31, 32, 33, 199, 200, 201, 255, 256, 257, 3999, 4000, 4001, 70_000]).map(lambda n: "x" * n),
    st.integers(0, MAX_FRAME).map(lambda n: "é" * (n // 2)),
)
wrong = st.one_of(json_values, raws, texts)  # anything at all, for a field of some other type
# What a worker may return: any JSON, unicode, long strings, and nesting up to what the parser reads.
results = st.one_of(json_values, st.text(), st.builds(deep, st.sampled_from([100, 254, 255, 256, 600, 1020]),
                                                      st.booleans()))


@dataclass
class Known:
    """What the fuzzer knows at the time of a draw: other agents' leases and task ids, and its own leases."""

    victim: list[tuple[int, int]]
    probe_ids: list[int]
    own: list[tuple[int, int]] = field(default_factory=list)

    def refs(self) -> list[tuple[int, int]]:
        return self.victim + self.own

    def ids(self) -> list[int]:
        return [i for i, _ in self.refs()] + self.probe_ids


def pick(items: Callable[[], list[T]], fallback: T) -> st.SearchStrategy[T]:
    """One of a list known only at draw time (leases granted a moment ago). Drawn as an index, so that
    the shape of the draw never depends on the daemon's state: hypothesis replays and shrinks it."""
    def choose(i: int) -> T:
        xs = items()
        return xs[i % len(xs)] if xs else fallback
    return st.integers(0, 1023).map(choose)


def int_values(known: Callable[[], list[int]] | None, lo: int, hi: int, clean: bool) -> st.SearchStrategy[Any]:
    in_range = st.integers(lo, hi) | st.sampled_from(sorted({lo, hi, min(hi, lo + 1)}))
    if known is not None:
        in_range = in_range | pick(known, lo)
    if clean:
        return in_range
    return st.one_of(in_range, st.integers(), st.sampled_from([lo - 1, hi + 1, 2**63 - 1, 2**63, 2**64, -2**63]),
                     st.floats(), wrong)


def num_values(clean: bool, hi: float = protocol.MAX_DURATION_S) -> st.SearchStrategy[Any]:
    ok = st.floats(min_value=0.0, max_value=hi) | st.integers(0, int(hi)) | st.sampled_from([0, hi])
    return ok if clean else st.one_of(ok, st.floats(), st.integers(), st.just(1.7e308), wrong)


def str_values(max_len: int, clean: bool) -> st.SearchStrategy[Any]:
    ok = st.text(max_size=max_len) | st.sampled_from(["", "x" * max_len, "\U0001f600" * max_len, "\x00"])
    return ok if clean else st.one_of(ok, texts, wrong)


def ref_values(k: Known, clean: bool) -> st.SearchStrategy[Any]:
    """A [task_id, token] pair: another agent's lease, this connection's own, one of them with a stale or
    future token, a known task id with a small token, or any pair in range."""
    def stale() -> list[list[int]]:
        return [[i, tok + d] for i, tok in k.refs() for d in (-1, 1) if tok + d >= 0]
    ok = st.one_of(
        st.lists(st.integers(0, I62), min_size=2, max_size=2),
        pick(lambda: [[i, tok] for i, tok in k.refs()], [1, 1]),
        pick(stale, [1, 0]),
        st.tuples(pick(k.ids, 1), st.integers(0, 3)).map(list),
    )
    if clean:
        return ok
    return st.one_of(ok, st.lists(int_values(k.ids, 0, I62, False), max_size=3), wrong)


def ref_lists(k: Known, clean: bool) -> st.SearchStrategy[Any]:
    items = st.lists(ref_values(k, clean), max_size=6)
    lists = st.one_of(items, items.map(lambda xs: xs + xs),  # duplicates
                      # Up to the frame limit: a pair of big ids is 44 bytes.
                      st.sampled_from([100, 1000, MAX_FRAME // 44 - 3, MAX_FRAME // 44]).map(
                          lambda n: [[I62, I62]] * n))
    return lists if clean else st.one_of(lists, wrong)


@st.composite
def messages(draw: st.DrawFn, k: Known, kind: str | None = None, *, clean: bool | None = None) -> dict[str, Any]:
    """A message of one type with each field drawn in range (clean) or from anything; fields may go missing."""
    if clean is None:
        clean = draw(st.integers(0, 3)) > 0  # mostly in range, so that a connection lives for several frames
    if kind is None:
        kind = draw(st.sampled_from(KINDS))

    def report() -> dict[str, Any]:
        ref = draw(ref_values(k, True))
        use_ref = draw(st.booleans())
        return {"id": ref[0] if use_ref else draw(int_values(k.ids, 0, I62, clean)),
                "token": ref[1] if use_ref else draw(int_values(None, 0, I62, clean)),
                "duration_s": draw(num_values(clean))}

    fields: dict[str, Any]
    if kind == "hello":
        fields = {"version": draw(int_values(None, 1, 1, clean)), "instance": draw(str_values(256, clean)),
                  "token": draw(str_values(256, clean)), "slots": draw(int_values(None, 1, 100_000, clean)),
                  "held": draw(ref_lists(k, clean))}
    elif kind == "lease":
        fields = {"n": draw(int_values(None, 0, 100_000, clean))}
    elif kind in ("hb", "handback"):
        fields = {"leases": draw(ref_lists(k, clean))}
        if kind == "handback":
            fields["reason"] = draw(str_values(200, clean))
    elif kind == "done":
        fields = {"results": [{**report(), "result": draw(results if clean else st.one_of(json_values, raws, texts))}
                              for _ in range(draw(st.integers(0, 4)))]}
    elif kind == "fail":
        fields = {"failures": [{**report(), "error": draw(str_values(10_000, clean)),
                                "retryable": draw(st.booleans() if clean else st.booleans() | wrong)}
                               for _ in range(draw(st.integers(0, 4)))]}
    elif kind == "draining":
        fields = {"reason": draw(str_values(200, clean))}
    else:
        fields = {"kind": draw(st.sampled_from(protocol.NOTICE_KINDS) if clean else
                               st.sampled_from(protocol.NOTICE_KINDS) | wrong),
                  "source": draw(str_values(32, clean)), "detail": draw(str_values(200, clean)),
                  "deadline": draw(st.none() | num_values(clean, protocol.MAX_DEADLINE))}
    if not clean:
        for name in list(fields):
            if draw(st.integers(0, 9)) == 0:
                del fields[name]
        if draw(st.integers(0, 9)) == 0:
            fields = {**fields, draw(st.text(max_size=5)): draw(wrong)}  # unknown keys are ignored
    return {"t": kind if clean or draw(st.integers(0, 9)) else draw(st.text(max_size=10) | wrong), **fields}


def to_text(obj: Any, ensure_ascii: bool = False) -> str:
    """JSON text with each Raw spliced in."""
    raws_seen: list[str] = []

    def swap(value: Any) -> Any:
        if isinstance(value, Raw):
            raws_seen.append(value.text)
            return f"@@raw{len(raws_seen) - 1}-{RAW_MARK}@@"
        if isinstance(value, list):
            return [swap(v) for v in value]
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        return value

    text = json.dumps(swap(obj), ensure_ascii=ensure_ascii)
    for i, raw in enumerate(raws_seen):
        text = text.replace(f'"@@raw{i}-{RAW_MARK}@@"', raw)
    return text


RAW_MARK = uuid.uuid4().hex


class Frame:
    __slots__ = ("binary", "data")

    def __init__(self, data: bytes, binary: bool = False) -> None:
        self.data = data
        self.binary = binary

    def __repr__(self) -> str:  # hypothesis prints the failing example: keep it readable
        shown = self.data[:300].decode("utf-8", "backslashreplace") + ("…" if len(self.data) > 300 else "")
        return f"Frame({'binary, ' if self.binary else ''}{len(self.data)} bytes: {shown!r})"


def text_frame(text: str) -> Frame:
    return Frame(text.encode("utf-8", "surrogatepass"))


@st.composite
def frames(draw: st.DrawFn, k: Known, *, kind: str | None = None, clean: bool = False) -> Frame:
    """One frame: mostly a message (hostile or not), else random JSON, text, bytes, invalid UTF-8, a huge frame.
    clean: only messages that follow the protocol, with hostile values within its limits."""
    shape = draw(st.sampled_from(["message"] * 12 + ["json", "text", "binary", "bad_utf8", "oversized", "padded"]))
    if clean:  # a second hello would break the protocol: chaos frames send those
        kind = kind or draw(st.sampled_from([x for x in KINDS if x != "hello"]))
        return text_frame(to_text(draw(messages(k, kind, clean=True)), ensure_ascii=draw(st.booleans())))
    if kind is not None or shape == "message":
        obj = draw(messages(k, kind))
        return text_frame(to_text(obj, ensure_ascii=draw(st.booleans())))
    if shape == "json":
        return text_frame(to_text(draw(json_values | raws)))
    if shape == "text":
        return text_frame(draw(st.text(max_size=200)))
    if shape == "binary":
        return Frame(draw(st.binary(max_size=200) | st.just(to_text(draw(messages(k))).encode("utf-8", "replace"))),
                     binary=True)
    if shape == "bad_utf8":
        good = to_text(draw(messages(k, clean=True))).encode("utf-8", "replace")
        at = draw(st.integers(0, len(good)))
        bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf"]))
        return Frame(good[:at] + bad + good[at:])
    if shape == "oversized":
        return text_frame('{"t":"hb","leases":[],"pad":"' + "x" * draw(st.integers(MAX_FRAME, 2 * MAX_FRAME)) + '"}')
    # A valid message padded to land on, just under or just over the frame limit.
    obj = draw(messages(k, clean=True))
    target = MAX_FRAME + draw(st.integers(-3, 2))
    base = len(text_frame(to_text({**obj, "pad": ""})).data)
    return text_frame(to_text({**obj, "pad": "x" * max(0, target - base)}))


def valid_message(obj: Any) -> bool:
    """The oracle: docs/protocol.md's message shapes with cloudtask_wire/messages.py's documented limits, written
    out independently of the parser under test."""
    def is_int(v: Any, lo: int = 0, hi: int = I62) -> bool:
        return type(v) is int and lo <= v <= hi

    def is_num(v: Any, hi: float) -> bool:
        return type(v) in (int, float) and 0 <= v <= hi

    def is_str(v: Any, n: int) -> bool:
        return type(v) is str and len(v) <= n

    def refs(v: Any) -> bool:
        return type(v) is list and all(type(r) is list and len(r) == 2 and is_int(r[0]) and is_int(r[1]) for r in v)

    def report(r: Any) -> bool:
        return (type(r) is dict and is_int(r.get("id")) and is_int(r.get("token"))
                and is_num(r.get("duration_s"), protocol.MAX_DURATION_S))

    if type(obj) is not dict:
        return False
    t = obj.get("t")
    if t == "hello":
        return (obj.get("version") == 1 and type(obj.get("version")) is int and is_str(obj.get("instance"), 256)
                and is_str(obj.get("token"), 256) and is_int(obj.get("slots"), 1, 100_000) and refs(obj.get("held")))
    if t == "lease":
        return is_int(obj.get("n"), 0, 100_000)
    if t == "hb":
        return refs(obj.get("leases"))
    if t == "done":
        rs = obj.get("results")
        return type(rs) is list and all(report(r) and "result" in r for r in rs)
    if t == "fail":
        fs = obj.get("failures")
        return type(fs) is list and all(report(f) and type(f.get("retryable")) is bool
                                        and type(f.get("error")) is str for f in fs)
    if t == "handback":
        return refs(obj.get("leases")) and is_str(obj.get("reason"), 200)
    if t == "draining":
        return is_str(obj.get("reason"), 200)
    if t == "notice":
        deadline = obj.get("deadline")
        return (obj.get("kind") in protocol.NOTICE_KINDS
                and (deadline is None or is_num(deadline, protocol.MAX_DEADLINE))
                and is_str(obj.get("source"), 32) and is_str(obj.get("detail"), 200))
    return False


def expected(frame: Frame) -> tuple[str, Any]:
    """What the daemon must do with a frame: ("ok", message), ("close", 1008) for a frame that breaks the
    protocol, ("close", 1009) for one at or over the size limit, ("close", 1007) for a text frame that
    is not UTF-8 (RFC 6455's code; aiohttp closes before the daemon sees it)."""
    if len(frame.data) >= MAX_FRAME:  # aiohttp refuses a frame of max_msg_size bytes or more, of any type
        return "close", 1009
    if frame.binary:
        return "close", 1008
    try:
        frame.data.decode("utf-8")
    except UnicodeDecodeError:
        return "close", 1007
    try:
        obj = orjson.loads(frame.data)
    except orjson.JSONDecodeError:
        return "close", 1008
    return ("ok", obj) if valid_message(obj) else ("close", 1008)


# ---- one fuzzing connection ------------------------------------------------------------------------------


class FuzzConn:
    def __init__(self, h: Harness, k: Known) -> None:
        self.h = h
        self.k = k
        self.inst: dict[str, Any] = {}
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.received: list[Any] = []
        self.closed = asyncio.Event()
        self.close_code: int | None = None  # the code of the daemon's close frame
        self._reader: asyncio.Task[None] | None = None

    async def open(self) -> None:
        try:
            async with asyncio.timeout(20):
                self.inst = await register(self.h, "fuzz")
        except TimeoutError:
            raise AssertionError(f"POST /v1/instances took over 20 s ({self.h.state()})") from None
        try:
            async with asyncio.timeout(20):
                self.ws = await self.h.http.ws_connect(self.inst["url"], ssl=agent_ssl(self.inst), max_msg_size=0)
        except TimeoutError:
            raise AssertionError(f"the websocket took over 20 s to open ({self.h.state()})") from None
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.ws is not None
        try:
            while True:
                msg = await self.ws.receive()
                if msg.type == aiohttp.WSMsgType.TEXT:
                    obj = json.loads(msg.data)
                    self.received.append(obj)
                    if obj["t"] == "grant":
                        self.k.own.extend((t["id"], t["token"]) for t in obj["tasks"])
                elif msg.type == aiohttp.WSMsgType.CLOSE:
                    # The daemon's code, as sent. ws.close_code may say 1006 instead: the client's
                    # automatic close reply fails when the daemon has already shut the socket.
                    self.close_code = int(msg.data)
                elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR):
                    break
        finally:
            self.closed.set()

    async def send(self, frame: Frame) -> None:
        assert self.ws is not None
        try:
            if frame.binary:
                await self.ws.send_bytes(frame.data)
            else:
                await self.ws.send_frame(frame.data, aiohttp.WSMsgType.TEXT)
        except (ConnectionError, RuntimeError):
            pass  # the daemon may cut a connection while a frame it refuses is still on its way

    async def hello(self, held: list[list[int]] | None = None, slots: int = 4) -> Frame:
        return text_frame(to_text({"t": "hello", "version": 1, "instance": self.inst["id"],
                                   "token": self.inst["token"], "slots": slots, "held": held or []}))

    async def expect_close(self, code: int, error_code: str | None) -> None:
        await asyncio.wait_for(self.closed.wait(), 15)
        assert self.ws is not None
        await self.ws.close()  # gives the client's connection back to its pool, however it ended
        if code == 1009 and self.close_code is None:
            # aiohttp sends 1009 and shuts the socket with the rest of the frame unread: the kernel
            # answers with a reset, which may overtake the close frame. The daemon's own record of
            # why it closed is checked instead (after a hello it logs the disconnect).
            return
        assert self.close_code == code, (self.close_code, code, self.received[-3:])
        if error_code is not None:
            errors = [m for m in self.received if m["t"] == "error"]
            assert errors and errors[-1]["code"] == error_code, self.received[-3:]

    async def sync(self) -> None:
        """Every frame sent so far was read and handled: a report for a task that does not exist comes
        back refused in an ack, after the frames before it (the connection is still open, too)."""
        assert self.ws is not None
        marker = I62 - secrets.randbelow(1000)
        await self.send(text_frame(protocol.encode(protocol.Complete([protocol.Success(marker, 0, None, 0.0)]))))

        async def acked() -> bool:
            assert not self.closed.is_set(), f"the daemon closed a connection that broke no rule: {self.received[-3:]}"
            return any(m["t"] == "ack" and marker in m["refused"] for m in self.received)
        await wait_for(acked, timeout=15, interval=0.005, message="the sync ack")

    async def abandon(self) -> None:
        """Close from this side whatever state the connection is in (idempotent)."""
        if self.ws is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(10):
                    await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader

    async def close(self) -> None:
        assert self.ws is not None
        await self.ws.close()
        if self._reader is not None:
            await self._reader
        inst = self.inst["id"]
        await wait_for(lambda: _gone(self.h, inst), message="the fuzz session detached")


async def _gone(h: Harness, inst: str) -> bool:
    return inst not in h.daemon.hub.by_instance and inst not in h.daemon.dispatcher.sessions


async def top_up(h: Harness, state: dict[str, Any]) -> None:
    """Keep a few queued tasks in the fuzzer's pool, so its connections get real leases to abuse."""
    row = await h.daemon.store.fetchone("SELECT n_queued FROM jobs WHERE id = ?", (state["job"],))
    if row is None or row[0] < 4:
        base = state["n"]
        state["n"] += 8
        await submit(h, "fuzz", [{"id": f"f{base + i}", "data": {"n": base + i}} for i in range(8)], state["job"])


# ---- the agent websocket ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What must follow a frame: nothing (code None: the connection stays open), or a close with this
    code, after an error frame carrying error_code when the daemon has one to send."""

    code: int | None = None
    error_code: str | None = None


def outcome_of(frame: Frame, *, authenticated: bool, inst: dict[str, Any]) -> Outcome:
    verdict, detail = expected(frame)
    if verdict == "close":
        return Outcome(detail, "protocol" if detail == 1008 else None)
    if detail.get("t") != "hello":
        return Outcome() if authenticated else Outcome(1008, "protocol")  # the first frame must be a hello
    if authenticated:
        return Outcome(1008, "protocol")  # hello only once
    if (detail["instance"], detail["token"]) != (inst["id"], inst["token"]):
        return Outcome(1008, "unauthorized")  # well formed, but not this instance's own id and token
    return Outcome()


def fuzz_example(h: Harness, k: Known, data: st.DataObject, counts: dict[str, Any]) -> None:
    """One connection: an opening (a proper hello, a bad one, or garbage), then frames until one must
    close the connection; what the daemon did is checked against the oracle."""
    conn = FuzzConn(h, k)
    h.run(conn.open())
    try:
        _fuzz_connection(h, k, conn, data, counts)
    finally:
        h.run(conn.abandon())  # also when the example failed: shrinking replays hundreds of them


def _fuzz_connection(h: Harness, k: Known, conn: FuzzConn, data: st.DataObject, counts: dict[str, Any]) -> None:
    opening = data.draw(st.sampled_from(["hello"] * 4 + ["bad_hello", "garbage"]), label="opening")
    if opening == "hello":
        held = data.draw(ref_lists(k, clean=True), label="held")
        frame = text_frame(to_text({"t": "hello", "version": 1, "instance": conn.inst["id"],
                                    "token": conn.inst["token"], "slots": 4, "held": held}))
    else:
        frame = data.draw(frames(k, kind="hello") if opening == "bad_hello" else frames(k), label="opening frame")
    outcome = outcome_of(frame, authenticated=False, inst=conn.inst)
    h.run(conn.send(frame))
    authenticated = outcome.code is None
    if authenticated:
        welcome = h.run(wait_for(lambda: _first(conn.received), message="welcome"))
        assert welcome["t"] == "welcome", welcome
        # Half the connections follow the protocol throughout (the daemon's semantics under hostile
        # values and leases); the others send anything until the daemon must close them.
        clean = data.draw(st.booleans(), label="clean")
        for _ in range(data.draw(st.integers(1, 8), label="frames")):
            frame = data.draw(frames(k, clean=clean), label="frame")
            outcome = outcome_of(frame, authenticated=True, inst=conn.inst)
            h.run(conn.send(frame))
            counts["frames"] += 1
            if outcome.code is not None:
                break
    if outcome.code is None:
        h.run(conn.sync())
        h.run(conn.close())
        counts["closes"]["kept open"] += 1
    else:
        h.run(conn.expect_close(outcome.code, outcome.error_code))
        h.run(wait_for(lambda: _gone(h, conn.inst["id"]), message="the fuzz session detached"))
        if authenticated and outcome.code == 1009:
            # The close frame may be lost to the reset (expect_close): the daemon says why it closed.
            gone = [e for e in h.logs.events
                    if e.get("event") == "agent_disconnected" and e.get("instance") == conn.inst["id"]]
            assert len(gone) == 1 and "exceeds limit" in gone[0]["reason"], gone
        counts["closes"][outcome.code] += 1


# Hypothesis checks that no draw touches the global random: the daemon's retry jitter (queue.backoff_s)
# runs on the loop's thread while hypothesis draws on its own, which that check cannot tell apart.
@pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")
async def test_fuzz_agent_websocket(harness: Harness, tmp_path: Path, soak: bool) -> None:
    h = harness
    victim, good = Victim(h), GoodAgent(h, tmp_path / "good-agent")
    await victim.start()
    await good.start()
    fuzz_state = {"job": await submit(h, "fuzz", [{"id": "f-first", "data": {"n": 0}}]), "n": 0}
    counts: dict[str, Any] = {"examples": 0, "frames": 0, "closes": defaultdict(int)}
    probe_every = 1 if soak else 4
    try:
        def fuzz(data: st.DataObject) -> None:
            k = Known(victim.refs, list(range(1, 3 + good.sent)))
            h.run(top_up(h, fuzz_state))
            fuzz_example(h, k, data, counts)
            h.run(h.check_alive())
            h.run(victim.check_untouched())
            h.run(h.check_store())
            counts["examples"] += 1
            if counts["examples"] % probe_every == 0:
                h.run(good.probe())
            if counts["examples"] % 20 == 0:
                h.run(h.check_views([fuzz_state["job"]]))

        runner = given(data=st.data())(fuzz)
        await asyncio.to_thread(hypothesis_settings(soak, 120, 3000)(runner))
        await good.probe()
        await h.check_views([fuzz_state["job"], good.job_id or 0])
        await good.check_results()
        await victim.check_untouched()
        await victim.finish()
        await h.check_store()
        await h.check_alive()
    finally:
        good.stop()
    print(f"agent websocket fuzz: {counts}")


async def _first(received: list[Any]) -> Any:
    return received[0] if received else None


# ---- the control API ------------------------------------------------------------------------------------


# Values stay short enough for the request line to fit aiohttp's 8190 bytes: a longer one is refused by
# its HTTP parser, before the app, in plain text and with an error-level log line (a known limit).
QUERY_KEYS = ("state", "limit", "after", "top", "source", "all", "cpus_per_task", "memory_per_task", "gpus_per_task",
              "spot", "providers", "regions", "max_price_per_hour", "tail", "job", "instance", "wait")
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")
query_values = st.one_of(
    st.text(max_size=30), st.integers().map(str), st.floats().map(repr),
    st.sampled_from(["", "nan", "inf", "-inf", "1e309", "-1", "0", "1", "9" * 30, "9" * 2000, "1_000", "\uff11", " 1 ",
                     "true", "false", "0x10", "queued", "succeeded", "1.5", "-0", "aws,gcp", ",,,"]))
# A long poll: only short waits, so that an example costs milliseconds.
wait_values = st.sampled_from(["", "0", "0.01", "0.05", "-1", "nan", "inf", "1e309", "abc", "0x1"])
header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=40)
content_types = st.sampled_from([
    "application/json", "application/json; charset=utf-8", "application/json; charset=latin-1",
    "application/json; charset=utf-16", "application/json; charset=bogus-9", "application/json; charset=",
    "text/plain", "application/gzip", "multipart/form-data; boundary=x", "application/x-www-form-urlencoded",
    "application/x-ndjson", ";;;", ""]) | header_text


def tar_gz(files: dict[str, bytes], *, kinds: dict[str, bytes] | None = None, mode: str = "w:gz") -> bytes:
    """An archive of these files; kinds: member name -> tar type (symlink, hard link, device, directory)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            kind = (kinds or {}).get(name)
            if kind is not None:
                info.type = kind
                info.linkname = data.decode(errors="replace")
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


SPECS = [
    b"mode: python\nfunction: work:run\n", b"mode: command\ncommand: ['true']\n", b"mode: nope\n", b"[1, 2]\n",
    b"mode: python\nfunction: 7\n", b"{{{", b"mode: python\nfunction: work:run\ntimeout: -1\n", b"", b"\xff\xfe",
    b"mode: python\nfunction: work:run\ncpus_per_task: .nan\n", b"mode: python\nfunction: work:run\nbogus: 1\n",
    b"!!python/object/apply:os.system ['true']\n", b"a: &a [*a]\n"]


@st.composite
def bundles(draw: st.DrawFn) -> bytes:
    """A worker upload: a good bundle, a spec of any kind, archives with hostile members, broken archives."""
    spec = draw(st.sampled_from(SPECS) | st.binary(max_size=64))
    shape = draw(st.sampled_from(["spec", "no_spec", "traversal", "absolute", "symlink", "hardlink", "device",
                                  "truncated", "garbage", "plain_tar", "bz2", "empty", "gzip_of_garbage"]))
    if shape == "spec":
        return tar_gz({"cloudtask.yaml": spec, "work.py": PY_WORKER["work.py"].encode()})
    if shape == "no_spec":
        return tar_gz({"work.py": b"x = 1\n"})
    if shape == "traversal":
        return tar_gz({"cloudtask.yaml": spec, "../../escape.txt": b"x"})
    if shape == "absolute":
        return tar_gz({"cloudtask.yaml": spec, "/tmp/cloudtask-fuzz-absolute": b"x"})
    if shape in ("symlink", "hardlink", "device"):
        kind = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "device": tarfile.CHRTYPE}[shape]
        return tar_gz({"cloudtask.yaml": spec, "link": b"/etc/passwd"}, kinds={"link": kind})
    good = tar_gz({"cloudtask.yaml": spec})
    if shape == "truncated":
        return good[: draw(st.integers(0, len(good) - 1))]
    if shape == "plain_tar":
        return tar_gz({"cloudtask.yaml": spec}, mode="w")
    if shape == "bz2":
        return tar_gz({"cloudtask.yaml": spec}, mode="w:bz2")
    if shape == "empty":
        return b""
    if shape == "gzip_of_garbage":
        return gzip.compress(draw(st.binary(max_size=200)))
    return draw(st.binary(max_size=300))


@dataclass(frozen=True)
class TaskFile:
    """A task file and what the daemon must answer: accepted n, or refused naming `line`."""

    body: bytes
    tasks: int
    line: int | None  # the line of the one broken task, None when every task is good


BROKEN_TASKS: list[bytes] = [
    b'{"id": "x"', b"{oops}", b"[1, 2]", b"7", b'"just a string"', b"null", b'{"data": 1}', b'{"id": ""}',
    b'{"id": null}', b'{"id": [1]}', b'{"id": 1.5}', b'{"id": true}', b'{"id": "' + b"i" * 513 + b'"}',
    b'{"id": "ok", "bogus": 1}', b'{"id": "ok", "priority": 1001}', b'{"id": "ok", "priority": "high"}',
    b'{"id": "ok", "priority": 1.0}', b'{"id": "ok", "timeout": 0}', b'{"id": "ok", "timeout": -1}',
    b'{"id": "ok", "timeout": "5"}', b'{"id": "ok", "max_attempts": 0}', b'{"id": "ok", "max_attempts": 101}',
    b'{"id": "ok", "data": NaN}', b'{"id": "ok", "data": 1e400}', b'{"id": "\xff"}', b'{"id": "\\ud800"}',
    b'{"id": "ok", "data": ' + b"[" * 300 + b"]" * 300 + b"}",
    b'{"id": "ok", "data": ' + b"[" * 2000 + b"]" * 2000 + b"}",
    b'{"id": "ok"} trailing', b'{"id": "ok", "id": 5, "x": 1}', b'{"id": 18446744073709551616}',
]


UPLOADS = itertools.count()


@st.composite
def task_files(draw: st.DrawFn) -> TaskFile:
    """JSON Lines or an array, one task per line, with at most one broken task (or a duplicate id) somewhere."""
    prefix = next(UPLOADS)  # not drawn: ids must differ from every earlier upload's, whatever hypothesis replays
    n = draw(st.integers(0, 8))
    good = [json.dumps({"id": f"u{prefix}-{i}", "data": draw(json_values),
                        **draw(st.fixed_dictionaries({}, optional={
                            "priority": st.integers(-1000, 1000), "timeout": st.floats(0.001, 1e9),
                            "max_attempts": st.integers(1, 100)}))}).encode() for i in range(n)]
    if not draw(st.integers(0, 3)) and good:
        lines = list(good)
        broken_at = None
    else:
        broken_at = draw(st.integers(0, n))
        bad = draw(st.sampled_from(BROKEN_TASKS + ([good[0]] if good else [])))  # the last: a duplicate id
        if bad in good and broken_at == 0:
            broken_at = n  # a duplicate must come after the first
        lines = [*good[:broken_at], bad, *good[broken_at:]]
    array = draw(st.booleans())
    crlf = draw(st.booleans())
    nl = b"\r\n" if crlf else b"\n"
    if array:  # "[" alone on line 1, one task per line after it
        body = b"[" + nl + (b"," + nl).join(lines) + nl + b"]" + nl
        line = None if broken_at is None else broken_at + 2
    else:
        body = nl.join(lines) + (nl if draw(st.booleans()) else b"")
        line = None if broken_at is None else broken_at + 1
    if draw(st.integers(0, 9)) == 0:
        body = b"\xef\xbb\xbf" + body  # a BOM is allowed at the very start
    return TaskFile(body, len(good), line)


def chunked(body: bytes, cuts: list[int]) -> Callable[[], AsyncIterator[bytes]]:
    """The body streamed in pieces cut at these offsets (chunked transfer encoding)."""
    async def gen() -> AsyncIterator[bytes]:
        last = 0
        for cut in sorted({min(max(c, 0), len(body)) for c in cuts}):
            yield body[last:cut]
            last = cut
        yield body[last:]
    return gen


@dataclass
class ApiTarget:
    """What the API fuzzer may touch, and what it must leave alone."""

    routes: list[tuple[str, tuple[str, ...]]]  # path template, methods
    job: int  # the fuzzer's own job: cancel it, retry it, upload to it
    keeper: int  # a job accepted before the fuzzing; never named by the fuzzer, checked at the end
    keeper_tasks: list[tuple[str, str]]
    instance: str
    digests: list[str]


def served_routes(d: Daemon) -> list[tuple[str, tuple[str, ...]]]:
    """Every route of the control socket's app, read from its router: a new route is fuzzed unasked."""
    [runner] = [r for r in d._runners if any(isinstance(site, web.UnixSite) for site in r.sites)]
    out = []
    for resource in runner.app.router.resources():
        methods = tuple(sorted({route.method for route in resource}))
        out.append((resource.canonical, methods))
    return out


def not_the_keeper(keeper: int) -> Callable[[str], bool]:
    def ok(value: str) -> bool:
        try:
            return int(value) != keeper  # int() takes " 1", "1_0", "\uff11": anything it maps to the keeper
        except ValueError:
            return True
    return ok


@st.composite
def requests(draw: st.DrawFn, t: ApiTarget) -> dict[str, Any]:
    """Any route, any method, with path parameters, query, headers and a body drawn from hostile sets."""
    template, methods = draw(st.sampled_from(t.routes))
    method = draw(st.sampled_from(METHODS) if draw(st.integers(0, 4)) == 0 else st.sampled_from(methods))
    keeper_safe = not_the_keeper(t.keeper)
    params = {
        "job": st.one_of(st.just(str(t.job)), st.just(str(t.job)), st.integers(-2**70, 2**70).map(str),
                         st.text(min_size=1, max_size=20),
                         st.sampled_from(["0", "-1", "9" * 25, "1e3", "0x1", "%00", "..", "nan"])).filter(keeper_safe),
        "instance": st.one_of(st.just(t.instance), st.just(t.instance), st.text(min_size=1, max_size=40),
                              st.just("x" * 2000)),
    }
    path = template
    for name in re.findall(r"\{(\w+)\}", template):
        value = draw(params.get(name, st.text(min_size=1, max_size=20)))
        path = path.replace("{" + name + "}", quote(value, safe=""))
    query = draw(st.lists(st.tuples(st.sampled_from(QUERY_KEYS) | st.text(max_size=8), query_values), max_size=5))
    query = [(k, draw(wait_values) if k == "wait" else v) for k, v in query]
    headers: dict[str, str] = {}
    for name, values in (("Content-Type", content_types),
                         ("Accept", st.sampled_from(["application/openmetrics-text; version=1.0.0", "text/plain",
                                                     "*/*", "application/json"]) | header_text),
                         ("Content-Encoding", st.sampled_from(["gzip", "deflate", "br", "identity", "bogus"])),
                         ("Origin", st.sampled_from(["http://cloudtaskd", "http://evil.example", "null"])),
                         ("Host", st.sampled_from(["cloudtaskd", "localhost:8080", "evil.example", "[::1]", ""])),
                         ("X-Anything", header_text)):
        if draw(st.integers(0, 11)) == 0:
            headers[name] = draw(values)
    body = draw(st.one_of(
        st.none(),
        json_values.map(lambda v: to_text(v).encode()),
        st.dictionaries(st.sampled_from(["name", "worker", "slots", "max_instances", "max_attempts", "timeout_s",
                                         "policy", "max_total_cost"]) | st.text(max_size=6),
                        st.one_of(json_values, st.sampled_from(t.digests), raws), max_size=5)
        .map(lambda v: to_text(v).encode("utf-8", "surrogatepass")),
        st.sampled_from([b'{"name": ', b"\xff\xfe{}", b"[1,2", b"NaN", b'{"a":1}{"b":2}', b"\xef\xbb\xbf{}",
                         '{"worker": "x"}'.encode("utf-16"), b"1e400", b"[" * 100_000, b"{}" * 10]),
        st.sampled_from([(1 << 20) - 10, 1 << 20, (1 << 20) + 1, 3 << 20]).map(lambda n: b"{" + b" " * n + b"}"),
        bundles(),
        task_files().map(lambda f: f.body),
    ))
    cuts = draw(st.lists(st.integers(0, 1 << 21), max_size=3)) if body and draw(st.booleans()) else None
    return {"method": method, "path": path, "params": query, "headers": headers, "body": body, "cuts": cuts}


@st.composite
def json_bodies(draw: st.DrawFn, t: ApiTarget) -> tuple[str, dict[str, Any], set[str]]:
    """A documented JSON body, in range or with hostile field values: (path, body, the fields a 400 may name)."""
    clean = draw(st.booleans())

    def opt(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
        return st.fixed_dictionaries({}, optional=fields)

    money = (st.floats(0.01, 1e308) if clean else
             st.one_of(num_values(False), st.just(0), st.just(-1.0), st.just(1e308)))
    flag = st.booleans() if clean else st.booleans() | wrong
    policy = opt(providers=st.lists(st.sampled_from(["aws", "gcp", "local"]), max_size=3),
                 regions=st.lists(st.text(min_size=1, max_size=10), max_size=3), spot=flag, on_demand_fallback=flag,
                 max_price_per_hour=money)
    if not clean:
        policy = st.one_of(st.none(), wrong, opt(
            providers=st.lists(st.sampled_from(["aws", "", "x"]), max_size=3) | wrong,
            regions=st.lists(st.text(max_size=10), max_size=3) | wrong, spot=flag, on_demand_fallback=flag,
            max_price_per_hour=money, bogus=st.just(1)))
    digest = st.sampled_from(t.digests) if clean else st.sampled_from(t.digests) | str_values(64, False)
    kind = draw(st.sampled_from(["job", "instance", "resume"]))
    if kind == "job":
        body = {"worker": draw(digest), **draw(opt(
            name=str_values(200, clean), max_instances=int_values(None, 1, 100_000, clean),
            max_attempts=int_values(None, 1, 100, clean), timeout_s=money, policy=policy, max_total_cost=money))}
        return "/v1/jobs", body, {"name", "worker", "max_instances", "max_attempts", "timeout_s", "max_total_cost",
                                  "policy"}
    if kind == "instance":
        body = {"worker": draw(digest), **draw(opt(slots=int_values(None, 1, 100_000, clean)))}
        return "/v1/instances", body, {"worker", "slots"}
    return f"/v1/jobs/{t.job}/resume", draw(opt(max_total_cost=money)), {"max_total_cost"}


async def api_call(h: Harness, req: dict[str, Any]) -> tuple[int, str, bytes]:
    body = req["body"]
    data: Any = body
    if body is not None and req["cuts"] is not None:
        data = chunked(body, req["cuts"])()
    elif body is not None and len(body) > 1 << 19:
        data = io.BytesIO(body)  # aiohttp warns of big bytes sent as they are
    async with h.api.session.request(req["method"], f"http://cloudtaskd{req['path']}", params=req["params"],
                                     headers=req["headers"], data=data) as resp:
        return resp.status, resp.content_type, await resp.read()


def check_answer(req: dict[str, Any], status: int, content_type: str, raw: bytes) -> Any:
    """A 2xx answer is well-formed; any other is a 4xx (or 429, or the store's 503/507) in the documented
    shape: {"error": {"type", "message", "line", "field"}}. Returns the decoded JSON body, if any."""
    where = f"{req['method']} {req['path']} -> {status} {raw[:300]!r}"
    assert status < 500 or status in (503, 507), where
    body = None
    if req["method"] == "HEAD":
        return None
    if content_type == "application/json":
        body = orjson.loads(raw)  # strict: no NaN or Infinity, which json.dumps would write
    elif content_type == "application/x-ndjson":
        for line in raw.splitlines():
            orjson.loads(line)
    if status >= 400:
        assert content_type == "application/json", where
        assert isinstance(body, dict) and set(body) == {"error"}, where
        err = body["error"]
        assert set(err) == {"type", "message", "line", "field"}, where
        assert isinstance(err["type"], str) and isinstance(err["message"], str) and err["message"], where
        assert err["line"] is None or type(err["line"]) is int, where
        assert err["field"] is None or isinstance(err["field"], str), where
        if status in (503, 507):
            assert err["type"] in ("StoreError", "StoreFull"), where
    return body


async def job_total(h: Harness, job_id: int) -> int:
    row = await h.daemon.store.fetchone("SELECT count(*) FROM tasks WHERE job_id = ?", (job_id,))
    assert row is not None
    return int(row[0])


async def check_keeper(h: Harness, t: ApiTarget) -> None:
    rows = await h.daemon.store.fetchall("SELECT key, data, state FROM tasks WHERE job_id = ? ORDER BY id",
                                         (t.keeper,))
    assert [(r["key"], r["data"]) for r in rows] == t.keeper_tasks
    assert {r["state"] for r in rows} == {"queued"}, {r["state"] for r in rows}
    _, job = await h.api.request("GET", f"/v1/jobs/{t.keeper}")
    assert job["state"] == "active" and job["counts"]["queued"] == len(t.keeper_tasks), job


async def test_fuzz_control_api(harness: Harness, soak: bool) -> None:
    h = harness
    keeper_tasks = [{"id": f"k{i}", "data": {"n": i, "s": "é" * i}} for i in range(50)]
    keeper = await submit(h, "probe", keeper_tasks)  # no agent serves the probe pool here: they stay queued
    job = await submit(h, "fuzz", [{"id": f"s{i}", "data": i} for i in range(20)])
    inst = await register(h, "fuzz")
    stored = await h.daemon.store.fetchall("SELECT key, data FROM tasks WHERE job_id = ? ORDER BY id", (keeper,))
    t = ApiTarget(served_routes(h.daemon), job, keeper, [(r["key"], r["data"]) for r in stored], inst["id"],
                  list(h.digests.values()))
    assert h.daemon.api is not None
    assert {r.path for r in h.daemon.api.routes()} <= {path for path, _ in t.routes}, t.routes
    counts: dict[str, Any] = {"requests": 0, "uploads": 0, "status": defaultdict(int)}

    def fuzz(data: st.DataObject) -> None:
        kind = data.draw(st.integers(0, 3), label="kind")
        if kind == 1:
            # A documented JSON body with hostile values: a refusal names the field it refuses.
            path, fields, known = data.draw(json_bodies(t), label="json body")
            text = to_text(fields)
            req = {"method": "POST", "path": path, "params": {}, "headers": {"Content-Type": "application/json"},
                   "body": text.encode("utf-8", "surrogatepass"), "cuts": None}
            status, ctype, raw = h.run(api_call(h, req))
            body = check_answer(req, status, ctype, raw)
            try:
                decoded = orjson.loads(req["body"])
            except orjson.JSONDecodeError:
                decoded = None  # NaN, a lone surrogate: refused as a whole
            if status == 400 and decoded is not None:
                field = body["error"]["field"]
                assert field is not None and field.split(".")[0] in known, (body, fields)
            assert status in (200, 201, 400, 404, 409), (status, body)
        elif kind == 0:
            # A task file upload with its exact answer known: accepted whole, or refused naming the line.
            f = data.draw(task_files(), label="task file")
            source = data.draw(st.sampled_from(["tasks", "my file.jsonl", "ü", ""]), label="source")
            cuts = data.draw(st.lists(st.integers(0, len(f.body)), max_size=4), label="cuts")
            req = {"method": "POST", "path": f"/v1/jobs/{t.job}/tasks", "params": {"source": source}, "headers": {},
                   "body": f.body, "cuts": cuts}
            before = h.run(job_total(h, t.job))
            status, ctype, raw = h.run(api_call(h, req))
            body = check_answer(req, status, ctype, raw)
            after = h.run(job_total(h, t.job))
            job_state = h.run(h.daemon.store.fetchone("SELECT state FROM jobs WHERE id = ?", (t.job,)))
            if job_state is not None and job_state[0] != "active":
                assert status == 400 and after == before, (status, body)
            elif f.line is None and f.tasks:
                assert (status, body) == (200, {"accepted": f.tasks}), (status, body, f)
                assert after == before + f.tasks
            else:
                assert status == 400 and after == before, (status, body, f)  # nothing of a refused upload stays
                if f.line is not None:
                    assert body["error"]["line"] == f.line, (body, f)
                    assert body["error"]["message"].startswith(f"{source}:{f.line}: "), (body, f)
            counts["uploads"] += 1
        else:
            req = data.draw(requests(t), label="request")
            status, ctype, raw = h.run(api_call(h, req))
            check_answer(req, status, ctype, raw)
        counts["requests"] += 1
        counts["status"][status] += 1
        h.run(h.check_alive())
        h.run(h.check_store())
        if counts["requests"] % 25 == 0:
            h.run(check_keeper(h, t))

    runner = given(data=st.data())(fuzz)
    await asyncio.to_thread(hypothesis_settings(soak, 400, 10_000)(runner))
    await check_keeper(h, t)
    jobs = [r["id"] for r in await h.daemon.store.fetchall("SELECT id FROM jobs ORDER BY id DESC LIMIT 20")]
    await h.check_views(jobs)
    await h.check_store()
    await h.check_alive()
    print(f"control API fuzz: {counts}")


# ---- what the fuzzer found, kept as plain tests ---------------------------------------------------------


async def hello_conn(h: Harness, k: Known, held: list[list[int]] | None = None) -> FuzzConn:
    conn = FuzzConn(h, k)
    await conn.open()
    await conn.send(await conn.hello(held))
    welcome = await wait_for(lambda: _first(conn.received), message="welcome")
    assert welcome["t"] == "welcome", welcome
    return conn


async def acks(conn: FuzzConn) -> list[Any]:
    await conn.sync()
    return [m for m in conn.received if m["t"] == "ack"]


async def test_a_hello_cannot_take_over_another_instances_leases(harness: Harness) -> None:
    """Found by the fuzzer: a hello listing another instance's [task_id, token] kept it, re-pointing the
    lease to the newcomer. Tokens are attempt numbers (1 for a first lease): anyone can guess them."""
    h = harness
    victim = Victim(h)
    await victim.start()
    conn = await hello_conn(h, Known(victim.refs, []), held=[[i, tok] for i, tok in victim.refs])
    assert conn.received[0]["kept"] == [] and sorted(conn.received[0]["dropped"]) == [i for i, _ in victim.refs]
    await victim.check_untouched()
    await conn.close()
    await victim.finish()


async def test_reports_on_another_instances_leases_are_refused(harness: Harness) -> None:
    """Found by the fuzzer: done, fail, handback and heartbeats naming another instance's leases with
    their right tokens were applied (a forged result, a requeue, a lease kept alive)."""
    h = harness
    victim = Victim(h)
    await victim.start(n=4)
    (a, ta), (b, tb), (c, tc), (d, td) = victim.refs
    conn = await hello_conn(h, Known(victim.refs, []))
    await conn.send(text_frame(protocol.encode(protocol.Complete([protocol.Success(a, ta, "forged", 0.0)]))))
    await conn.send(text_frame(protocol.encode(protocol.Fail([protocol.Failure(b, tb, "forged", False, 0.0)]))))
    await conn.send(text_frame(protocol.encode(protocol.Handback([(c, tc)], "forged"))))
    await conn.send(text_frame(protocol.encode(protocol.Heartbeat([(d, td)]))))
    got = await acks(conn)
    refused = sorted(i for m in got for i in m["refused"])
    assert sorted(i for m in got for i in m["ok"]) == [] and {a, b, c} <= set(refused), got
    revoked = [m for m in conn.received if m["t"] == "revoke"]
    assert revoked and revoked[0]["ids"] == [d], conn.received  # not its lease: told to stop it
    await victim.check_untouched()
    await conn.close()
    await victim.finish()


async def test_a_result_too_deep_to_store_fails_its_task_and_nothing_else(harness: Harness) -> None:
    """Found by the fuzzer: a result nested 255 to 1024 deep parses (orjson reads 1024 levels) but cannot
    be written back (orjson writes 254): the dispatch round crashed, dropping every report of the round,
    other agents' included, and the agent was never acked, so it sent it again after each reconnect."""
    h = harness
    await submit(h, "fuzz", [{"id": f"deep{i}", "data": {"n": i}} for i in range(2)])
    k = Known([], [])
    conn = await hello_conn(h, k)
    await conn.send(text_frame(protocol.encode(protocol.LeaseRequest(2))))
    await wait_for(lambda: _true(len(k.own) == 2), message="two leases")
    (deep_id, deep_tok), (ok_id, ok_tok) = k.own
    # Both reports in one frame, so in one round: the good one must land whatever the other does.
    await conn.send(text_frame(to_text({"t": "done", "results": [
        {"id": deep_id, "token": deep_tok, "duration_s": 0.1, "result": deep(300, brace=False)},
        {"id": ok_id, "token": ok_tok, "duration_s": 0.1, "result": {"fine": True}}]})))
    got = await acks(conn)
    assert sorted(i for m in got for i in m["ok"]) == sorted([deep_id, ok_id]), got
    rows = {r["id"]: r for r in await h.daemon.store.fetchall(
        "SELECT id, state, result, error FROM tasks WHERE id IN (?, ?)", (deep_id, ok_id))}
    assert rows[ok_id]["state"] == "succeeded" and json.loads(rows[ok_id]["result"]) == {"fine": True}
    assert rows[deep_id]["state"] == "dead" and "nested too deeply" in rows[deep_id]["error"], dict(rows[deep_id])
    await conn.close()
    await h.check_alive()
    await h.check_store()


async def _true(value: bool) -> bool:
    return value


async def test_aiohttp_refusals_come_in_the_documented_error_shape(harness: Harness) -> None:
    """Found by the API fuzzer: no such route, a method the route lacks and a body over the size limit
    were answered by aiohttp in plain text, not {"error": {...}} as docs/api.md promises."""
    h = harness
    for method, path, kw, status in (("GET", "/v1/nope", {}, 404), ("PUT", "/v1/jobs", {}, 405),
                                     ("POST", "/v1/jobs", {"data": b"{" + b" " * (1 << 20) + b"}"}, 413)):
        req = {"method": method, "path": path, "params": {}, "headers": {}, "body": kw.get("data"), "cuts": None}
        got, ctype, raw = await api_call(h, req)
        assert got == status, raw
        check_answer(req, got, ctype, raw)
    async with h.api.session.put("http://cloudtaskd/v1/jobs") as resp:
        assert set(resp.headers["Allow"].split(",")) == {"GET", "HEAD", "POST"}  # the headers are kept


@pytest.mark.parametrize("path", [
    "/v1/jobs/99999999999999999999/retry", "/v1/jobs/99999999999999999999", "/v1/jobs/{job}/tasks?after=1" + "0" * 20,
    "/v1/jobs/{job}/tasks?limit=-1", "/v1/jobs/{job}/results?top=1" + "0" * 20, "/v1/events?job=1" + "0" * 20,
    "/v1/events?after=1" + "0" * 20,
])
async def test_integers_sqlite_cannot_hold_are_refused_not_a_500(harness: Harness, path: str) -> None:
    """Found by the API fuzzer: an id or query integer past 2^63 reached SQLite, which cannot bind it
    (OverflowError, a 500); a negative limit meant no limit at all."""
    h = harness
    job = await submit(h, "fuzz", [{"id": "a"}])
    method = "POST" if path.endswith("/retry") else "GET"
    req = {"method": method, "path": path.format(job=job), "params": {}, "headers": {}, "body": None, "cuts": None}
    status, ctype, raw = await api_call(h, req)
    body = check_answer(req, status, ctype, raw)
    assert status in (400, 404), body
    if status == 400:
        assert body["error"]["field"] in ("after", "limit", "top", "job"), body
    await h.check_alive()


async def test_a_compressed_request_body_is_refused_and_nothing_is_logged(harness: Harness) -> None:
    """Found by the API fuzzer: with a Content-Encoding, aiohttp decoded the body; a broken one that the
    handler never read (GET) was drained after the answer and logged as an unhandled exception, and one
    it read was a 500."""
    h = harness
    for method, path in (("GET", "/v1/instances"), ("POST", "/v1/jobs"), ("POST", f"/v1/jobs/{1}/tasks")):
        req = {"method": method, "path": path, "params": {}, "headers": {"Content-Encoding": "deflate"},
               "body": b"\x00not deflate at all" * 100, "cuts": None}
        status, ctype, raw = await api_call(h, req)
        body = check_answer(req, status, ctype, raw)
        assert status == 415 and body["error"]["field"] == "Content-Encoding", body
    await h.check_alive()  # nothing logged at error level


async def test_draining_an_instance_that_is_not_running_is_a_conflict(harness: Harness) -> None:
    """Found by the API fuzzer: draining a stopping or stopped instance raised TransitionError, a
    StoreError, so the answer was 503 "the store failed" and an error was logged."""
    h = harness
    inst = await register(h, "fuzz")
    status, body = await h.api.request("POST", f"/v1/instances/{inst['id']}/drain")
    assert status == 200, body

    async def ended() -> bool:  # a drained external instance with no agent ends
        row = await h.daemon.store.fetchone("SELECT state FROM instances WHERE id = ?", (inst["id"],))
        return row is not None and row[0] in ("stopping", "stopped")
    await wait_for(ended, message="the drained instance ended")
    status, body = await h.api.request("POST", f"/v1/instances/{inst['id']}/drain")
    assert status == 409 and "can be drained" in body["error"]["message"], body
    await h.check_alive()


async def test_numbers_no_agent_could_report_are_refused(harness: Harness) -> None:
    """Found by the soak fuzzer: a duration of 1.7e308 is a valid JSON number; two of them summed to
    infinity in GET /v1/jobs/{id}/cost, whose estimate became NaN, which json.dumps writes and no JSON
    client reads. Durations and notice deadlines are now bounded (protocol.MAX_DURATION_S, MAX_DEADLINE)."""
    h = harness
    job = await submit(h, "fuzz", [{"id": f"long{i}"} for i in range(3)])
    k = Known([], [])
    conn = await hello_conn(h, k)
    await conn.send(text_frame(protocol.encode(protocol.LeaseRequest(2))))
    await wait_for(lambda: _true(len(k.own) == 2), message="two leases")
    (a, ta), (b, tb) = k.own
    await conn.send(text_frame(to_text({"t": "done", "results": [
        {"id": a, "token": ta, "duration_s": protocol.MAX_DURATION_S, "result": 1}]})))
    await conn.sync()
    await conn.send(text_frame(to_text({"t": "done", "results": [
        {"id": b, "token": tb, "duration_s": 1.7e308, "result": 1}]})))
    await conn.expect_close(1008, "protocol")
    await conn.abandon()
    await h.check_views([job])  # the job still has a task queued: its estimate is computed
    await h.check_alive()


async def test_head_of_the_results_stream_logs_no_error(harness: Harness) -> None:
    """Found by the soak fuzzer: HEAD /v1/jobs/{id}/results streamed the body anyway; the client, which
    reads none, had closed the connection, and the write failed as an unhandled exception (logged at
    error level). A client hanging up mid-stream is an ordinary event, not an error."""
    h = harness
    job = await submit(h, "fuzz", [{"id": f"h{i}"} for i in range(3)])
    status, _ = await h.api.request("POST", f"/v1/jobs/{job}/cancel")  # cancelled tasks have result lines
    assert status == 200
    for _ in range(5):
        async with h.api.session.head(f"http://cloudtaskd/v1/jobs/{job}/results") as resp:
            assert resp.status == 200 and resp.content_type == "application/x-ndjson"
    _, text = await h.api.request("GET", f"/v1/jobs/{job}/results")
    assert len(text.splitlines()) == 3
    await h.check_alive()
