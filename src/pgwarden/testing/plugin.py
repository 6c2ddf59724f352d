"""pytest plugin: real PostgreSQL, PgBouncer, pgpool-II and fault-proxy fixtures.

Loaded automatically when pgwarden is installed (entry point ``pytest11``); disable it with
``-p no:pgwarden``. Fixtures:

* ``pg_server`` (session): a started :class:`~pgwarden.testing.PostgresServer`;
* ``pg_url`` (session): its URL;
* ``pg_server_factory`` (function): ``make(settings=None, **kwargs)`` starts another
  server, closed when the test ends;
* ``pgbouncer`` (session): a :class:`~pgwarden.testing.PgBouncerServer` over ``pg_server``
  in transaction mode;
* ``pgbouncer_factory`` (function): ``make(postgres=None, **kwargs)``, closed at test end;
* ``pgpool`` (session): a :class:`~pgwarden.testing.PgpoolServer` over ``pg_server``;
* ``pgpool_factory`` (function): ``make(postgres=None, **kwargs)``, closed at test end;
* ``fault_proxy`` (function): a :class:`~pgwarden.testing.FaultProxy` in front of
  ``pg_server``;
* ``fault_proxy_factory`` (function): ``make(target_host, target_port, **kwargs)``;
* ``standby_pair`` (function): a started :class:`~pgwarden.testing.StandbyPair` (a primary
  with a synchronous streaming standby), closed when the test ends;
* ``standby_pair_factory`` (function): ``make(settings=None, **kwargs)``, closed at test end.

When a server cannot be provided (:class:`~pgwarden.testing.ServerUnavailable`: binaries
or system user missing), the test is skipped with the reason, or fails with it when the
environment variable ``CI`` is ``true`` (or ``1``/``yes``), so CI cannot pass by skipping.
Tests that use the PgBouncer fixtures are marked ``pgbouncer``, those that use the
pgpool-II fixtures ``pgpool``, and those that use the proxy fixtures ``proxy``, so
``-m "not pgbouncer"`` deselects them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import pytest

if TYPE_CHECKING:
    from .pgbouncer import PgBouncerServer
    from .pgpool import PgpoolServer
    from .postgres import PostgresServer
    from .proxy import FaultProxy
    from .replication import StandbyPair

__all__ = [
    "fault_proxy",
    "fault_proxy_factory",
    "pg_server",
    "pg_server_factory",
    "pg_url",
    "pgbouncer",
    "pgbouncer_factory",
    "pgpool",
    "pgpool_factory",
    "standby_pair",
    "standby_pair_factory",
]

_MARKERS = {
    "pgbouncer": "needs a real PgBouncer (pgwarden.testing)",
    "pgpool": "needs a real pgpool-II (pgwarden.testing)",
    "proxy": "uses the TCP fault proxy (pgwarden.testing)",
    "slow": "takes more than a few seconds",
}
_MARK_BY_FIXTURE = {
    "pgbouncer": "pgbouncer",
    "pgbouncer_factory": "pgbouncer",
    "pgpool": "pgpool",
    "pgpool_factory": "pgpool",
    "fault_proxy": "proxy",
    "fault_proxy_factory": "proxy",
}
_T = TypeVar("_T")


def is_ci() -> bool:
    """True when the environment variable ``CI`` says this run is CI."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")


def unavailable(reason: str) -> NoReturn:
    """Fail the test with ``reason`` under CI, skip it otherwise."""
    if is_ci():
        pytest.fail(f"{reason} (CI=true: not skipping)", pytrace=False)
    pytest.skip(reason)


def _obtain(make: Callable[[], _T]) -> _T:
    from ._errors import ServerUnavailable

    try:
        return make()
    except ServerUnavailable as exc:
        unavailable(str(exc))


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers that the project has not registered itself."""
    known = {line.split(":")[0].split("(")[0].strip() for line in config.getini("markers")}
    for name, description in _MARKERS.items():
        if name not in known:
            config.addinivalue_line("markers", f"{name}: {description}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests that use the PgBouncer, pgpool-II or proxy fixtures."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        for fixture, marker in _MARK_BY_FIXTURE.items():
            if fixture in names and item.get_closest_marker(marker) is None:
                item.add_marker(marker)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server shared by the whole session."""
    from .postgres import PostgresServer

    server = _obtain(PostgresServer)
    try:
        _obtain(server.start)
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def pg_url(pg_server: PostgresServer) -> str:
    """The session server's URL (superuser ``postgres`` with its random password)."""
    return pg_server.url


