"""The task and instance state machines: every legal edge, in one place.

Each edge is (from_state, event) -> to_state. The store builds its guarded UPDATEs
(`WHERE state IN (...)`) from these tables and refuses anything not listed, so a
transition that is not written down here cannot happen. Terminal states have no edges out.
"""

from __future__ import annotations

from collections.abc import Collection
from enum import StrEnum


class TaskState(StrEnum):
    STAGED = "staged"  # uploaded, not yet visible: the whole upload is validated first
    QUEUED = "queued"  # ready to lease
    LEASED = "leased"  # held by an agent under a visibility timeout and fencing token
    FAILED = "failed"  # an attempt failed; waits out its backoff, then queued again
    SUCCEEDED = "succeeded"
    DEAD = "dead"  # permanent failure, or attempts exhausted
    CANCELLED = "cancelled"


class TaskEvent(StrEnum):
    UPLOAD_COMMITTED = "upload_committed"
    LEASE_GRANTED = "lease_granted"
    SUCCEEDED = "task_succeeded"
    FAILED_RETRYABLE = "task_failed"  # attempts remain: backoff, then retry
    FAILED_DEAD = "task_dead"  # permanent failure or attempts exhausted
    LEASE_EXPIRED = "lease_expired"  # counts as a failed attempt (the agent may have died of the task)
    LEASE_EXPIRED_DEAD = "lease_expired_dead"
    HANDED_BACK = "lease_handed_back"  # drain or spot interruption: no attempt counted
    RETRY_DUE = "retry_due"
    CANCELLED = "task_cancelled"
    RETRY_REQUESTED = "retry_requested"  # cloudtaskctl retry JOB


S, E = TaskState, TaskEvent

TASK_TRANSITIONS: dict[tuple[TaskState, TaskEvent], TaskState] = {
    (S.STAGED, E.UPLOAD_COMMITTED): S.QUEUED,  # the upload validated whole; all of it becomes visible
    (S.STAGED, E.CANCELLED): S.CANCELLED,  # the job was cancelled while its upload streamed in
    (S.QUEUED, E.LEASE_GRANTED): S.LEASED,  # an agent had credit; fencing token = attempt + 1
    (S.QUEUED, E.CANCELLED): S.CANCELLED,  # cloudtaskctl cancel
    (S.LEASED, E.SUCCEEDED): S.SUCCEEDED,  # report with the current token
    (S.LEASED, E.FAILED_RETRYABLE): S.FAILED,  # retryable failure, failures < max_attempts
    (S.LEASED, E.FAILED_DEAD): S.DEAD,  # permanent failure, or failures reached max_attempts
    (S.LEASED, E.LEASE_EXPIRED): S.FAILED,  # no heartbeat within the visibility timeout
    (S.LEASED, E.LEASE_EXPIRED_DEAD): S.DEAD,  # ... and that was the last attempt
    (S.LEASED, E.HANDED_BACK): S.QUEUED,  # drain/interruption: back at once, attempt not counted
    (S.LEASED, E.CANCELLED): S.CANCELLED,  # the agent is told to stop (revoke)
    (S.FAILED, E.RETRY_DUE): S.QUEUED,  # backoff elapsed
    (S.FAILED, E.CANCELLED): S.CANCELLED,
    (S.DEAD, E.RETRY_REQUESTED): S.QUEUED,  # user asked to retry: failure count reset
    (S.CANCELLED, E.RETRY_REQUESTED): S.QUEUED,
}

