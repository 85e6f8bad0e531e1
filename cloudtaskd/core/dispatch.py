"""The dispatcher: group-commits agent reports and hands out leases, one transaction a round.

Agents' messages are buffered as they arrive; a single loop takes everything buffered, runs
one write transaction (reports, timers, leases for every connection with credit), and only
after the commit sends acks and grants. Under load a round carries thousands of tasks, so the
commit (an fsync) is paid once per round rather than once per task; when idle, a message is
handled as soon as it arrives.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from cloudtask_wire.frames import GRANT_HEAD, ack_fields, grant_frames, task_ref, wire_len
from cloudtask_wire.messages import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Ack,
    Complete,
    Draining,
    DrainRequest,
    Fail,
    Failure,
    Handback,
    Heartbeat,
    LeaseRef,
    LeaseRequest,
    Revoke,
    encode,
)
from cloudtaskd.config import Config
from cloudtaskd.core.metrics import Metrics
from cloudtaskd.core.store import Store, Tx
from cloudtaskd.core.tables import tasks as queue
from cloudtaskd.errors import StoreError, StoreFull

log = structlog.get_logger("cloudtaskd.core.dispatch")

TIMER_INTERVAL_S = 0.5
# A departure of the wall clock from the daemon clock logged as a step (NTP slews far less).
WALL_STEP_NOTICE_S = 5.0
ROUND_RETRY_S = 1.0


@dataclass(eq=False)
class Session:
    """One connected agent. `send` is wired by the hub to the websocket's outbox."""

    instance_id: str
    pool_id: int
    slots: int
    send: Callable[[str], None]
    credit: int = 0
    draining: bool = False
    # A newer connection of the same instance said hello: nothing more may be leased to this one
    # (its grant could go out on a dead socket after the newer hello's reclaim has run).
    superseded: bool = False
    stats: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    waiting_since: float = 0.0  # monotonic: when its credit last became non-zero (the lease wait metric)
    ack_in_grant: bool = False  # the agent reads a round's acks inside its grant (protocol.ACK_IN_GRANT)
    # The largest frame the agent reads (its hello; an agent that does not say reads the old default):
    # grants are packed under it, a task that fits in no frame is never sent.
    max_frame_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # The longest grant frame sent on this connection (characters, and its UTF-8 bytes), for the reason
    # given when deliveries keep getting lost with the connection.
    largest_grant_chars: int = 0
    largest_grant_bytes: int = 0


class AgentSessions(Protocol):
    """The connected agents, by instance id, read-only: what the reconciler and the control API
    may know of the dispatcher's sessions (Dispatcher.sessions is one)."""

    def __contains__(self, instance_id: object, /) -> bool: ...

    def __len__(self) -> int: ...

    def get(self, instance_id: str, /) -> Session | None: ...


@dataclass(slots=True)
class _Want:
    session: Session
    n: int


