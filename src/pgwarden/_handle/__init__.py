"""What the async and sync shells share, with no awaits and no threads of its own.

``state.py`` is the one owner of a handle's mutable state (behind one lock);
``config.py`` turns settings into psycopg and psycopg_pool arguments;
``events.py`` writes the handle's log events; ``net.py`` holds the two socket
helpers (sever a blackholed connection, see whether an idle one has input).
"""
