"""The agent's session with the daemon: hello, credit-based leasing, reports, heartbeats,
reconnect with backoff, and drain.

Invariants:
- A report (done/fail/handback) stays buffered until the daemon acks it, and is resent after a
  reconnect: a network blip never loses a finished result (the daemon treats resends idempotently).
- Leases survive reconnects: the hello lists what we hold, the welcome says what we may keep.
- Any replica will do: the agent is given every replica's URL (failover.py) and, when a session
  ends, dials the others too; the hello's list of held leases lets the one it reaches reclaim them.
- Credit: we ask for `slots + prefetch` tasks in total and one more each time a task leaves our
  hands, so the daemon pushes work as soon as it has it; we never poll.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import ssl
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from agent import interruption
from agent.compat import SLOTS
from agent.failover import UrlRing, dial_first, parse_urls
from agent.logline import log
from agent.runner import Outcome, Runner
from cloudtask_wire import frames, jsonx
from cloudtask_wire.frames import FRAME_OVERHEAD, wire_len
from cloudtask_wire.messages import (
    CREDIT_IN_REPORT,
    DEFAULT_MAX_MESSAGE_BYTES,
    FEATURES,
    Ack,
    Draining,
    DrainRequest,
    ErrorMessage,
    Failure,
    Grant,
    GrantedTask,
    Heartbeat,
    Hello,
    Notice,
    Report,
    Returned,
    Revoke,
    Success,
    Welcome,
    encode,
    parse_daemon_message,
)
from cloudtask_wire.workerspec import RESOLVED_SPEC_FILE, WorkerSpec

RECONNECT_MIN_S = 0.2
# The daemon's refusals that pass (too many connections for now): try again with backoff. Any other
# (a wrong or revoked token, a protocol error) ends the agent.
RETRYABLE_REFUSALS = frozenset({"busy"})
RECONNECT_MAX_S = 15.0
DEFAULT_DRAIN_GRACE_S = 60.0
# How long an agent goes on dialling a daemon it cannot reach before it exits (EXIT_GAVE_UP). An
# hour rides out a daemon host's reboot or a long network outage; by then the daemon (if it is
# back) has long ended this instance (agents.reconnect_grace_s) and a machine nobody serves must
# not run, and be paid for, for ever. The daemon gives the local agents it starts less.
DEFAULT_GIVE_UP_AFTER_S = 3600.0
EXIT_GAVE_UP = 3
# Before the cloud's deadline, what still runs is stopped and handed back with this much time left
# for the hand-back to reach the daemon.
DEFAULT_INTERRUPTION_MARGIN_S = 10.0
# The longest notice a supported cloud gives (AWS: two minutes). A deadline further off means this
# machine's clock is behind the cloud's: the grace is capped, not stretched by the skew past the
# moment the cloud takes the machine (work finished after it would be lost, not handed back).
MAX_NOTICE_S = 120.0
ACK_WAIT_S = 5.0
# A connection that brings nothing (not even the pong to our ping each heartbeat) for half the lease
# TTL, or this long if more, is dead: a NAT or firewall that lost it, a peer gone without a FIN.
# Left then, the reconnect's hello still lands before the leases expire and keeps them; the
# websocket's own 20 s heartbeat (30 s to notice) is later than a short TTL's expiry.
SILENCE_MIN_S = 10.0
# The close handshake of a connection we leave: a dead one never answers (aiohttp waits 10 s).
WS_CLOSE_TIMEOUT_S = 2.0
MAX_ERROR_CHARS = 64 * 1024  # a failure's message beyond this is cut (a worker's whole stderr)


class FatalAgentError(Exception):
    """The daemon refused us for good (bad token, instance ended): reconnecting cannot help."""


@dataclass(**SLOTS)
class Held:
    task: GrantedTask
    slot: int | None = None  # set while running
    runner_task: asyncio.Task[Any] | None = None
    reported: bool = False


class Agent:
    def __init__(self, url: str | Sequence[str], instance: str, token: str, worker_dir: Path, slots: int, *,
                 prefetch: int | None = None, drain_grace_s: float = DEFAULT_DRAIN_GRACE_S,
                 spec: WorkerSpec | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 interruption_source: str = "", metadata_url: str | None = None,
                 interruption_margin_s: float = DEFAULT_INTERRUPTION_MARGIN_S, ca_file: Path | None = None,
                 url_file: Path | None = None, give_up_after_s: float = DEFAULT_GIVE_UP_AFTER_S) -> None:
        # Every replica's URL (a str may list several, comma-separated), in the order to dial them.
        self.ring = UrlRing([url] if isinstance(url, str) else url)
        self.url = self.ring.order()[0]  # the one dialled last, for the logs
        self.give_up_after_s = give_up_after_s  # 0: never
        self.gave_up = False
        # Read again before each connection when given (one URL or several, a line each): a tunnel
        # re-established by the daemon (after a dropped SSH connection or its restart) may listen on
        # another local port, a restarted local daemon on another port.
        self.url_file = url_file
        self.instance = instance
        self.token = token
        self.worker_dir = worker_dir
        self.spec = spec or load_spec(worker_dir)
        self.slots = slots
        self.prefetch = slots if prefetch is None else prefetch
        self.drain_grace_s = drain_grace_s
        # The largest frame we read (our websocket's max_msg_size), told to the daemon in the hello so
        # that it packs grants under it: a bigger frame would close the connection with 1009.
        self.max_message_bytes = max_message_bytes
        # What one frame to the daemon may hold, in UTF-8 bytes: the daemon's limit once its welcome
        # says it (a frame over it closes the connection, and would be resent after every reconnect).
        self.send_limit_bytes = max_message_bytes
        self.interruption_source = interruption_source
        self.metadata_url = metadata_url
        self.interruption_margin_s = interruption_margin_s
        # The daemon's CA, pinned: only a certificate it issued is accepted (not the system's CAs).
        self.ssl: ssl.SSLContext | bool = True
        if ca_file is not None:
            self.ssl = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
        self.notices: list[Notice] = []  # sent again after every reconnect until the agent exits
        self.drain_reason = ""
        self._drain_timer: asyncio.TimerHandle | None = None
        self._drain_deadline = float("inf")  # monotonic
        self.runner = Runner(self.spec, worker_dir, slots)
        self.held: dict[int, Held] = {}
        self.ready: deque[int] = deque()  # granted, not yet started
        self.free_slots = list(range(slots))
        self._ready_event = asyncio.Event()
        self._pending: list[Report] = []  # reports not yet sent on this connection
        self._unacked: dict[int, Report] = {}  # sent, waiting for an ack
        self._credit_owed = 0
        self._flush_event = asyncio.Event()
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self.draining = False
        self.done = asyncio.Event()
        self.heartbeat_s = 15.0
        self._credit_in_report = False  # the daemon's welcome says whether a done frame may carry credit
        self.completed = 0
        # Lease round trips (credit sent -> the grant that covers it), for benchmarks and debugging.
        self._credit_sent: deque[list[float]] = deque()  # [sent_at, n still uncovered]
        self.lease_rtts_s: deque[float] = deque(maxlen=100_000)

    # ---- lifecycle ----

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.start_drain, "signal")
        workers = [loop.create_task(self._slot_loop(), name=f"slot-{i}") for i in range(self.slots)]
        conn = loop.create_task(self._connect_loop(), name="connection")
        others = []
        if self.interruption_source:
            others.append(loop.create_task(interruption.watch(
                self.interruption_source, self.on_notice, base_url=self.metadata_url, log=log), name="notices"))
        try:
            await self.done.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            for t in (*workers, conn, *others):
                t.cancel()
            await asyncio.gather(*workers, conn, *others, return_exceptions=True)
            await self.runner.close()
        if self.gave_up:
            return EXIT_GAVE_UP
        return 0 if conn.cancelled() or conn.exception() is None else 1

    def on_notice(self, notice: Notice) -> None:
        """The cloud's interruption or rebalance notice: tell the daemon (it records it, counts it
        against the offer and starts replacement capacity); on an interruption, drain so that what
        cannot finish before the deadline is handed back in time."""
        log("spot_notice", kind=notice.kind, source=notice.source, deadline=notice.deadline, detail=notice.detail)
        self.notices.append(notice)
        self._send_now(encode(notice))
        if notice.kind == "interruption":
            # The cloud's deadline, not the daemon's drain grace, bounds how long work may go on:
            # on AWS that is ~110 s of a 2-minute notice, on GCP/Azure ~20 s.
            grace = self.drain_grace_s
            if notice.deadline is not None:
                # The one wall-clock reading: the clouds give an absolute time. Turned into a
                # grace once, then timed on the monotonic loop clock (a later step cannot move it).
                left = min(notice.deadline - time.time(), MAX_NOTICE_S)
                grace = max(0.0, left - self.interruption_margin_s)
            self.start_drain("interruption", grace_s=grace)

    def start_drain(self, reason: str, *, grace_s: float | None = None) -> None:
        grace = self.drain_grace_s if grace_s is None else grace_s
        loop = asyncio.get_running_loop()
        if self.draining:
            # Already draining (SIGTERM, the daemon): a nearer deadline (the cloud's) still wins.
            if loop.time() + grace < self._drain_deadline and self._drain_timer is not None:
                self._drain_timer.cancel()
                self._drain_deadline = loop.time() + grace
                self._drain_timer = loop.call_later(grace, self._drain_timeout)
                self.drain_reason = reason
            return
        self.draining = True
        self.drain_reason = reason
        # A timer, not the heartbeat loop: the grace must end even while disconnected.
        self._drain_deadline = loop.time() + grace
        self._drain_timer = loop.call_later(grace, self._drain_timeout)
        log("agent_draining", reason=reason, held=len(self.held), grace_s=round(grace, 1))
        self._send_now(encode(Draining(reason)))
        # Tasks not yet started go back at once: another instance can run them now.
        while self.ready:
            self._handback(self.ready.popleft())
        self._ready_event.set()
        self._check_drained()

    def _drain_timeout(self) -> None:
        """Grace is over: stop what still runs and give it back; exit once acked (or at once if
        the daemon cannot be reached: unacked leases expire there and are retried)."""
        self._drain_timer = None
        for tid in list(self.held):
            h = self.held[tid]
            if h.runner_task is not None:
                h.runner_task.cancel()
            self._handback(tid)
        if self._ws is None:
            self.done.set()
        else:
            asyncio.get_running_loop().call_later(ACK_WAIT_S, self.done.set)

    def _check_drained(self) -> None:
        if self.draining and not self.held and not self._unacked and not self._pending:
            self.done.set()

    # ---- connection ----

    def _reread_url(self) -> None:
        if self.url_file is None:
            return
        try:
            urls = parse_urls(self.url_file.read_text().splitlines())
        except OSError:
            return  # not written yet or being replaced: the last one known stays
        if urls and self.ring.replace(urls):
            log("agent_url_changed", url=urls[0], urls=urls)

    async def _connect_loop(self) -> None:
        delay = RECONNECT_MIN_S
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        ws_timeout = aiohttp.ClientWSTimeout(ws_close=WS_CLOSE_TIMEOUT_S)
        unreachable_since = time.monotonic()  # since the start, or since the last session ended
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async def dial(url: str) -> aiohttp.ClientWebSocketResponse:
                return await http.ws_connect(url, heartbeat=20, max_msg_size=self.max_message_bytes,
                                             ssl=self.ssl, timeout=ws_timeout)

            async def close(ws: aiohttp.ClientWebSocketResponse) -> None:
                await ws.close()

            while not self.done.is_set():
                if self.give_up_after_s and time.monotonic() - unreachable_since > self.give_up_after_s:
                    log("agent_gave_up", url=self.url, unreachable_s=round(time.monotonic() - unreachable_since, 1),
                        held=len(self.held), exit_code=EXIT_GAVE_UP)
                    self.gave_up = True
                    self.done.set()
                    return
                self._reread_url()
                url = ""
                try:
                    # Every URL, staggered: one that hangs does not hold the others up (failover.py).
                    url, ws = await dial_first(self.ring.order(), dial, close=close)
                    self.url = url
                    delay = RECONNECT_MIN_S
                    try:
                        await self._session(ws)
                    finally:
                        await ws.close()
                    if not self.done.is_set():
                        log("agent_disconnected", url=url, close_code=ws.close_code,
                            error=str(ws.exception() or "") or None)
                except FatalAgentError as exc:
                    log("agent_refused", error=str(exc))
                    self.done.set()
                    raise
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    event = "agent_disconnected" if self._ws is not None else "agent_connect_failed"
                    log(event, url=url or None, error=str(exc) or type(exc).__name__, retry_in_s=round(delay, 2))
                finally:
                    if self._ws is not None:
                        unreachable_since = time.monotonic()
                    self._ws = None
                    if url:  # it answered, then the session ended or its hello failed: the others first
                        self.ring.lost(url)
                if self.done.is_set():
                    return
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(RECONNECT_MAX_S, delay * 2)

    async def _session(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        held = [(tid, h.task.token) for tid, h in self.held.items()]
        # A task whose result is reported but not acknowledged is still leased to us as far as the
        # daemon knows: listed, it keeps the lease for the resent report (unlisted, it would be
        # requeued and run again, and the report refused).
        held += [(r.id, r.token) for r in (*self._unacked.values(), *self._pending)
                 if not isinstance(r, Returned) and r.id not in self.held]
        await ws.send_str(encode(Hello(self.instance, self.token, self.slots, held,
                                       features=list(FEATURES), max_message_bytes=self.max_message_bytes)))
        first = await ws.receive(timeout=30)
        if first.type != aiohttp.WSMsgType.TEXT:
            raise aiohttp.ClientError(f"connection closed before welcome ({first.type.name})")
        welcome = parse_daemon_message(first.data)
        if isinstance(welcome, ErrorMessage):
            if welcome.code in RETRYABLE_REFUSALS:
                raise aiohttp.ClientError(f"refused for now: {welcome.code}: {welcome.message}")
            raise FatalAgentError(f"{welcome.code}: {welcome.message}")
        if not isinstance(welcome, Welcome):
            raise aiohttp.ClientError("expected a welcome")
        self.heartbeat_s = welcome.heartbeat_s
        self._credit_in_report = CREDIT_IN_REPORT in welcome.features  # an older daemon would drop it
        if welcome.max_message_bytes:
            self.send_limit_bytes = welcome.max_message_bytes
        for tid in welcome.dropped:
            self._forget(tid, abort=True)
        self._ws = ws
        self._credit_sent.clear()  # credit of the old connection died with it
        log("agent_connected", url=self.url, kept=len(welcome.kept), dropped=len(welcome.dropped))
        # Everything unacked is resent: the daemon may never have committed it.
        self._pending[:0] = list(self._unacked.values())
        self._unacked.clear()
        for notice in self.notices:  # the daemon may not have them (sent while disconnected)
            await ws.send_str(encode(notice))
        if self.draining:
            await ws.send_str(encode(Draining(self.drain_reason or "draining")))
        else:
            self._credit_owed = self.slots + self.prefetch - len(self.held)
        self._flush_event.set()
        flusher = asyncio.get_running_loop().create_task(self._flush_loop(ws))
        beater = asyncio.get_running_loop().create_task(self._heartbeat_loop(ws))
        silence_s = max(SILENCE_MIN_S, 2 * self.heartbeat_s)
        try:
            while True:
                try:
                    msg = await ws.receive(timeout=silence_s)
                except TimeoutError:
                    raise aiohttp.ServerTimeoutError(f"nothing from the daemon for {silence_s:g} s") from None
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                self._on_message(parse_daemon_message(msg.data))
        finally:
            flusher.cancel()
            beater.cancel()
            await asyncio.gather(flusher, beater, return_exceptions=True)
        if ws.close_code == 1008:  # policy violation: the daemon refused us
            raise FatalAgentError(f"closed by the daemon: {ws.close_code}")

    def _on_message(self, msg: Any) -> None:
        if isinstance(msg, Grant):
            if msg.ok or msg.refused:  # this round's acks, carried by the grant (ACK_IN_GRANT)
                self._on_message(Ack(msg.ok, msg.refused))
            self._record_rtt(len(msg.tasks))
            for task in msg.tasks:
                if task.id in self.held:
                    continue
                self.held[task.id] = Held(task)
                if self.draining:
                    self._handback(task.id)
                else:
                    self.ready.append(task.id)
            self._ready_event.set()
        elif isinstance(msg, Ack):
            for tid in msg.ok:
                self._unacked.pop(tid, None)
            for tid in msg.refused:
                self._unacked.pop(tid, None)
                log("report_refused", task=tid)
            self._check_drained()
        elif isinstance(msg, Revoke):
            for tid in msg.ids:
                self._forget(tid, abort=True)
        elif isinstance(msg, DrainRequest):
            self.start_drain(msg.reason or "daemon")
        elif isinstance(msg, ErrorMessage):
            log("daemon_error", code=msg.code, message=msg.message)

    def _record_rtt(self, granted: int) -> None:
        now = time.monotonic()
        while granted > 0 and self._credit_sent:
            entry = self._credit_sent[0]
            take = min(granted, int(entry[1]))
            entry[1] -= take
            granted -= take
            if entry[1] <= 0:
                self._credit_sent.popleft()
                self.lease_rtts_s.append(now - entry[0])

    def _forget(self, tid: int, *, abort: bool) -> None:
        held = self.held.pop(tid, None)
        if held is None:
            return
        try:
            self.ready.remove(tid)
        except ValueError:
            pass
        if abort and held.runner_task is not None and not held.runner_task.done():
            held.runner_task.cancel()
        if not self.draining:
            self._credit_owed += 1
            self._flush_event.set()
        self._check_drained()

    # ---- outgoing ----

    def _send_now(self, frame: str) -> None:
        ws = self._ws
        if ws is not None and not ws.closed:
            asyncio.get_running_loop().create_task(ws.send_str(frame))

    def _report(self, report: Report) -> None:
        self._pending.append(report)
        self._flush_event.set()

    def _handback(self, tid: int) -> None:
        held = self.held.pop(tid, None)
        if held is None:
            return
        self._report(Returned(tid, held.task.token))

    async def _flush_loop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        while True:
            await self._flush_event.wait()
            await asyncio.sleep(0.001)  # let a burst of completions share one frame
            self._flush_event.clear()
            pending, self._pending = self._pending, []
            for r in pending:
                self._unacked[r.id] = r
            credit = 0
            if self._credit_owed > 0 and not self.draining:
                credit, self._credit_owed = self._credit_owed, 0
                self._credit_sent.append([time.monotonic(), credit])
            if not await self._send_reports(ws, pending, credit if self._credit_in_report else 0) and credit:
                await ws.send_str(frames.lease_frame(credit))

    async def _send_reports(self, ws: aiohttp.ClientWebSocketResponse, pending: list[Report],
                            credit: int = 0) -> bool:
        """One frame per kind when it fits under the daemon's message limit (the usual case: one
        encode); else the items packed into several frames, and a result no frame can carry
        turned into a permanent failure (an oversized frame closes the connection and would be
        resent after every reconnect). `credit` rides in the one done frame when there is one
        (CREDIT_IN_REPORT); returns whether it did, else the caller sends a lease frame."""
        done = [r for r in pending if type(r) is Success]
        failed = [r for r in pending if type(r) is Failure]
        back = [(r.id, r.token) for r in pending if type(r) is Returned]
        limit = self.send_limit_bytes - FRAME_OVERHEAD
        sent_credit = False
        if done:
            frame = frames.done_frame(done, credit)
            if wire_len(frame) <= limit:
                await ws.send_str(frame)
                sent_credit = bool(credit)
            else:
                items = []
                for s in done:
                    item = frames.success_item(s)
                    if wire_len(item) > limit:
                        failure = Failure(s.id, s.token, f"the result is {wire_len(item)} bytes, over the daemon's "
                                          f"message limit ({self.send_limit_bytes} bytes)", False, s.duration_s)
                        self._unacked[s.id] = failure
                        failed.append(failure)
                    else:
                        items.append(item)
                for frame in frames.pack(frames.DONE_HEAD, items, frames.DONE_TAIL, self.send_limit_bytes):
                    await ws.send_str(frame)
        for frame in frames.fail_frames(failed, self.send_limit_bytes):
            await ws.send_str(frame)
        if back:
            reason = (self.drain_reason or "draining") if self.draining else "released"
            for frame in frames.handback_frames(back, reason, self.send_limit_bytes):
                await ws.send_str(frame)
        return sent_credit

    async def _heartbeat_loop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            refs = [(tid, h.task.token) for tid, h in self.held.items()]
            if refs:
                await ws.send_str(encode(Heartbeat(refs)))
            await ws.ping()  # the daemon's pong is what proves the connection alive (see _session)

    # ---- running tasks ----

    async def _slot_loop(self) -> None:
        while True:
            while not self.ready:
                self._ready_event.clear()
                await self._ready_event.wait()
            tid = self.ready.popleft()
            held = self.held.get(tid)
            if held is None:
                continue
            slot = self.free_slots.pop()
            held.slot = slot
            current = asyncio.current_task()
            held.runner_task = current
            task = held.task
            try:
                outcome = await self.runner.run(slot, task.key, task.data, task.timeout_s)
            except asyncio.CancelledError:
                # Revoked or drained mid-run: the runner's process is ours to stop.
                await asyncio.shield(self.runner.abort(slot))
                self.free_slots.append(slot)
                if self.done.is_set():
                    raise
                uncancel = getattr(current, "uncancel", None)
                if uncancel is not None:
                    uncancel()
                continue
            self.free_slots.append(slot)
            held.runner_task = None
            self._finish(tid, outcome)

    def _finish(self, tid: int, outcome: Outcome) -> None:
        held = self.held.pop(tid, None)
        if held is None:
            return  # revoked while running: the daemon no longer wants this result
        self.completed += 1
        duration_s = round(outcome.duration_s, 6)
        if outcome.ok:
            self._report(Success(tid, held.task.token, outcome.result, duration_s))
        else:
            # Cut here, not at the daemon (which keeps less): a worker's whole stderr must not
            # sit in memory until acked, nor fill frames.
            error = (outcome.error or "failed")[:MAX_ERROR_CHARS]
            self._report(Failure(tid, held.task.token, error, outcome.retryable, duration_s))
        if not self.draining:
            self._credit_owed += 1


def load_spec(worker_dir: Path) -> WorkerSpec:
    path = worker_dir / RESOLVED_SPEC_FILE
    return WorkerSpec.from_dict(jsonx.loads(path.read_text()), source=str(path))


def default_slots(spec: WorkerSpec) -> int:
    return max(1, int((os.cpu_count() or 1) // spec.cpus_per_task))
