"""The control API's handlers (api.py) through aiohttp's test server on 127.0.0.1, on a real Store:
job creation, parameters refused with the field named, unknown jobs, cancel and delete answers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from cloudtaskd.core.dispatch import Dispatcher
from cloudtaskd.core.housekeeping import Housekeeper
from cloudtaskd.core.store import Store
from cloudtaskd.fleet.orchestrator.market import Market
from cloudtaskd.http.api import ControlApi, errors_middleware
from cloudtaskd.http.bundles import Bundles
from cloudtaskd.http.runs import Runs
from cloudtaskd.http.series import StatusSeries
from tests.conftest import make_config
from tests.procs import bundle

WORKER = bundle({"cloudtask.yaml": "mode: command\ncommand: python3 worker.py\ntimeout: 30\n",
                 "worker.py": "print('{}')\n"})


def make_api(store: Store, tmp_path: Path) -> ControlApi:
    """The one place the ControlApi is built: its constructor's collaborators are changing."""
    config = make_config(tmp_path)
    dispatcher = Dispatcher(store, config)
    return ControlApi(
        store=store, dispatcher=dispatcher, config=config, metrics=dispatcher.metrics, sessions=dispatcher.sessions,
        market=Market(store, [], {}), series=StatusSeries(store), housekeeper=Housekeeper(
            store=store, dispatcher=dispatcher, config=config),
        runs=Runs(store=store, dispatcher=dispatcher, ttl_s=15.0, grace_s=15.0),
        bundles=Bundles(store, tmp_path / "workers", config.workers), waits=lambda pool_id: None,
        daemon_id="test-daemon", agent_url=lambda: "ws://127.0.0.1:1/v1/agent")


@pytest.fixture
def store(both_stores: Store) -> Store:
    """Every test here runs on SQLite and on PostgreSQL."""
    return both_stores


@pytest.fixture
async def client(store: Store, tmp_path: Path) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    api = make_api(store, tmp_path)
    app = web.Application(middlewares=[errors_middleware])
    app.add_routes(api.routes())
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        yield c
    await api.feeds.close()


Client = TestClient[web.Request, web.Application]


async def call(client: Client, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    async with client.request(method, path, **kwargs) as resp:
        return resp.status, await resp.json()


async def worker(client: Client) -> str:
    status, body = await call(client, "POST", "/v1/workers", data=WORKER)
    assert status == 200, body
    return str(body["digest"])


async def job(client: Client, tasks: int = 0, **fields: Any) -> dict[str, Any]:
    status, body = await call(client, "POST", "/v1/jobs", json={"worker": await worker(client), **fields})
    assert status == 201, body
    if tasks:
        lines = "".join(json.dumps({"id": f"t{i}", "data": {"n": i}}) + "\n" for i in range(tasks))
        status, accepted = await call(client, "POST", f"/v1/jobs/{body['id']}/tasks", data=lines.encode())
        assert (status, accepted) == (200, {"accepted": tasks})
    return dict(body)


async def test_a_job_is_created_and_read_back(client: Client, store: Store) -> None:
    digest = await worker(client)
    status, created = await call(client, "POST", "/v1/jobs", json={
        "worker": digest, "name": "render", "max_attempts": 5, "max_instances": 2, "timeout_s": 12.5})
    assert status == 201, created
    assert created["name"] == "render" and created["state"] == "active"
    row = await store.fetchone("SELECT name, state, max_attempts, max_instances, timeout_s FROM jobs WHERE id = ?",
                               (created["id"],))
    assert row is not None and tuple(row) == ("render", "active", 5, 2, 12.5)

    status, read = await call(client, "GET", f"/v1/jobs/{created['id']}")
    assert status == 200 and read["id"] == created["id"] and read["name"] == "render"
    status, listed = await call(client, "GET", "/v1/jobs")
    assert status == 200 and [j["id"] for j in listed["jobs"]] == [created["id"]]


@pytest.mark.parametrize(("field", "value", "says"), [
    ("max_instances", 0, "expected an integer between 1 and 100000"),
    ("max_attempts", 101, "expected an integer between 1 and 100"),
    ("max_attempts", "3", "expected an integer between 1 and 100"),
    ("timeout_s", -1, "expected a positive number"),
    ("max_total_cost", 0, "expected a positive number of USD"),
    ("name", "x" * 201, "expected a string of at most 200 characters"),
])
async def test_a_bad_parameter_is_refused_naming_its_field(
        client: Client, store: Store, field: str, value: Any, says: str) -> None:
    digest = await worker(client)
    status, body = await call(client, "POST", "/v1/jobs", json={"worker": digest, field: value})
    assert status == 400, body
    assert body["error"]["type"] == "BadInput" and body["error"]["field"] == field
    assert body["error"]["message"] == f"{field}: {says}"
    assert await store.fetchone("SELECT id FROM jobs") is None  # nothing half-made


async def test_a_job_needs_a_known_worker(client: Client) -> None:
    status, body = await call(client, "POST", "/v1/jobs", json={"name": "j"})
    assert (status, body["error"]["field"]) == (400, "worker")
    status, body = await call(client, "POST", "/v1/jobs", json={"worker": "ab" * 32})
    assert (status, body["error"]["field"]) == (400, "worker")
    assert "is unknown: upload it first (POST /v1/workers)" in body["error"]["message"]


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/jobs/99"), ("POST", "/v1/jobs/99/cancel"), ("DELETE", "/v1/jobs/99"),
    ("POST", "/v1/jobs/99/tasks"), ("GET", "/v1/jobs/99/tasks"),
])
async def test_a_job_that_does_not_exist_is_404_no_job_n(client: Client, method: str, path: str) -> None:
    await job(client)  # job 1 exists; 99 does not
    status, body = await call(client, method, path, data=b'{"id": "a"}\n' if path.endswith("tasks") else None)
    assert status == 404, body
    assert (body["error"]["type"], body["error"]["message"]) == ("NotFound", "no job 99")


