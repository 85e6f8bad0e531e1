"""What the status page's plots cost the daemon (cloudtaskd.http.series).

    python benchmarks/status_series.py [--jobs 100] [--live 2000] [--instances 20000]

Prints the milliseconds of one sample (read on a real store's reader connection, with that many
jobs and live of all instances) and of encoding a full hour of samples (360, ten lines), and the
size of that answer: the first is paid every SERIES_INTERVAL_S, the second once per sample.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import _common  # noqa: F401 - puts the repository on sys.path

from cloudtaskd.core.store import Store
from cloudtaskd.http.series import Sample, encode, read_sample


async def sample_ms(jobs: int, live: int, instances: int, rounds: int = 200) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "db.sqlite")
        await store.open()

        def rows(tx: Any) -> None:
            db = tx.db
            db.execute("INSERT INTO pools (id, digest, spec, path, created_at) VALUES (1, 'd', '{}', '/', 0)")
            for j in range(1, jobs + 1):
                db.execute("INSERT INTO jobs (id, name, pool_id, state, created_at, max_attempts, n_queued,"
                           " n_leased, n_succeeded) VALUES (?, 'j', 1, 'active', 0, 3, 1000, 8, 500)", (j,))
            for i in range(instances):
                db.execute("INSERT INTO instances (id, provider, pool_id, state, slots, token_hash, offer,"
                           " price_per_hour, created_at, state_changed_at) VALUES (?, ?, 1, ?, 2, 'h', ?, 0.1, 0, 0)",
                           (f"i{i}", ("aws", "gcp", "azure")[i % 3], "running" if i < live else "stopped",
                            json.dumps({"spot": i % 2 == 0, "machine_type": "x"})))

        try:
            await store.write(rows)
            start = time.perf_counter()
            for _ in range(rounds):
                await store.read(lambda db: read_sample(db, 0.0, 0.0))
            return (time.perf_counter() - start) / rounds * 1000
        finally:
            await store.close()


def encode_ms(rounds: int = 50) -> tuple[float, int]:
    samples = [Sample(t=1e9 + 10 * i, mono=10.0 * i, succeeded=1000 * i, dead=i, queued=100_000 - i, leased=512,
                      instances={"aws spot": 40, "aws on-demand": 5, "gcp spot": 30, "gcp on-demand": 2,
                                 "azure spot": 20, "local": 1},
                      cost_per_hour={"aws": 3.2, "gcp": 2.1, "azure": 1.5, "local": 0.0}) for i in range(360)]
    start = time.perf_counter()
    for _ in range(rounds):
        body = encode(samples, 10.0, 3600.0)
    return (time.perf_counter() - start) / rounds * 1000, len(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--live", type=int, default=2000)
    parser.add_argument("--instances", type=int, default=20_000)
    args = parser.parse_args()
    ms = asyncio.run(sample_ms(args.jobs, args.live, args.instances))
    print(f"one sample, {args.jobs} jobs, {args.live} live of {args.instances} instances: {ms:.2f} ms")
    ms, size = encode_ms()
    print(f"encode an hour (360 samples, 6 instance lines, 4 cost lines): {ms:.2f} ms, {size} bytes")


if __name__ == "__main__":
    main()
