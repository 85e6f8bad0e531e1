"""Grant packing (cloudtask_wire.frames.grant_frames): every frame under the agent's limit in UTF-8 bytes, each
task exactly once and in order, the acks in the first frame, a task too big for any frame set aside."""

from __future__ import annotations

import json
import random

import pytest

from cloudtask_wire.frames import GRANT_HEAD, grant_frames
from cloudtask_wire.messages import TASK_FRAME_MARGIN_BYTES, frame_limit_for, parse_daemon_message


def task(i: int, data_chars: int, char: str = "x") -> str:
    return f'{{"id":{i},"token":1,"key":"k{i}","timeout_s":null,"data":"{char * data_chars}"}}'


def unpack(frames: list[str]) -> tuple[list[int], list[list[int]]]:
    ids: list[int] = []
    oks: list[list[int]] = []
    for frame in frames:
        grant = parse_daemon_message(frame)
        ids += [t.id for t in grant.tasks]  # type: ignore[union-attr]
        oks.append(grant.ok)  # type: ignore[union-attr]
    return ids, oks


def test_small_tasks_go_in_one_frame_as_before() -> None:
    tasks = [task(i, 10) for i in range(100)]
    frames, oversize = grant_frames(tasks, 4 * 1024 * 1024, ',"ok":[7],"refused":[]')
    assert frames == [GRANT_HEAD + ",".join(tasks) + '],"ok":[7],"refused":[]}'] and oversize == []


@pytest.mark.parametrize("char", ["x", "é", "😀"], ids=["ascii", "2-byte", "4-byte"])
@pytest.mark.parametrize("seed", range(20))
def test_frames_stay_under_the_limit_with_every_task_once_in_order(char: str, seed: int) -> None:
    rng = random.Random(seed)
    limit = rng.choice([1024, 4096, 65536])
    tasks = [task(i, rng.choice([0, 5, 50, 300, 1000, 3000]), char) for i in range(rng.randint(0, 60))]
    many = ',"ok":[' + ",".join(map(str, range(400))) + '],"refused":[]'  # fits alone in 4 KiB, not 1 KiB
    acks = rng.choice(["", ',"ok":[1,2,3],"refused":[4]'] + ([many] if limit > 1024 else []))
    frames, oversize = grant_frames(tasks, limit, acks)
    for frame in frames:
        assert len(frame.encode()) < limit, "a frame of the limit or more is refused (1009)"
        json.loads(frame)
    ids, oks = unpack(frames)
    alone = [i for i, t in enumerate(tasks) if len((GRANT_HEAD + t + "]}").encode()) >= limit]
    assert oversize == alone  # set aside only what fits in no frame, even alone
    assert ids == [i for i in range(len(tasks)) if i not in alone]  # each once, in order
    if acks:
        assert oks[0] == json.loads("{" + acks[1:] + "}")["ok"] and all(ok == [] for ok in oks[1:])
    # Packed, not one task a frame: each frame but the last could not take the next task.
    assert len(frames) <= max(1, len(ids)) + (1 if acks else 0)


def test_a_task_too_big_for_any_frame_is_set_aside_and_the_rest_delivered() -> None:
    limit = 10_000
    tasks = [task(0, 100), task(1, 20_000), task(2, 100)]
    frames, oversize = grant_frames(tasks, limit)
    assert oversize == [1]
    assert unpack(frames)[0] == [0, 2]
    assert grant_frames([task(1, 20_000)], limit) == ([], [1 - 1])


def test_acks_too_big_to_share_go_in_a_frame_of_their_own() -> None:
    limit = 10_000
    acks = ',"ok":[' + ",".join(map(str, range(1500))) + '],"refused":[]'
    big = task(0, 8_000)
    frames, oversize = grant_frames([big], limit, acks)
    assert oversize == [] and len(frames) == 2
    ids, oks = unpack(frames)
    assert ids == [0] and oks[0] == list(range(1500)) and oks[1] == []


def test_the_frame_limit_fits_the_largest_task_alone() -> None:
    """A task of max_task_bytes of data with the longest key a task file allows (512 characters, each
    escaped to 6 bytes) and the biggest numbers still fits in a frame of frame_limit_for() bytes."""
    max_task = 5 * 1024 * 1024
    key = json.dumps("\u0001" * 512)
    worst = (f'{{"id":{2**62},"token":{2**62},"key":{key},"timeout_s":1.7976931348623157e+308,'
             f'"data":"{"x" * (max_task - 2)}"}}')
    limit = frame_limit_for(max_task)
    assert limit == max_task + TASK_FRAME_MARGIN_BYTES
    frames, oversize = grant_frames([worst], limit, "")
    assert oversize == [] and len(frames) == 1


def test_the_hello_carries_the_agents_frame_limit() -> None:
    """Said: the daemon packs under it. Not said (an older agent) or 0: the old default is assumed.
    Below 1 KiB: a protocol error naming the field."""
    from cloudtask_wire.messages import Hello, ProtocolError, encode, parse_agent_message

    said = parse_agent_message(encode(Hello("i", "t", 2, [], max_message_bytes=65536)))
    assert isinstance(said, Hello) and said.max_message_bytes == 65536
    assert parse_agent_message(encode(Hello("i", "t", 2, []))).max_message_bytes == 0  # type: ignore[union-attr]
    old = '{"t":"hello","version":1,"instance":"i","token":"t","slots":2,"held":[]}'
    assert parse_agent_message(old).max_message_bytes == 0  # type: ignore[union-attr]
    with pytest.raises(ProtocolError, match="max_message_bytes"):
        parse_agent_message(old[:-1] + ',"max_message_bytes":500}')
