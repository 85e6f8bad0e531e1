"""What a table function is handed: the write transaction (`Tx`) and, for the few that drive a
chunked change across transactions, the store's doors (`Doors`). Both are Protocols, so the table
modules stand below the stores that implement them (core/store.py, core/pg/store.py) and a store
may call its tables at commit (counters, events) without an import circle."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from cloudtaskd.core.states import InstanceEvent, InstanceState, TaskState

T = TypeVar("T")


class Tx(Protocol):
    """One write transaction on the writer thread (core/store.Transaction): its connection, its
    time, and the buffered counters and events it writes at commit."""

    db: sqlite3.Connection
    now: float
    sql_events: bool  # a statement wrote event rows itself: the commit wakes the event followers

    def event(self, kind: str, *, job_id: int | None = None, task_id: int | None = None,
              instance_id: str | None = None, detail: str | None = None) -> None: ...

    def count(self, job_id: int, src: TaskState | None, dst: TaskState | None, n: int = 1) -> None: ...

    def transition_instance(self, instance_id: str, event: InstanceEvent, *, error: str | None = None,
                            **columns: Any) -> InstanceState: ...


class Doors(Protocol):
    """A store's two doors: a write transaction and a read, each run on the store's own thread;
    and, after a change of thousands of rows, the planner's statistics of the table refreshed."""

    async def write(self, fn: Callable[..., T], *args: Any, now: float | None = None, urgent: bool = False) -> T: ...

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T: ...

    def analyze(self, table: str, rows: int) -> None: ...
