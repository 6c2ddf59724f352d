"""The threaded shell, generated from `_async` by scripts/async_to_sync.py (except _compat)."""
