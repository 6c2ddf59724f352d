"""Each rule of ``pgwarden check`` (pgwarden.core.check_rules) on its own: pure, no server."""

from __future__ import annotations

import psycopg
import pytest

from pgwarden.cli import check
from pgwarden.cli._check_probe import summarize_connect_error
from pgwarden.cli._common import url_secrets
from pgwarden.core import check_rules as rules
from pgwarden.core.check_rules import CheckFacts, ServerSetting
from pgwarden.core.fleet import plan_fleet
from pgwarden.settings import Settings


def server(**values: tuple[str, str | None]) -> dict[str, ServerSetting]:
    return {
        name: ServerSetting(name, value, unit, "configuration file")
        for name, (value, unit) in values.items()
    }


def facts(pgwarden: Settings | None = None, /, **kwargs: object) -> CheckFacts:
    """Facts with the given server settings (``name=(value, unit)``) and flags."""
    flags = {k: kwargs.pop(k) for k in list(kwargs) if not isinstance(kwargs[k], tuple)}
    return CheckFacts(
        server=server(**kwargs),  # type: ignore[arg-type]
        pgwarden=pgwarden or Settings(),
        **flags,  # type: ignore[arg-type]
    )


def test_rules_are_named_after_their_codes() -> None:
    every = facts(
        idle_session_timeout=("5", "s"),
        idle_in_transaction_session_timeout=("2", "s"),
        tcp_keepalives_idle=("0", "s"),
        statement_timeout=("30", "s"),
        superuser_reserved_connections=("0", None),
        max_connections=("20", None),
        connections_in_use=18,
        local=False,
        standby=True,
        fleet=plan_fleet(50, None, 100, 3, 200, 10),
    )
    found = [rule(every) for rule in rules.RULES]
    assert [f.code if f else None for f in found] == [r.__name__ for r in rules.RULES]
    assert rules.assess(every) == found


def test_defaults_are_the_handles() -> None:
    # The check compares with pgwarden's own defaults, not copies that can drift.
    assert CheckFacts(server={}).pgwarden == Settings()


def test_idle_session_timeout_shorter_than_max_idle() -> None:
    finding = rules.idle_session_timeout(facts(idle_session_timeout=("5000", "ms")))
    assert finding is not None
    assert finding.level == "warning"
    assert "idle_session_timeout = 5s (set by configuration file)" in finding.message
    assert "shorter than pgwarden's max_lifetime (30min)" in finding.message
    assert f"and than max_idle ({rules.fmt_duration(Settings().max_idle)})" in finding.message
    assert "PGWARDEN_MAX_IDLE below 5s" in finding.message


def test_idle_session_timeout_between_max_idle_and_max_lifetime() -> None:
    pgw = Settings(max_idle=60, max_lifetime=1800)
    finding = rules.idle_session_timeout(facts(pgw, idle_session_timeout=("600", "s")))
    assert finding is not None
    assert "min_size=0 kept open can sit idle past 10min" in finding.message


def test_idle_session_timeout_behind_pooler_and_quiet_cases() -> None:
    behind = rules.idle_session_timeout(facts(idle_session_timeout=("5", "s"), behind_pooler=True))
    assert behind is not None
    assert "server_idle_timeout" in behind.message
    assert rules.idle_session_timeout(facts(idle_session_timeout=("0", "ms"))) is None
    longer = Settings(max_lifetime=4.0, max_idle=1.0)
    assert rules.idle_session_timeout(facts(longer, idle_session_timeout=("5", "s"))) is None
    assert rules.idle_session_timeout(facts()) is None


def test_idle_in_transaction_session_timeout() -> None:
    short = rules.idle_in_transaction_session_timeout(
        facts(idle_in_transaction_session_timeout=("2000", "ms"))
    )
    assert short is not None
    assert short.level == "warning"
    assert "25P03" in short.message
    for value in ("0", "10000", "600000"):
        quiet = facts(idle_in_transaction_session_timeout=(value, "ms"))
        assert rules.idle_in_transaction_session_timeout(quiet) is None


