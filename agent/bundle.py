"""Worker bundles unpacked by our own rules, the same on the control host and on an instance.

A bundle is a tar archive (gzip, bzip2, xz or plain) that holds regular files and directories
only: no symbolic or hard links, no devices, fifos or sparse files, no absolute paths, no `..`,
no name twice. Every entry is checked by this module before anything is written (a first pass
over the headers), then written into a fresh directory that nothing else writes (mkdtemp), files
created with O_EXCL|O_NOFOLLOW, and renamed into place whole. The checks do not lean on
`tarfile`'s extraction filters: those are missing on older Pythons (Debian 12's 3.11.2 has none)
and were bypassed by symlink chains longer than PATH_MAX until CPython 3.11.13 / 3.12.11 /
3.13.4 (CVE-2025-4517). Since no link is ever created, no later entry can be led outside.

Caps bound what a small upload can cost: the unpacked size (declared sizes are summed before
any data is decompressed past the cap), the number of entries and the depth.

Ships with the agent, so it keeps to Python 3.9 and the standard library. On an instance:
    python3 -m agent.bundle ARCHIVE DEST [--max-bytes N] [--max-files N] [--max-depth N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

DEFAULT_MAX_BYTES = 1 << 30  # unpacked
DEFAULT_MAX_FILES = 20_000  # entries, directories included
DEFAULT_MAX_DEPTH = 32
MAX_COMPONENT_BYTES = 255  # NAME_MAX
MAX_PATH_BYTES = 1024  # well under PATH_MAX (4096) once the state directory is in front
COPY_CHUNK = 1 << 20

_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE)
_REFUSED_TYPES = {
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a fifo",
    tarfile.CONTTYPE: "a contiguous file",
    tarfile.GNUTYPE_SPARSE: "a sparse file",
}
ONLY = "a bundle holds regular files and directories only"


class BundleError(ValueError):
    """The bundle breaks one of the rules; the message names the entry (when there is one) and the rule."""

    def __init__(self, rule: str, entry: str | None = None) -> None:
        self.entry = entry
        self.rule = rule
        where = f"entry {entry!r:.300}: " if entry is not None else ""
        super().__init__(f"worker bundle refused: {where}{rule}")


@dataclass(frozen=True)
class Limits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_files: int = DEFAULT_MAX_FILES
    max_depth: int = DEFAULT_MAX_DEPTH


@dataclass(frozen=True)
class Entry:
    parts: tuple[str, ...]  # the normalised path, one component each
    is_dir: bool
    size: int
    executable: bool

    @property
    def path(self) -> str:
        return "/".join(self.parts)


def _parts(name: str, limits: Limits) -> tuple[str, ...]:
    """The entry's path as components; refuses what could land outside or cannot be written."""
    if "\x00" in name:
        raise BundleError("a NUL character in the name", name)
    if name.startswith("/"):
        raise BundleError("an absolute path: names are relative to the worker directory", name)
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise BundleError("'..' in the path: names stay inside the worker directory", name)
    if len(parts) > limits.max_depth:
        raise BundleError(f"nested {len(parts)} levels deep, more than the limit of {limits.max_depth}", name)
    if len(name.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        raise BundleError(f"a path longer than {MAX_PATH_BYTES} bytes", name)
    if any(len(p.encode("utf-8", "surrogateescape")) > MAX_COMPONENT_BYTES for p in parts):
        raise BundleError(f"a path component longer than {MAX_COMPONENT_BYTES} bytes", name)
    return parts


def _open(fileobj: IO[bytes]) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=fileobj, mode="r:*")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BundleError(f"not a valid tar archive ({exc})") from exc


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The archive's members one by one, header errors turned into BundleError. Not `for m in tar`:
    that keeps every member in tar.members, and the first pass already counts them."""
    while True:
        try:
            info = tar.next()
        except (tarfile.TarError, EOFError) as exc:
            raise BundleError(f"not a valid tar archive ({exc})") from exc
        except OSError as exc:  # a corrupt gzip/xz stream; a full disk cannot happen while reading
            raise BundleError(f"not a valid compressed archive ({exc})") from exc
        if info is None:
            return
        yield info


def scan(fileobj: IO[bytes], limits: Limits | None = None) -> list[Entry]:
    """Every entry checked against the rules, nothing written. Stops at the first broken rule."""
    limits = limits or Limits()
    entries: list[Entry] = []
    kinds: dict[tuple[str, ...], bool] = {}  # path parts -> is_dir, for duplicates and files used as directories
    total = 0
    with _open(fileobj) as tar:
        for info in _members(tar):
            name = info.name
            if info.type in _REFUSED_TYPES:
                what = _REFUSED_TYPES[info.type]
                if info.issym() or info.islnk():
                    what += f" (to {info.linkname!r:.200})"
                raise BundleError(f"{what}: {ONLY}", name)
            if info.type not in _FILE_TYPES and info.type != tarfile.DIRTYPE:
                raise BundleError(f"an entry of unknown type {info.type!r}: {ONLY}", name)
            if len(entries) >= limits.max_files:
                raise BundleError(f"more than {limits.max_files} entries (the limit)")
            parts = _parts(name, limits)
            is_dir = info.type == tarfile.DIRTYPE
            if not parts:
                if is_dir:
                    continue  # "./": the worker directory itself
                raise BundleError("a file without a name", name)
            if info.size < 0 or (is_dir and info.size):
                raise BundleError(f"a corrupt header (size {info.size})", name)
            total += info.size
            if total > limits.max_bytes:
                raise BundleError(f"the bundle unpacks to more than {limits.max_bytes} bytes (the limit)", name)
            for i in range(1, len(parts)):
                if kinds.get(parts[:i]) is False:
                    raise BundleError(f"inside {'/'.join(parts[:i])!r}, which is a file", name)
            if parts in kinds:
                # Also what a header loop (negative offsets, CVE-2025-8194) looks like: never endless.
                raise BundleError("the same path appears twice", name)
            kinds[parts] = is_dir
            entries.append(Entry(parts, is_dir, info.size, bool(info.mode & 0o111)))
    return entries


def unpack(fileobj: IO[bytes], target: str, limits: Limits | None = None) -> list[Entry]:
    """Check the whole bundle, then unpack it to `target` (which must not exist) whole or not at all.

    `fileobj` must be seekable: it is read twice. Staged beside `target` (never in /tmp: the
    final rename must not cross filesystems). BundleError for a broken rule; OSError (a full disk)
    passes through, with nothing left behind."""
    entries = scan(fileobj, limits)
    fileobj.seek(0)
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".incoming-", dir=parent)  # 0700, ours alone
    try:
        _write(fileobj, tmp, entries)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, target)
        except OSError:
            if not os.path.isdir(target):  # lost a race with the same bundle: theirs is as good
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return entries


def _write(fileobj: IO[bytes], root: str, entries: list[Entry]) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    expected = iter(entries)
    with _open(fileobj) as tar:
        for info in _members(tar):
            parts = tuple(p for p in info.name.split("/") if p not in ("", "."))
            if not parts:
                continue
            entry = next(expected, None)
            if entry is None or entry.parts != parts or entry.size != info.size:
                raise BundleError("the archive changed between reads", info.name)  # never from our own spool
            path = os.path.join(root, *parts)
            if entry.is_dir:
                os.makedirs(path, mode=0o755, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            src = tar.extractfile(info)
            if src is None:
                raise BundleError("a file entry without data", info.name)
            fd = os.open(path, flags, 0o600)
            with os.fdopen(fd, "wb") as out:
                os.fchmod(fd, 0o755 if entry.executable else 0o644)  # exactly, whatever the umask
                left = entry.size
                while left > 0:
                    chunk = src.read(min(COPY_CHUNK, left))
                    if not chunk:
                        raise BundleError("the archive ends inside this file", info.name)
                    out.write(chunk)
                    left -= len(chunk)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m agent.bundle", description="Unpack a worker bundle safely.")
    parser.add_argument("archive")
    parser.add_argument("dest", help="a directory that does not exist yet")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES)
    parser.add_argument("--max-files", type=int, default=DEFAULT_MAX_FILES)
    parser.add_argument("--max-depth", type=int, default=DEFAULT_MAX_DEPTH)
    args = parser.parse_args(argv)
    limits = Limits(args.max_bytes, args.max_files, args.max_depth)
    try:
        with open(args.archive, "rb") as f:
            entries = unpack(f, args.dest, limits)
    except BundleError as exc:
        print(f"{args.archive}: {exc}", file=sys.stderr)
        return 2
    print(f"unpacked {len(entries)} entries into {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
