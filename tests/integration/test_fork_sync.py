"""Fork safety of the sync handle: a forked child gets a fresh pool (sync only: os.fork)."""

from __future__ import annotations

import os
from typing import Any

import pytest


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
