"""The admin page's pages against a big store: 10,000 keys and 1,000,000 spend log entries, on SQLite and PostgreSQL.

`.venv/bin/python bench/ui_pages.py [--backend sqlite|postgres] [--keys 10000] [--entries 1000000] [--days 30]`
fills a fresh store (a SQLite file in a temp folder, or a database `passthru_ui_bench_<pid>` made on the test
PostgreSQL at 127.0.0.1:5432 and dropped at exit), logs in through the page's own login, and prints each page's
render time (median and slowest of 7, after one warm-up), through Flask's test client: the page's own work, with no
socket in between. `--days` spreads the entries evenly over that many days before now: 30 puts all of them in the
usage page's default range, the worst case for its sums; 365 is a year of history.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402
import yaml  # noqa: E402

from passthru import create_app  # noqa: E402
from passthru.auth import digest  # noqa: E402
from passthru.keystore.engine import migrate  # noqa: E402

MASTER = "bench-ui-master-key-0123456789"
ADMIN_DSN = "host=127.0.0.1 port=5432 dbname=test user=postgres connect_timeout=5"
ROUTES = [f"/v1/route-{n}" for n in range(8)]
MODELS = [f"model-{n}" for n in range(10)] + [None]
RUNS = 7


def fill(url: str, backend: str, keys: int, entries: int, days: float) -> tuple[list[str], str]:
    """Keys and entries written straight into the migrated tables, in bulk: (the keys' tokens, one entry's id)."""
    migrate(url)
    now = time.time()
    tokens = [digest(f"sk-bench-{n}").hex() for n in range(keys)]
    key_rows = [(t, f"sk-...{n % 10000:04d}", f"key-{n:05d}", now - keys + n, float(n % 7 == 0) * 10 or None,
                 n * 0.001, 60 if n % 3 == 0 else None) for n, t in enumerate(tokens)]  # fmt: skip
    span, rng = days * 86400, random.Random(18)

    def ident(n: int) -> str:  # a UUIDv7-like id, time-ordered as the writer's are (spend.entry_id)
        return str(uuid.UUID(int=(int((now - span + span * n / entries) * 1000) << 80) | n))

    def entry(n: int) -> tuple[Any, ...]:
        start = now - span + span * n / entries
        status = 200 if rng.random() < 0.97 else rng.choice((429, 500, 502))
        model = rng.choice(MODELS)
        tokens_in, tokens_out = (rng.randrange(10, 2000), rng.randrange(1, 800)) if model else (None, None)
        total = None if tokens_in is None else tokens_in + (tokens_out or 0)
        return (ident(n), rng.choice(tokens), rng.choice(ROUTES), status, 0.001 * rng.random(), start, rng.random(),
                f"call-{n}", model, tokens_in, tokens_out, total, "upstream.example")  # fmt: skip

    key_sql = ("INSERT INTO passthru_keys (token, key_name, key_alias, created_at, max_budget, spend, rpm_limit, "
               "blocked, window_start, window_count) VALUES ({}, false, 0, 0)")  # fmt: skip
    columns = ("request_id, token, route, status, spend, start_time, duration, call_id, model, prompt_tokens, "
               "completion_tokens, total_tokens, target")  # fmt: skip
    if backend == "sqlite":
        import sqlite3

        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            conn.executemany(key_sql.format(", ".join("?" * 7)), key_rows)
            for start in range(0, entries, 100_000):
                rows = [entry(n) for n in range(start, min(entries, start + 100_000))]
                conn.executemany(f"INSERT INTO passthru_spend_logs ({columns}) VALUES ({', '.join('?' * 13)})", rows)
            conn.execute("ANALYZE")
    else:
        with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
            with conn.cursor() as cursor:
                cursor.executemany(key_sql.format(", ".join(["%s"] * 7)), key_rows)
                with cursor.copy(f"COPY passthru_spend_logs ({columns}) FROM STDIN") as copy:
                    for n in range(entries):
                        copy.write_row(entry(n))
            conn.commit()
            conn.autocommit = True
            conn.execute("ANALYZE")
    return tokens, ident(entries // 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--days", type=float, default=30)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="passthru-ui-bench-"))
    database = f"passthru_ui_bench_{__import__('os').getpid()}"
    if args.backend == "sqlite":
        url = f"sqlite:///{folder / 'keys.db'}"
    else:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{database}"')
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}"
    app = None
    try:
        began = time.perf_counter()
        tokens, entry_id = fill(url, args.backend, args.keys, args.entries, args.days)
        print(f"filled {args.backend}: {args.keys:,} keys, {args.entries:,} entries over {args.days:g} days in "
              f"{time.perf_counter() - began:.0f} s")  # fmt: skip
        config = folder / "config.yaml"
        endpoints = [{"path": path, "target": "http://127.0.0.1:9/x", "auth": True} for path in ROUTES]
        config.write_text(yaml.safe_dump({"general_settings": {"master_key": MASTER, "database_url": url,
                                                               "pass_through_endpoints": endpoints}}))  # fmt: skip
        app = create_app(config)
        client = app.test_client()
        assert client.post("/ui/login", data={"key": MASTER}).status_code == 303
        pages = ["/ui/keys", f"/ui/keys?page={-(-args.keys // 50)}", "/ui/keys?alias=key-0999",
                 f"/ui/keys/{tokens[1]}", "/ui/usage", "/ui/routes", "/ui/logs", f"/ui/logs?key={tokens[42]}",
                 "/ui/logs?key=key-00042", f"/ui/logs?route={ROUTES[3]}", "/ui/logs?status=502",
                 f"/ui/logs?route={ROUTES[3]}&status=500", f"/ui/logs/{entry_id}"]  # fmt: skip
        print(f"\n| page ({args.backend}, {args.days:g} days) | median ms | slowest ms |\n| --- | ---: | ---: |")
        for page in pages:
            times = []
            for run in range(RUNS + 1):
                started = time.perf_counter()
                answer = client.get(page)
                if run:
                    times.append((time.perf_counter() - started) * 1000)
                assert answer.status_code == 200, (page, answer.status_code, answer.text[:300])
            print(f"| `{page.replace(tokens[42], '<token>').replace(tokens[1], '<token>').replace(entry_id, '<id>')}`"
                  f" | {statistics.median(times):.1f} | {max(times):.1f} |")  # fmt: skip
    finally:
        if app is not None:
            app.extensions["passthru.key_store"].close()
        if args.backend == "postgres":
            with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


if __name__ == "__main__":
    main()
