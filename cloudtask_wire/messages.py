"""The agent <-> daemon messages: one JSON object per websocket text frame.

Every message shape is defined here, once, as a dataclass whose fields map one to one onto JSON
keys: `encode` writes any of them, `parse_agent_message`/`parse_daemon_message` read them back.
The busy frames (grants, reports, credit) are written by frames.py's fast encoders, which must
equal `encode` parsed back. See docs/protocol.md for the prose and the sequence of a session.

Every message has a type field "t". Task references on the wire are [task_id, token] pairs:
the token is the task's attempt number at lease time and fences stale reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from cloudtask_wire import jsonx
from cloudtask_wire.compat import SLOTS

PROTOCOL_VERSION = 1
MAX_CREDIT = 100_000  # one lease request's n
# What one frame may hold, in UTF-8 bytes, each way, when nothing else is said: what an agent that does
# not give its limit in the hello accepts (every agent before that field), and the daemon's default.
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MIN_MESSAGE_BYTES = 1024
MAX_MESSAGE_BYTES = 1 << 40
# What a granted task takes on the wire beyond its data: the id, token and timeout numbers, the key
# (at most 512 characters, up to 6 bytes each when escaped) and the grant frame's own JSON around it.
# A frame limit of max_task_bytes + this carries any accepted task alone.
TASK_FRAME_MARGIN_BYTES = 8192
MAX_ERROR_CHARS = 4000

# Exit code by which a `command` worker declares a permanent failure (no retry).
PERMANENT_FAILURE_EXIT_CODE = 3

# Bounds on numbers no real agent comes near: 1.8e308 is a valid JSON number, and a sum of two such
# durations is infinite, which the daemon's cost estimates then turn into NaN (not JSON).
MAX_DURATION_S = 1e9  # about 31 years
MAX_DEADLINE = 1e11  # epoch seconds, the year 5138


class ProtocolError(Exception):
    """A message that does not follow the protocol; the connection that sent it is closed."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        self.reason = message
        super().__init__(f"{field}: {message}" if field else message)

    def within(self, where: str) -> ProtocolError:
        """The same error with the path of the object it is in ("results[3]") before its field:
        built only on the way out, so the usual message pays nothing for the path."""
        return ProtocolError(self.reason, field=f"{where}.{self.field}" if self.field else where)


LeaseRef = tuple[int, int]  # (task_id, token)


# ---- agent -> daemon ------------------------------------------------------------------------


# Optional features, offered in the hello and granted in the welcome, so either side may be older.
# With 2,000 agents each frame is a TLS record and a trip through the event loop: these two halve
# the frames per task (benchmarks/scale.py).
CREDIT_IN_REPORT = "credit_in_report"  # a done/fail frame may carry credit (`n`): no lease frame after it
ACK_IN_GRANT = "ack_in_grant"  # a grant frame may carry the acks (`ok`, `refused`) of the same round
FEATURES = (CREDIT_IN_REPORT, ACK_IN_GRANT)


@dataclass(frozen=True, **SLOTS)
class Hello:
    instance: str
    token: str
    slots: int
    held: list[LeaseRef]
    features: list[str] = field(default_factory=list)
    # The largest frame this agent reads, in UTF-8 bytes (its websocket's max_msg_size: a frame of
    # this size or more is refused with close code 1009). 0: not said (an agent before this field),
    # the daemon assumes DEFAULT_MAX_MESSAGE_BYTES.
    max_message_bytes: int = 0
    version: int = PROTOCOL_VERSION
    t: str = "hello"


@dataclass(frozen=True, **SLOTS)
class LeaseRequest:
    """Adds n to the connection's credit: the daemon grants up to that many tasks, now or later."""

    n: int
    t: str = "lease"


@dataclass(frozen=True, **SLOTS)
class Heartbeat:
    leases: list[LeaseRef]
    t: str = "hb"


@dataclass(frozen=True, **SLOTS)
class Success:
    id: int
    token: int
    result: Any
    duration_s: float


@dataclass(frozen=True, **SLOTS)
class Complete:
    results: list[Success]
    n: int = 0  # credit returned with the reports (CREDIT_IN_REPORT)
    t: str = "done"


@dataclass(frozen=True, **SLOTS)
class Failure:
    id: int
    token: int
    error: str
    retryable: bool
    duration_s: float


@dataclass(frozen=True, **SLOTS)
class Returned:
    """A lease handed back: one item of a Handback, which carries it as an [id, token] pair. The
    agent keeps its reports as Success, Failure or Returned until the daemon acks them."""

    id: int
    token: int


Report = Union[Success, Failure, Returned]


@dataclass(frozen=True, **SLOTS)
class Fail:
    failures: list[Failure]
    n: int = 0  # credit returned with the reports (CREDIT_IN_REPORT)
    t: str = "fail"


@dataclass(frozen=True, **SLOTS)
class Handback:
    """Leases given back unfinished (drain, spot interruption): requeued without counting an attempt."""

    leases: list[LeaseRef]
    reason: str
    t: str = "handback"