async def test_cancel_answers_the_cancelled_job_and_delete_then_takes_it(client: Client, store: Store) -> None:
    created = await job(client, tasks=3)
    job_id = created["id"]
    status, body = await call(client, "DELETE", f"/v1/jobs/{job_id}")  # unfinished tasks: cancel first
    assert status == 409, body
    assert body["error"]["message"] == (f"job {job_id} is active with 3 unfinished tasks: cancel it first"
                                        f" (cloudtaskctl cancel {job_id}), then delete it")

    status, cancelled = await call(client, "POST", f"/v1/jobs/{job_id}/cancel")
    assert status == 200, cancelled
    # a job within one chunk is cancelled whole in the answer, and the cancel is over with it
    assert cancelled["state"] == "cancelled" and cancelled["cancelling"] is None and cancelled["done"]
    states = {r["state"] for r in await store.fetchall("SELECT state FROM tasks WHERE job_id = ?", (job_id,))}
    assert states == {"cancelled"}
    # so `cloudtaskctl cancel N && cloudtaskctl delete N` works
    status, deleted = await call(client, "DELETE", f"/v1/jobs/{job_id}")
    assert status == 200, deleted
    assert (deleted["deleted"], deleted["tasks"]) == (job_id, 3)
    status, body = await call(client, "GET", f"/v1/jobs/{job_id}")
    assert (status, body["error"]["message"]) == (404, f"no job {job_id}")


async def test_a_job_that_never_got_tasks_is_withdrawn_whole(client: Client, store: Store) -> None:
    created = await job(client)
    status, body = await call(client, "DELETE", f"/v1/jobs/{created['id']}")
    assert status == 200, body
    assert body == {"deleted": created["id"], "tasks": 0, "purging": False, "withdrawn": created["id"]}
    assert await store.fetchone("SELECT id FROM jobs") is None


# ---- a standing queue: single tasks (issue 17) ----------------------------------------------------


async def enqueue(client: Client, job_id: int, task: Any, query: str = "") -> tuple[int, Any]:
    return await call(client, "POST", f"/v1/jobs/{job_id}/tasks{query}", json=task)


async def keys_and_counts(client: Client, job_id: int) -> tuple[list[str], dict[str, int]]:
    _, page = await call(client, "GET", f"/v1/jobs/{job_id}/tasks?limit=1000")
    _, body = await call(client, "GET", f"/v1/jobs/{job_id}")
    return [t["id"] for t in page["tasks"]], body["counts"]


async def test_a_single_task_is_queued_and_answered_with_its_id(client: Client) -> None:
    j = await job(client, open=True)
    status, answer = await enqueue(client, j["id"], {"id": "a", "data": {"n": 1}, "priority": 5})
    assert status == 201 and answer["key"] == "a"
    _, page = await call(client, "GET", f"/v1/jobs/{j['id']}/tasks")
    [task] = page["tasks"]
    assert (task["task"], task["id"], task["state"], task["priority"]) == (answer["id"], "a", "queued", 5)
    # Without an id the task is named by its number; an ordinary (not open) job takes single tasks too.
    plain = await job(client, tasks=2)
    status, answer = await enqueue(client, plain["id"], {"data": [1, 2]})
    assert status == 201 and answer["key"] == str(answer["id"])
    _, body = await call(client, "GET", f"/v1/jobs/{plain['id']}")
    assert body["counts"]["queued"] == 3 and body["open"] is False


