"""The ``spikelm`` command line: ``main`` dispatches to one module per subcommand (``train``, ``generate``, ``eval``,
``sparsity``), each with ``add_arguments(parser)`` and ``run(args) -> int``. Argument parsing and file I/O for a
command live here; the packages below stay importable as a library."""
