"""Command-mode test worker: reads {"id", "data"} from stdin, behaves as data["op"] says."""

import json
import os
import signal
import subprocess
import sys
import time


def spawn_grandchild(marker: str) -> None:
    """A grandchild that ignores SIGTERM (only SIGKILL to the group stops it); pids go to `marker`."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited through exec by the grandchild
    child = subprocess.Popen(["sleep", "300"], stdout=sys.stdout, stderr=subprocess.DEVNULL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with open(marker + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    os.rename(marker + ".tmp", marker)


def main() -> None:
    if os.environ.get("RUNNER_TEST_SKIP_STDIN"):
        print(json.dumps({"skipped_stdin": True}))  # exits without reading its (large) input
        return
    task = json.loads(sys.stdin.read())
    data = task["data"]
    op = data.get("op", "echo")
    if op == "echo":
        print(json.dumps({
            "id": task["id"],
            "value": data.get("value"),
            "env_task_id": os.environ.get("CLOUDTASK_TASK_ID"),
            "env_slot": os.environ.get("CLOUDTASK_SLOT"),
            "env_extra": os.environ.get("RUNNER_TEST_EXTRA"),
            "cwd": os.getcwd(),
        }))
    elif op == "empty":
        pass
    elif op == "fail":
        print("something went wrong: disk on fire", file=sys.stderr)
        sys.exit(1)
    elif op == "permanent":
        print("bad input: value must be positive", file=sys.stderr)
        sys.exit(3)
    elif op == "garbage":
        print("hello, this is not JSON")
    elif op == "signal":
        os.kill(os.getpid(), signal.SIGKILL)
    elif op == "hang":
        spawn_grandchild(data["marker"])
        time.sleep(300)
    elif op == "background":
        spawn_grandchild(data["marker"])  # keeps our stdout open after we exit
        print(json.dumps({"done": True}))
    elif op == "flood":
        chunk = "x" * 65536
        while True:
            sys.stdout.write(chunk)
    elif op == "big_stderr":
        sys.stderr.write("noise\n" * 200_000 + "THE END\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