@pytest.mark.parametrize(("task", "field"), [
    ({"id": "x", "prio": 1}, "prio"),
    ({"id": "x", "priority": "high"}, "priority"),
    ({"id": "x", "timeout": -1}, "timeout"),
    ({"id": "x", "max_attempts": 0}, "max_attempts"),
    ({"id": ""}, "id"),
    ({"id": None, "data": 1}, "id"),
    ([{"id": "x"}], None),
])
async def test_a_bad_single_task_is_refused_naming_its_field_and_nothing_is_lost(
        client: Client, task: Any, field: str | None) -> None:
    j = await job(client, open=True)
    for key in ("a", "b"):
        assert (await enqueue(client, j["id"], {"id": key}))[0] == 201
    status, body = await enqueue(client, j["id"], task)
    assert status == 400 and body["error"]["field"] == field, body
    assert body["error"]["message"].startswith("task: ")
    if field is not None:
        assert f"{field!r}" in body["error"]["message"] or f'"{field}"' in body["error"]["message"]
    keys, counts = await keys_and_counts(client, j["id"])
    assert keys == ["a", "b"] and counts["queued"] == 2 == counts["total"]


async def test_a_duplicate_id_is_refused_and_the_first_task_kept(client: Client) -> None:
    j = await job(client, open=True)
    status, first = await enqueue(client, j["id"], {"id": "same", "data": 1})
    assert status == 201 and first["key"] == "same"
    status, body = await enqueue(client, j["id"], {"id": "same", "data": 2})
    assert status == 400 and body["error"]["field"] == "id" and "duplicate id 'same'" in body["error"]["message"]
    # Copies clashing with a task already there are refused whole: none of them is queued.
    assert (await enqueue(client, j["id"], {"id": "r-2"}))[0] == 201
    status, body = await enqueue(client, j["id"], {"id": "r"}, "?copies=3")
    assert status == 400 and "duplicate id 'r-2'" in body["error"]["message"], body
    keys, counts = await keys_and_counts(client, j["id"])
    assert keys == ["same", "r-2"] and counts["total"] == 2


async def test_copies_queue_copies_with_suffixed_or_numbered_ids(client: Client) -> None:
    j = await job(client, open=True)
    status, answer = await enqueue(client, j["id"], {"id": "job", "data": {"x": 1}}, "?copies=3")
    assert status == 201 and answer["keys"] == ["job-1", "job-2", "job-3"] and len(set(answer["ids"])) == 3
    status, auto = await enqueue(client, j["id"], {"data": {"x": 2}}, "?copies=2")
    assert status == 201 and auto["keys"] == [str(i) for i in auto["ids"]]
    for query in ("?copies=0", "?copies=10001", "?copies=07"):
        status, body = await enqueue(client, j["id"], {"data": 1}, query)
        assert status == 400 and body["error"]["field"] == "copies", body
    # A task file is not repeated: copies is for a single task.
    status, body = await call(client, "POST", f"/v1/jobs/{j['id']}/tasks?copies=2", data=b'{"id": "f"}\n')
    assert status == 400 and body["error"]["field"] == "copies"
    _, counts = await keys_and_counts(client, j["id"])
    assert counts["queued"] == 5


async def test_close_ends_an_open_job_and_an_ordinary_job_is_as_before(client: Client, store: Store) -> None:
    j = await job(client, open=True)
    assert (await enqueue(client, j["id"], {"id": "a"}))[0] == 201
    status, closed = await call(client, "POST", f"/v1/jobs/{j['id']}/close")
    assert status == 200 and closed["open"] is False and closed["state"] == "active"
    status, again = await call(client, "POST", f"/v1/jobs/{j['id']}/close")
    assert status == 200 and again["open"] is False  # closing twice is the same answer
    status, body = await enqueue(client, j["id"], {"id": "b"})
    assert status == 400 and "closed" in body["error"]["message"]
    # Closed before any task came: nothing to run, so it is over (cancelled), as a withdrawn submission.
    empty = await job(client, open=True)
    status, body = await call(client, "POST", f"/v1/jobs/{empty['id']}/close")
    assert status == 200 and (body["state"], body["outcome"]) == ("cancelled", "cancelled"), body
    # An ordinary job has nothing to close, and its tasks' end is its end as before.
    plain = await job(client, tasks=1)
    status, body = await call(client, "POST", f"/v1/jobs/{plain['id']}/close")
    assert status == 409 and "not created open" in body["error"]["message"]
    status, body = await call(client, "POST", "/v1/jobs", json={"worker": await worker(client), "open": 1})
    assert status == 400 and body["error"]["field"] == "open"

