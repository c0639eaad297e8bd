"""Subcommands of `cluster`: every module here has ``register(subparsers)``; cli.py finds them."""
