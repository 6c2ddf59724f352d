"""The sync Database mirrors AsyncDatabase; fork safety and drain on close."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from pgwarden import Database, HandleClosed, Settings
from pgwarden.core.lifecycle import State


def make(url: str, **overrides: Any) -> Database:
    return Database(Settings(url=url, **overrides))


def test_sync_query_api(pg_server: Any) -> None:
    with make(pg_server.url) as db:
        assert db.fetch("SELECT 1 AS a") == [{"a": 1}]
        assert db.fetchval("SELECT %s::int * 2", [21]) == 42
        with db.transaction() as tx:
            assert tx.fetchval("SELECT 1") == 1
        with db.connection() as conn:
            assert conn.execute("SELECT 3 AS x").fetchone() == {"x": 3}


def test_sync_200_threads_share_one_warmup(pg_server: Any) -> None:
    with make(pg_server.url, max_size=8) as db, ThreadPoolExecutor(max_workers=50) as ex:
        results = list(ex.map(lambda i: db.fetchval("SELECT %s::int", [i]), range(200)))
        assert results == list(range(200))
        assert db.stats()["counters"]["warmups"] == {"ok": 1, "failed": 0}
        assert db.stats()["counters"]["connections_opened"] <= 8


def test_sync_close_drains(pg_server: Any) -> None:
    db = make(pg_server.url)
    db.ready()
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(db.fetchval("SELECT 7 FROM pg_sleep(0.4)")))
    t.start()
    time.sleep(0.1)
    db.close(timeout=5)
    t.join()
    assert out == [7]
    assert db.state is State.CLOSED
    with pytest.raises(HandleClosed):
        db.fetchval("SELECT 1")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_gives_the_child_a_fresh_pool(pg_server: Any) -> None:
    import pgwarden

    db = pgwarden.connect(pg_server.url, max_size=2, application_name="pgw-fork")
    parent_pid = db.fetchval("SELECT pg_backend_pid()")
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(read_fd)
            again = pgwarden.connect(pg_server.url, max_size=2, application_name="pgw-fork")
            child_backend = again.fetchval("SELECT pg_backend_pid()")
            os.write(write_fd, str(child_backend).encode())
            again.close()
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    _, status = os.waitpid(child, 0)
    child_backend = int(os.read(read_fd, 64) or b"0")
    os.close(read_fd)
    assert os.waitstatus_to_exitcode(status) == 0
    assert child_backend not in (0, parent_pid)
    # The parent's connection survived the child's exit.
    assert db.fetchval("SELECT pg_backend_pid()") == parent_pid
    db.close()
