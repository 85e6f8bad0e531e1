"""Running under systemd: readiness and status through sd_notify, and a watchdog that pings only
while the daemon is healthy.

The notify protocol is one datagram per message to the unix socket named by $NOTIFY_SOCKET (a
path, or an abstract socket when it starts with '@'), holding newline-separated KEY=VALUE lines;
no library is needed. Without $NOTIFY_SOCKET every call is a no-op, so the daemon behaves the same
from a terminal, inside `cloudtaskctl run` and in tests.

The watchdog: with `WatchdogSec=` systemd sets $WATCHDOG_USEC and restarts the service when no
WATCHDOG=1 arrives within it. A timer that pings blindly would only prove the event loop turns;
here each ping first asks the daemon's own health check (the database answers, no supervised task
has died), so a daemon that is stuck or limping stops pinging and is restarted.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable, MutableMapping

import structlog

log = structlog.get_logger("cloudtaskd.service")

# What systemd sets for the main process; read once and removed from the environment, so that the
# agents and commands the daemon starts do not inherit them (as sd_notify(unset_environment=1)).
SYSTEMD_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")

HealthCheck = Callable[[], Awaitable[str | None]]  # None: healthy; else why not


class Notifier:
    """Sends sd_notify messages; a no-op when the daemon was not started by systemd."""

    def __init__(self, address: str = "") -> None:
        self.address = address
        self._sock: socket.socket | None = None
        self._failed = False  # a send failed: logged once, not on every watchdog ping
        if address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # Never block the event loop: a full receive queue loses a message, and the next
            # watchdog ping comes soon enough.
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: str | int) -> bool:
        """One message of KEY=VALUE lines; False when it could not be sent (or there is no socket)."""
        if self._sock is None:
            return False
        # A value must stay on its line: a newline would start a field of its own.
        data = "\n".join(f"{k}={str(v).replace(chr(10), ' ')}" for k, v in fields.items()).encode()
        # '@' names an abstract socket: its address starts with a NUL byte instead.
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            self._sock.sendto(data, target)
        except OSError as exc:
            if not self._failed:
                log.warning("sd_notify_failed", socket=self.address, error=str(exc))
                self._failed = True
            return False
        self._failed = False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send(READY=1, STATUS=status) if status else self.send(READY=1)

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def reloading(self) -> bool:
        # systemd >= 253 matches RELOADING=1 to the reload it asked for by this timestamp
        # (CLOCK_MONOTONIC in microseconds, which Python's monotonic clock is on Linux).
        return self.send(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000)

    def stopping(self, status: str = "") -> bool:
        return self.send(STOPPING=1, STATUS=status) if status else self.send(STOPPING=1)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Systemd:
    """What systemd told this process: where to notify, and how often to ping, if at all."""

    def __init__(self, notifier: Notifier, watchdog_interval_s: float | None) -> None:
        self.notifier = notifier
        self.watchdog_interval_s = watchdog_interval_s

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> Systemd:
        """Read NOTIFY_SOCKET and WATCHDOG_USEC/WATCHDOG_PID, and remove them from the environment."""
        env = os.environ if environ is None else environ
        values = {name: env.pop(name, "") for name in SYSTEMD_VARS}
        interval_s = None
        usec, pid = values["WATCHDOG_USEC"], values["WATCHDOG_PID"]
        try:
            # WATCHDOG_PID names the process meant to ping; another's (a wrapper's) is not ours.
            if usec and int(usec) > 0 and (not pid or int(pid) == os.getpid()):
                interval_s = int(usec) / 2e6  # systemd's own advice: ping at half the timeout
        except ValueError:
            log.warning("watchdog_env_invalid", watchdog_usec=usec, watchdog_pid=pid)
        return cls(Notifier(values["NOTIFY_SOCKET"]), interval_s)


async def watchdog(notifier: Notifier, interval_s: float, check: HealthCheck) -> None:
    """Send WATCHDOG=1 every interval_s, each time only if check() returns None within interval_s.

    A check that fails, raises or hangs withholds the ping (and says why in the log); after the
    whole WatchdogSec without one systemd kills and restarts the daemon. A blocked event loop
    withholds it too, since this coroutine then never runs.
    """
    loop = asyncio.get_running_loop()
    withheld_since: float | None = None
    while True:
        started = loop.time()
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that arrives as the
            # check completes, and the daemon's stop would then wait for this loop for ever.
            async with asyncio.timeout(interval_s):
                reason = await check()
        except TimeoutError:
            reason = f"the health check did not answer within {interval_s:.3g} s"
        except Exception as exc:  # a check that raises is a failed check, never a dead watchdog
            reason = f"the health check failed: {exc!r}"
        if reason is None:
            notifier.watchdog()
            if withheld_since is not None:
                log.warning("watchdog_resumed", withheld_s=round(loop.time() - withheld_since, 3))
                withheld_since = None
        else:
            if withheld_since is None:
                withheld_since = started
            log.error("watchdog_ping_withheld", reason=reason,
                      withheld_s=round(loop.time() - withheld_since, 3))
        await asyncio.sleep(max(0.0, interval_s - (loop.time() - started)))
