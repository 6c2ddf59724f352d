"""``pgwarden stress``: fault scenarios that compare pgwarden with the clients it replaces.

Every scenario runs the same workload with seven clients in turn (pgwarden, psycopg_pool
with its defaults, SQLAlchemy's QueuePool with ``pool_pre_ping=True``, the same SQLAlchemy
code on pgwarden's ``postgresql+pgwarden://`` dialect, Django on its own backend and on
pgwarden's, and a naive connect-per-request client), each in real worker processes, while
the harness injects a fault (a restart, killed backends, an overloaded server, a flaky
network...). Writes carry unique ids, so duplicates and lost acknowledged writes are counted
from the table itself; in some scenarios the ORM clients also run units of work
(:mod:`.orm`), counted the same way and checked for torn units.

Modules:

* :mod:`.worker`: the worker process (``python -m pgwarden.stress.worker CONFIG``). It
  imports only the standard library until the start signal, so a cold start is real.
* :mod:`.clients`: the client adapters the worker drives (the Django ones in
  :mod:`.django_clients`), and the report's error kinds (from
  :mod:`pgwarden.core.classify`).
* :mod:`.orm`: the declarative models and the unit of work of the ORM workload.
* :mod:`.scenarios`: scenario definitions, sizes, waves and fault schedules.
* :mod:`.harness`: the orchestration of a run: per scenario a target, per client a run.
* :mod:`.targets`: the servers (ours or ``--url``), PgBouncer or the fault proxy, the schema.
* :mod:`.workers`: spawning and following the worker processes; compiling bytecode first.
* :mod:`.sampler`: the ``pg_stat_activity`` sampler.
* :mod:`.faults`: the fault injector.
* :mod:`.results`: the typed records, and one client's result from its workers' files.
* :mod:`.fleet`: the ``fleet`` scenario's per-process figures.
* :mod:`.failover`: the ``failover`` scenario's target (a primary with a synchronous
  standby), its failover and rejoin faults, and its figures.
* :mod:`.analysis`: turning request records into figures (pure).
* :mod:`.report`: the terminal table, the JSON file and the HTML report.

This package imports nothing at import time, so the worker starts as fast as Python can.
See ``docs/stress.md``.
"""

from __future__ import annotations

__all__: list[str] = []
