"""The spend log's cost per entry as the log grows: passthru's time-ordered ids (UUIDv7) against random ones (v4).

`.venv/bin/python bench/spend_log_ids.py [--entries 350000]`: each kind writes its entries into a fresh SQLite store
through SqlKeyStore.record, in batches of 35 (what one of four workers' spend writers wrote per round at 2,800
calls/s), and prints the CPU per entry for each tenth of the run. Random ids land all over the primary key's index;
once that outgrows SQLite's page cache, every entry reads and writes pages far apart.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from passthru.keystore.records import NewKey, SpendEntry  # noqa: E402
from passthru.keystore.spend import entry_id  # noqa: E402
from passthru.keystore.sql import open_store  # noqa: E402

BATCH = 35


def random_id(now: float) -> str:
    return str(uuid.UUID(int=random.getrandbits(128), version=4))


def per_tenth(make_id: Callable[[float], str], entries: int, folder: Path) -> list[float]:
    """µs of CPU per entry for each tenth of `entries`, written into a fresh store in `folder`."""
    store = open_store(f"sqlite:///{folder / 'keys.db'}")
    try:
        token = store.create(NewKey(token="a" * 64, key_name="sk-...aaaa")).token
        now = time.time()
        tenth = entries // 10
        out = []
        for _ in range(10):
            started = time.process_time()
            for _ in range(tenth // BATCH):
                batch = []
                for _ in range(BATCH):
                    now += 0.00036  # 2,800 calls a second
                    batch.append(SpendEntry(make_id(now), token, "/small-auth", 200, 0.001, now, 0.0004))
                store.record(batch)
            out.append((time.process_time() - started) / (tenth // BATCH * BATCH) * 1e6)
        return out
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=350_000)
    args = parser.parse_args()
    for name, make_id in (("time-ordered (v7)", entry_id), ("random (v4)", random_id)):
        with tempfile.TemporaryDirectory(prefix="passthru-ids-") as folder:
            figures = per_tenth(make_id, args.entries, Path(folder))
        print(f"{name}: µs of CPU per entry, by tenth of {args.entries:,}: " + ", ".join(f"{f:.1f}" for f in figures))


if __name__ == "__main__":
    main()
