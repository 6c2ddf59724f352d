"""The pure core: decisions without I/O.

Nothing in this package opens a socket, sleeps, starts a thread or touches
asyncio, and nothing imports psycopg. Time ("now", monotonic seconds) and
randomness (a float in ``[0, 1)``) are arguments, so every policy is tested
without a database and both shells share one implementation of it. The only
clock read is in :func:`pgwarden.core.deadline.deadline`, at entry.

- :mod:`~pgwarden.core.classify`: exception + phase -> failure kind; retry safety;
  read/write detection.
- :mod:`~pgwarden.core.retry`: backoff policy, the process-wide retry budget, and
  :func:`~pgwarden.core.retry.decide`, the one retry decision.
- :mod:`~pgwarden.core.commit`: what ``txid_status()`` says about a lost COMMIT.
- :mod:`~pgwarden.core.breaker`: the circuit breaker.
- :mod:`~pgwarden.core.lifecycle`: the handle's state machine.
- :mod:`~pgwarden.core.sizing`: AIMD limit on the pool size.
- :mod:`~pgwarden.core.deadline`: deadlines and statement timeouts.
- :mod:`~pgwarden.core.hygiene`: validation, freeze detection, jittered lifetimes.
- :mod:`~pgwarden.core.metrics`: the metrics model.
- :mod:`~pgwarden.core.tracing`: the statement-observer seam (tracers such as OTel spans).

Import from the submodules. This package re-exports nothing, so importing it
costs nothing, and a function such as ``classify`` is never shadowed by the
submodule of the same name.
"""
