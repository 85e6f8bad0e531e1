"""Fast encoders for the busy frames: grants (daemon -> agent), reports and credit (agent -> daemon).

Thousands of tasks a second go through these, so they write JSON text directly: a granted task's
data is the JSON the store already holds, spliced in verbatim (never decoded and encoded again),
and a round's grant is one join. Each encoder here must equal messages.encode() of the message it
stands for, parsed back (tests/unit/wire/test_wire.py checks every one); a new field goes into the message
dataclass first, then here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from cloudtask_wire import jsonx
from cloudtask_wire.messages import Failure, LeaseRef, Success

# ---- daemon -> agent: grants ------------------------------------------------------------------

GRANT_HEAD = '{"t":"grant","tasks":['
_TASK_REF = re.compile(r'\{"id":(\d+),"token":(\d+),')


def wire_len(text: str) -> int:
    """A frame's size on the wire (UTF-8 bytes), which is what websocket limits count: one character
    may take up to 4. isascii() is O(1) in CPython: the usual frame costs nothing."""
    return len(text) if text.isascii() else len(text.encode())


def task_entry(task_id: int, token: int, key: str, timeout_s: float | None, data_json: str) -> str:
    """One GrantedTask as JSON, `data_json` (the stored task data, already JSON) spliced in."""
    dumps = jsonx.dumps
    return f'{{"id":{task_id},"token":{token},"key":{dumps(key)},"timeout_s":{dumps(timeout_s)},"data":{data_json}}}'


def task_ref(entry: str) -> LeaseRef:
    """(task id, token) of a task_entry() (the rare path: a task too big for the agent's frames)."""
    match = _TASK_REF.match(entry)
    if match is None:
        raise ValueError(f"not a task entry written by task_entry(): {entry[:60]!r}")
    return int(match.group(1)), int(match.group(2))


def ack_fields(ok: list[int], refused: list[int]) -> str:
    """A round's acks as the fields a grant carries them in (ACK_IN_GRANT): ',"ok":[..],"refused":[..]'."""
    return f',"ok":{jsonx.dumps(ok)},"refused":{jsonx.dumps(refused)}'


def grant_frames(tasks: list[str], limit_bytes: int, acks: str = "") -> tuple[list[str], list[int]]:
    """Task entries (task_entry()) as grant frames each smaller than limit_bytes in UTF-8 (a websocket
    refuses a frame of max_msg_size bytes or more), in order, each task once. `acks` (ack_fields()
    or "") rides in the first frame, alone when it would not fit beside the first task (acks are not
    split: a round acks the reports one agent sent since the last, a few ids per task it holds).
    Returns (frames, indexes of tasks that fit in no frame even alone: the caller must not send them).

    The usual round costs one sum of str lengths: while 4 bytes a character fit, nothing is encoded."""
    fixed = len(GRANT_HEAD) + 2 + len(acks)  # "]" and "}"
    chars = sum(map(len, tasks)) + len(tasks) + fixed
    if chars * 4 < limit_bytes:
        return [GRANT_HEAD + ",".join(tasks) + "]" + acks + "}"], []
    frames: list[str] = []
    oversize: list[int] = []
    part: list[str] = []
    base = len(GRANT_HEAD) + 2
    extra = wire_len(acks)  # what the first frame carries beyond its tasks
    size = base + extra
    for i, task in enumerate(tasks):
        n = wire_len(task) + 1  # its comma
        if base + n >= limit_bytes:
            oversize.append(i)
            continue
        if size + n >= limit_bytes:
            # Close the frame so far; with no task in it yet it carries only the acks.
            frames.append(GRANT_HEAD + ",".join(part) + "]" + (acks if extra else "") + "}")
            part, size, extra = [], base, 0
        part.append(task)
        size += n
    if part or extra:
        frames.append(GRANT_HEAD + ",".join(part) + "]" + (acks if extra else "") + "}")
    return frames, oversize


# ---- agent -> daemon: credit and reports ------------------------------------------------------

FRAME_OVERHEAD = 256  # a report frame's own JSON around its items, with room to spare
DONE_HEAD, DONE_TAIL = '{"t":"done","results":[', "]}"
FAIL_HEAD, FAIL_TAIL = '{"t":"fail","failures":[', "]}"
HANDBACK_HEAD = '{"t":"handback","leases":['


def lease_frame(n: int) -> str:
    """LeaseRequest(n)."""
    return f'{{"t":"lease","n":{n}}}'


def _success(s: Success) -> dict[str, object]:
    return {"id": s.id, "token": s.token, "result": s.result, "duration_s": s.duration_s}


def _failure(f: Failure) -> dict[str, object]:
    return {"id": f.id, "token": f.token, "error": f.error, "retryable": f.retryable, "duration_s": f.duration_s}


def done_frame(results: Sequence[Success], n: int = 0) -> str:
    """Complete(results, n) in one frame (one encode: the usual flush)."""
    items = [_success(s) for s in results]
    return jsonx.dumps({"t": "done", "results": items, "n": n} if n else {"t": "done", "results": items})


def success_item(s: Success) -> str:
    """One Success as JSON, for pack(DONE_HEAD, items, DONE_TAIL, ...) when one frame is too small."""
    return jsonx.dumps(_success(s))


def fail_frames(failures: Iterable[Failure], limit_bytes: int) -> list[str]:
    """Fail(failures) in as few frames as fit under limit_bytes."""
    return pack(FAIL_HEAD, [jsonx.dumps(_failure(f)) for f in failures], FAIL_TAIL, limit_bytes)


def handback_frames(leases: Iterable[LeaseRef], reason: str, limit_bytes: int) -> list[str]:
    """Handback(leases, reason) in as few frames as fit under limit_bytes."""
    tail = f"],\"reason\":{jsonx.dumps(reason)}}}"
    return pack(HANDBACK_HEAD, [f"[{task_id},{token}]" for task_id, token in leases], tail, limit_bytes)


def pack(head: str, items: list[str], tail: str, limit_bytes: int) -> list[str]:
    """Encoded items as few frames as fit under the daemon's message limit (a bigger frame would
    close the connection, and the same frame would be resent after every reconnect)."""
    frames: list[str] = []
    part: list[str] = []
    # In bytes, head and tail too: a hand-back's reason may be up to 200 characters of 4 bytes each.
    fixed = wire_len(head) + wire_len(tail)
    size = fixed
    for item in items:
        n = wire_len(item)
        if part and size + n + 1 > limit_bytes - FRAME_OVERHEAD:
            frames.append(head + ",".join(part) + tail)
            part, size = [], fixed
        part.append(item)
        size += n + 1
    if part:
        frames.append(head + ",".join(part) + tail)
    return frames
