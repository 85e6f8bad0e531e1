"""Worker bundles: validate a worker directory locally, then pack it as a deterministic .tar.gz.

Deterministic (sorted entries, zeroed times and owners, normalised modes) so the same directory
always gives the same digest, and the daemon reuses the worker it already has instead of
starting a second pool of instances for an identical worker.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path
from typing import IO

import yaml

from cloudtask_wire.workerspec import SPEC_FILE, WorkerSpec
from cloudtaskd import subproc
from cloudtaskd.errors import BadInput

EXCLUDED_NAMES = frozenset({".git", "__pycache__", ".venv"})
EXCLUDED_SUFFIXES = (".pyc",)
GIT_TIMEOUT_S = 600.0
GIT_ERROR_LINES = 5


def load_spec(worker_dir: Path) -> WorkerSpec:
    """Validate the worker before anything is sent; every error names the file and the key."""
    if not worker_dir.is_dir():
        what = "is not a directory" if worker_dir.exists() else "no such directory"
        raise BadInput(f"{worker_dir}: {what} (--worker expects the worker's directory)")
    spec_path = worker_dir / SPEC_FILE
    try:
        text = spec_path.read_text()
    except FileNotFoundError:
        raise BadInput(f"{spec_path}: missing (a worker directory needs {SPEC_FILE} at its top level)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"{spec_path}: cannot read: {exc}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        where = f"{spec_path}:{line}" if line is not None else str(spec_path)
        raise BadInput(f"{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}", line=line) from exc
    return WorkerSpec.from_dict(raw, source=str(spec_path))  # WorkerSpecError names the file and key


def _excluded(name: str) -> bool:
    return name in EXCLUDED_NAMES or name.endswith(EXCLUDED_SUFFIXES)


def _entries(root: Path) -> list[tuple[str, Path]]:
    """(archive name, path) for everything to pack, sorted by archive name; symlinks are not followed."""
    found: list[tuple[str, Path]] = []

    def walk(directory: Path, prefix: str) -> None:
        with os.scandir(directory) as it:
            children = sorted(it, key=lambda e: e.name)
        for entry in children:
            if _excluded(entry.name):
                continue
            arcname = f"{prefix}{entry.name}"
            found.append((arcname, Path(entry.path)))
            if entry.is_dir(follow_symlinks=False):
                walk(Path(entry.path), arcname + "/")

    walk(root, "")
    return sorted(found, key=lambda item: item[0])


def _tarinfo(root: Path, arcname: str, path: Path) -> tuple[tarfile.TarInfo, Path] | None:
    """The entry's header and the file whose bytes it carries. A bundle holds regular files and
    directories only (agent/bundle.py, which the daemon applies): a symlink to a file inside the
    worker is packed as that file's content; any other link is refused here, naming it."""
    st = path.lstat()
    data = path
    if stat.S_ISLNK(st.st_mode):
        data = path.resolve()
        inside = data.is_relative_to(root.resolve())
        if not inside or not data.is_file():
            what = "outside the worker directory" if not inside else "not a regular file"
            raise BadInput(f"{path}: a symbolic link to {os.readlink(path)} ({what}): a worker bundle holds regular "
                           "files and directories only; copy what it points to into the worker instead")
        st = data.stat()
    info = tarfile.TarInfo(arcname)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if stat.S_ISDIR(st.st_mode):
        info.type, info.mode = tarfile.DIRTYPE, 0o755
    elif stat.S_ISREG(st.st_mode):
        # Only the executable bit is kept: umasks differ between machines, the meaning does not.
        info.type, info.size = tarfile.REGTYPE, st.st_size
        info.mode = 0o755 if st.st_mode & 0o111 else 0o644
    else:
        return None  # sockets, fifos and devices have no place in a worker
    return info, data


class _HashingWriter:
    """Passes bytes through to `out`, hashing them on the way: the digest without a second read."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()


def write_bundle(worker_dir: Path, out: IO[bytes]) -> str:
    """Pack worker_dir into `out` as a gzip'd tar; returns the sha256 hex digest of the bytes written."""
    sink = _HashingWriter(out)
    # filename="" and mtime=0: the gzip header must carry neither a name nor a time.
    with gzip.GzipFile(filename="", mode="wb", fileobj=sink, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for arcname, path in _entries(worker_dir):
            found = _tarinfo(worker_dir, arcname, path)
            if found is None:
                continue
            info, data = found
            if info.type == tarfile.REGTYPE:
                with data.open("rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return sink.sha256.hexdigest()


def bundle_bytes(worker_dir: Path) -> tuple[bytes, str]:
    """The bundle in memory, with its digest (small workers and tests)."""
    buf = io.BytesIO()
    digest = write_bundle(worker_dir, buf)
    return buf.getvalue(), digest


async def clone_worker(url: str, dest: Path, *, ref: str | None = None) -> Path:
    """Shallow-clone a worker repository into dest (which must not exist yet); git's message on failure."""
    argv = ["git", "clone", "--quiet", "--depth", "1"]
    if ref:
        argv += ["--branch", ref]
    argv += ["--", url, str(dest)]  # "--": a URL starting with "-" must not be read as an option
    # No prompt: a repository needing credentials must fail, not hang waiting for a password.
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    try:
        code, output = await subproc.run(argv, timeout_s=GIT_TIMEOUT_S, env=env)
    except FileNotFoundError:
        raise BadInput("--worker-repo needs git, which is not installed (or not on PATH)") from None
    if code != 0:
        lines = [ln for ln in output.decode(errors="replace").strip().splitlines() if ln.strip()]
        detail = "; ".join(lines[-GIT_ERROR_LINES:]) or f"exit status {code}"
        target = f"{url} (ref {ref})" if ref else url
        raise BadInput(f"git clone {target} failed: {detail}")
    return dest
