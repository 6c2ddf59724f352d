"""The asyncio shell. `_sync` is generated from this package by scripts/async_to_sync.py."""
