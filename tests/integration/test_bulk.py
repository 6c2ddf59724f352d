"""Streaming and COPY at size, behind PgBouncer, and cut by the network (real servers)."""

from __future__ import annotations

import datetime as dt
import io
import json
import subprocess
import sys
import textwrap
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from pgwarden import Database, NotCommitted, Settings


def make(url: str, **overrides: Any) -> Database:
    return Database(Settings(url=url, **overrides))


def fresh_table(server: Any, name: str, columns: str) -> None:
    server.execute(f"DROP TABLE IF EXISTS {name}")
    server.execute(f"CREATE TABLE {name} ({columns})")


# Runs in a fresh interpreter, so that its peak RSS is the stream's alone. The
# control (the same rows fetched into a list) shows the measure sees growth.
_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    from pgwarden import Database, Settings

    def peak_kb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    QUERY = "SELECT g, repeat('x', 64) AS pad FROM generate_series(1, %s) g"
    with Database(Settings(url=sys.argv[1], default_timeout=300)) as db:
        n = sum(1 for _ in db.stream(QUERY, (10_000,)))  # warm: imports, pool, caches
        base = peak_kb()
        total = 0
        count = 0
        for row in db.stream(QUERY, (1_000_000,), row=tuple):
            total += row[0]
            count += 1
        streamed = peak_kb()
        held = db.fetch(QUERY, (1_000_000,), row=tuple)
        fetched = peak_kb()
        print(json.dumps({"count": count, "total": total, "base": base,
                          "streamed": streamed, "fetched": fetched, "held": len(held)}))
    """
)


def test_streaming_a_million_rows_keeps_memory_flat(pg_server: Any) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, pg_server.url],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    print("peak RSS (KiB):", seen)
    assert seen["count"] == 1_000_000
    assert seen["total"] == 1_000_000 * 1_000_001 // 2
    stream_growth_mb = (seen["streamed"] - seen["base"]) / 1024
    fetch_growth_mb = (seen["fetched"] - seen["streamed"]) / 1024
    # 1M rows of ~100 bytes: a list of them is well over 100 MB; a stream holds
    # one batch of DEFAULT_FETCH_SIZE rows (well under 1 MB) at a time.
    assert stream_growth_mb < 16, seen
    assert fetch_growth_mb > 100, seen  # the measure does see rows being kept


ROW_TYPES = "id int, note text, amount numeric, at timestamptz, data bytea, flag bool, j jsonb"


def _rows(n: int) -> list[tuple[Any, ...]]:
    base = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    return [
        (
            i,
            None if i % 97 == 0 else f"row {i}\t\\ \n ✓ «{i % 13}»",
            Decimal(i) / 7 if i % 5 else None,
            base + dt.timedelta(seconds=i),
            bytes([i % 256, 0, 255]),
            i % 2 == 0,
            Jsonb({"i": i, "s": "é"}),
        )
        for i in range(n)
    ]


def test_copy_in_and_out_of_100k_rows_round_trips_exactly(pg_server: Any) -> None:
    fresh_table(pg_server, "bulk_src", ROW_TYPES)
    fresh_table(pg_server, "bulk_dst", ROW_TYPES)
    rows = _rows(100_000)
    with make(pg_server.url, default_timeout=120) as db:
        assert db.copy_in("bulk_src", rows) == 100_000
        for fmt in ("text", "binary"):
            db.execute("TRUNCATE bulk_dst")
            dump = io.BytesIO()
            assert db.copy_out("SELECT * FROM bulk_src ORDER BY id", dump, format=fmt) == 100_000
            dump.seek(0)
            assert db.copy_in("bulk_dst", dump, format=fmt) == 100_000
            differ = db.fetchval(
                "SELECT count(*) FROM ((TABLE bulk_src EXCEPT ALL TABLE bulk_dst)"
                " UNION ALL (TABLE bulk_dst EXCEPT ALL TABLE bulk_src)) d"
            )
            assert differ == 0, fmt
        back = db.fetch("SELECT * FROM bulk_dst ORDER BY id", row=tuple)
    expected = [(*r[:6], r[6].obj) for r in rows]
    assert back == expected


@pytest.mark.pgbouncer
def test_streams_work_behind_pgbouncer_transaction_mode(pgbouncer_factory: Any) -> None:
    bouncer = pgbouncer_factory(default_pool_size=2)
    with make(bouncer.url, max_size=4) as db:
        query = "SELECT g FROM generate_series(1, %s) g ORDER BY g"
        first = db.stream(query, (20_000,), fetch_size=500)
        second = db.stream(query, (30_000,), fetch_size=700)
        # Interleaved: each stream's cursor lives in its own transaction, pinned
        # to one server connection from BEGIN to COMMIT.
        seen_first, seen_second = [], []
        for a, b in zip(first, second, strict=False):
            seen_first.append(a["g"])
            seen_second.append(b["g"])
        seen_second += [b["g"] for b in second]
        assert seen_first == list(range(1, 20_001))
        assert seen_second == list(range(1, 30_001))
        # Between the streams' transactions, other statements go through as usual.
        assert db.fetchval("SELECT count(*) FROM pg_cursors") == 0
        assert sum(1 for _ in db.stream(query, (5_000,), fetch_size=100)) == 5_000
        assert db.stats()["pgbouncer"] is True


@pytest.mark.proxy
def test_a_copy_cut_by_the_network_leaves_no_rows(pg_server: Any, fault_proxy: Any) -> None:
    fresh_table(pg_server, "bulk_cut", "id int, note text")
    rows = [(i, "CUT-HERE" if i == 60_000 else f"n{i}") for i in range(100_000)]
    with make(fault_proxy.url_for(pg_server.url), default_timeout=60) as db:
        fault_proxy.cut_on(b"CUT-HERE", when="before")
        with pytest.raises(NotCommitted):
            db.copy_in("bulk_cut", rows)
        assert fault_proxy.cuts == 1
        assert db.fetchval("SELECT count(*) FROM bulk_cut") == 0

        def in_tx(tx: Any) -> None:
            tx.execute("INSERT INTO bulk_cut VALUES (-1, 'before the copy')")
            tx.copy_in("bulk_cut", rows)

        fault_proxy.cut_on(b"CUT-HERE", when="before")
        with pytest.raises(NotCommitted):
            db.run_transaction(in_tx, attempts=1)
        assert db.fetchval("SELECT count(*) FROM bulk_cut") == 0
        # and the handle recovers for the next COPY
        assert db.copy_in("bulk_cut", rows[:10]) == 10
    assert pg_server.execute("SELECT count(*) FROM bulk_cut")[0][0] == 10


@pytest.mark.proxy
def test_a_stream_is_reopened_before_its_first_row_and_never_after(
    pg_server: Any, fault_proxy: Any
) -> None:
    query = "SELECT g FROM generate_series(1, 1000) g ORDER BY g"
    with make(fault_proxy.url_for(pg_server.url)) as db:
        db.fetchval("SELECT 1")
        fault_proxy.cut_on(b"DECLARE", when="before")
        assert [r["g"] for r in db.stream(query, fetch_size=100)] == list(range(1, 1001))
        assert fault_proxy.cuts == 1
        assert db.stats()["counters"]["retries"]["total"] == 1

        seen = []
        with pytest.raises(psycopg.OperationalError):  # noqa: PT012 - the cut is mid-iteration
            for row in db.stream(query, fetch_size=100):
                seen.append(row["g"])
                if len(seen) == 1:
                    fault_proxy.cut_on(b"FETCH", when="before")
        assert seen == list(range(1, 101))  # the first batch, then the error: no repeat
        assert fault_proxy.cuts == 2
        assert db.stats()["counters"]["retries"]["total"] == 1
        assert db.stats()["in_flight"] == 0
        assert db.fetchval("SELECT 1") == 1
