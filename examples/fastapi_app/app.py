"""A small FastAPI service on pgwarden: accounts, a write and a transfer.

Run it (see README.md):

    DATABASE_URL=postgresql://app:secret@localhost/bank uvicorn app:app

It shows, in one file:

* the lifespan nested in the app's own (warm up at startup, fail /readyz on SIGTERM,
  drain at shutdown); the app starts even if the database is down, and /readyz says so;
* the handle injected with ``DatabaseDep`` (a handle, not a held connection);
* a write under a deadline (its COMMIT is resolved by transaction id if the connection
  drops while it commits) and a transfer with ``run_transaction`` (re-run whole on
  serialization failures, deadlocks and lost connections);
* pgwarden's errors as HTTP: 503 with Retry-After, or 500 for an outcome that is unknown;
* /livez, /readyz and /health (application/health+json), and the live dashboard at
  /pgwarden/ (no authentication: keep it behind yours).

Configuration, from the environment: ``DATABASE_URL`` and any ``PGWARDEN_*`` setting;
``APP_DRAIN_DELAY`` (seconds to keep serving after SIGTERM while /readyz fails; default 0,
use a few probe periods under Kubernetes); ``APP_STARTUP_TIMEOUT`` (seconds to wait for the
database at startup; default 5); ``APP_FAIL_ON_OUTAGE=1`` (a database outage fails /readyz
instead of reporting ``warn``); ``APP_FAIL_STARTUP=1`` (refuse to start without the database).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

import pgwarden
import pgwarden.asgi
import pgwarden.fastapi
from pgwarden.dashboard import app as dashboard_app
from pgwarden.fastapi import DatabaseDep
from pgwarden.logs import configure_json_logging


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


# pgwarden's events (warmup, retries, breaker, draining...) as JSON lines on stderr.
configure_json_logging()

#: The process's one handle (DATABASE_URL). No I/O happens here.
db = pgwarden.connect_async()
dashboard = dashboard_app(db)

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS accounts (
        id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        owner   text   NOT NULL,
        balance bigint NOT NULL CHECK (balance >= 0)   -- in cents
    )""",
    """CREATE TABLE IF NOT EXISTS transfers (
        id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        from_id    bigint NOT NULL REFERENCES accounts (id),
        to_id      bigint NOT NULL REFERENCES accounts (id),
        amount     bigint NOT NULL CHECK (amount > 0),
        created_at timestamptz NOT NULL DEFAULT now()
    )""",
]

warden = pgwarden.fastapi.lifespan(
    db,
    startup_timeout=float(os.environ.get("APP_STARTUP_TIMEOUT", "5")),
    fail_startup=_flag("APP_FAIL_STARTUP"),
    drain_delay=float(os.environ.get("APP_DRAIN_DELAY", "0")),
    dashboard=dashboard,
)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # pgwarden's lifespan nested in ours: anything else the app starts goes here too.
    # (A lifespan= replaces FastAPI's default one, so @app.on_event handlers would no
    # longer run: do startup work in here instead.)
    async with warden:
        if warden.startup_error is None:
            # A real service runs migrations separately; the demo creates its tables.
            for statement in SCHEMA:
                await db.execute(statement, timeout=10)
        yield


app = FastAPI(title="pgwarden example", lifespan=lifespan)
pgwarden.fastapi.install_error_handlers(app)


class NewAccount(BaseModel):
    owner: str = Field(min_length=1, max_length=100)
    balance: int = Field(ge=0, description="opening balance, in cents")


class Transfer(BaseModel):
    from_id: int
    to_id: int
    amount: int = Field(gt=0, description="in cents")


@app.post("/accounts", status_code=201)
async def open_account(new: NewAccount, db: DatabaseDep) -> dict[str, Any]:
    # A write: never sent twice. Under a deadline it runs in BEGIN ... COMMIT and a
    # COMMIT lost with its connection is resolved by transaction id, so the caller gets
    # the row, a 503 (certainly not written) or a 500 (outcome unknown), never a guess.
    row = await db.fetchrow(
        "INSERT INTO accounts (owner, balance) VALUES (%s, %s) RETURNING id, owner, balance",
        [new.owner, new.balance],
        timeout=5,
    )
    assert row is not None
    return row


@app.get("/accounts/{account_id}")
async def get_account(account_id: int, db: DatabaseDep) -> dict[str, Any]:
    # A read: retried by pgwarden on a lost or stale connection, within the deadline.
    row = await db.fetchrow(
        "SELECT id, owner, balance FROM accounts WHERE id = %s", [account_id], timeout=2
    )
    if row is None:
        raise HTTPException(404, "no such account")
    return row


@app.post("/transfers", status_code=201)
async def transfer(t: Transfer, db: DatabaseDep) -> dict[str, Any]:
    if t.from_id == t.to_id:
        raise HTTPException(422, "from_id and to_id must differ")

    async def move(tx: pgwarden.AsyncTransaction) -> dict[str, Any]:
        # The whole function is re-run on a deadlock or serialization failure (40P01,
        # 40001) and on a connection lost before COMMIT; an HTTPException raised here
        # rolls back and is not retried. Both rows are locked in id order, so two
        # transfers between the same accounts queue instead of deadlocking.
        rows = await tx.fetch(
            "SELECT id, balance FROM accounts WHERE id = ANY(%s) ORDER BY id FOR UPDATE",
            [[t.from_id, t.to_id]],
        )
        balances = {row["id"]: row["balance"] for row in rows}
        if len(balances) != 2:
            raise HTTPException(404, "no such account")
        if balances[t.from_id] < t.amount:
            raise HTTPException(409, "insufficient funds")
        await tx.execute(
            "UPDATE accounts SET balance = balance - %s WHERE id = %s", [t.amount, t.from_id]
        )
        await tx.execute(
            "UPDATE accounts SET balance = balance + %s WHERE id = %s", [t.amount, t.to_id]
        )
        row = await tx.fetchrow(
            "INSERT INTO transfers (from_id, to_id, amount) VALUES (%s, %s, %s) "
            "RETURNING id, from_id, to_id, amount",
            [t.from_id, t.to_id, t.amount],
        )
        assert row is not None
        return row

    # Read committed with row locks needs no re-runs under contention; under
    # isolation="serializable", conflicts are re-run (within the retry budget) and one
    # that outlives them answers 409 (install_error_handlers).
    return await db.run_transaction(move, timeout=10)


@app.get("/slow")
async def slow(db: DatabaseDep, seconds: float = 1.0) -> dict[str, Any]:
    """A slow read, to watch a graceful shutdown finish it (see README.md)."""
    await db.execute("SELECT pg_sleep(%s)", [min(seconds, 30.0)], timeout=seconds + 5)
    return {"slept": seconds}


# Mounted apps last: a Mount("/") matches every path, so routes added after it would be
# shadowed. The dashboard samples from startup because the lifespan above enters it.
app.mount("/pgwarden", dashboard)
app.mount("/", pgwarden.asgi.health_app(db, fail_on_outage=_flag("APP_FAIL_ON_OUTAGE")))
