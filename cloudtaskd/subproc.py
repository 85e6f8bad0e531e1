"""A helper program run to its end with a deadline, never left behind (git clone, uv)."""

from __future__ import annotations

import asyncio


async def run(argv: list[str], *, timeout_s: float, env: dict[str, str] | None = None) -> tuple[int, bytes]:
    """(exit status, stderr with stdout interleaved). Raises FileNotFoundError when the program is
    missing and TimeoutError at the deadline; either way, and on cancellation, the process is killed
    and reaped first."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env=env)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=timeout_s)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    return int(proc.returncode or 0), out
