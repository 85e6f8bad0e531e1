"""Worker bundles: every hostile archive is refused before anything is written, on the control host
(POST /v1/workers on a real daemon), by `python3 -m agent.bundle` under every interpreter on this
machine (an instance's Python may be 3.9), and on an instance over SSH; caps bound what a small
upload costs; bundles no job uses are pruned; cloudtaskctl packs links as the rules allow."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from agent import bundle as rules
from cloudtaskd.config import LocalProviderConfig, ProvidersConfig, WorkersConfig
from cloudtaskd.ctl.bundle import bundle_bytes
from cloudtaskd.daemon import Daemon
from cloudtaskd.errors import BadInput
from tests import hostile_bundles as hostile
from tests.conftest import ROOT, UnixApi, interpreters, make_config, python_version
from tests.procs import bundle

# Each: (name, builder(outside_dir) -> bytes, the entry the refusal names or None, words of the rule).
HOSTILE: list[tuple[str, Callable[[Path], bytes], str | None, str]] = [
    ("symlink_chain", lambda out: hostile.symlink_chain(str(out)), "a", "a symbolic link"),
    ("symlink", lambda out: hostile.plain_symlink(str(out / "existing.txt")), "link", "a symbolic link"),
    ("hardlink", lambda out: hostile.hardlink(str(out / "existing.txt")), "link", "a hard link"),
    ("device", lambda out: hostile.device(), "dev", "a character device"),
    ("fifo", lambda out: hostile.fifo(), "pipe", "a fifo"),
    ("dotdot", lambda out: hostile.dotdot("created.txt"), "../../created.txt", "'..' in the path"),
    ("absolute", lambda out: hostile.absolute(str(out / "created.txt")), None, "an absolute path"),
    ("duplicate", lambda out: hostile.duplicate(), "a.txt", "appears twice"),
    ("file_as_directory", lambda out: hostile.file_as_directory(), "a/b", "which is a file"),
    ("deep", lambda out: hostile.deep(40), None, "levels deep"),
]


def outside_dir(tmp_path: Path) -> Path:
    out = tmp_path / "outside"
    out.mkdir()
    (out / "existing.txt").write_text("original\n")
    return out


def assert_untouched(out: Path) -> None:
    assert (out / "existing.txt").read_text() == "original\n", "a file outside was overwritten"
    assert sorted(p.name for p in out.iterdir()) == ["existing.txt"], "a file was created outside"


def test_a_good_bundle_unpacks_with_its_modes(tmp_path: Path) -> None:
    data = bundle({"cloudtask.yaml": "mode: command\ncommand: ./run\n", "sub/lib.py": "X = 1\n"})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        with tarfile.open(fileobj=io.BytesIO(data)) as src:
            for m in src.getmembers():
                tar.addfile(m, src.extractfile(m))
        run = tarfile.TarInfo("run")
        run.size, run.mode = 3, 0o755
        tar.addfile(run, io.BytesIO(b"#!\n"))
    buf.seek(0)
    entries = rules.unpack(buf, str(tmp_path / "w"))
    assert {e.path for e in entries} == {"cloudtask.yaml", "sub/lib.py", "run"}
    assert (tmp_path / "w" / "sub" / "lib.py").read_text() == "X = 1\n"
    assert os.stat(tmp_path / "w" / "run").st_mode & 0o777 == 0o755
    assert os.stat(tmp_path / "w" / "cloudtask.yaml").st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["w"], "the staging directory was left behind"


@pytest.mark.parametrize(("name", "build", "entry", "rule"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_bundle_refused_before_anything_is_written(
        tmp_path: Path, name: str, build: Callable[[Path], bytes], entry: str | None, rule: str) -> None:
    out = outside_dir(tmp_path)
    workers = tmp_path / "state" / "workers"
    with pytest.raises(rules.BundleError) as refused:
        rules.unpack(io.BytesIO(build(out)), str(workers / "w"))
    assert rule in str(refused.value)
    if entry is not None:
        assert refused.value.entry == entry and repr(entry)[:40] in str(refused.value)
    assert_untouched(out)
    assert not workers.exists(), "nothing may be written for a refused bundle, not even its parent"


def test_the_symlink_chain_escapes_tarfiles_own_filter_here(tmp_path: Path) -> None:
    """Why the rules are ours: on this interpreter (3.11.7 and the other builds on this machine),
    tarfile's "data" filter lets the chain write outside. If a fixed CPython stops it, fine."""
    out = outside_dir(tmp_path)
    dest = tmp_path / "state" / "workers" / ".incoming-x"
    dest.mkdir(parents=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(hostile.symlink_chain(str(out))), mode="r:*") as tar:
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError, TypeError):
        pytest.skip(f"Python {sys.version.split()[0]}'s tarfile refuses the chain (a fixed release)")
    assert (out / "existing.txt").read_text() != "original\n", "the chain should show the filter's hole"


