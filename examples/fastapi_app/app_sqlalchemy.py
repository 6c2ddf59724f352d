"""The same service as app.py, written the usual FastAPI + SQLAlchemy way, on pgwarden.

This is the "after" of docs/migration-fastapi-sqlalchemy.md: the engine URL says
``postgresql+pgwarden`` instead of ``postgresql+psycopg`` (and ``pool_pre_ping`` is gone),
the transfer runs in ``pgwarden.sqlalchemy.run_transaction_async``, and the lifespan and
health endpoints are given the engine. Run it with ``uvicorn app_sqlalchemy:app``; the
environment variables are app.py's.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel, Field
from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, String, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import pgwarden
import pgwarden.asgi
import pgwarden.fastapi
from pgwarden.logs import configure_json_logging
from pgwarden.sqlalchemy import run_transaction_async


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


configure_json_logging()

# Before: create_async_engine("postgresql+psycopg://...", pool_pre_ping=True)
# After: the pgwarden dialect (the handle's pool is the pool; SQLAlchemy's is a NullPool).
URL = make_url(os.environ["DATABASE_URL"]).set(drivername="postgresql+pgwarden")
engine = create_async_engine(URL)
Session = async_sessionmaker(engine, expire_on_commit=False)


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"
    __table_args__ = (CheckConstraint("balance >= 0"),)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    owner: Mapped[str] = mapped_column(String(100))
    balance: Mapped[int] = mapped_column(BigInteger)  # in cents


class TransferRow(Base):
    __tablename__ = "transfers"
    __table_args__ = (CheckConstraint("amount > 0"),)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    from_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    to_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    amount: Mapped[int] = mapped_column(BigInteger)


warden = pgwarden.fastapi.lifespan(
    engine,  # the handle behind the engine: warmed at startup, drained at shutdown
    startup_timeout=float(os.environ.get("APP_STARTUP_TIMEOUT", "5")),
    fail_startup=_flag("APP_FAIL_STARTUP"),
    drain_delay=float(os.environ.get("APP_DRAIN_DELAY", "0")),
)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with warden:
        if warden.startup_error is None:
            async with engine.begin() as conn:  # a real service runs migrations instead
                await conn.run_sync(Base.metadata.create_all)
        yield


app = FastAPI(title="pgwarden example (SQLAlchemy)", lifespan=lifespan)
pgwarden.fastapi.install_error_handlers(app)


async def get_session() -> AsyncIterator[AsyncSession]:
    # The session takes a connection at its first statement and gives it back at
    # commit or close; no connection is held while the request waits for anything else.
    async with Session() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


class NewAccount(BaseModel):
    owner: str = Field(min_length=1, max_length=100)
    balance: int = Field(ge=0, description="opening balance, in cents")


class Transfer(BaseModel):
    from_id: int
    to_id: int
    amount: int = Field(gt=0, description="in cents")


def _account(a: Account) -> dict[str, Any]:
    return {"id": a.id, "owner": a.owner, "balance": a.balance}


@app.post("/accounts", status_code=201)
async def open_account(new: NewAccount, session: SessionDep) -> dict[str, Any]:
    # A lost COMMIT is resolved by the dialect (txid_status): the row is there, or
    # NotCommitted (503: certainly not written), or AmbiguousCommitError (500).
    with pgwarden.deadline(5):
        async with session.begin():
            account = Account(owner=new.owner, balance=new.balance)
            session.add(account)
            await session.flush()
            return _account(account)


@app.get("/accounts/{account_id}")
async def get_account(account_id: int, session: SessionDep) -> dict[str, Any]:
    with pgwarden.deadline(2):
        account = await session.get(Account, account_id)
    if account is None:
        raise HTTPException(404, "no such account")
    return _account(account)


@app.post("/transfers", status_code=201)
async def transfer(t: Transfer) -> dict[str, Any]:
    if t.from_id == t.to_id:
        raise HTTPException(422, "from_id and to_id must differ")

    async def move(session: AsyncSession) -> dict[str, Any]:
        # Re-run whole, on a new session, after a deadlock, a serialization failure or a
        # connection lost before COMMIT; an HTTPException rolls back and is not retried.
        rows = await session.scalars(
            select(Account)
            .where(Account.id.in_([t.from_id, t.to_id]))
            .order_by(Account.id)
            .with_for_update()
        )
        accounts = {a.id: a for a in rows}
        if len(accounts) != 2:
            raise HTTPException(404, "no such account")
        if accounts[t.from_id].balance < t.amount:
            raise HTTPException(409, "insufficient funds")
        accounts[t.from_id].balance -= t.amount
        accounts[t.to_id].balance += t.amount
        row = TransferRow(from_id=t.from_id, to_id=t.to_id, amount=t.amount)
        session.add(row)
        await session.flush()
        return {"id": row.id, "from_id": row.from_id, "to_id": row.to_id, "amount": row.amount}

    return await run_transaction_async(Session, move, timeout=10)


@app.get("/slow")
async def slow(session: SessionDep, seconds: float = 1.0) -> dict[str, Any]:
    """A slow read, to watch a graceful shutdown finish it."""
    with pgwarden.deadline(seconds + 5):
        await session.execute(text("SELECT pg_sleep(:s)"), {"s": min(seconds, 30.0)})
    return {"slept": seconds}


app.mount("/", pgwarden.asgi.health_app(engine, fail_on_outage=_flag("APP_FAIL_ON_OUTAGE")))
