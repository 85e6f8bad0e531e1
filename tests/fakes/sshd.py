"""A real OpenSSH server for tests, on 127.0.0.1 and a free port, with keys made per test."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from tests.procs import free_port

SSHD = "/usr/sbin/sshd"


def available() -> str | None:
    """None when a real sshd can run here, else why not (for skip reasons)."""
    if not Path(SSHD).exists():
        return "openssh-server is not installed (install.sh installs it)"
    if os.geteuid() != 0:
        return "sshd for tests needs root here (it logs in as root)"
    if shutil.which("ssh-keygen") is None:
        return "ssh-keygen is not installed"
    return None


class Sshd:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.port = free_port()
        self.host_key = workdir / "host_ed25519"
        self.client_key = workdir / "client_ed25519"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for key in (self.host_key, self.client_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        (self.dir / "authorized_keys").write_text(Path(f"{self.client_key}.pub").read_text())
        config = self.dir / "sshd_config"
        config.write_text("\n".join([
            "ListenAddress 127.0.0.1", f"Port {self.port}", f"HostKey {self.host_key}",
            f"PidFile {self.dir / 'sshd.pid'}", f"AuthorizedKeysFile {self.dir / 'authorized_keys'}",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "UsePAM no", "StrictModes no", "Subsystem sftp internal-sftp", "",
        ]))
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        subprocess.run([SSHD, "-t", "-f", str(config)], check=True)
        self.proc = subprocess.Popen([SSHD, "-D", "-f", str(config), "-E", str(self.dir / "sshd.log")])
        deadline = time.monotonic() + 10
        while "Server listening" not in self._log():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"sshd did not start: {self._log()}")
            time.sleep(0.02)

    def _log(self) -> str:
        path = self.dir / "sshd.log"
        return path.read_text() if path.exists() else ""

    def public_host_key(self) -> str:
        return Path(f"{self.host_key}.pub").read_text().strip()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
