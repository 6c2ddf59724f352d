"""`Settings`: every knob pgwarden has, with a production-safe default and its reason.

Settings are frozen and hashable: the per-process registry uses them as the
key that decides whether two ``connect()`` calls share one pool.

Sources, highest precedence first:

1. keyword arguments to :class:`Settings` (or to ``pgwarden.connect()``);
2. ``PGWARDEN_<NAME>`` environment variables (``PGWARDEN_MAX_SIZE=20``);
3. ``DATABASE_URL`` for the URL;
4. the defaults below.

Validation errors name the setting and the bad value, never a password.
This module imports nothing but the standard library, so it is cheap.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import FrozenInstanceError
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, get_args

from pgwarden._redact import redact
from pgwarden.errors import SettingsError

__all__ = ["CredentialSource", "Credentials", "FleetBudget", "PgBouncerMode", "Settings"]

PgBouncerMode = Literal["auto", "on", "off"]
#: `Settings.fleet_budget`: a number of connections, or where to read it from.
FleetBudget: TypeAlias = 'int | Literal["role", "server"]'

#: What `Settings.credentials` returns (or, on the async handle, what it may await): the
#: password, or connection parameters (``password``, ``user``, ``host``...) overriding the URL's.
Credentials: TypeAlias = "str | Mapping[str, Any]"
#: `Settings.credentials`: called with no arguments for every new connection.
CredentialSource: TypeAlias = "Callable[[], Credentials | Awaitable[Credentials]]"

ENV_PREFIX = "PGWARDEN_"
# Variables of the test harness (pgwarden.testing), not settings of a handle.
TEST_ENV_PREFIX = "PGWARDEN_TEST_"


class _Doc:
    """A setting's default and its reason, until `_LazyDataclass.install` takes them apart."""

    __slots__ = ("default", "reason", "repr")

    def __init__(self, default: Any, reason: str, repr: bool) -> None:
        self.default = default
        self.reason = reason
        self.repr = repr


def _doc(default: Any, reason: str, *, repr: bool = True) -> Any:
    """A field's default with its reason (shown by ``Settings.describe()``)."""
    return _Doc(default, reason, repr)


class _LazyDataclass:
    """A class's ``__dataclass_fields__`` or ``__dataclass_params__``, made on first read.

    `install` turns the class's `_doc` values into plain defaults and reasons; the first
    read of either attribute runs ``dataclasses.dataclass(**params)`` on a twin of the class
    (same name, module, annotations and fields) and moves the twin's two onto the class.
    """

    __slots__ = ("attr", "cls", "docs", "params")

    def __init__(self, cls: type, params: dict[str, Any], docs: dict[str, _Doc], attr: str):
        self.cls, self.params, self.docs, self.attr = cls, params, docs, attr

    @staticmethod
    def install(cls: type, params: dict[str, Any]) -> type:
        docs: dict[str, _Doc] = {}
        for name in cls.__annotations__:
            doc = cls.__dict__.get(name)
            if not isinstance(doc, _Doc):
                raise TypeError(f"{cls.__name__}.{name}: declare it as _doc(default, reason)")
            docs[name] = doc
            _REASONS[name] = doc.reason
            setattr(cls, name, doc.default)  # as dataclasses leaves it: the default
        for attr in ("__dataclass_fields__", "__dataclass_params__"):
            setattr(cls, attr, _LazyDataclass(cls, params, docs, attr))
        cls.__match_args__ = tuple(docs)  # type: ignore[attr-defined,misc]
        return cls

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        cls = self.cls
        namespace: dict[str, Any] = {
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
            "__annotations__": cls.__annotations__,
        }
        for name, doc in self.docs.items():
            namespace[name] = dataclasses.field(
                default=doc.default, repr=doc.repr, metadata={"reason": doc.reason}
            )
        twin: type = dataclasses.dataclass(**self.params)(type(cls.__name__, (), namespace))
        for attr in ("__dataclass_fields__", "__dataclass_params__"):
            setattr(cls, attr, getattr(twin, attr))
        return getattr(cls, self.attr)


#: Field name -> reason (``Settings.describe()``), filled when the class is defined.
_REASONS: dict[str, str] = {}

# Settings is a frozen dataclass to mypy and to dataclasses' functions (fields, replace,
# asdict), but dataclasses does not process it at import: that compiles __init__,
# __setattr__ and __delattr__ from source and builds 43 Field objects, ~3 ms of a cold
# start. Its methods are written out below instead (compiled into the .pyc), and the real
# __dataclass_fields__ and __dataclass_params__ are built by dataclasses on first use.
if TYPE_CHECKING:
    from dataclasses import dataclass as _dataclass
