"""Sync tests, generated from `tests/_async/` by scripts/async_to_sync.py (except _compat)."""