def test_caps_on_unpacked_size_and_entries(tmp_path: Path) -> None:
    small = rules.Limits(max_bytes=1 << 20, max_files=50, max_depth=4)
    bomb = hostile.oversized(64 << 20)
    assert len(bomb) < 256 << 10, "a small upload that declares 64 MiB"
    with pytest.raises(rules.BundleError, match=r"unpacks to more than 1048576 bytes"):
        rules.unpack(io.BytesIO(bomb), str(tmp_path / "a"), small)
    with pytest.raises(rules.BundleError, match=r"more than 50 entries"):
        rules.unpack(io.BytesIO(hostile.many_files(51)), str(tmp_path / "b"), small)
    with pytest.raises(rules.BundleError, match=r"nested 6 levels deep, more than the limit of 4"):
        rules.unpack(io.BytesIO(hostile.deep(5)), str(tmp_path / "c"), small)
    rules.unpack(io.BytesIO(hostile.many_files(48)), str(tmp_path / "d"), small)  # 48 + the spec: fits
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_broken_archives_are_named_as_such(tmp_path: Path) -> None:
    good = bundle({"cloudtask.yaml": "mode: command\ncommand: cat\n", "big": "x" * 100_000})
    for data in (b"not a tar at all", good[: len(good) // 2]):
        with pytest.raises(rules.BundleError, match="not a valid"):
            rules.unpack(io.BytesIO(data), str(tmp_path / "w"))
    assert not list(tmp_path.iterdir())


# ---- every interpreter on this machine (instances run 3.9 and newer) ----------------------------

@pytest.mark.parametrize("python", interpreters())
def test_agent_side_rules_on_every_interpreter(tmp_path: Path, python: str) -> None:
    """`python3 -m agent.bundle` (what an instance runs) refuses every hostile bundle and unpacks a
    good one, on each Python here, 3.9 (Debian 11, Amazon Linux 2023) to 3.13."""
    if python_version(python) < (3, 9):
        pytest.skip(f"{python} is older than the 3.9 an instance needs")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = outside_dir(tmp_path)
    for name, build, _, rule in HOSTILE:
        archive = tmp_path / f"{name}.tar.gz"
        archive.write_bytes(build(out))
        dest = tmp_path / "inst" / name
        run = subprocess.run([python, "-m", "agent.bundle", str(archive), str(dest)], capture_output=True, text=True,
                             env=env, cwd=tmp_path, timeout=60)
        assert run.returncode == 2, f"{name}: {run.stdout}{run.stderr}"
        assert rule in run.stderr and "worker bundle refused" in run.stderr, run.stderr
        assert not dest.exists()
    assert_untouched(out)
    good = tmp_path / "good.tar.gz"
    good.write_bytes(bundle({"cloudtask.yaml": "mode: command\ncommand: cat\n", "a/b.txt": "b"}))
    run = subprocess.run([python, "-m", "agent.bundle", str(good), str(tmp_path / "w"), "--max-files", "3"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "w" / "a" / "b.txt").read_text() == "b"


# ---- the control API ------------------------------------------------------------------------------

@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[tuple[Daemon, UnixApi]]:
    config = replace(make_config(tmp_path), providers=ProvidersConfig(local=LocalProviderConfig(max_instances=0)),
                     workers=WorkersConfig(max_unpacked_bytes=8 << 20, max_files=100, max_depth=8,
                                           max_upload_bytes=1 << 20, unused_ttl_s=60))
    d = Daemon(config, shutdown_grace_s=1)
    await d.start()
    api = UnixApi(config.socket_path)
    try:
        yield d, api
    finally:
        await api.close()
        await d.stop()


async def test_upload_refusals_name_the_entry_and_rule(tmp_path: Path, daemon: tuple[Daemon, UnixApi]) -> None:
    d, api = daemon
    out = outside_dir(tmp_path)
    workers = d.config.state_path / "workers"
    for name, build, entry, rule in HOSTILE:
        status, body = await api.request("POST", "/v1/workers", data=build(out))
        assert status == 400, (name, body)
        message = body["error"]["message"]
        assert rule in message and "not a valid tar archive" not in message, (name, message)
        assert entry is None or body["error"]["field"] == entry, (name, body)
    status, body = await api.request("POST", "/v1/workers", data=hostile.oversized(64 << 20))
    assert status == 400 and "unpacks to more than 8388608 bytes" in body["error"]["message"]
    status, body = await api.request("POST", "/v1/workers", data=io.BytesIO(os.urandom(2 << 20)))
    assert status == 400 and "workers.max_upload_bytes" in body["error"]["message"]
    assert_untouched(out)
    assert not workers.exists() or not list(workers.iterdir()), "a refused bundle left files behind"
    status, body = await api.request("POST", "/v1/workers", data=bundle({"cloudtask.yaml": "mode: command\n"
                                                                         "command: cat\n"}))
    assert status == 200, body


async def test_unused_bundles_are_pruned_and_used_ones_kept(daemon: tuple[Daemon, UnixApi]) -> None:
    d, api = daemon
    assert d.api is not None
    workers = d.config.state_path / "workers"
    _, used = await api.request("POST", "/v1/workers", data=bundle({"cloudtask.yaml": "mode: command\ncommand: a\n"}))
    _, unused = await api.request("POST", "/v1/workers", data=bundle({"cloudtask.yaml": "mode: command\ncommand: b\n"}))
    status, _ = await api.request("POST", "/v1/jobs", json={"worker": used["digest"]})
    assert status == 201
    (workers / ".incoming-crashed").mkdir()  # what a crash mid-unpack leaves
    assert await d.api.bundles.prune() == [], "nothing is old enough yet"
    gone = await d.api.bundles.prune(now=time.time() + 61)
    assert gone == [unused["digest"]]
    assert not (workers / unused["digest"]).exists() and not (workers / f"{unused['digest']}.tar.gz").exists()
    assert (workers / used["digest"] / "cloudtask.yaml").exists() and (workers / f"{used['digest']}.tar.gz").exists()
    assert not (workers / ".incoming-crashed").exists()
    status, body = await api.request("POST", "/v1/jobs", json={"worker": unused["digest"]})
    assert status == 400 and "upload it first" in body["error"]["message"]
    # Uploaded again, it is back.
    status, _ = await api.request("POST", "/v1/workers", data=bundle({"cloudtask.yaml": "mode: command\ncommand: b\n"}))
    assert status == 200 and (workers / unused["digest"] / "cloudtask.yaml").exists()


# ---- cloudtaskctl packs by the same rules ----------------------------------------------------------

def test_ctl_packs_a_link_inside_as_a_file_and_refuses_one_outside(tmp_path: Path) -> None:
    w = tmp_path / "w"
    w.mkdir()
    (w / "cloudtask.yaml").write_text("mode: command\ncommand: ./run.sh\n")
    (w / "real.txt").write_text("data\n")
    (w / "alias.txt").symlink_to("real.txt")
    data, _ = bundle_bytes(w)
    entries = rules.unpack(io.BytesIO(data), str(tmp_path / "unpacked"))  # the daemon's rules accept it
    assert {e.path for e in entries} == {"cloudtask.yaml", "alias.txt", "real.txt"}
    assert (tmp_path / "unpacked" / "alias.txt").read_text() == "data\n"
    secret = tmp_path / "secret"
    secret.write_text("not for the bundle\n")
    (w / "leak").symlink_to(secret)
    with pytest.raises(BadInput, match=r"leak: a symbolic link to .*secret \(outside the worker directory\)"):
        bundle_bytes(w)
    (w / "leak").unlink()
    (w / "dirlink").symlink_to(".")
    with pytest.raises(BadInput, match=r"dirlink: a symbolic link to \. \(not a regular file\)"):
        bundle_bytes(w)
