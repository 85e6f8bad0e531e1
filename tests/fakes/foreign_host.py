"""A foreign host: what a cloud VM looks like, on this machine.

A Debian bullseye root made with `debootstrap --variant=minbase` plus only `python3` (3.9, no venv,
no pip: `import ensurepip` fails as on the clouds' images) and `openssh-server`, its sshd running
chrooted inside a network namespace of its own (its own address and loopback, no route out). A
process there shares nothing with the control host but the kernel: not our Python, not our
packages, not our 127.0.0.1.

The root is built once and cached (`CLOUDTASK_FOREIGN_ROOT`, default
/var/cache/cloudtask-tests/debian-bullseye; `python -m tests.fakes.foreign_host build` builds it ahead, as
.ci/run does). Each host mounts an overlay on it, so a test's changes vanish with the test.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.fakes import netns

SUITE = "bullseye"
MIRROR = "http://deb.debian.org/debian"
CACHE = Path(os.environ.get("CLOUDTASK_FOREIGN_ROOT", f"/var/cache/cloudtask-tests/debian-{SUITE}"))
BUILD_TIMEOUT_S = 900


def unavailable() -> str | None:
    """None when a foreign host can be made here, else why not (skip reasons)."""
    why = netns.unavailable()
    if why is not None:
        return why
    if not CACHE.joinpath("usr/bin/python3").exists() and shutil.which("debootstrap") is None:
        return "debootstrap is not installed (install.sh installs it) and no root is cached at " + str(CACHE)
    return None


def build(cache: Path = CACHE) -> Path:
    """The cached root, built first if it is not there yet (one builder at a time)."""
    if cache.joinpath(".complete").exists():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.parent / f".{cache.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if cache.joinpath(".complete").exists():
            return cache
        tmp = cache.with_name(cache.name + ".building")
        shutil.rmtree(tmp, ignore_errors=True)
        done = subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=python3,openssh-server", SUITE, str(tmp), MIRROR],
            capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"debootstrap failed ({done.returncode}): {(done.stdout + done.stderr)[-2000:]}")
        # No host keys in the image: each host makes its own, as a VM does at first boot.
        for key in tmp.glob("etc/ssh/ssh_host_*"):
            key.unlink()
        tmp.joinpath(".complete").write_text(time.strftime("%Y-%m-%d\n"))
        shutil.rmtree(cache, ignore_errors=True)
        tmp.rename(cache)
    return cache


def _run(*argv: str, timeout: float = 60) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


@dataclass
class ForeignHost:
    root: Path  # the host's / as seen from here
    net: netns.Netns
    client_key: Path  # root may log in with this key
    port: int = 22

    @property
    def address(self) -> str:
        return self.net.ns_ip

    def public_host_key(self) -> str:
        return self.root.joinpath("etc/ssh/ssh_host_ed25519_key.pub").read_text().strip()

    def run(self, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """A shell command on the host (its namespace, its root), as root."""
        return subprocess.run(["ip", "netns", "exec", self.net.name, "chroot", str(self.root), "/bin/sh", "-c",
                               command], capture_output=True, text=True, timeout=timeout)

    def python_version(self) -> str:
        return self.run("python3 -c 'import sys; print(sys.version.split()[0])'").stdout.strip()


@contextmanager
def foreign_host(workdir: Path) -> Iterator[ForeignHost]:
    """A running foreign host: overlay root, namespace, sshd on its own address, port 22."""
    base = build()
    workdir.mkdir(parents=True, exist_ok=True)
    upper, work, merged = workdir / "upper", workdir / "work", workdir / "root"
    for d in (upper, work, merged):
        d.mkdir()
    with ExitStack() as stack:
        _run("mount", "-t", "overlay", "overlay", "-o", f"lowerdir={base},upperdir={upper},workdir={work}",
             str(merged))
        stack.callback(_umount, merged)
        for sub in ("proc", "dev", "dev/pts"):
            _run("mount", "--bind", f"/{sub}", str(merged / sub))
            stack.callback(_umount, merged / sub)
        net = stack.enter_context(netns.namespace("ct-vm"))
        stack.callback(_kill_inside, net)
        client_key = workdir / "client_ed25519"
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(client_key))
        _run("chroot", str(merged), "ssh-keygen", "-A")
        ssh_dir = merged / "root" / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        (ssh_dir / "authorized_keys").write_text(Path(f"{client_key}.pub").read_text())
        (ssh_dir / "authorized_keys").chmod(0o600)
        (merged / "etc/ssh/sshd_config_ct").write_text("\n".join([
            f"ListenAddress {net.ns_ip}", "Port 22", "HostKey /etc/ssh/ssh_host_ed25519_key",
            "PidFile /run/sshd-ct.pid", "PermitRootLogin prohibit-password", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "UsePAM no", "AllowTcpForwarding yes",
            "Subsystem sftp internal-sftp", "",
        ]))
        (merged / "run" / "sshd").mkdir(parents=True, exist_ok=True)
        _run("ip", "netns", "exec", net.name, "chroot", str(merged), "/usr/sbin/sshd", "-f",
             "/etc/ssh/sshd_config_ct", "-E", "/var/log/sshd-ct.log")
        pidfile = merged / "run" / "sshd-ct.pid"
        deadline = time.monotonic() + 10
        while not pidfile.exists():
            if time.monotonic() > deadline:
                log = merged / "var/log/sshd-ct.log"
                raise RuntimeError(f"sshd did not start: {log.read_text() if log.exists() else ''}")
            time.sleep(0.02)
        yield ForeignHost(merged, net, client_key)


def _kill_inside(net: netns.Netns) -> None:
    """Everything still running in the namespace (sshd, agents, workers), by PID."""
    for _ in range(50):
        pids = net.pids()
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


if __name__ == "__main__":
    if sys.argv[1:] == ["build"]:
        why = unavailable()
        if why is not None:
            print(f"foreign host root not built: {why}", file=sys.stderr)
            sys.exit(0)
        print(f"foreign host root ready at {build()}")
    else:
        print("usage: python -m tests.fakes.foreign_host build", file=sys.stderr)
        sys.exit(2)