def test_tcp_keepalives_idle() -> None:
    os_default = rules.tcp_keepalives_idle(facts(tcp_keepalives_idle=("0", "s")))
    assert os_default is not None
    assert os_default.level == "info"
    assert "the OS default, usually 2h" in os_default.message
    long = rules.tcp_keepalives_idle(facts(tcp_keepalives_idle=("7200", "s")))
    assert long is not None
    assert "(2h)" in long.message
    assert rules.tcp_keepalives_idle(facts(tcp_keepalives_idle=("300", "s"))) is None
    assert rules.tcp_keepalives_idle(facts(tcp_keepalives_idle=("0", "s"), socket=True)) is None
    behind = facts(tcp_keepalives_idle=("0", "s"), behind_pooler=True)
    assert rules.tcp_keepalives_idle(behind) is None


def test_statement_timeout() -> None:
    finding = rules.statement_timeout(facts(statement_timeout=("30000", "ms")))
    assert finding is not None
    assert finding.level == "info"
    assert finding.message.startswith("statement_timeout = 30s (set by configuration file)")
    assert rules.statement_timeout(facts(statement_timeout=("0", "ms"))) is None


def test_superuser_reserved_connections() -> None:
    none_kept = rules.superuser_reserved_connections(
        facts(superuser_reserved_connections=("0", None))
    )
    assert none_kept is not None
    assert none_kept.level == "warning"
    assert (
        rules.superuser_reserved_connections(facts(superuser_reserved_connections=("3", None)))
        is None
    )


def test_connections_in_use() -> None:
    limits = {"max_connections": ("23", None), "superuser_reserved_connections": ("3", None)}
    busy = rules.connections_in_use(facts(connections_in_use=16, **limits))  # 16 >= 0.8 * 20
    assert busy is not None
    assert busy.message.startswith("16 of 20 usable connections are in use")
    assert rules.connections_in_use(facts(connections_in_use=15, **limits)) is None
    assert rules.connections_in_use(facts(connections_in_use=None, **limits)) is None
    assert rules.connections_in_use(facts(connections_in_use=99)) is None  # limits unknown


def test_max_connections() -> None:
    small = rules.max_connections(
        facts(max_connections=("100", None), superuser_reserved_connections=("3", None))
    )
    assert small is not None
    assert "room for 9 processes at pgwarden's max_size=10" in small.message
    roomy = facts(Settings(max_size=5), max_connections=("100", None))
    assert rules.max_connections(roomy) is None  # 20 processes fit
    behind = facts(max_connections=("100", None), behind_pooler=True)
    assert rules.max_connections(behind) is None


def test_tls() -> None:
    plaintext = rules.tls(facts(local=False))
    assert plaintext is not None
    assert "sslmode=require" in plaintext.message
    assert rules.tls(facts(local=False, tls=True)) is None
    assert rules.tls(facts(local=True)) is None
    assert rules.tls(facts(local=False, socket=True)) is None


def test_standby() -> None:
    finding = rules.standby(facts(standby=True))
    assert finding is not None
    assert "25006" in finding.message
    assert rules.standby(facts()) is None


def test_usable_slots() -> None:
    assert rules.usable_slots({}) is None
    assert (
        rules.usable_slots(
            server(
                max_connections=("100", None),
                superuser_reserved_connections=("3", None),
                reserved_connections=("2", None),
            )
        )
        == 95
    )


def test_fmt_duration() -> None:
    assert [rules.fmt_duration(s) for s in (0, 0.25, 5, 90, 1800, 7200, 5400)] == [
        "0",
        "250ms",
        "5s",
        "90s",
        "30min",
        "2h",
        "90min",
    ]


def test_load_settings_falls_back_to_the_handles_defaults() -> None:
    settings, problem = check.load_settings({"PGWARDEN_MAX_SIZE": "lots", "DATABASE_URL": "x"})
    assert settings == Settings(url="x")
    assert problem is not None
    assert "PGWARDEN_MAX_SIZE" in problem
    settings, problem = check.load_settings({"PGWARDEN_MAX_IDLE": "60"})
    assert (settings.max_idle, problem) == (60.0, None)


