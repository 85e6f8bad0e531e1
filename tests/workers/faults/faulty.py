"""A worker that misbehaves on request, for tests/integration/test_faults_workers.py, in all three modes:

    python3 faulty.py command      one process per task (task on stdin, result on stdout)
    python3 -u faulty.py stream    one process per slot, one JSON line in and out per task
    function: faulty:run           python mode, called in the agent

`data["op"]` picks the behaviour: ok (the default), hang, exit, signal, raise, permanent, os_exit,
garbage, binary, partial_exit, partial_hang, huge_line, wrong_id, big_result, alloc, flaky, meet.
Every process records its pid under `data["piddir"]` when given, so a test can check that none
outlives what should have ended it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

MODE = sys.argv[1] if __name__ == "__main__" and len(sys.argv) > 1 else "python"


class PermanentFailure(Exception):
    """Same name as the agent's class: a permanent failure in python mode."""


class Answered(Exception):
    """Stream mode: the op already wrote its own (mis)answer."""


def _note_pid(data: dict[str, Any], pid: int, tag: str) -> None:
    piddir = data.get("piddir")
    if piddir:
        path = os.path.join(piddir, f"{tag}-{pid}")
        with open(path + ".tmp", "w") as f:
            f.write(str(pid))
        os.rename(path + ".tmp", path)


def _oom_score_adj() -> int | None:
    try:
        with open("/proc/self/oom_score_adj") as f:
            return int(f.read())
    except OSError:
        return None


def _write_raw(raw: bytes) -> None:
    sys.stdout.flush()
    sys.stdout.buffer.write(raw)
    sys.stdout.buffer.flush()


def work(key: str, data: dict[str, Any]) -> Any:
    """The result, or an exception; ops that end the process never return."""
    op = data.get("op", "ok")
    if MODE != "python":
        _note_pid(data, os.getpid(), "worker")
    if op == "ok":
        if data.get("sleep"):
            time.sleep(data["sleep"])
        return {"n": data.get("n"), "pid": os.getpid(), "oom_score_adj": _oom_score_adj()}
    if op == "hang":
        if data.get("grandchild"):
            # Ignores SIGTERM (inherited through exec): only SIGKILL to the whole group stops it.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            child = subprocess.Popen(["sleep", "300"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            _note_pid(data, child.pid, "grandchild")
        time.sleep(data.get("hang_s", 300))
        return "woke up"
    if op == "exit":
        print(f"worker exits with code {data['code']} on purpose", file=sys.stderr, flush=True)
        sys.exit(data["code"])
    if op == "signal":
        print(f"worker sends itself {data['sig']}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), getattr(signal, data["sig"]))
        time.sleep(10)  # the signal lands before this ends
    if op == "raise":
        raise RuntimeError("worker blew up on purpose")
    if op == "permanent":
        raise PermanentFailure("this input can never work")
    if op == "os_exit":
        os._exit(data.get("code", 9))
    if op == "flaky":
        marker = data["marker"]
        if not os.path.exists(marker):
            open(marker, "w").close()
            raise RuntimeError("flaky: fails the first time only")
        return "second time lucky"
    if op == "meet":
        # Finishes only when `peers` tasks run at the same time: proves that many slots are free.
        open(os.path.join(data["dir"], key), "w").close()
        deadline = time.monotonic() + data.get("wait_s", 30)
        while len(os.listdir(data["dir"])) < data["peers"]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(os.listdir(data['dir']))} of {data['peers']} peers ran at once")
            time.sleep(0.02)
        return "met"
    if op == "big_result":
        return data.get("char", "x") * data["chars"]
    if op == "alloc":
        block = bytearray(data["mib"] * 1024 * 1024)
        for i in range(0, len(block), 4096):  # touch every page: resident, not just reserved
            block[i] = 1
        return {"mib": data["mib"], "oom_score_adj": _oom_score_adj()}
    if MODE == "python":
        return f"op {op} is not for python mode"
    # Output faults, for command and stream mode.
    if op == "garbage":
        _write_raw(b"this is not JSON, just a log line on the wrong stream\n")
    elif op == "binary":
        _write_raw(bytes(range(256)) * 16 + b"\n")
    elif op == "partial_exit":
        _write_raw(b'{"id": "' + key.encode() + b'", "resu')
        os._exit(0)
    elif op == "partial_hang":
        _write_raw(b'{"id": "' + key.encode() + b'", "resu')
        time.sleep(300)
    elif op == "huge_line":
        chunk = b"x" * (1024 * 1024)
        for _ in range(data["mib"]):
            sys.stdout.buffer.write(chunk)
        _write_raw(b"\n")
    elif op == "wrong_id":
        _write_raw(json.dumps({"id": "someone-else", "result": 1}).encode() + b"\n")
    else:
        return f"unknown op {op}"
    raise Answered


def run(task_id: str, data: dict[str, Any]) -> Any:
    """python mode: the agent calls this in a worker thread."""
    return work(task_id, data)


def command_main() -> None:
    task = json.loads(sys.stdin.read())
    try:
        result = work(task["id"], task["data"])
    except Answered:
        return
    except PermanentFailure as exc:
        print(exc, file=sys.stderr)
        sys.exit(3)
    print(json.dumps(result))


def stream_main() -> None:
    for line in sys.stdin:
        task = json.loads(line)
        key = task["id"]
        try:
            answer = {"id": key, "result": work(key, task["data"])}
        except Answered:
            continue
        except PermanentFailure as exc:
            answer = {"id": key, "error": str(exc), "retryable": False}
        _write_raw(json.dumps(answer).encode() + b"\n")


if __name__ == "__main__":
    command_main() if MODE == "command" else stream_main()
