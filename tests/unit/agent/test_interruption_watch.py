"""The spot-interruption watchers against local stand-ins of the three metadata services
(tests/fakes/metadata_standin.py), which refuse what the real services refuse."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent import interruption
from agent.connection import Agent
from agent.interruption import Notice, watch
from cloudtask_wire.messages import Notice as NoticeMessage
from cloudtask_wire.workerspec import WorkerSpec
from tests.fakes.metadata_standin import MetadataStandin, metadata_standin

POLL_S = 0.05


async def until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll until cond() is truthy; fail at the deadline (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


@dataclass
class Run:
    task: asyncio.Task[None] = field(init=False)
    notices: list[Notice] = field(default_factory=list)
    logs: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def log(self, event: str, **fields: Any) -> None:
        self.logs.append((event, fields))

    def errors(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [f for e, f in self.logs if e == "interruption_watch_error" and kind in (None, f["kind"])]


@asynccontextmanager
async def watching(source: str, url: str, *, clock: Callable[[], float] = time.time) -> AsyncIterator[Run]:
    """A watch task for the block; it must still be running at the end (only cancelling ends it)."""
    run = Run()
    run.task = asyncio.create_task(watch(source, run.notices.append, base_url=url, poll_s=POLL_S, log=run.log,
                                         clock=clock))
    try:
        yield run
        if run.task.done():
            raise AssertionError(f"the watch ended by itself: {run.task.exception()!r}")
    finally:
        run.task.cancel()
        await asyncio.gather(run.task, return_exceptions=True)


async def more_polls(standin: MetadataStandin, route: str, n: int = 5) -> None:
    """Let the watcher poll `route` n more times (to show nothing more gets reported)."""
    target = standin.requests[route] + n
    await until(lambda: standin.requests[route] >= target, what=f"{n} more polls of {route}")


def free_port() -> int:
    """A local port nothing listens on (a connection to it is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture
def short_gcp_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """GCP long polls of 1 s instead of 60, so that quiet polls can be counted."""
    monkeypatch.setattr(interruption, "GCP_WAIT_S", 1)


# ---- common ----


async def test_unknown_source_raises_at_once() -> None:
    with pytest.raises(ValueError, match="oracle"):
        await watch("oracle", lambda n: None)


async def test_standin_enforces_the_real_protocols() -> None:
    """The stand-ins refuse what the real services refuse, so the watcher's passing tests mean something."""
    async with aiohttp.ClientSession() as http:
        async with metadata_standin("aws") as aws:
            async with http.put(aws.url + "/latest/api/token") as r:
                assert r.status == 400  # no TTL header
            async with http.get(aws.url + interruption.AWS_ACTION_PATH) as r:
                assert r.status == 401  # no token
            async with http.get(aws.url + interruption.AWS_ACTION_PATH,
                                headers={"X-aws-ec2-metadata-token": "made-up"}) as r:
                assert r.status == 401
            async with http.put(aws.url + "/latest/api/token",
                                headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"}) as r:
                token = await r.text()
            async with http.get(aws.url + interruption.AWS_ACTION_PATH,
                                headers={"X-aws-ec2-metadata-token": token}) as r:
                assert r.status == 404  # no notice yet
            aws.aws_expire_tokens()
            async with http.get(aws.url + interruption.AWS_ACTION_PATH,
                                headers={"X-aws-ec2-metadata-token": token}) as r:
                assert r.status == 401
        async with metadata_standin("gcp") as gcp:
            async with http.get(gcp.url + interruption.GCP_PREEMPTED_PATH) as r:
                assert r.status == 403
            async with http.get(gcp.url + interruption.GCP_PREEMPTED_PATH, headers={"Metadata-Flavor": "Google"}) as r:
                assert (r.status, await r.text()) == (200, "FALSE")
        async with metadata_standin("azure") as azure:
            async with http.get(azure.url + interruption.AZURE_EVENTS_PATH) as r:
                assert r.status == 400
            async with http.get(azure.url + "/metadata/scheduledevents", headers={"Metadata": "true"}) as r:
                assert r.status == 400  # no api-version
            async with http.get(azure.url + interruption.AZURE_NAME_PATH, headers={"Metadata": "true"}) as r:
                assert (r.status, await r.text()) == (200, "ctvm-1")


@pytest.mark.usefixtures("short_gcp_wait")
@pytest.mark.parametrize(("source", "route"), [("aws", "aws_token"), ("aws", "aws_action"),
                                                ("gcp", "gcp_preempted"), ("azure", "azure_events")])
async def test_cancelling_ends_the_watch_promptly_even_mid_request(source: str, route: str) -> None:
    async with metadata_standin(source) as standin:
        standin.hang_next(None, route=route)
        task = asyncio.create_task(watch(source, lambda n: None, base_url=standin.url, poll_s=POLL_S,
                                         log=lambda event, **f: None))
        await until(lambda: standin.requests[route] >= 1, what="a held request")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=5)  # a deadline, not a measurement
        assert task.cancelled()


async def test_unreachable_service_keeps_the_watch_running_and_it_recovers() -> None:
    port = free_port()
    async with watching("aws", f"http://127.0.0.1:{port}") as run:
        await until(lambda: run.errors("unreachable"), what="the error logged")
        assert not run.task.done()
        async with metadata_standin("aws", port=port) as aws:  # the service comes up on that port
            aws.aws_interrupt("terminate", "2026-11-23T10:02:00Z")
            await until(lambda: run.notices, what="the notice once the service is reachable")
            await more_polls(aws, "aws_action")
        assert len(run.errors("unreachable")) == 1  # logged once, however many attempts failed
        assert any(e == "interruption_watch_recovered" for e, _ in run.logs)
        assert [n.detail for n in run.notices] == ["terminate"]


# ---- AWS ----


async def test_aws_no_notice_while_polling() -> None:
    async with metadata_standin("aws") as aws, watching("aws", aws.url) as run:
        await more_polls(aws, "aws_action", 5)
        await more_polls(aws, "aws_rebalance", 5)
        assert run.notices == []
        assert aws.tokens_issued == 1  # one token serves all polls
        assert aws.refused == {}
        assert run.errors() == []


async def test_aws_interruption_reported_once_with_its_deadline() -> None:
    async with metadata_standin("aws") as aws, watching("aws", aws.url) as run:
        await more_polls(aws, "aws_action", 2)
        aws.aws_interrupt("stop", "2026-11-23T10:02:00Z")
        await until(lambda: run.notices, what="the notice")
        await more_polls(aws, "aws_action")
    deadline = datetime(2026, 11, 23, 10, 2, tzinfo=UTC).timestamp()
    assert run.notices == [Notice("interruption", "aws", deadline, "stop")]


async def test_aws_a_changed_action_is_reported_again() -> None:
    async with metadata_standin("aws") as aws, watching("aws", aws.url) as run:
        aws.aws_interrupt("stop", "2026-11-23T10:02:00Z")
        await until(lambda: run.notices, what="the first notice")
        aws.aws_interrupt("terminate", "2026-11-23T10:04:00Z")
        await until(lambda: len(run.notices) == 2, what="the second notice")
        await more_polls(aws, "aws_action")
    assert [(n.detail, n.deadline) for n in run.notices] == [
        ("stop", datetime(2026, 11, 23, 10, 2, tzinfo=UTC).timestamp()),
        ("terminate", datetime(2026, 11, 23, 10, 4, tzinfo=UTC).timestamp())]


async def test_aws_rebalance_then_interruption() -> None:
    async with metadata_standin("aws") as aws, watching("aws", aws.url) as run:
        aws.aws_rebalance("2026-11-23T09:58:00Z")
        await until(lambda: run.notices, what="the rebalance notice")
        await more_polls(aws, "aws_rebalance")
        assert run.notices == [Notice("rebalance", "aws", None, "rebalance")]
        aws.aws_interrupt("terminate", "2026-11-23T10:02:00Z")
        await until(lambda: len(run.notices) == 2, what="the interruption notice")
        await more_polls(aws, "aws_action")
        await more_polls(aws, "aws_rebalance")
    assert [n.kind for n in run.notices] == ["rebalance", "interruption"]


async def test_aws_expired_token_is_replaced_and_polling_goes_on() -> None:
    async with metadata_standin("aws") as aws, watching("aws", aws.url) as run:
        await more_polls(aws, "aws_action", 2)
        assert aws.tokens_issued == 1
        aws.aws_expire_tokens()
        await until(lambda: aws.tokens_issued == 2, what="a new token")
        assert aws.refused["aws_action"] + aws.refused["aws_rebalance"] == 1  # one 401, then the new token
        aws.aws_interrupt("terminate", "2026-11-23T10:02:00Z")
        await until(lambda: run.notices, what="the notice with the new token")
        await more_polls(aws, "aws_action")
        assert aws.tokens_issued == 2
        assert run.errors() == []  # a refused token is routine, not an error


async def test_aws_token_renewed_before_its_ttl_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(interruption, "AWS_TOKEN_TTL_S", 2)  # renewed after 1 s (margin: half the TTL)
    async with metadata_standin("aws") as aws, watching("aws", aws.url):
        await until(lambda: aws.tokens_issued >= 3, what="two renewals")
        assert aws.refused == {}  # never used a dead token


async def test_aws_server_errors_and_garbage_do_not_stop_the_watch() -> None:
    async with metadata_standin("aws") as aws, watching("aws", aws.url) as run:
        aws.fail_next(6, 500, route="aws_action")
        await until(lambda: aws.requests["aws_action"] >= 6, what="the failing polls")
        aws.garbage_next(4, route="aws_rebalance")
        aws.fail_next(2, 503, route="aws_token")
        aws.aws_expire_tokens()
        aws.aws_interrupt("terminate", "2026-11-23T10:02:00Z")
        await until(lambda: run.notices, what="the notice after the errors")
        await more_polls(aws, "aws_rebalance")
    # Each kind of error logged once, not once per failed poll.
    assert sorted(f["kind"] for f in run.errors()) == ["bad_body", "http_500", "token_http_503"]
    assert len(run.notices) == 1


# ---- GCP ----


@pytest.mark.usefixtures("short_gcp_wait")
async def test_gcp_no_notice_while_waiting() -> None:
    async with metadata_standin("gcp") as gcp, watching("gcp", gcp.url) as run:
        await more_polls(gcp, "gcp_preempted", 3)  # the first read, then long polls that time out
        assert run.notices == []
        assert run.errors() == []


async def test_gcp_preemption_seen_by_the_long_poll_and_reported_once() -> None:
    async with metadata_standin("gcp") as gcp, watching("gcp", gcp.url, clock=lambda: 1000.0) as run:
        await until(lambda: gcp.requests["gcp_preempted"] >= 2, what="the long poll")
        gcp.gcp_preempt()
        # The wait is 60 s: a notice within the 10 s deadline came from the long poll, not a timeout.
        await until(lambda: run.notices, what="the notice")
        assert run.notices == [Notice("interruption", "gcp", 1030.0, "preempted")]
        assert gcp.requests["gcp_preempted"] <= 3


async def test_gcp_preemption_between_two_reads_is_not_missed() -> None:
    """The long poll names the value it last saw (last_etag): a change made while no request was
    waiting answers the next one at once, instead of after the whole 60 s wait."""
    async with metadata_standin("gcp") as gcp:
        gcp.hang_next(1, after=1)  # the first read answers; the first long poll is held
        async with watching("gcp", gcp.url) as run:
            await until(lambda: gcp.requests["gcp_preempted"] >= 2, what="the held long poll")
            gcp.gcp_preempt()  # while the only request in flight is one that cannot see it
            gcp.release_hung()  # it answers 503; the next long poll must see TRUE at once
            await until(lambda: run.notices, what="the notice")
    assert [n.detail for n in run.notices] == ["preempted"]
    assert gcp.requests["gcp_preempted"] <= 4


@pytest.mark.usefixtures("short_gcp_wait")
async def test_gcp_already_preempted_at_start_is_reported_once() -> None:
    async with metadata_standin("gcp") as gcp:
        gcp.gcp_preempt()
        async with watching("gcp", gcp.url, clock=lambda: 50.0) as run:
            await until(lambda: run.notices, what="the notice")
            await more_polls(gcp, "gcp_preempted", 2)
    assert run.notices == [Notice("interruption", "gcp", 80.0, "preempted")]


async def test_gcp_errors_garbage_and_a_hung_wait_do_not_stop_the_watch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(interruption, "GCP_WAIT_S", 1)
    monkeypatch.setattr(interruption, "READ_TIMEOUT_S", 0.3)
    async with metadata_standin("gcp") as gcp, watching("gcp", gcp.url) as run:
        await until(lambda: gcp.requests["gcp_preempted"] >= 1, what="the first read")
        gcp.fail_next(3, 503)
        gcp.garbage_next(2)
        gcp.hang_next(1)
        await until(lambda: not gcp.faults_pending, what="the faults served")
        gcp.gcp_preempt()
        await until(lambda: run.notices, what="the notice after the errors")
    assert sorted(f["kind"] for f in run.errors()) == ["bad_body", "http_503", "timeout"]
    assert len(run.notices) == 1


# ---- Azure ----


async def test_azure_wakes_the_service_first_and_reports_nothing_without_events() -> None:
    async with metadata_standin("azure") as azure, watching("azure", azure.url) as run:
        await more_polls(azure, "azure_events", 5)
        assert azure.calls[0] == "azure_events"  # the first call turns Scheduled Events on
        assert azure.requests["azure_name"] == 1
        assert run.notices == []
        assert azure.refused == {}


async def test_azure_preempt_reported_once_with_its_deadline() -> None:
    async with metadata_standin("azure") as azure, watching("azure", azure.url) as run:
        await more_polls(azure, "azure_events", 2)
        event_id = azure.azure_event("Preempt", ["ctvm-1"], "Mon, 19 Sep 2016 18:29:47 GMT")
        await until(lambda: run.notices, what="the notice")
        await more_polls(azure, "azure_events")
        # Once started, the same event has no NotBefore: still the same event.
        azure.azure_event("Preempt", ["ctvm-1"], "", event_id=event_id, status="Started")
        await more_polls(azure, "azure_events")
    deadline = datetime(2016, 9, 19, 18, 29, 47, tzinfo=UTC).timestamp()
    assert run.notices == [Notice("interruption", "azure", deadline, f"Preempt {event_id}")]


async def test_azure_ignores_other_vms_and_other_event_types() -> None:
    async with metadata_standin("azure") as azure, watching("azure", azure.url) as run:
        azure.azure_event("Freeze", ["ctvm-1"])
        azure.azure_event("Reboot", ["ctvm-1"])
        azure.azure_event("Preempt", ["ctvm-2", "ctvm-3"])
        await more_polls(azure, "azure_events", 5)
        assert run.notices == []
        ours = azure.azure_event("Preempt", ["ctvm-0", "CTVM-1"], "")  # names are case-insensitive
        await until(lambda: run.notices, what="our notice")
        await more_polls(azure, "azure_events")
    assert run.notices == [Notice("interruption", "azure", None, f"Preempt {ours}")]


async def test_azure_never_acts_without_knowing_the_vm_name() -> None:
    async with metadata_standin("azure") as azure, watching("azure", azure.url) as run:
        azure.fail_next(None, 500, route="azure_name")
        azure.azure_event("Preempt", ["ctvm-1"])
        await until(lambda: azure.requests["azure_name"] >= 4, what="the name asked for again")
        await more_polls(azure, "azure_events", 2)
        assert run.notices == []
        assert len(run.errors("name_http_500")) == 1
        azure.clear_faults()
        await until(lambda: run.notices, what="the notice once the name is known")
    assert run.notices[0].source == "azure"


async def test_azure_errors_and_garbage_do_not_stop_the_watch() -> None:
    async with metadata_standin("azure") as azure, watching("azure", azure.url) as run:
        await until(lambda: azure.requests["azure_name"] >= 1, what="the name")
        azure.fail_next(4, 500, route="azure_events")
        azure.garbage_next(3, route="azure_events")
        await until(lambda: not azure.faults_pending, what="the faults served")
        azure.azure_event("Preempt", ["ctvm-1"])
        await until(lambda: run.notices, what="the notice after the errors")
        await more_polls(azure, "azure_events")
    assert sorted(f["kind"] for f in run.errors()) == ["bad_body", "http_500"]
    assert len(run.notices) == 1


# ---- the agent's drain on a notice ----


@pytest.mark.parametrize(("seconds_left", "expected_grace"), [(120.0, 110.0), (25.0, 15.0), (5.0, 0.0), (None, 60.0)])
async def test_the_agent_drains_until_the_clouds_deadline_less_the_margin(
        tmp_path: Path, seconds_left: float | None, expected_grace: float) -> None:
    agent = Agent("wss://127.0.0.1:1/", "i-1", "token", tmp_path, 2, drain_grace_s=60.0,
                  spec=WorkerSpec(mode="command", command="true"), interruption_margin_s=10.0)
    loop = asyncio.get_running_loop()
    deadline = None if seconds_left is None else time.time() + seconds_left
    agent.on_notice(NoticeMessage("interruption", "aws", deadline, "terminate"))
    try:
        assert agent.draining and agent.drain_reason == "interruption"
        # An AWS notice's two minutes are used (110 s), not cut to the daemon's 60 s drain grace;
        # without a deadline the drain grace applies.
        assert agent._drain_deadline - loop.time() == pytest.approx(expected_grace, abs=1.0)
        # A later drain with a longer grace (SIGTERM, the daemon) never extends the cloud's deadline.
        agent.start_drain("signal", grace_s=expected_grace + 100)
        assert agent._drain_deadline - loop.time() == pytest.approx(expected_grace, abs=1.0)
    finally:
        if agent._drain_timer is not None:
            agent._drain_timer.cancel()


async def test_a_rebalance_notice_does_not_drain_the_agent(tmp_path: Path) -> None:
    agent = Agent("wss://127.0.0.1:1/", "i-1", "token", tmp_path, 2,
                  spec=WorkerSpec(mode="command", command="true"))
    agent.on_notice(NoticeMessage("rebalance", "aws", None, "recommendation"))
    assert not agent.draining and len(agent.notices) == 1
