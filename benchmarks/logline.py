"""The cost of one log call with secret redaction (cloudtaskd.logs), against plain JSON rendering.

    python benchmarks/logline.py [--calls 200000]

Prints microseconds per `log.info(...)` of a typical line: plain structlog JSON (no redaction), the
daemon's processors with no secret registered, and with 5 registered secrets of 40 characters.
"""

from __future__ import annotations

import argparse
import io
import secrets
import time

import _common  # noqa: F401 - puts the repository on sys.path
import structlog

from cloudtaskd import logs, redact


class _Null(io.TextIOBase):
    def write(self, s: str) -> int:
        return len(s)


def per_call_us(calls: int) -> float:
    log = structlog.get_logger("bench")
    start = time.perf_counter()
    for i in range(calls):
        log.info("lease_granted", instance="i-0123456789abcdef", task=i, job=12, pool=3, offer="aws:m5.large:spot")
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    null = _Null()
    logs.configure("info", null)
    redacting = structlog.get_config()["processors"]
    # The same processors less the two that redact.
    plain = [*[p for p in redacting if p is not logs.hide_secrets][:-1], structlog.processors.JSONRenderer()]
    needles = [secrets.token_urlsafe(30) for _ in range(5)]
    best = {"plain JSON": float("inf"), "redaction, none registered": float("inf"),
            "redaction, 5 registered": float("inf")}
    for _ in range(args.rounds):  # interleaved, best of each: the machine's noise only ever adds
        for name, processors, registered in (("plain JSON", plain, []), ("redaction, none registered", redacting, []),
                                             ("redaction, 5 registered", redacting, needles)):
            redact.forget_all()
            for needle in registered:
                redact.register(needle)
            structlog.configure(processors=processors)
            best[name] = min(best[name], per_call_us(args.calls))
    for name, us in best.items():
        print(f"{name + ':':28} {us:.2f} us per call ({us - best['plain JSON']:+.2f})")


if __name__ == "__main__":
    main()
