"""Network namespaces for tests: a host of its own on this machine, joined to ours by a veth pair.

Each namespace gets a /30 of 10.231.0.0/16 kept to its veth (nothing is routed beyond it, so a
process inside has no internet and its own loopback). Names and addresses are unique to the run.
Needs root and iproute2; `unavailable()` says why not, for skip reasons.
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class Netns:
    name: str
    host_if: str
    ns_if: str
    host_ip: str  # our end of the veth: what a process inside dials to reach this host
    ns_ip: str  # the namespace's address

    def pids(self) -> list[int]:
        out = ip("netns", "pids", self.name).stdout
        return [int(p) for p in out.split()]


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    try:
        ip("-V")
    except FileNotFoundError:
        return "network namespaces: the `ip` command (iproute2) is not installed"
    return None


@contextmanager
def namespace(prefix: str = "ct") -> Iterator[Netns]:
    """A new namespace with a veth pair up on both ends; deleted (with its addresses) on exit.
    Processes still inside are the caller's to stop first (by PID: `Netns.pids()`)."""
    tag = f"{os.getpid() % 10000:04d}{random.randrange(16 ** 3):03x}"
    used = ip("-4", "-o", "addr", "show").stdout
    while True:
        base = f"10.231.{random.randrange(256)}.{4 * random.randrange(64)}"
        head, last = base.rsplit(".", 1)
        host_ip, ns_ip = f"{head}.{int(last) + 1}", f"{head}.{int(last) + 2}"
        if f" {host_ip}/" not in used and f" {ns_ip}/" not in used:
            break
    ns = Netns(f"{prefix}-{tag}", f"{prefix[:3]}{tag}h", f"{prefix[:3]}{tag}n", host_ip, ns_ip)
    added = ip("netns", "add", ns.name)
    if added.returncode != 0:
        raise RuntimeError(f"ip netns add {ns.name}: {added.stderr.strip()}")
    try:
        for args in (("link", "add", ns.host_if, "type", "veth", "peer", "name", ns.ns_if),
                     ("link", "set", ns.ns_if, "netns", ns.name),
                     ("addr", "add", f"{ns.host_ip}/30", "dev", ns.host_if),
                     ("link", "set", ns.host_if, "up"),
                     ("-n", ns.name, "addr", "add", f"{ns.ns_ip}/30", "dev", ns.ns_if),
                     ("-n", ns.name, "link", "set", ns.ns_if, "up"),
                     ("-n", ns.name, "link", "set", "lo", "up")):
            done = ip(*args)
            if done.returncode != 0:
                raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
        yield ns
    finally:
        # Deleting one end of a veth deletes the pair (and its address); then the namespace.
        ip("link", "del", ns.host_if)
        ip("netns", "del", ns.name)