else:

    def _dataclass(**params):
        return lambda cls: _LazyDataclass.install(cls, params)


@_dataclass(frozen=True, repr=False, eq=False)
class Settings:
    """Frozen configuration of one database handle. See each field's reason."""

    # repr=False: the URL may carry a password; repr shows `safe_url` instead.
    url: str | None = _doc(None, "connection URL; defaults to DATABASE_URL", repr=False)
    credentials: CredentialSource | None = _doc(
        None,
        "A callable (sync, or async on the async handle) called for every new "
        "connection, the warmup's included: it returns the password, or a mapping of "
        "connection parameters that override the URL's. For rotating secrets and RDS IAM "
        "tokens (pgwarden.aws); its results are never logged or stored by pgwarden.",
    )

    # --- pool size -------------------------------------------------------------------------
    min_size: int = _doc(
        0,
        "Serverless instances and idle workers should hold no connections they do not use; "
        "a fleet of them at min_size>0 is how servers run out of slots.",
    )
    max_size: int = _doc(
        10,
        "Enough for a busy process, small enough that 20 processes fit in the default "
        "max_connections=100 behind no pooler. Adaptive sizing lowers it under overload.",
    )

    # --- time limits -----------------------------------------------------------------------
    acquire_timeout: float = _doc(
        10.0,
        "How long a caller waits for a pooled connection when no deadline is set. "
        "psycopg_pool's 30 s outlives most request timeouts; failing sooner is clearer.",
    )
    connect_timeout: float = _doc(
        5.0,
        "Per connection attempt. A healthy server on a LAN connects in milliseconds; "
        "5 s tolerates a cold managed instance without hanging a request for libpq's forever.",
    )
    ready_timeout: float = _doc(
        15.0,
        "How long the first readiness probe keeps retrying a server that is still starting "
        "(a deploy racing a database restart) before every waiter gets the same error.",
    )
    default_timeout: float | None = _doc(
        30.0,
        "Client-side backstop for a call that sets no deadline: nothing it does (acquire, "
        "validation, statements, COMMIT, the pool's reset) waits longer; the socket is shut "
        "down when it passes. 30 s outlasts ordinary OLTP statements and matches common request "
        "timeouts. Unlike an explicit deadline it is not sent to the server as "
        "statement_timeout (that costs a pipelined BEGIN). None removes the bound.",
    )
    server_deadlines: bool = _doc(
        True,
        "An explicit deadline on a transaction or stream is also sent to the server as a "
        "transaction-local statement_timeout (set_config(..., true)), so the server ends a "
        "statement itself at the deadline. False: pgwarden never sends it (nor any SET); "
        "the deadline is a cancel request from the client, then the socket sever. For "
        "RDS Proxy, which may pin sessions on configuration changes (docs/serverless.md).",
    )

    # --- TCP liveness ----------------------------------------------------------------------
    keepalives_idle: int = _doc(
        30,
        "Seconds of silence before TCP probes start, so a silently dropped connection (NAT, "
        "load balancer) is found in about a minute, not the kernel's two hours.",
    )
    keepalives_interval: int = _doc(10, "Seconds between TCP keepalive probes.")
    keepalives_count: int = _doc(3, "Unanswered keepalive probes before the socket is dead.")
    tcp_user_timeout: int = _doc(
        30_000,
        "Milliseconds that sent data may stay unacknowledged before the kernel drops the "
        "connection: bounds a hang on a blackholed network while a query is in flight.",
    )

    # --- connection hygiene ----------------------------------------------------------------
    max_lifetime: float = _doc(
        1800.0,
        "Connections are replaced after 30 min so server-side memory growth, DNS changes and "
        "failovers are picked up. Shorter than typical managed idle/session limits.",
    )
    lifetime_jitter: float = _doc(
        0.2,
        "Each process shortens max_lifetime by a random 0-20% (and psycopg_pool adds up to 5% "
        "per connection), so a fleet deployed at once does not reconnect at once.",
    )
    max_idle: float = _doc(
        300.0,
        "Idle connections beyond min_size are closed after 5 min: below the 350 s idle timeout "
        "of common cloud load balancers, so the balancer never silently drops them first.",
    )
    validation_window: float = _doc(
        1.0,
        "A connection idle longer than this gets a cheap check before use (as HikariCP's "
        "aliveBypassWindow). Recently used connections skip it: no round trip per request.",
    )
    gap_threshold: float = _doc(
        10.0,
        "If the process saw no activity for this long by the wall or monotonic clock (a "
        "frozen serverless instance, a suspended VM), all idle connections are checked in one "
        "pass on the next acquire.",
    )

    # --- readiness -------------------------------------------------------------------------
    probe_query: str | None = _doc(
        None,
        "Optional application query run once after the first round trip (the second phase of "
        "warmup), e.g. 'SELECT 1 FROM my_table LIMIT 1' to prove migrations have run.",
    )
    application_name: str = _doc(
        "pgwarden", "Shown in pg_stat_activity so operators can tell whose connections these are."
    )

    # --- PgBouncer ------------------------------------------------------------------------
    pgbouncer: PgBouncerMode = _doc(
        "auto",
        "'auto' detects PgBouncer from the server's answers; 'on' or 'off' overrides. In "
        "transaction mode server-side prepared statements must be off.",
    )
    prepare_threshold: int | None = _doc(
        5,
        "psycopg's default; forced to None (no server-side prepares) behind PgBouncer "
        "unless pooler_prepared_statements.",
    )
    pooler_prepared_statements: bool = _doc(
        False,
        "Keep prepare_threshold behind PgBouncer 1.21+ with max_prepared_statements > 0. "
        "The first 26000/42P05 there (it does not track them) turns prepares off for good.",
    )

    # --- retries ---------------------------------------------------------------------------
    retry_attempts: int = _doc(
        3, "Total attempts including the first; more only lengthens outages for callers."
    )
    retry_base_delay: float = _doc(0.05, "First backoff ceiling; full jitter below it.")
    retry_max_delay: float = _doc(2.0, "Backoff cap, so a long outage is polled, not waited out.")
    retry_budget_ratio: float = _doc(
        0.1,
        "Retries may add at most ~10% to the request rate, so an outage is not multiplied "
        "by every client's retries (the retry storm of the background incident).",
    )
    retry_budget_floor: float = _doc(
        2.0, "Retries per second always allowed, so a quiet process can still retry."
    )

    # --- circuit breaker -------------------------------------------------------------------
    breaker_threshold: int = _doc(
        5, "Consecutive connect failures that open the breaker; callers then fail fast."
    )
    breaker_min_outage: float = _doc(
        1.0,
        "The failures must span at least this long before the breaker opens: a restart makes "
        "every pooled connection fail at once, and callers with time left should wait it out.",
    )
    breaker_cooldown: float = _doc(
        0.25,
        "Wait before the single half-open probe (jittered to 50-100% of it); doubles per "
        "failed probe up to breaker_max_cooldown.",
    )
    breaker_max_cooldown: float = _doc(
        0.4,
        "Cap on the probe interval during a long outage, so the first request succeeds within "
        "about 0.5 s of the server accepting again. One probe per process per 0.2-0.4 s, each "
        "bounded by a connect time learnt from this server, costs a down server nothing.",
    )

    # --- adaptive sizing -------------------------------------------------------------------
    adaptive_sizing: bool = _doc(
        True,
        "On 'too many clients' the local pool limit halves and then grows back by one per "
        "quiet period (AIMD), so a fleet converges below the server's limit.",
    )
    sizing_quiet_period: float = _doc(5.0, "Seconds without overload before the limit grows by 1.")

    # --- fleet budget ----------------------------------------------------------------------
    fleet_budget: FleetBudget | None = _doc(
        None,
        "Connections shared by every process of the fleet (same fleet_tag, any host): an "
        "integer, 'role' (the role's CONNECTION LIMIT) or 'server' (max_connections less "
        "the reserved slots). Each process counts its live peers in pg_stat_activity and caps "
        "its pool at its fair share, so a newcomer gets slots by others shrinking, not by "
        "waiting for a refusal. None: off (each process sizes itself alone). Turned off "
        "behind a pooler, where pg_stat_activity shows the pooler.",
    )
    fleet_tag: str = _doc(
        "default",
        "Names the fleet in application_name (pgwarden:<tag>:<instance>): processes with "
        "the same tag share one budget. Letters, digits, '_', '.', '-'; at most 20 bytes.",
    )
    fleet_interval: float = _doc(
        1.0,
        "Seconds between pg_stat_activity samples (one short query, off the hot path). When "
        "the fleet has more instances than connections they take turns of a third of it; an "
        "instance waits at most two turns for its next one while the fleet is at most three "
        "times the budget.",
    )

    # --- commits ---------------------------------------------------------------------------
    resolve_commits: bool = _doc(
        True,
        "Record txid_current() before COMMIT so a connection lost during COMMIT can be "
        "resolved with txid_status(). Costs one statement per transaction; set False to skip.",
    )

    # --- observability ---------------------------------------------------------------------
    metrics: bool = _doc(
        True, "Count and time operations for stats(); False installs a no-op tracker."
    )
    health_interval: float = _doc(
        5.0,
        "health() results are cached this long and computed single-flight; a connect "
        "failure or a lost connection seen since a check began makes its result stale.",
    )
    health_timeout: float = _doc(
        1.0,
        "health() answers within this long, whatever the database does: the wait for "
        "readiness, for a pooled connection and the round trip all fit in it. A health "
        "endpoint must answer before its prober gives up; a known outage (open breaker, "
        "failing connects) is reported at once, without a round trip.",
    )
    slow_query_threshold: float = _doc(
        1.0, "Statements slower than this emit a 'slow_query' event (without parameters)."
    )
    leak_threshold: float = _doc(
        60.0, "A connection held longer than this is reported once, with its acquiring site."
    )

    # What dataclass(frozen=True) would generate. Keep the parameters in field order with
    # the fields' defaults (tests/unit/test_settings_import_cost.py checks).
    def __init__(
        self,
        url: str | None = None,
        credentials: CredentialSource | None = None,
        min_size: int = 0,
        max_size: int = 10,
        acquire_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        ready_timeout: float = 15.0,
        default_timeout: float | None = 30.0,
        server_deadlines: bool = True,
        keepalives_idle: int = 30,
        keepalives_interval: int = 10,
        keepalives_count: int = 3,
        tcp_user_timeout: int = 30000,
        max_lifetime: float = 1800.0,
        lifetime_jitter: float = 0.2,
        max_idle: float = 300.0,
        validation_window: float = 1.0,
        gap_threshold: float = 10.0,
        probe_query: str | None = None,
        application_name: str = "pgwarden",
        pgbouncer: PgBouncerMode = "auto",
        prepare_threshold: int | None = 5,
        pooler_prepared_statements: bool = False,
        retry_attempts: int = 3,
        retry_base_delay: float = 0.05,
        retry_max_delay: float = 2.0,
        retry_budget_ratio: float = 0.1,
        retry_budget_floor: float = 2.0,
        breaker_threshold: int = 5,
        breaker_min_outage: float = 1.0,
        breaker_cooldown: float = 0.25,
        breaker_max_cooldown: float = 0.4,
        adaptive_sizing: bool = True,
        sizing_quiet_period: float = 5.0,
        fleet_budget: FleetBudget | None = None,
        fleet_tag: str = "default",
        fleet_interval: float = 1.0,
        resolve_commits: bool = True,
        metrics: bool = True,
        health_interval: float = 5.0,
        health_timeout: float = 1.0,
        slow_query_threshold: float = 1.0,
        leak_threshold: float = 60.0,
    ) -> None:
        _set = object.__setattr__  # frozen: the class's own __setattr__ raises
        _set(self, "url", url)
        _set(self, "credentials", credentials)
        _set(self, "min_size", min_size)
        _set(self, "max_size", max_size)
        _set(self, "acquire_timeout", acquire_timeout)
        _set(self, "connect_timeout", connect_timeout)
        _set(self, "ready_timeout", ready_timeout)
        _set(self, "default_timeout", default_timeout)
        _set(self, "server_deadlines", server_deadlines)
        _set(self, "keepalives_idle", keepalives_idle)
        _set(self, "keepalives_interval", keepalives_interval)
        _set(self, "keepalives_count", keepalives_count)
        _set(self, "tcp_user_timeout", tcp_user_timeout)
        _set(self, "max_lifetime", max_lifetime)
        _set(self, "lifetime_jitter", lifetime_jitter)
        _set(self, "max_idle", max_idle)
        _set(self, "validation_window", validation_window)
        _set(self, "gap_threshold", gap_threshold)
        _set(self, "probe_query", probe_query)
        _set(self, "application_name", application_name)
        _set(self, "pgbouncer", pgbouncer)
        _set(self, "prepare_threshold", prepare_threshold)
        _set(self, "pooler_prepared_statements", pooler_prepared_statements)
        _set(self, "retry_attempts", retry_attempts)
        _set(self, "retry_base_delay", retry_base_delay)
        _set(self, "retry_max_delay", retry_max_delay)
        _set(self, "retry_budget_ratio", retry_budget_ratio)
        _set(self, "retry_budget_floor", retry_budget_floor)
        _set(self, "breaker_threshold", breaker_threshold)
        _set(self, "breaker_min_outage", breaker_min_outage)
        _set(self, "breaker_cooldown", breaker_cooldown)
        _set(self, "breaker_max_cooldown", breaker_max_cooldown)
        _set(self, "adaptive_sizing", adaptive_sizing)
        _set(self, "sizing_quiet_period", sizing_quiet_period)
        _set(self, "fleet_budget", fleet_budget)
        _set(self, "fleet_tag", fleet_tag)
        _set(self, "fleet_interval", fleet_interval)
        _set(self, "resolve_commits", resolve_commits)
        _set(self, "metrics", metrics)
        _set(self, "health_interval", health_interval)
        _set(self, "health_timeout", health_timeout)
        _set(self, "slow_query_threshold", slow_query_threshold)
        _set(self, "leak_threshold", leak_threshold)
        self.__post_init__()

    def __post_init__(self) -> None:
        self._validate()

    # What dataclass(frozen=True) would generate; hidden from mypy, which knows them already.
    if not TYPE_CHECKING:

        def __setattr__(self, name, value):
            if type(self) is Settings or name in _FIELD_NAMES:
                raise FrozenInstanceError(f"cannot assign to field {name!r}")
            super().__setattr__(name, value)

        def __delattr__(self, name):
            if type(self) is Settings or name in _FIELD_NAMES:
                raise FrozenInstanceError(f"cannot delete field {name!r}")
            super().__delattr__(name)

        if sys.version_info >= (3, 13):  # dataclasses adds copy.replace() support from 3.13

            def __replace__(self, /, **changes):
                return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, /, **overrides: Any) -> Settings:
        """Build settings from ``PGWARDEN_*`` variables and ``DATABASE_URL``, then *overrides*.

        Unknown ``PGWARDEN_*`` variables raise, so a typo is not silently ignored
        (``PGWARDEN_TEST_*`` belong to the test harness and are skipped).
        """
        env = os.environ if environ is None else environ
        known = _FIELD_TYPES
        values: dict[str, Any] = {}
        for key, raw in env.items():
            if not key.startswith(ENV_PREFIX) or key.startswith(TEST_ENV_PREFIX):
                continue
            name = key[len(ENV_PREFIX) :].lower()
            if name not in known:
                raise SettingsError(f"unknown setting in environment: {key}")
            values[name] = _parse_env(name, raw, known[name])
        if values.get("url") is None and env.get("DATABASE_URL"):
            values["url"] = env["DATABASE_URL"]
        unknown = set(overrides) - set(known)
        if unknown:
            raise SettingsError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        values.update({k: v for k, v in overrides.items() if not (k == "url" and v is None)})
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        """A copy with *changes* applied and validated."""
        return dataclasses.replace(self, **changes)

    @property
    def safe_url(self) -> str:
        """The URL with its password masked, for logs and errors."""
        return redact(self.url) if self.url else "<no url>"

    def __repr__(self) -> str:
        parts = [f"url={self.safe_url!r}"]
        parts += [
            f"{name}={_shown(name, getattr(self, name))}" for name in _FIELD_NAMES if name != "url"
        ]
        return f"Settings({', '.join(parts)})"

    # What dataclass(eq=True, frozen=True) would generate: equal when of the same class with
    # equal fields, hashed on the fields (the registry's key).
    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return _field_values(self) == _field_values(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(_field_values(self))

    @classmethod
    def describe(cls) -> list[tuple[str, Any, str]]:
        """(name, default, reason) for every setting, for docs and ``--help`` output."""
        return [(name, getattr(Settings, name), _REASONS[name]) for name in _FIELD_NAMES]

    # ----------------------------------------------------------------------------------------
    def _validate(self) -> None:
        def bad(name: str, why: str) -> SettingsError:
            value = getattr(self, name)
            shown = redact(str(value)) if isinstance(value, str) else repr(value)
            return SettingsError(f"invalid setting {name}={shown}: {why}")

        if self.url is not None and not isinstance(self.url, str):
            raise bad("url", "must be a string")
        if self.credentials is not None:
            # Not repr(): a callable object's repr may show what it holds.
            if not callable(self.credentials):
                raise SettingsError("invalid setting credentials: must be a callable or None")
            try:
                hash(self.credentials)
            except TypeError:
                raise SettingsError(
                    "invalid setting credentials: must be hashable (the handle registry keys "
                    "handles by their settings); pass a function or a hashable callable object"
                ) from None
        for name in ("min_size", "max_size", "retry_attempts", "breaker_threshold"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise bad(name, "must be an integer")
        if self.min_size < 0:
            raise bad("min_size", "must be >= 0")
        if self.max_size < 1:
            raise bad("max_size", "must be >= 1")
        if self.min_size > self.max_size:
            raise bad("min_size", f"must be <= max_size ({self.max_size})")
        if self.retry_attempts < 1:
            raise bad("retry_attempts", "must be >= 1 (1 means no retries)")
        if self.breaker_threshold < 1:
            raise bad("breaker_threshold", "must be >= 1")
        positive = (
            "acquire_timeout",
            "connect_timeout",
            "ready_timeout",
            "max_lifetime",
            "max_idle",
            "gap_threshold",
            "retry_max_delay",
            "breaker_cooldown",
            "breaker_max_cooldown",
            "breaker_min_outage",
            "health_interval",
            "health_timeout",
            "sizing_quiet_period",
            "leak_threshold",
            "fleet_interval",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise bad(name, "must be a number > 0")
        non_negative = (
            "validation_window",
            "retry_base_delay",
            "retry_budget_ratio",
            "retry_budget_floor",
            "slow_query_threshold",
            "keepalives_idle",
            "keepalives_interval",
            "keepalives_count",
            "tcp_user_timeout",
        )
        for name in non_negative:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise bad(name, "must be a number >= 0")
        if self.default_timeout is not None and self.default_timeout <= 0:
            raise bad("default_timeout", "must be > 0 or None")
        if not 0 <= self.lifetime_jitter < 1:
            raise bad("lifetime_jitter", "must be in [0, 1)")
        if self.breaker_max_cooldown < self.breaker_cooldown:
            raise bad("breaker_max_cooldown", "must be >= breaker_cooldown")
        if self.pgbouncer not in get_args(PgBouncerMode):
            raise bad("pgbouncer", "must be one of 'auto', 'on', 'off'")
        if self.prepare_threshold is not None and self.prepare_threshold < 0:
            raise bad("prepare_threshold", "must be >= 0 or None")
        if self.probe_query is not None and not self.probe_query.strip():
            raise bad("probe_query", "must not be empty")
        budget = self.fleet_budget
        if (
            budget is not None
            and budget not in ("role", "server")
            and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1)
        ):
            raise bad("fleet_budget", "must be an integer >= 1, 'role', 'server' or None")
        if not (
            isinstance(self.fleet_tag, str)
            and 0 < len(self.fleet_tag.encode()) <= 20
            and all(c.isascii() and (c.isalnum() or c in "_.-") for c in self.fleet_tag)
        ):
            raise bad("fleet_tag", "must be 1-20 letters, digits, '_', '.' or '-'")


def _shown(name: str, value: Any) -> str:
    """A field's value in `Settings.__repr__`: the credentials callable by name only."""
    if name == "credentials" and value is not None:
        return f"<{getattr(value, '__qualname__', type(value).__qualname__)}>"
    return repr(value)


#: Field name -> annotation (a string, as in ``dataclasses.fields(Settings)[i].type``).
_FIELD_TYPES: dict[str, str] = Settings.__annotations__
_FIELD_NAMES = tuple(_FIELD_TYPES)
#: Every field's value, in declaration order (a tuple): what equality and the hash compare.
_field_values = attrgetter(*_FIELD_NAMES)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse_env(name: str, raw: str, annotation: Any) -> Any:
    """Convert one environment string to the field's type, with a clear error."""
    text = raw.strip()
    kind = str(annotation)
    try:
        if "None" in kind and text.lower() in {"", "none", "null"}:
            return None
        if name == "fleet_budget":
            return text.lower() if text.lower() in {"role", "server"} else int(text)
        if kind.startswith("bool"):
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError("expected true/false")
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
    except ValueError as exc:
        shown = "***" if name == "url" else repr(raw)
        raise SettingsError(f"invalid {ENV_PREFIX}{name.upper()}={shown}: {exc}") from None
    return raw
