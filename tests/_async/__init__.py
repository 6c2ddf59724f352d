"""Async tests, the source of truth: `tests/_sync/` is generated from them (except _compat)."""
