"""A real PostgreSQL server for tests, from Debian's `postgresql` package, on 127.0.0.1 and a free port.

`initdb` makes a cluster in a temp dir (its unix socket there too); `postgres` runs it as a process
of ours, stopped by its PID. PostgreSQL refuses to run as root: as root, both run as the package's
`postgres` user (or `cloudtask-pg`, made with useradd where there is none), and the temp dir is
made under /tmp directly, because pytest's own temp dirs are private to root.

The superuser has a password and TCP logins need it (scram-sha-256), as on a real deployment: a
DSN in the tests carries a password, so the tests can check it never shows in an error or a log.

`fsync=False` (the default here) also turns off synchronous_commit and full_page_writes: a unit
test gains nothing from durability. The fault tests that kill the server must pass `fsync=True`.

Run by hand:  .venv/bin/python -m tests.fakes.postgres   (starts one, prints its DSN, stops on Enter)
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.procs import free_port

PG_ROOT = Path("/usr/lib/postgresql")
SUPERUSER = "cloudtask"
PASSWORD = "pg-test-pw-5d1c9a7e3b"  # long enough for redact.register to hide it
STOP_TIMEOUT_S = 15.0
START_TIMEOUT_S = 60.0


def bin_dir() -> Path | None:
    """The newest installed server's bin dir (/usr/lib/postgresql/<major>/bin), or None."""
    found = []
    for path in PG_ROOT.glob("*/bin/postgres") if PG_ROOT.is_dir() else ():
        major = path.parent.parent.name
        if re.fullmatch(r"\d+(\.\d+)?", major) and (path.parent / "initdb").exists():
            found.append((float(major), path.parent))
    return max(found)[1] if found else None


def unavailable() -> str | None:
    """Why a test server cannot be started here, or None. Absent binaries are a failure as root
    (install.sh installs the package; CI runs as root), a skip elsewhere."""
    if bin_dir() is None:
        return (f"PostgreSQL server binaries not found under {PG_ROOT}/<version>/bin: install Debian's "
                "`postgresql` package (install.sh does, as root)")
    return None


def _server_user() -> pwd.struct_passwd | None:
    """The user the server runs as: None for ourselves; as root, an unprivileged system user."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "cloudtask-pg"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "cloudtask-pg"],
                   check=True)
    return pwd.getpwnam("cloudtask-pg")


class PostgresServer:
    """One cluster: start() once, restart() keeps its data, port and socket; stop() by PID."""

    def __init__(self, *, fsync: bool = False) -> None:
        found = bin_dir()
        if found is None:
            raise RuntimeError(unavailable())
        self.bin = found
        self.fsync = fsync
        self.user = _server_user()
        self.dir = Path(tempfile.mkdtemp(prefix="cloudtask-pg-"))
        self.data = self.dir / "data"
        self.log_path = self.dir / "postgres.log"
        self.port = free_port()
        self.host = "127.0.0.1"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_s: float | None = None  # the last start's wall time (initdb excluded)
        self.initdb_s: float | None = None
        if self.user is not None:
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self.dir.chmod(0o700)

    def _popen_kw(self) -> dict[str, object]:
        if self.user is None:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": [],
                "env": {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8",
                        "HOME": str(self.dir)}}

    def dsn(self, database: str = "postgres", *, password: str = PASSWORD, port: int | None = None) -> str:
        return f"postgresql://{SUPERUSER}:{password}@{self.host}:{port or self.port}/{database}"

    def initdb(self) -> None:
        began = time.monotonic()
        pwfile = self.dir / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        if self.user is not None:
            os.chown(pwfile, self.user.pw_uid, self.user.pw_gid)
        # --no-sync: initdb's own fsync of every file is most of its time, and a test cluster
        # is thrown away. Unix-socket logins are trusted (the dir is ours, 0700); TCP needs the password.
        subprocess.run(
            [str(self.bin / "initdb"), "-D", str(self.data), "-U", SUPERUSER, f"--pwfile={pwfile}",
             "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"],
            check=True, capture_output=True, cwd=self.dir, **self._popen_kw(),  # type: ignore[call-overload]
        )
        pwfile.unlink()
        self.initdb_s = time.monotonic() - began

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        if not self.data.exists():
            self.initdb()
        began = time.monotonic()
        settings = {
            "listen_addresses": self.host, "port": str(self.port), "unix_socket_directories": str(self.dir),
            "max_connections": "200", "shared_buffers": "32MB", "logging_collector": "off",
            "log_min_messages": "warning",
        }
        if not self.fsync:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        argv = [str(self.bin / "postgres"), "-D", str(self.data)]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        with self.log_path.open("ab") as log:
            # Its own process group: a Ctrl-C at the pytest prompt is not also a fast shutdown of it.
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=self.dir,
                                         process_group=0, **self._popen_kw())  # type: ignore[call-overload]
        pidfile = self.data / "postmaster.pid"
        deadline = time.monotonic() + timeout_s
        # postmaster.pid's last line is the server's status; "ready" once it accepts connections.
        while not (pidfile.exists() and pidfile.read_text().rstrip("\n").rsplit("\n", 1)[-1].strip() == "ready"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"postgres did not start:\n{self.log()[-3000:]}")
            time.sleep(0.01)
        self.start_s = time.monotonic() - began

    def stop(self, sig: signal.Signals = signal.SIGINT, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGINT: fast shutdown (sessions ended, a clean checkpoint). SIGQUIT: immediate, as a crash
        (WAL recovery at the next start). SIGKILL after timeout_s either way."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)

    def restart(self, sig: signal.Signals = signal.SIGINT) -> None:
        self.stop(sig)
        self.start()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


if __name__ == "__main__":
    server = PostgresServer()
    try:
        server.start()
        print(f"initdb {server.initdb_s:.2f} s, start {server.start_s:.2f} s")
        print(server.dsn())
        input("Enter stops it: ")
    finally:
        server.cleanup()
