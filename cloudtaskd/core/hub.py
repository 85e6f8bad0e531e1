"""The agent websocket: authentication, sessions, and frames in and out.

Each connection must open with a valid hello (instance id + its own token) within a few
seconds; anything else closes that connection only. Outgoing frames go through a per-session
outbox drained by its own task, so one slow agent never stalls the dispatcher or the others.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from functools import partial

import structlog
from aiohttp import WSCloseCode, WSMsgType, web

from cloudtask_wire.messages import (
    ACK_IN_GRANT,
    CREDIT_IN_REPORT,
    DEFAULT_MAX_MESSAGE_BYTES,
    FEATURES,
    Draining,
    ErrorMessage,
    Hello,
    Notice,
    ProtocolError,
    Welcome,
    encode,
    parse_agent_message,
)
from cloudtaskd.config import Config
from cloudtaskd.core.dispatch import Dispatcher, Session
from cloudtaskd.core.ratelimit import TokenBucket
from cloudtaskd.core.states import InstanceEvent, InstanceState
from cloudtaskd.core.store import Store, Tx
from cloudtaskd.core.tables import instances
from cloudtaskd.errors import TransitionError
from cloudtaskd.fleet import interruptions

log = structlog.get_logger("cloudtaskd.core.hub")

HELLO_TIMEOUT_S = 10.0
MAX_UNAUTHENTICATED = 1024
WS_HEARTBEAT_S = 20.0
OUTBOX_MAX_FRAMES = 10_000


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Outbox:
    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self.frames: list[str] = []
        self.ready = asyncio.Event()
        self.closed = False

    def send(self, frame: str) -> None:
        if self.closed:
            return
        if len(self.frames) >= OUTBOX_MAX_FRAMES:
            # The agent is not reading: better to drop it (its leases survive and it reconnects)
            # than to buffer without bound.
            self.closed = True
            asyncio.get_running_loop().create_task(self.ws.close(code=WSCloseCode.TRY_AGAIN_LATER,
                                                                message=b"too slow"))
            return
        self.frames.append(frame)
        self.ready.set()

    async def pump(self) -> None:
        while not self.closed:
            await self.ready.wait()
            self.ready.clear()
            frames, self.frames = self.frames, []
            for frame in frames:
                await self.ws.send_str(frame)


class AgentHub:
    def __init__(self, *, store: Store, dispatcher: Dispatcher, config: Config,
                 on_notice: Callable[[interruptions.Recorded], Awaitable[None]] | None = None,
                 on_connect: Callable[[str], Awaitable[None]] | None = None) -> None:
        """on_notice: told of each new interruption notice once it is recorded (the reconciler:
        replace the instance now); on_connect: told of each agent that said hello."""
        self.store = store
        self.dispatcher = dispatcher
        # Bound at start: a listener's frame limit and what agents were told stay until a restart.
        self.max_message_bytes = config.agents.max_message_bytes
        self.max_connections_per_instance = 0
        self.max_messages_per_s = 0.0
        self.apply_config(config)
        self.sockets: set[web.WebSocketResponse] = set()
        self.by_instance: dict[str, set[web.WebSocketResponse]] = {}
        self._instance_of: dict[web.WebSocketResponse, str] = {}
        self._closing: set[asyncio.Task[bool]] = set()
        self.throttled = 0  # times an agent connection was read more slowly for its message rate
        self.on_connect = on_connect
        self.on_notice = on_notice

    def apply_config(self, config: Config) -> None:
        """At start and on reload: checked at each new connection (connected agents keep their rate)."""
        self.max_connections_per_instance = config.agents.max_connections_per_instance
        self.max_messages_per_s = config.agents.max_messages_per_s

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if len(self.sockets) - len(self._instance_of) >= MAX_UNAUTHENTICATED:  # _instance_of: authenticated
            # Connections that have not said hello yet cost a socket each for HELLO_TIMEOUT_S.
            return web.Response(status=503, text="too many connections waiting to authenticate")
        ws = web.WebSocketResponse(heartbeat=WS_HEARTBEAT_S, max_msg_size=self.max_message_bytes)
        await ws.prepare(request)
        self.sockets.add(ws)
        peer = request.remote
        try:
            await self._serve(ws, peer)
        finally:
            self.sockets.discard(ws)
            inst = self._instance_of.pop(ws, None)
            if inst is not None:
                conns = self.by_instance.get(inst, set())
                conns.discard(ws)
                if not conns:
                    self.by_instance.pop(inst, None)
        return ws

    async def disconnect(self, instance_id: str) -> None:
        """The instance has ended: its token is revoked, nothing more is granted to it, and a
        connection still open is closed (in the background: a dead peer's close handshake must not
        hold up the caller)."""
        self.dispatcher.drain(instance_id, tell_agent=False)
        for ws in list(self.by_instance.get(instance_id, ())):
            task = asyncio.get_running_loop().create_task(
                ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"instance ended"))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _refuse(self, ws: web.WebSocketResponse, code: str, message: str) -> None:
        with suppress(Exception):
            await ws.send_str(encode(ErrorMessage(code, message)))
        await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=code.encode())

    async def _serve(self, ws: web.WebSocketResponse, peer: str | None) -> None:
        try:
            first = await ws.receive(timeout=HELLO_TIMEOUT_S)
        except TimeoutError:
            await self._refuse(ws, "hello_timeout", "no hello within the time limit")
            return
        if first.type != WSMsgType.TEXT:
            await self._refuse(ws, "protocol", "the first frame must be a hello text frame")
            return
        try:
            hello = parse_agent_message(first.data)
            if not isinstance(hello, Hello):
                raise ProtocolError("the first message must be a hello", field="t")
        except ProtocolError as exc:
            log.warning("agent_refused", peer=peer, reason=str(exc))
            await self._refuse(ws, "protocol", str(exc))
            return
        auth = await self._authenticate(hello)
        if auth is None:
            log.warning("agent_refused", peer=peer, instance=hello.instance, reason="bad instance or token")
            await self._refuse(ws, "unauthorized", "unknown instance, wrong token, or the instance has ended")
            return

        conns = self.by_instance.setdefault(hello.instance, set())
        if len(conns) >= self.max_connections_per_instance:
            log.warning("agent_refused", peer=peer, instance=hello.instance, reason="too many connections")
            await self._refuse(ws, "busy", f"instance {hello.instance} already has {len(conns)} live connections")
            return
        conns.add(ws)
        self._instance_of[ws] = hello.instance
        pool_id, draining = auth
        log_ = log.bind(instance=hello.instance)
        kept, dropped = await self.dispatcher.reclaim(hello.instance, hello.held)
        outbox = Outbox(ws)
        session = Session(hello.instance, pool_id, hello.slots, outbox.send,
                          ack_in_grant=ACK_IN_GRANT in hello.features,
                          # An agent that does not say reads what every agent read before it said.
                          max_frame_bytes=hello.max_message_bytes or DEFAULT_MAX_MESSAGE_BYTES)
        # The daemon reads credit in reports from any agent; it puts acks in grants only for an
        # agent that said it reads them (an older one would miss its acks).
        features = [f for f in FEATURES if f == CREDIT_IN_REPORT or f in hello.features]
        outbox.send(encode(Welcome(self.dispatcher.ttl_s, self.dispatcher.ttl_s / 4, kept, dropped,
                                   max_message_bytes=self.max_message_bytes, features=features)))
        self.dispatcher.attach(session)
        if draining:
            # It was told to drain before this reconnect: say it again, grant it nothing.
            self.dispatcher.drain(hello.instance)
        pump = asyncio.get_running_loop().create_task(outbox.pump(), name=f"outbox-{hello.instance}")
        log_.info("agent_connected", peer=peer, slots=hello.slots, kept=len(kept), dropped=len(dropped),
                  max_message_bytes=session.max_frame_bytes)
        if self.on_connect is not None:
            await self.on_connect(hello.instance)
        reason = "closed"
        # A token bucket per connection: an agent sending faster than max_messages_per_s is read
        # more slowly (TCP pushes back on it); the others are served as before.
        loop = asyncio.get_running_loop()
        bucket = TokenBucket(self.max_messages_per_s, 2 * self.max_messages_per_s, loop.time())
        try:
            async for msg in ws:
                while (wait := bucket.take(loop.time())) > 0:
                    self.throttled += 1
                    await asyncio.sleep(wait)
                if msg.type == WSMsgType.TEXT:
                    try:
                        parsed = parse_agent_message(msg.data)
                    except ProtocolError as exc:
                        reason = f"protocol error: {exc}"
                        log_.warning("agent_protocol_error", error=str(exc))
                        await self._refuse(ws, "protocol", str(exc))
                        break
                    if isinstance(parsed, Hello):
                        reason = "second hello"
                        await self._refuse(ws, "protocol", "hello may only be sent once")
                        break
                    if isinstance(parsed, Notice):
                        await self._notice(hello.instance, parsed)
                        continue
                    self.dispatcher.handle(session, parsed)
                    if isinstance(parsed, Draining):
                        await self._mark_draining(hello.instance)
                elif msg.type == WSMsgType.ERROR:
                    reason = f"error: {ws.exception()}"
                    break
                else:
                    reason = "binary frame"
                    await self._refuse(ws, "protocol", "only text frames are accepted")
                    break
        finally:
            outbox.closed = True
            outbox.ready.set()
            pump.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await pump
            self.dispatcher.detach(session)
            self.dispatcher.closed(session, ws.close_code)
            with suppress(Exception):
                await self.store.write(instances.touch, hello.instance)
            log_.info("agent_disconnected", reason=reason, close_code=ws.close_code)

    async def _notice(self, instance_id: str, notice: Notice) -> None:
        recorded = await self.store.write(interruptions.record, instance_id, notice.kind, notice.source,
                                          notice.deadline, notice.detail)
        if recorded is None or not recorded.new:
            return
        log.warning("spot_notice", instance=instance_id, kind=notice.kind, source=notice.source,
                    detail=notice.detail, offer=recorded.offer_key,
                    seconds_left=None if notice.deadline is None else round(notice.deadline - time.time(), 1))
        if recorded.drained:
            self.dispatcher.drain(instance_id, tell_agent=False)  # its agent drains on its own already
        if self.on_notice is not None:
            await self.on_notice(recorded)

    async def _mark_draining(self, instance_id: str) -> None:
        """The agent drains on its own (SIGTERM, interruption): record it, so its exit is a drain."""
        try:
            await self.store.write(lambda tx: tx.transition_instance(instance_id, InstanceEvent.DRAIN))
        except TransitionError:
            pass  # already draining or stopping

    async def _authenticate(self, hello: Hello) -> tuple[int, bool] | None:
        hashed = token_hash(hello.token)
        # Checked on the reader first: a flood of bad hellos must not queue write transactions
        # ahead of the dispatcher's.
        known = await self.store.read(partial(instances.token_hash_of, instance_id=hello.instance))
        if known is None or not hmac.compare_digest(known, hashed):
            return None
        # urgent, like the dispatcher's rounds: behind a stream of them an ordinary write waits a round
        # each time, and 2,000 agents reconnecting took two minutes (benchmarks/scale.py)
        return await self.store.write(_authenticate_tx, hello.instance, hashed, urgent=True)

    async def close_all(self, message: bytes = b"daemon shutting down") -> None:
        async def close(ws: web.WebSocketResponse) -> None:
            with suppress(Exception):
                await ws.close(code=WSCloseCode.GOING_AWAY, message=message)
        # At once, not one after another: each close waits for its agent's answer.
        await asyncio.gather(*(close(ws) for ws in list(self.sockets)))


def _authenticate_tx(tx: Tx, instance_id: str, hashed: str) -> tuple[int, bool] | None:
    """(pool, draining) for a valid instance token, else None."""
    row = instances.auth_of(tx, instance_id)
    if row is None or not hmac.compare_digest(row.token_hash, hashed):
        return None
    state = row.state
    if state == InstanceState.STARTING:
        try:
            tx.transition_instance(instance_id, InstanceEvent.AGENT_CONNECTED, started_at=tx.now)
        except TransitionError:
            return None
    elif state not in (InstanceState.RUNNING, InstanceState.DRAINING):
        return None
    instances.touch(tx, instance_id)
    return int(row.pool_id), state == InstanceState.DRAINING