class Dispatcher:
    def __init__(self, store: Store, config: Config, *, metrics: Metrics | None = None) -> None:
        """metrics: the daemon's one Metrics (the daemon passes the same object to the reconciler and
        the control API); a dispatcher of its own (tests) records into one of its own."""
        self.store = store
        self.metrics = metrics if metrics is not None else Metrics()
        self.ttl_s = 0.0
        self.batch_max = 0
        self.backoff = (0.0, 0.0)
        self.apply_config(config)
        self.sessions: dict[str, Session] = {}
        self.on_work: Callable[[int | None], None] | None = None  # replicas: Broadcaster.announce
        self._reports = queue.Reports()
        self._wake = asyncio.Event()
        self._pool_gen: dict[int, int] = defaultdict(int)
        self._pool_empty: set[int] = set()
        # time.monotonic(): a step of the wall clock (NTP, a VM resumed) must not stop the timers
        # (an hour back stopped lease expiry and retries for an hour) nor run them in a burst.
        self._next_timers = 0.0
        self._wall_offset_s = 0.0  # the wall clock's step last logged (cloudtaskd.core.clock)
        # Connections that may want tasks, per pool, in the order they are to be served: a round
        # looks at these, not at every connection (2,000 agents, most of them busy, made the scan
        # of all sessions a good part of each round). Entries without credit are dropped lazily.
        self._wanting: dict[int, dict[Session, None]] = defaultdict(dict)
        # How each instance's last connection ended: (close code, largest grant frame in bytes, the
        # agent's frame limit), for the reason given when deliveries keep getting lost.
        self._last_close: dict[str, tuple[int | None, int, int]] = {}
        self.rounds = 0

    def apply_config(self, config: Config) -> None:
        """At start and on reload: the lease length, round size and retry backoff for the next round."""
        self.ttl_s = config.agents.lease_ttl_s
        self.batch_max = config.agents.lease_batch_max
        self.backoff = (config.queue.retry_backoff_s, config.queue.retry_backoff_max_s)

    # ---- inputs, from the hub and the API ----

    def attach(self, session: Session) -> None:
        old = self.sessions.get(session.instance_id)
        self.sessions[session.instance_id] = session
        if old is not None and old is not session:
            old.credit = 0
        self._wanting[session.pool_id][session] = None

    def detach(self, session: Session) -> None:
        if self.sessions.get(session.instance_id) is session:
            del self.sessions[session.instance_id]
        self._wanting[session.pool_id].pop(session, None)

    def handle(self, session: Session, msg: Any) -> None:
        inst = session.instance_id
        reports = self._reports
        if isinstance(msg, Complete):
            reports.done.extend((inst, s) for s in msg.results)
            self._credit(session, msg.n)
        elif isinstance(msg, Fail):
            reports.failed.extend((inst, f) for f in msg.failures)
            self._credit(session, msg.n)
        elif isinstance(msg, LeaseRequest):
            if not self._credit(session, msg.n):
                return  # nothing to grant; a notify_work will wake us
        elif isinstance(msg, Heartbeat):
            reports.heartbeat.extend((inst, ref) for ref in msg.leases)
        elif isinstance(msg, Handback):
            reports.handback.extend((inst, ref) for ref in msg.leases)
        elif isinstance(msg, Draining):
            session.draining = True
            session.credit = 0
            return
        self._wake.set()

    def _credit(self, session: Session, n: int) -> bool:
        """Add credit (a lease request, or credit carried by a report); False if no round is needed."""
        if n <= 0 or session.draining:
            return False
        if session.credit <= 0:
            session.waiting_since = time.monotonic()
        session.credit += n
        self._wanting[session.pool_id][session] = None
        return session.pool_id not in self._pool_empty

    def notify_work(self, pool_id: int | None = None, *, announce: bool = True) -> None:
        """Tasks became queued (upload, retry, requeue): connections waiting with credit get them.
        With replicas, `on_work` announces it to the others (announce=False: the wake-up came from one)."""
        if announce and self.on_work is not None:
            self.on_work(pool_id)
        pools = [pool_id] if pool_id is not None else list(self._pool_empty)
        for p in pools:
            self._pool_gen[p] += 1
            self._pool_empty.discard(p)
        self._wake.set()

    def drain(self, instance_id: str, *, tell_agent: bool = True) -> bool:
        """Stop granting to an instance. ``tell_agent=False`` when the agent drains on its own
        (an interruption notice): a DrainRequest would cut its grace to the daemon's default."""
        session = self.sessions.get(instance_id)
        if session is None:
            return False
        session.draining = True
        session.credit = 0
        if tell_agent:
            session.send(encode(DrainRequest("requested")))
        return True

    def revoke(self, leases: list[tuple[int, str | None]]) -> None:
        """Tell agents to stop tasks whose leases the daemon no longer honours (cancel, expiry)."""
        by_inst: dict[str, list[int]] = defaultdict(list)
        for task_id, inst_id in leases:
            if inst_id:
                by_inst[inst_id].append(task_id)
        for inst_id, ids in by_inst.items():
            session = self.sessions.get(inst_id)
            if session is not None:
                session.send(encode(Revoke(ids)))

    # ---- the loop ----

    async def run(self) -> None:
        while True:
            timeout = max(0.0, self._next_timers - time.monotonic())
            if not self._wake.is_set():
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=timeout)
                except TimeoutError:
                    pass
            self._wake.clear()
            try:
                await self.round()
            except StoreError as exc:
                # Disk full, I/O error: nothing of the round was committed or acknowledged. Keep
                # the reports and try again; agents hold their unacked reports meanwhile.
                if not isinstance(exc, StoreFull):  # a full disk is logged once per outage, by the store
                    log.error("dispatch_round_failed", error=str(exc), retry_in_s=ROUND_RETRY_S)
                await asyncio.sleep(ROUND_RETRY_S)
                self._wake.set()
            except Exception:
                # A bug or a report nothing should have let through: the round's reports are
                # dropped (agents resend what is not acked), but the dispatcher must live on.
                log.exception("dispatch_round_crashed", retry_in_s=ROUND_RETRY_S)
                await asyncio.sleep(ROUND_RETRY_S)
                self._wake.set()

    async def round(self) -> None:
        # The daemon clock, not time.time(): lease expiry and retry times are compared with it, and a
        # step of the wall clock must neither expire every lease at once nor stall retries (issue 15).
        now = self.store.clock.now()
        reports, self._reports = self._reports, queue.Reports()
        mono = time.monotonic()
        timers = mono >= self._next_timers
        if timers:
            self._next_timers = mono + TIMER_INTERVAL_S
            self._note_wall_step()
        # Round robin over connections with credit: a connection served (in full or in part) goes to
        # the back of its pool's line, so a round's budget serves them in turn; with thousands of
        # agents none waits more than (agents x credit / budget) rounds.
        budget = self.batch_max
        wants = []
        for pool_id, line in list(self._wanting.items()):
            if budget <= 0:
                break
            if pool_id in self._pool_empty:
                continue
            # Pools take turns too: a pool served goes to the back, or one whose agents always ask
            # for the whole budget would starve the others.
            del self._wanting[pool_id]
            self._wanting[pool_id] = line
            for s in list(line):
                if budget <= 0:
                    break
                if s.credit <= 0 or s.draining or s.superseded:
                    del line[s]
                    continue
                n = min(s.credit, budget)
                wants.append(_Want(s, n))
                budget -= n
                del line[s]
                line[s] = None
        if not reports and not timers and not wants:
            return
        gens = {w.session.pool_id: self._pool_gen[w.session.pool_id] for w in wants}
        try:
            # urgent: ahead of uploads and API writes, so agents never idle behind a burst of them
            out: queue.RoundResult = await self.store.write(self._round_tx, reports, wants, timers, now=now,
                                                            urgent=True)
        except StoreError:
            self._reports.merge_front(reports)
            raise
        self.rounds += 1
        # --- committed: now tell the agents ---
        # An agent that reads acks inside grants gets one frame for both when it has a grant
        # (on the very connection the acks are for: a newer one may have said hello meanwhile).
        combined = {w.session.instance_id for w in wants
                    if w.session.ack_in_grant and out.grants.get(w.session.instance_id)
                    and self.sessions.get(w.session.instance_id) is w.session}
        for inst in set(out.accepted) | set(out.refused):
            session = self.sessions.get(inst)
            if session is not None and inst not in combined:
                session.send(encode(Ack(out.accepted.get(inst, []), out.refused.get(inst, []))))
        for inst, ids in out.lost.items():
            session = self.sessions.get(inst)
            if session is not None:
                session.send(encode(Revoke(ids)))
        short_pools = set()
        n_granted = 0
        sent_at = time.monotonic()
        for w in wants:
            granted = out.grants.get(w.session.instance_id, [])
            w.session.credit -= len(granted)
            if granted:
                inst = w.session.instance_id
                acks = ""
                if inst in combined and (inst in out.accepted or inst in out.refused):
                    acks = ack_fields(out.accepted.get(inst, []), out.refused.get(inst, []))
                # As many frames as the agent's limit needs (one, unless the tasks are big): a frame
                # over it closes the connection (1009) and the same grant would go out again after the
                # reconnect, for ever (issue 13).
                frames, oversize = grant_frames(granted, w.session.max_frame_bytes, acks)
                for frame in frames:
                    w.session.send(frame)
                    if len(frame) > w.session.largest_grant_chars:  # a few times a connection: encode then
                        w.session.largest_grant_chars, w.session.largest_grant_bytes = len(frame), wire_len(frame)
                if oversize:
                    self._undeliverable(w.session, [granted[i] for i in oversize])
                n_granted += len(granted) - len(oversize)
                self.metrics.lease_wait.observe(sent_at - w.session.waiting_since)
                w.session.waiting_since = sent_at  # credit left over waits anew from here
            if len(granted) < w.n:
                short_pools.add(w.session.pool_id)
        self.metrics.round_done(n_granted, sum(map(len, out.accepted.values())), sum(map(len, out.refused.values())))
        for pool in short_pools:
            if self._pool_gen[pool] == gens.get(pool):
                self._pool_empty.add(pool)
        if out.requeued_pools:
            for pool in out.requeued_pools:
                self.notify_work(pool)
        if out.expired:
            # The agent may still be working on these: tell it to stop, its report would be refused.
            self.revoke(out.expired)

    def _note_wall_step(self) -> None:
        """Log a step of the wall clock once, when it first departs from the daemon clock by more
        than WALL_STEP_NOTICE_S: times the daemon records stay on its own clock until it restarts."""
        offset = self.store.clock.wall_offset_s()
        if abs(offset - self._wall_offset_s) > WALL_STEP_NOTICE_S:
            log.warning("wall_clock_stepped", offset_s=round(offset, 3),
                        previous_offset_s=round(self._wall_offset_s, 3),
                        note="leases and retries keep the daemon's monotonic clock; recorded times keep its"
                             " offset at start until the daemon restarts")
            self._wall_offset_s = offset

    def _undeliverable(self, session: Session, tasks: list[str]) -> None:
        """Tasks leased to a connection whose agent reads no frame large enough for them (an agent
        started with a smaller limit than the task limit, an older one): never sent. Each fails
        its attempt with a reason that says so (the next attempt may reach an agent that takes it;
        the last one makes it dead), through the next round like an agent's own report."""
        for task in tasks:
            task_id, token = task_ref(task)
            size = len(GRANT_HEAD) + 2 + wire_len(task)
            error = (f"could not be delivered to instance {session.instance_id}: the grant frame ({size} bytes) "
                     f"exceeds the agent's limit of {session.max_frame_bytes} bytes (start the agent with "
                     "--max-message-bytes to fit queue.max_task_bytes, or lower that limit)")
            log.warning("task_undeliverable", task=task_id, instance=session.instance_id, frame_bytes=size,
                        agent_limit_bytes=session.max_frame_bytes)
            self._reports.failed.append((session.instance_id, Failure(task_id, token, error, True, 0.0)))
        session.credit += len(tasks)  # never reached the agent: its credit still waits for tasks
        self._wake.set()

    def closed(self, session: Session, close_code: int | None) -> None:
        """A connection ended (the hub): how, kept for the reason of a delivery lost with it."""
        self._last_close[session.instance_id] = (close_code, session.largest_grant_bytes, session.max_frame_bytes)

    def _round_tx(self, tx: Tx, reports: queue.Reports, wants: list[_Want], timers: bool) -> queue.RoundResult:
        out = queue.RoundResult()
        if reports:
            queue.apply_reports(tx, reports, out, self.backoff, self.ttl_s)
        if timers:
            out.expired, pools = queue.requeue_interrupted(tx)
            out.requeued_pools |= pools
            out.expired += queue.expire_leases(tx, self.backoff)
            out.requeued_pools |= queue.promote_due(tx)
        by_pool: dict[int, list[tuple[str, int]]] = defaultdict(list)
        for w in wants:
            if not w.session.superseded:  # set before the newer hello's reclaim, which ran before this
                by_pool[w.session.pool_id].append((w.session.instance_id, w.n))
        for pool_id, pool_wants in by_pool.items():
            out.grants.update(queue.lease_many(tx, pool_id, pool_wants, self.ttl_s))
        return out

    async def reclaim(self, instance_id: str, held: list[LeaseRef]) -> tuple[list[int], list[int]]:
        """A (re)connecting agent's hello: what it holds is kept, what it does not list is requeued.
        Any older connection of the instance is superseded first: a round that already chose it
        must not lease to it after this reclaim (those leases would be stranded until expiry)."""
        old = self.sessions.get(instance_id)
        if old is not None:
            old.superseded = True
            old.credit = 0
        out = await self.store.write(queue.reclaim, instance_id, held, self.ttl_s, urgent=True)
        if not out.undelivered:
            self._last_close.pop(instance_id, None)
        for pool in out.requeued_pools:
            self.notify_work(pool)
        if out.undelivered:
            # Granted, and gone before the agent held them, MAX_LOST_GRANTS times in a row: sending
            # them again would loop (a frame the agent refuses, an agent that dies of the grant).
            # Their attempt fails, through the next round like an agent's own report.
            reason = self._lost_reason(instance_id)
            for task_id, token in out.undelivered:
                log.warning("task_undeliverable", task=task_id, instance=instance_id, reason=reason)
                self._reports.failed.append((instance_id, Failure(task_id, token, reason, True, 0.0)))
            self._wake.set()
        return out.kept, out.dropped

    def _lost_reason(self, instance_id: str) -> str:
        code, largest, limit = self._last_close.pop(instance_id, (None, 0, 0))
        # An agent refusing a frame closes with 1009 on its side, but its reader drops the socket with
        # the frame unread, so the daemon mostly sees 1006: say what was sent and what the agent reads.
        how = f"its connection closed (code {int(code)})" if code is not None else "its connection was lost"
        sent = (f"; the largest grant frame sent on it was {largest} bytes, the agent reads {limit}"
                if largest else "")
        return (f"could not be delivered to instance {instance_id}: {how} before the agent held the task, "
                f"{queue.MAX_LOST_GRANTS} times in a row{sent} (a frame too big for the agent closes the "
                "connection, as does an agent that dies of the task)")
