"""RDS / Aurora IAM authentication: a `Settings.credentials` callable that makes tokens.

::

    from pgwarden import aws

    db = pgwarden.connect(
        "postgresql://app@mydb.xxxx.eu-west-1.rds.amazonaws.com:5432/app?sslmode=verify-full",
        credentials=aws.rds_iam_token("mydb.xxxx.eu-west-1.rds.amazonaws.com", 5432, "app"),
    )

A token is valid for 15 minutes; one is made per (host, port, user, region), reused
for 10 minutes and then replaced (`pgwarden.core.credentials.TokenCache`). Making
one is local signing with the process's AWS credentials (botocore's usual chain:
environment, profile, container or instance role), not a network call, except when
botocore itself refreshes those credentials.

AWS asks for fewer than 200 new IAM-authenticated connections per second per DB
instance. Every call (every new connection) takes a slot from one token bucket shared
by the whole process (`TokenBucket`, 100 per second after a burst of 20 by default),
waiting for it if need be: a reconnect storm is spread out instead of refused.

Needs botocore: ``pip install 'pgwarden[aws]'``. It is imported here only, at the first
token, so importing pgwarden never loads it.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import threading
import time
from collections.abc import Callable
from typing import Any

from pgwarden.core.credentials import TokenBucket, TokenCache

__all__ = [
    "IAM_TOKEN_LIFETIME",
    "IAM_TOKEN_REFRESH_AFTER",
    "RdsIamToken",
    "rds_iam_token",
    "set_connection_rate",
]

#: Seconds an RDS IAM auth token is accepted (AWS: 15 minutes).
IAM_TOKEN_LIFETIME = 900.0
#: Seconds after which a new token replaces the cached one.
IAM_TOKEN_REFRESH_AFTER = 600.0
#: New IAM connections per second for the whole process, and the burst allowed first.
DEFAULT_RATE = 100.0
DEFAULT_BURST = 20.0

# One bucket for every token of the process: the limit AWS states is on connections.
_bucket_lock = threading.Lock()
_bucket = TokenBucket(DEFAULT_RATE, DEFAULT_BURST)

_instances_lock = threading.Lock()
_instances: dict[tuple[str, int, str, str | None], RdsIamToken] = {}


def set_connection_rate(rate: float, burst: float = DEFAULT_BURST) -> None:
    """Bound this process's new IAM connections to *rate* per second after *burst*
    (several processes on one instance share AWS's limit: divide it among them)."""
    global _bucket
    with _bucket_lock:
        _bucket = TokenBucket(rate, burst)


def _reserve_slot(now: float) -> float:
    with _bucket_lock:
        return _bucket.reserve(now)


class RdsIamToken:
    """A credentials callable returning a cached RDS IAM auth token (a password).

    Calling it waits for a slot of the process's connection rate (see the module
    docstring), then returns the cached token or makes a new one. Use
    `rds_iam_token` to get one: it returns the same object for the same
    arguments, so handles built from equal settings stay one handle.
    `__call__` blocks while waiting for a slot; `call_async` (what the async
    handle should be given: ``credentials=token.call_async``) awaits instead.
    """

    def __init__(
        self,
        host: str,
        port: int,
        user: str,
        region: str | None = None,
        *,
        generate: Callable[[], str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host, self.port, self.user, self.region = host, port, user, region
        self._generate = generate or self._botocore_token
        self._clock = clock
        self._lock = threading.Lock()
        self._cache = TokenCache(IAM_TOKEN_REFRESH_AFTER, IAM_TOKEN_LIFETIME)
        self._client: Any = None

    def __repr__(self) -> str:  # never the token
        return f"RdsIamToken(host={self.host!r}, port={self.port}, user={self.user!r})"

    def __call__(self) -> str:
        delay = _reserve_slot(self._clock())
        if delay > 0:
            time.sleep(delay)
        return self.token()

    async def call_async(self) -> str:
        """`__call__` for the async handle: waits for the slot without blocking the loop,
        and makes a new token in a worker thread (botocore may refresh credentials)."""
        delay = _reserve_slot(self._clock())
        if delay > 0:
            await asyncio.sleep(delay)
        cached = self._cached()
        return cached if cached is not None else await asyncio.to_thread(self.token)

    def _cached(self) -> str | None:
        with self._lock:
            return self._cache.current(self._clock())

    def token(self) -> str:
        """The cached token, or a new one once it is `IAM_TOKEN_REFRESH_AFTER` old (no
        rate slot taken). If making one fails, a still valid old one is returned."""
        started = self._clock()
        with self._lock:
            cached = self._cache.current(started)
        if cached is not None:
            return cached
        try:
            token = self._generate()
        except Exception:
            with self._lock:
                old = self._cache.usable_old(self._clock())
            if old is None:
                raise
            return old
        with self._lock:
            self._cache.store(token, started)
        return token

    def _botocore_token(self) -> str:
        if self._client is None:
            session = importlib.import_module("botocore.session").get_session()
            self._client = session.create_client("rds", region_name=self.region)
        token = self._client.generate_db_auth_token(
            DBHostname=self.host, Port=self.port, DBUsername=self.user, Region=self.region
        )
        return str(token)


def rds_iam_token(host: str, port: int, user: str, region: str | None = None) -> RdsIamToken:
    """The process's `RdsIamToken` for (*host*, *port*, *user*, *region*); *region*
    None is botocore's default region (``AWS_REGION``, the profile). Raises
    ImportError now if botocore is not installed."""
    if importlib.util.find_spec("botocore") is None:
        raise ImportError("pgwarden.aws needs botocore: pip install 'pgwarden[aws]'")
    key = (host, int(port), user, region)
    with _instances_lock:
        found = _instances.get(key)
        if found is None:
            found = _instances[key] = RdsIamToken(host, int(port), user, region)
        return found