@dataclass(frozen=True, **SLOTS)
class Draining:
    """The agent takes no more leases (SIGTERM, interruption notice); credit drops to zero."""

    reason: str
    t: str = "draining"


@dataclass(frozen=True, **SLOTS)
class Notice:
    """The cloud's word about this instance: "interruption" (it is being taken; deadline when it
    goes, if the cloud says) or "rebalance" (AWS: at elevated risk; replace it before it goes)."""

    kind: str
    source: str
    deadline: float | None
    detail: str
    t: str = "notice"


NOTICE_KINDS = ("interruption", "rebalance")

AgentMessage = Union[Hello, LeaseRequest, Heartbeat, Complete, Fail, Handback, Draining, Notice]


# ---- daemon -> agent ------------------------------------------------------------------------


@dataclass(frozen=True, **SLOTS)
class GrantedTask:
    id: int
    token: int
    key: str
    data: Any
    timeout_s: float | None


@dataclass(frozen=True, **SLOTS)
class Welcome:
    lease_ttl_s: float
    heartbeat_s: float
    kept: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    version: int = PROTOCOL_VERSION
    # The daemon's frame limit (agents.max_message_bytes) in bytes: what the agent may send in one
    # frame. 0: not said (an older daemon); the agent keeps its own default.
    max_message_bytes: int = 0
    features: list[str] = field(default_factory=list)  # of FEATURES, those this connection uses
    t: str = "welcome"


@dataclass(frozen=True, **SLOTS)
class Ack:
    ok: list[int]
    refused: list[int]
    t: str = "ack"


@dataclass(frozen=True, **SLOTS)
class Grant:
    tasks: list[GrantedTask]
    ok: list[int] = field(default_factory=list)  # acks of the same round (ACK_IN_GRANT)
    refused: list[int] = field(default_factory=list)
    t: str = "grant"


@dataclass(frozen=True, **SLOTS)
class Revoke:
    """The daemon no longer honours these leases (job cancelled, lease expired): stop them."""

    ids: list[int]
    t: str = "revoke"


@dataclass(frozen=True, **SLOTS)
class DrainRequest:
    reason: str
    t: str = "drain"


@dataclass(frozen=True, **SLOTS)
class ErrorMessage:
    code: str
    message: str
    t: str = "error"


DaemonMessage = Union[Welcome, Ack, Grant, Revoke, DrainRequest, ErrorMessage]


# ---- validation helpers ---------------------------------------------------------------------


def _int(obj: dict[str, Any], key: str, *, minimum: int = 0, maximum: int = 2**62) -> int:
    value = obj.get(key)
    if type(value) is not int or not (minimum <= value <= maximum):
        raise ProtocolError(f"expected an integer in [{minimum}, {maximum}], got {value!r:.60}", field=key)
    return value


def _num(obj: dict[str, Any], key: str, *, maximum: float) -> float:
    value = obj.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= maximum:
        raise ProtocolError(f"expected a number in [0, {maximum:g}], got {value!r:.60}", field=key)
    return float(value)


def _str(obj: dict[str, Any], key: str, *, max_len: int = 256) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or len(value) > max_len:
        raise ProtocolError(f"expected a string of at most {max_len} characters", field=key)
    return value


def _list(obj: dict[str, Any], key: str) -> list[Any]:
    value = obj.get(key)
    if not isinstance(value, list):
        raise ProtocolError("expected a list", field=key)
    return value


def _refs(obj: dict[str, Any], key: str) -> list[LeaseRef]:
    out: list[LeaseRef] = []
    for i, item in enumerate(_list(obj, key)):
        if (
            not isinstance(item, list)
            or len(item) != 2
            or type(item[0]) is not int
            or type(item[1]) is not int
            or not (0 <= item[0] <= 2**62 and 0 <= item[1] <= 2**62)  # SQLite holds 64-bit integers
        ):
            raise ProtocolError("expected [task_id, token] pairs of integers in [0, 2^62]", field=f"{key}[{i}]")
        out.append((item[0], item[1]))
    return out


