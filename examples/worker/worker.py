"""Example worker: reads {"id", "data"} on stdin, prints the result as JSON on stdout.

Exit 0 = success, exit 3 = permanent failure (no retry), any other exit = retryable failure.
"""

import json
import sys
import time

task = json.load(sys.stdin)
data = task["data"]
if not isinstance(data.get("n"), int):
    print(f"task {task['id']}: data.n must be an integer", file=sys.stderr)
    sys.exit(3)
time.sleep(data.get("sleep", 0))
print(json.dumps({"n": data["n"], "square": data["n"] ** 2}))
