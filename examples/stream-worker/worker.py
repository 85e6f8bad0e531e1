"""Example stream worker: for each line {"id", "data"} answer {"id", "result"} (or "error")."""

import json
import sys

for line in sys.stdin:
    task = json.loads(line)
    n = task["data"].get("n")
    if isinstance(n, int):
        answer = {"id": task["id"], "result": {"square": n * n}}
    else:
        answer = {"id": task["id"], "error": "data.n must be an integer", "retryable": False}
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
