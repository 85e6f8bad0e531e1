"""Stream-mode test worker: one {"id", "data"} line in, one answer line out, per data["op"]."""

import json
import os
import signal
import subprocess
import sys
import time


def answer(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    for line in sys.stdin:
        task = json.loads(line)
        key, data = task["id"], task["data"]
        op = data.get("op", "echo")
        if op == "echo":
            answer({"id": key, "result": {"value": data.get("value"), "pid": os.getpid(),
                                          "slot": os.environ.get("CLOUDTASK_SLOT")}})
        elif op == "blank_first":
            sys.stdout.write("\n")
            answer({"id": key, "result": "after blank"})
        elif op == "fail":
            answer({"id": key, "error": "upstream returned 503"})
        elif op == "permanent":
            answer({"id": key, "error": "invalid input", "retryable": False})
        elif op == "garbage":
            sys.stdout.write("debug: this is not JSON\n")
            sys.stdout.flush()
        elif op == "wrong_id":
            answer({"id": "someone-else", "result": 1})
        elif op == "no_result":
            answer({"id": key})
        elif op == "crash":
            print("fatal: segfault imminent", file=sys.stderr, flush=True)
            sys.exit(7)
        elif op == "hang":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the grandchild inherits it: only SIGKILL works
            child = subprocess.Popen(["sleep", "300"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            marker = data["marker"]
            with open(marker + ".tmp", "w") as f:
                f.write(f"{os.getpid()} {child.pid}")
            os.rename(marker + ".tmp", marker)
            time.sleep(300)


if __name__ == "__main__":
    main()
