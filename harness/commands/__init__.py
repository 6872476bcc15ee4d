"""The command line's subcommands, each a `main(argv)` that `python -m harness` dispatches to."""
