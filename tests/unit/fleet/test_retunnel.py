"""Which tunnelled agents the leader re-tunnels (fleet/retunnel.py): only those no replica holds."""

from __future__ import annotations

from typing import Any

from cloudtaskd.fleet.retunnel import orphans

TTL = 6.0
NOW = 1000.0


def _row(inst: str, state: str = "running", seen: float | None = None) -> dict[str, Any]:
    return {"id": inst, "provider": "ssh", "state": state, "last_seen_at": seen}


def test_only_agents_connected_nowhere_and_past_their_bootstrap_are_orphans() -> None:
    rows = [
        _row("gone", seen=NOW - TTL - 1),  # its replica stopped writing it: orphaned
        _row("never", seen=None),  # running, never written present (a restart of every replica)
        _row("draining", state="draining", seen=NOW - 60),
        _row("elsewhere", seen=NOW - 1),  # another replica wrote it present lately: left alone
        _row("here", seen=NOW - 60),  # connected to this replica
        _row("tunnelled", seen=NOW - 60),  # this replica already keeps its tunnel
        _row("booting", state="starting"),  # maybe this leader's own bootstrap: its launch tunnels it
    ]
    got = orphans(rows, here={"here"}, tunnelled={"tunnelled"}, now=NOW, presence_ttl_s=TTL)
    assert [r["id"] for r in got] == ["gone", "never", "draining"]