@pytest.fixture
def pg_server_factory() -> Iterator[Callable[..., PostgresServer]]:
    """Return ``make(settings=None, **kwargs) -> PostgresServer`` (started, closed at
    test end); ``kwargs`` go to :class:`~pgwarden.testing.PostgresServer`."""
    from .postgres import PostgresServer

    made: list[PostgresServer] = []

    def make(settings: Any = None, **kwargs: Any) -> PostgresServer:
        server = _obtain(lambda: PostgresServer(settings, **kwargs))
        made.append(server)
        return _obtain(server.start)

    try:
        yield make
    finally:
        for server in reversed(made):
            server.close()


@pytest.fixture(scope="session")
def pgbouncer(pg_server: PostgresServer) -> Iterator[PgBouncerServer]:
    """A PgBouncer in transaction mode over ``pg_server``, shared by the session."""
    from .pgbouncer import PgBouncerServer

    bouncer = _obtain(lambda: PgBouncerServer(pg_server))
    try:
        _obtain(bouncer.start)
        yield bouncer
    finally:
        bouncer.close()


@pytest.fixture
def pgbouncer_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., PgBouncerServer]]:
    """Return ``make(postgres=None, **kwargs) -> PgBouncerServer`` (started, closed at test
    end); ``postgres`` defaults to ``pg_server``, ``kwargs`` go to the constructor."""
    from .pgbouncer import PgBouncerServer

    made: list[PgBouncerServer] = []

    def make(postgres: PostgresServer | None = None, **kwargs: Any) -> PgBouncerServer:
        target = postgres if postgres is not None else request.getfixturevalue("pg_server")
        bouncer = _obtain(lambda: PgBouncerServer(target, **kwargs))
        made.append(bouncer)
        return _obtain(bouncer.start)

    try:
        yield make
    finally:
        for bouncer in reversed(made):
            bouncer.close()


@pytest.fixture(scope="session")
def pgpool(pg_server: PostgresServer) -> Iterator[PgpoolServer]:
    """A pgpool-II over ``pg_server``, shared by the session."""
    from .pgpool import PgpoolServer

    server = _obtain(lambda: PgpoolServer(pg_server))
    try:
        _obtain(server.start)
        yield server
    finally:
        server.close()


@pytest.fixture
def pgpool_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., PgpoolServer]]:
    """Return ``make(postgres=None, **kwargs) -> PgpoolServer`` (started, closed at test
    end); ``postgres`` defaults to ``pg_server``, ``kwargs`` go to the constructor."""
    from .pgpool import PgpoolServer

    made: list[PgpoolServer] = []

    def make(postgres: PostgresServer | None = None, **kwargs: Any) -> PgpoolServer:
        target = postgres if postgres is not None else request.getfixturevalue("pg_server")
        server = _obtain(lambda: PgpoolServer(target, **kwargs))
        made.append(server)
        return _obtain(server.start)

    try:
        yield make
    finally:
        for server in reversed(made):
            server.close()


@pytest.fixture
def fault_proxy(pg_server: PostgresServer) -> Iterator[FaultProxy]:
    """A started :class:`~pgwarden.testing.FaultProxy` in front of ``pg_server``;
    ``fault_proxy.url_for(pg_server.url)`` is the URL to connect through it."""
    from .proxy import FaultProxy

    with FaultProxy(pg_server.host, pg_server.port) as proxy:
        yield proxy


@pytest.fixture
def fault_proxy_factory() -> Iterator[Callable[..., FaultProxy]]:
    """Return ``make(target_host, target_port, **kwargs) -> FaultProxy`` (started, closed
    at test end)."""
    from .proxy import FaultProxy

    made: list[FaultProxy] = []

    def make(target_host: str, target_port: int, **kwargs: Any) -> FaultProxy:
        proxy = FaultProxy(target_host, target_port, **kwargs)
        made.append(proxy)
        return proxy.start()

    try:
        yield make
    finally:
        for proxy in reversed(made):
            proxy.close()


@pytest.fixture
def standby_pair_factory() -> Iterator[Callable[..., StandbyPair]]:
    """Return ``make(settings=None, **kwargs) -> StandbyPair`` (started, closed at test
    end); ``kwargs`` go to :class:`~pgwarden.testing.StandbyPair`."""
    from .replication import StandbyPair

    made: list[StandbyPair] = []

    def make(settings: Any = None, **kwargs: Any) -> StandbyPair:
        pair = _obtain(lambda: StandbyPair(settings, **kwargs))
        made.append(pair)
        return _obtain(pair.start)

    try:
        yield make
    finally:
        for pair in reversed(made):
            pair.close()


@pytest.fixture
def standby_pair(standby_pair_factory: Callable[..., StandbyPair]) -> StandbyPair:
    """A started primary with a synchronous streaming standby, of this test alone (a
    failover changes it for good); closed when the test ends."""
    return standby_pair_factory()