# Everything else is built from these, in TaskState's order: the API's counts, cloudtaskctl's
# --state choices, the jobs table's counter columns, and every `state IN (...)` the SQL uses.
TASK_STATES: tuple[TaskState, ...] = tuple(TaskState)
TASK_STATE_NAMES: tuple[str, ...] = tuple(s.value for s in TaskState)
# Finished: nothing moves a task out of these but a user's retry.
TERMINAL_TASK_STATES: tuple[TaskState, ...] = (S.SUCCEEDED, S.DEAD, S.CANCELLED)
# Not finished: a job is done when it has none of these.
WAITING_TASK_STATES: tuple[TaskState, ...] = tuple(s for s in TaskState if s not in TERMINAL_TASK_STATES)
# What a cancel moves to cancelled (staged tasks: the upload's own cancel does).
OPEN_TASK_STATES: tuple[TaskState, ...] = (S.QUEUED, S.LEASED, S.FAILED)
# Work done (an attempt ended, never a cancellation): what a job's rate counts.
WORKED_TASK_STATES: tuple[TaskState, ...] = (S.SUCCEEDED, S.DEAD)

# How cloudtaskctl's progress line shows each state: (segment, long label, short label). Tasks of
# states sharing a segment are counted together (staged tasks are as good as queued to a user;
# failed ones wait out a backoff, so they read as retrying).
TASK_STATE_LABELS: dict[TaskState, tuple[str, str, str]] = {
    S.STAGED: ("queued", "queued ", "queue "),
    S.QUEUED: ("queued", "queued ", "queue "),
    S.LEASED: ("leased", "leased ", "lsd "),
    S.FAILED: ("retrying", "retrying ", "retry "),
    S.SUCCEEDED: ("succeeded", "succeeded ", "ok "),
    S.DEAD: ("dead", "dead ", "dead "),
    S.CANCELLED: ("cancelled", "cancelled ", "canc "),
}

# The jobs table keeps one counter column per task state (migration 001): n_<state>.
COUNTER: dict[TaskState, str] = {state: f"n_{state.value}" for state in TaskState}


class InstanceState(StrEnum):
    PENDING = "pending"  # launch requested from the provider
    STARTING = "starting"  # the provider has it; booting / bootstrapping, no agent yet
    RUNNING = "running"  # its agent said hello
    DRAINING = "draining"  # takes no new leases; stops when it holds none
    STOPPING = "stopping"  # termination requested from the provider
    STOPPED = "stopped"  # gone


class InstanceEvent(StrEnum):
    LAUNCHED = "instance_launched"
    LAUNCH_FAILED = "instance_launch_failed"
    AGENT_CONNECTED = "agent_connected"
    START_FAILED = "instance_start_failed"  # bootstrap failed or the agent never connected
    DRAIN = "instance_drain"  # idle, scale-down, cloudtaskctl drain, interruption notice
    LOST = "instance_lost"  # the provider no longer reports it, or its agent is gone too long
    DRAINED = "instance_drained"
    TERMINATED = "instance_terminated"


IS, IE = InstanceState, InstanceEvent

INSTANCE_TRANSITIONS: dict[tuple[InstanceState, InstanceEvent], InstanceState] = {
    (IS.PENDING, IE.LAUNCHED): IS.STARTING,  # the provider accepted the launch
    (IS.PENDING, IE.LAUNCH_FAILED): IS.STOPPED,  # nothing was created; last_error says why
    (IS.STARTING, IE.AGENT_CONNECTED): IS.RUNNING,
    (IS.STARTING, IE.START_FAILED): IS.STOPPING,  # terminate what the provider made; an external
    # instance whose agent never connected within agents.external_connect_timeout_s
    (IS.STARTING, IE.DRAIN): IS.STOPPING,  # no agent yet, nothing to drain (an external one as well)
    (IS.STARTING, IE.LOST): IS.STOPPING,
    (IS.RUNNING, IE.DRAIN): IS.DRAINING,
    (IS.RUNNING, IE.LOST): IS.STOPPING,  # its leases expire on their own and requeue
    (IS.DRAINING, IE.DRAINED): IS.STOPPING,
    (IS.DRAINING, IE.LOST): IS.STOPPING,
    (IS.STOPPING, IE.TERMINATED): IS.STOPPED,  # the provider ended it; an external one at once (no provider)
    (IS.STOPPING, IE.LOST): IS.STOPPED,  # already gone at the provider
}

