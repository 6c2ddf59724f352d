"""The ``pgwarden`` command line (the ``cli`` extra; standard library argparse only).

``pgwarden.cli.main`` is the entry point. It imports nothing heavy: each subcommand lives in
its own module, imported only when that subcommand is chosen, so ``pgwarden --help`` stays
fast and a new subcommand is one line in :data:`pgwarden.cli.main.COMMANDS` plus a module
with ``run(argv, prog) -> int``.
"""