def _obj(item: Any, where: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise ProtocolError("expected an object", field=where or None)
    return item


def _credit(obj: dict[str, Any]) -> int:
    return _int(obj, "n", maximum=MAX_CREDIT) if "n" in obj else 0


def _frame_limit(obj: dict[str, Any]) -> int:
    """A hello's max_message_bytes: 0 (or absent) for not said, else at least MIN_MESSAGE_BYTES."""
    value = _int(obj, "max_message_bytes", maximum=MAX_MESSAGE_BYTES) if "max_message_bytes" in obj else 0
    if 0 < value < MIN_MESSAGE_BYTES:
        raise ProtocolError(f"expected 0 (not said) or at least {MIN_MESSAGE_BYTES}, got {value}",
                            field="max_message_bytes")
    return value


def _success(item: Any) -> Success:
    it = _obj(item, "")
    if "result" not in it:
        raise ProtocolError("missing", field="result")
    return Success(_int(it, "id"), _int(it, "token"), it["result"], _num(it, "duration_s", maximum=MAX_DURATION_S))


def _failure(item: Any) -> Failure:
    it = _obj(item, "")
    retryable = it.get("retryable")
    if not isinstance(retryable, bool):
        raise ProtocolError("expected true or false", field="retryable")
    error = it.get("error")
    if not isinstance(error, str):
        raise ProtocolError("expected a string", field="error")
    return Failure(_int(it, "id"), _int(it, "token"), error[:MAX_ERROR_CHARS], retryable,
                   _num(it, "duration_s", maximum=MAX_DURATION_S))


def parse_agent_message(raw: str | bytes) -> AgentMessage:
    """Decode and validate one agent frame; raises ProtocolError naming the bad field."""
    try:
        obj = jsonx.loads(raw)
    except (ValueError, TypeError) as exc:
        raise ProtocolError(f"not valid JSON: {exc}") from exc
    obj = _obj(obj, "message")
    kind = obj.get("t")
    if kind == "lease":
        return LeaseRequest(n=_int(obj, "n", maximum=MAX_CREDIT))
    if kind == "done":
        results: list[Success] = []
        items = _list(obj, "results")
        try:
            for item in items:
                results.append(_success(item))
        except ProtocolError as exc:
            raise exc.within(f"results[{len(results)}]") from None  # the item that failed is the next
        return Complete(results, _credit(obj))
    if kind == "fail":
        failures: list[Failure] = []
        items = _list(obj, "failures")
        try:
            for item in items:
                failures.append(_failure(item))
        except ProtocolError as exc:
            raise exc.within(f"failures[{len(failures)}]") from None
        return Fail(failures, _credit(obj))
    if kind == "hb":
        return Heartbeat(_refs(obj, "leases"))
    if kind == "hello":
        version = _int(obj, "version")
        if version != PROTOCOL_VERSION:
            raise ProtocolError(f"protocol version {version} is not supported (daemon speaks {PROTOCOL_VERSION})")
        features = obj.get("features", [])
        if not isinstance(features, list) or len(features) > 32 or not all(isinstance(f, str) for f in features):
            raise ProtocolError("expected a list of at most 32 strings", field="features")
        return Hello(
            instance=_str(obj, "instance"),
            token=_str(obj, "token"),
            slots=_int(obj, "slots", minimum=1, maximum=100_000),
            held=_refs(obj, "held"),
            features=[f for f in features if f in FEATURES],
            max_message_bytes=_frame_limit(obj),
        )
    if kind == "handback":
        return Handback(_refs(obj, "leases"), _str(obj, "reason", max_len=200))
    if kind == "draining":
        return Draining(_str(obj, "reason", max_len=200))
    if kind == "notice":
        notice_kind = obj.get("kind")
        if notice_kind not in NOTICE_KINDS:
            raise ProtocolError(f"expected one of {', '.join(NOTICE_KINDS)}, got {notice_kind!r:.40}", field="kind")
        deadline = None if obj.get("deadline") is None else _num(obj, "deadline", maximum=MAX_DEADLINE)
        return Notice(notice_kind, _str(obj, "source", max_len=32), deadline, _str(obj, "detail", max_len=200))
    raise ProtocolError(f"unknown message type {kind!r:.40}", field="t")


def parse_daemon_message(raw: str | bytes) -> DaemonMessage:
    """Decode one daemon frame (the agent trusts the daemon, so checks are light)."""
    try:
        obj = _obj(jsonx.loads(raw), "message")
        kind = obj["t"]
        if kind == "grant":
            return Grant(
                [
                    GrantedTask(t["id"], t["token"], t["key"], t.get("data"), t.get("timeout_s"))
                    for t in obj["tasks"]
                ],
                obj.get("ok", []), obj.get("refused", []),
            )
        if kind == "ack":
            return Ack(obj["ok"], obj["refused"])
        if kind == "revoke":
            return Revoke(obj["ids"])
        if kind == "welcome":
            return Welcome(obj["lease_ttl_s"], obj["heartbeat_s"], obj["kept"], obj["dropped"], obj["version"],
                           obj.get("max_message_bytes", 0), obj.get("features", []))
        if kind == "drain":
            return DrainRequest(obj.get("reason", ""))
        if kind == "error":
            return ErrorMessage(obj["code"], obj["message"])
    except KeyError as exc:
        raise ProtocolError("missing", field=str(exc.args[0])) from exc
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed daemon message: {exc}") from exc
    raise ProtocolError(f"unknown message type {kind!r:.40}", field="t")


def frame_limit_for(max_task_bytes: int) -> int:
    """The frame limit that carries any task of up to max_task_bytes alone, and never less than the
    default (frames of several small tasks are fewer with it)."""
    return max(DEFAULT_MAX_MESSAGE_BYTES, max_task_bytes + TASK_FRAME_MARGIN_BYTES)


def encode(msg: AgentMessage | DaemonMessage) -> str:
    """Encode a message; dataclass fields map one to one onto JSON keys."""
    return jsonx.dumps(_to_plain(msg))


def _to_plain(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return {name: _to_plain(getattr(value, name)) for name in value.__dataclass_fields__}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value