def test_url_secrets() -> None:
    assert url_secrets("postgresql://u:pw1@h/db", {}) == ("pw1",)
    assert url_secrets("host=h password=pw2", {"PGPASSWORD": "pw3"}) == ("pw2", "pw3")
    assert url_secrets("postgresql://u@h/db", {}) == ()


# --------------------------------------------------------------------------------------------
# Connect failures, worded after core/classify.py's rules


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (
            'connection failed: connection to server at "127.0.0.1", port 1 failed: '
            "Connection refused\n\tIs the server running on that host and accepting TCP/IP "
            "connections?",
            "connection refused",
        ),
        (
            'connection failed: connection to server at "h", port 5432 failed: FATAL:  '
            'password authentication failed for user "app"',
            'password authentication failed for user "app"',
        ),
        (
            "failed to resolve host 'nohost.invalid': [Errno -2] Name or service not known",
            "cannot resolve host name 'nohost.invalid'",
        ),
        (
            'connection is bad: connection to server on socket "/tmp/x/.s.PGSQL.5432" failed: '
            "No such file or directory\n\tIs the server running locally?",
            "no server socket at /tmp/x/.s.PGSQL.5432",
        ),
        ("connection failed: something new and odd", "something new and odd"),
    ],
)
def test_summarize_connect_error(message: str, reason: str) -> None:
    assert summarize_connect_error(psycopg.OperationalError(message)) == reason


def test_summarize_timeout_uses_the_one_libpq_rule() -> None:
    exc = psycopg.errors.ConnectionTimeout("connection timeout expired")
    assert summarize_connect_error(exc, 0.5) == "timed out after 2s"
    assert summarize_connect_error(exc, 4.2) == "timed out after 5s"
    assert summarize_connect_error(exc) == "timed out"


# --------------------------------------------------------------------------------------------
# The fleet rule (pgwarden check --instances N), over core/fleet.py's plan


def test_fleet_budget_quiet_without_instances() -> None:
    assert rules.fleet_budget(facts()) is None


def test_fleet_budget_warns_when_instances_take_turns() -> None:
    plan = plan_fleet(50, None, 100, 3, 200, 10)
    finding = rules.fleet_budget(CheckFacts(server={}, fleet=plan))
    assert finding is not None
    assert finding.level == "warning"
    assert finding.message.startswith("200 instances share 45 connections")


def test_fleet_budget_notes_an_unset_budget_that_max_size_would_overrun() -> None:
    plan = plan_fleet("server", None, 100, 3, 30, 10)  # 97, 10 free: 87 for 30 -> 2 or 3
    finding = rules.fleet_budget(CheckFacts(server={}, fleet=plan))
    assert finding is not None
    assert finding.level == "info"
    assert "could open 300 connections, more than the budget of 97" in finding.message
    assert "caps itself at 2-3" in finding.message
    # With PGWARDEN_FLEET_BUDGET set the handles cap themselves: nothing to say.
    budgeted = CheckFacts(server={}, pgwarden=Settings(fleet_budget="server"), fleet=plan)
    assert rules.fleet_budget(budgeted) is None
    # A fleet that fits at max_size needs no budget either.
    small = plan_fleet("server", None, 100, 3, 5, 10)
    assert rules.fleet_budget(CheckFacts(server={}, fleet=small)) is None


def test_plan_for_reads_the_fleet_sampler_row() -> None:
    row = {
        "members": {},
        "others_server": 7,
        "others_role": 2,
        "role_limit": 20,
        "max_connections": 100,
        "reserved": 3,
    }
    by_server = check.plan_for(4, "server", Settings(), row)
    assert by_server.budget == 100 - 3 - 7
    by_role = check.plan_for(4, "role", Settings(), row)
    assert by_role.budget == 20 - 2
    assert check.plan_for(4, 12, Settings(), row).budget == 12