TERMINAL_INSTANCE_STATES = frozenset({IS.STOPPED})
LIVE_INSTANCE_STATES = frozenset({IS.PENDING, IS.STARTING, IS.RUNNING, IS.DRAINING, IS.STOPPING})
# A job's instances as the API and the status page count them: launched for its worker and not on
# their way out (a stopping one is being terminated and serves no one).
ACTIVE_INSTANCE_STATES: tuple[InstanceState, ...] = (IS.PENDING, IS.STARTING, IS.RUNNING, IS.DRAINING)
# Those whose agent may be out there, connected or about to be (a restarted daemon sets up their tunnels).
AGENT_INSTANCE_STATES: tuple[InstanceState, ...] = (IS.STARTING, IS.RUNNING, IS.DRAINING)


def sql_in(states: Collection[TaskState] | Collection[InstanceState]) -> str:
    """`('queued', 'leased')`: the text of an SQL IN list, in the enum's order, built once at import by
    whoever needs it (task or instance states)."""
    order: list[StrEnum] = [*TaskState, *InstanceState]
    return "(" + ", ".join(f"'{s.value}'" for s in sorted(states, key=order.index)) + ")"


def sql_lit(state: TaskState | InstanceState) -> str:
    """`'leased'`: one state as an SQL string literal (so no SQL outside the tables types it)."""
    return f"'{state.value}'"


def counter_sum(states: tuple[TaskState, ...], prefix: str = "") -> str:
    """`n_queued + n_leased`: the sum of the jobs table's counters for those states (prefix: `j.`)."""
    return " + ".join(f"{prefix}{COUNTER[s]}" for s in states)


def task_sources(event: TaskEvent) -> tuple[TaskState, ...]:
    """The states an event may move a task out of (for `WHERE state IN (...)`)."""
    return tuple(src for (src, ev) in TASK_TRANSITIONS if ev == event)


def task_target(event: TaskEvent) -> TaskState:
    targets = {dst for (_, ev), dst in TASK_TRANSITIONS.items() if ev == event}
    if len(targets) != 1:
        raise ValueError(f"event {event} does not lead to exactly one state: {targets}")
    return targets.pop()


def instance_next(state: InstanceState, event: InstanceEvent) -> InstanceState | None:
    """The state an instance moves to, or None when the edge is not legal."""
    return INSTANCE_TRANSITIONS.get((state, event))


def job_done(state: str, counts: dict[str, int], is_open: bool = False) -> bool:
    """Nothing left to do: no task staged, queued, leased or failed (waiting to retry), at least one
    task, and not open for more (an open job is done only once closed; a cancelled one takes no more).
    `counts` holds a count per TaskState and `total`."""
    total = counts.get("total", 0)
    waiting = sum(counts.get(s, 0) for s in WAITING_TASK_STATES)
    return total > 0 and waiting == 0 and (not is_open or state == "cancelled")


def job_outcome(state: str, counts: dict[str, int], is_open: bool = False) -> str | None:
    """What happened to a job, once it is over: succeeded (every task), failed (some dead),
    cancelled; None while it still has work, or is open for more (is_open). `counts` holds a count
    per TaskState and `total`. One answer for the API, cloudtaskctl and the status page: a cancelled
    or failed job must never read as merely `done`."""
    total = counts.get("total", 0)
    done = job_done(state, counts, is_open)
    if state == "cancelled" and (done or not total):
        return "cancelled"
    if not done:
        return None
    if counts.get(S.SUCCEEDED, 0) == total:
        return "succeeded"
    return "failed" if counts.get(S.DEAD, 0) else "cancelled"


def task_edge(src: TaskState, dst: TaskState) -> None:
    """Assert an edge is in the table (the bulk SQL in tables/tasks.py states its edges through this)."""
    if not any(s == src and d == dst for (s, _), d in TASK_TRANSITIONS.items()):
        raise AssertionError(f"illegal task transition {src} -> {dst}")
