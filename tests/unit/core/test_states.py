"""The state machines, edge by edge."""

from __future__ import annotations

import pytest

from cloudtaskd.core.states import (
    INSTANCE_TRANSITIONS,
    TASK_TRANSITIONS,
    TERMINAL_INSTANCE_STATES,
    TERMINAL_TASK_STATES,
    InstanceEvent,
    InstanceState,
    TaskEvent,
    TaskState,
    instance_next,
    task_edge,
    task_sources,
)


def test_every_task_state_is_reachable_and_non_terminal_ones_can_leave() -> None:
    targets = {dst for dst in TASK_TRANSITIONS.values()}
    sources = {src for (src, _) in TASK_TRANSITIONS}
    for state in TaskState:
        if state != TaskState.STAGED:
            assert state in targets, f"{state} is never entered"
        if state not in TERMINAL_TASK_STATES:
            assert state in sources, f"{state} has no way out"


def test_succeeded_is_final() -> None:
    assert not any(src == TaskState.SUCCEEDED for (src, _) in TASK_TRANSITIONS)


@pytest.mark.parametrize(("edge", "dst"), list(TASK_TRANSITIONS.items()), ids=lambda v: str(v))
def test_each_task_edge_is_accepted(edge: tuple[TaskState, TaskEvent], dst: TaskState) -> None:
    src, event = edge
    task_edge(src, dst)
    assert src in task_sources(event)


def test_illegal_task_edges_are_refused() -> None:
    with pytest.raises(AssertionError):
        task_edge(TaskState.SUCCEEDED, TaskState.QUEUED)
    with pytest.raises(AssertionError):
        task_edge(TaskState.QUEUED, TaskState.SUCCEEDED)


@pytest.mark.parametrize(("edge", "dst"), list(INSTANCE_TRANSITIONS.items()), ids=lambda v: str(v))
def test_each_instance_edge(edge: tuple[InstanceState, InstanceEvent], dst: InstanceState) -> None:
    assert instance_next(*edge) == dst


def test_instance_graph_shape() -> None:
    for state in InstanceState:
        outgoing = [e for e in InstanceEvent if instance_next(state, e) is not None]
        if state in TERMINAL_INSTANCE_STATES:
            assert outgoing == []
        else:
            assert outgoing, f"{state} has no way out"
    assert instance_next(InstanceState.STOPPED, InstanceEvent.AGENT_CONNECTED) is None
    assert instance_next(InstanceState.RUNNING, InstanceEvent.LAUNCHED) is None
