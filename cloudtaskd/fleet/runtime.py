"""The agent's runtime for an instance: its third-party packages, built on the control host.

A cloud image has a system `python3` (3.9 on Debian 11 and Amazon Linux 2023, 3.10 on Ubuntu
22.04, 3.12 on Ubuntu 24.04) and often nothing else: no `python3-venv` (no ensurepip), no pip, no
compiler, sometimes no internet. So the instance installs nothing from anywhere: the daemon builds,
once per (Python minor version, CPU architecture), a directory of the agent's dependencies
(aiohttp and what it needs, and pip for the worker's `setup`) with uv, which resolves wheels for a
target interpreter and platform other than its own (`--python-version`, `--python-platform`:
environment markers are evaluated for the target, so Python 3.9 gets async-timeout), and packs it as
a tarball under `<state_dir>/runtime/`. The bootstrap uploads it and puts it on the instance's
`sys.path`; see bootstrap.py.

uv rather than `pip download --platform`: pip evaluates dependencies' environment markers against
its own interpreter, so a 3.11 control host leaves out what 3.9 needs.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import structlog

from cloudtaskd import subproc
from cloudtaskd.errors import CloudtaskError

log = structlog.get_logger("cloudtaskd.fleet.runtime")

# What the agent imports beyond the standard library, and pip for the worker's own `setup`.
PACKAGES = ("aiohttp>=3.10.7,<4", "pip")  # the floor pyproject.toml names for the daemon too
MIN_PYTHON = (3, 9)
ARCHES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
GLIBC_PLATFORM = "manylinux_2_17"  # glibc 2.17+: every mainstream image of the last ten years
BUILD_TIMEOUT_S = 600.0


class RuntimeUnavailable(CloudtaskError):
    """The agent's runtime could not be built for an instance."""


@dataclass(frozen=True)
class Target:
    python: tuple[int, int]
    arch: str  # x86_64 | aarch64

    @property
    def key(self) -> str:
        return f"cp{self.python[0]}{self.python[1]}-{self.arch}"

    @classmethod
    def parse(cls, uname_m: str, python_version: str) -> Target:
        """From `uname -m` and `python3 -c 'print(version_info[:2])'` on the instance; a clear error
        for what the agent cannot run on."""
        arch = ARCHES.get(uname_m.strip())
        if arch is None:
            raise RuntimeUnavailable(f"the instance's CPU architecture {uname_m.strip()!r} is not supported "
                                "(x86_64 and aarch64 are)")
        try:
            major, minor = (int(x) for x in python_version.strip().split(".")[:2])
        except ValueError:
            raise RuntimeUnavailable("the instance's image has no python3 (the agent needs Python 3.9 or newer): "
                                     "choose an image that has one, e.g. Ubuntu 22.04+, Debian 11+ or Amazon Linux "
                                     "2023") from None
        if (major, minor) < MIN_PYTHON:
            raise RuntimeUnavailable(f"the instance's python3 is {major}.{minor}; the agent needs 3.9 or newer: choose "
                                "a newer image (Ubuntu 22.04+, Debian 11+, Amazon Linux 2023)")
        return cls((major, minor), arch)


@dataclass(frozen=True)
class Runtime:
    path: Path  # the .tar.gz
    digest: str  # its sha256: the directory name on the instance, so a change is a new directory


class RuntimeBuilder:
    """Builds runtimes on demand, each once (concurrent launches for one target wait for one build)."""

    def __init__(self, cache_dir: Path, index_args: tuple[str, ...] = ()) -> None:
        self.dir = cache_dir
        self.index_args = index_args  # uv's index options, e.g. ("--index-url", URL) or ("--find-links", DIR)
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, target: Target) -> Runtime:
        path = self.dir / f"agent-runtime-{target.key}.tar.gz"
        async with self._locks.setdefault(target.key, asyncio.Lock()):
            if not path.exists():
                await self._build(target, path)
        return Runtime(path, await asyncio.to_thread(_sha256, path))

    async def _build(self, target: Target, path: Path) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=self.dir))
        try:
            argv = [_uv(), "pip", "install", "--quiet", "--target", str(staging / "lib"),
                    "--python-version", f"{target.python[0]}.{target.python[1]}",
                    "--python-platform", f"{target.arch}-{GLIBC_PLATFORM}", "--only-binary", ":all:",
                    *self.index_args, *PACKAGES]
            log.info("runtime_build_started", target=target.key)
            code, out = await subproc.run(argv, timeout_s=BUILD_TIMEOUT_S, env={**os.environ, "UV_NO_PROGRESS": "1"})
            if code != 0:
                tail = out.decode(errors="replace").strip()[-1500:]
                raise RuntimeUnavailable(f"building the agent's runtime for {target.key} failed (uv exit "
                                    f"{code}); the control host needs the package index, or set pip_args "
                                    f"to a reachable one: {tail}")
            size = await asyncio.to_thread(_pack, staging / "lib", path)
            log.info("runtime_built", target=target.key, bytes=size)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _uv() -> str:
    import uv  # the uv package ships its binary; imported here, only the bootstrap needs it

    return str(uv.find_uv_bin())


def _pack(lib: Path, dest: Path) -> int:
    """A deterministic tar.gz of lib's contents, without the console scripts uv wrote for its own
    interpreter (bin/: their shebangs name the control host's Python)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for root, dirs, files in os.walk(lib):
            dirs.sort()
            rel = Path(root).relative_to(lib)
            if rel.parts[:1] == ("bin",):
                continue
            for name in sorted(files):
                if name.endswith(".pyc"):
                    continue
                full = Path(root) / name
                if full.is_symlink() or not full.is_file():
                    continue
                info = tar.gettarinfo(str(full), arcname=str(rel / name))
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                with full.open("rb") as f:
                    tar.addfile(info, f)
    tmp = dest.with_name(dest.name + ".partial")
    tmp.write_bytes(buf.getvalue())
    tmp.rename(dest)
    return len(buf.getvalue())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
