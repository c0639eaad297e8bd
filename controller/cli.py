"""`cluster`: the argument spec and the command table. No logic lives here.

Each module in ``controller.commands`` registers its subcommands; a handler
takes (args, ctx) and calls the Python API.  Exceptions become exit codes in
one place, ``main``.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from typing import Optional, Sequence, TextIO

from controller import __version__, commands
from controller.commands.context import Context
from controller.errors import REPORTED, ExitStatus, TaskError
from controller.logs import CliLogging

# `cluster --help` lists the commands in the order of the work, not in the order modules register them;
# a command missing here is listed after these, in registration order
COMMAND_ORDER = (
    "start",
    "status",
    "scale",
    "remove",
    "stop",
    "train",
    "runs",
    "infer",
    "sweep",
    "sweeps",
    "results",
    "bench",
    "report",
    "prices",
    "ip",
    "ssh",
)


def command_modules() -> list:
    """The modules of ``controller.commands`` that register subcommands (``context`` is what handlers get)."""
    names = sorted(m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_"))
    modules = [importlib.import_module(f"{commands.__name__}.{name}") for name in names]
    return [module for module in modules if hasattr(module, "register")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cluster",
        description="Start GPU slaves, train on them, stop them; a master-slave controller over ipyparallel.",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="configuration file (default: $CLUSTER_CONFIG, ./cluster.ini, built-in defaults)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more logging from this tool (-vv: debug); libraries stay at warnings",
    )
    parser.add_argument(
        "--debug-libraries",
        action="store_true",
        help="also debug logging of boto3/botocore, paramiko and ipyparallel (secrets redacted)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in command_modules():
        module.register(sub)
    in_order_of_work(sub)
    return parser


def in_order_of_work(sub: argparse._SubParsersAction) -> None:
    """Reorder the help's command list and the choices (named in usage errors) by COMMAND_ORDER."""
    rank = {name: position for position, name in enumerate(COMMAND_ORDER)}

    def key(name: str) -> int:
        return rank.get(name, len(rank))  # a stable sort: unknown names keep their registration order

    # argparse keeps both in the order of add_parser calls and offers no way to reorder them
    sub._choices_actions.sort(key=lambda action: key(action.dest))
    ordered = sorted(sub.choices.items(), key=lambda item: key(item[0]))
    sub.choices.clear()
    sub.choices.update(ordered)


def main(
    argv: Optional[Sequence[str]] = None,
    *,
    stdout: Optional[TextIO] = None,
    stderr: Optional[TextIO] = None,
    stdin: Optional[TextIO] = None,
) -> int:
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    stdin = stdin if stdin is not None else sys.stdin
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed the usage error
        return int(exit_.code or 0)
    logs = CliLogging(stderr, args.verbose, args.debug_libraries)
    ctx = Context(args=args, stdout=stdout, stderr=stderr, stdin=stdin)
    try:
        return int(args.handler(args, ctx) or ExitStatus.OK)
    except REPORTED as error:
        if isinstance(error, TaskError) and error.traceback:
            print(error.traceback, file=stderr)
        print(f"cluster {args.command}: error: {error}", file=stderr)
        return int(error.exit_status)
    except KeyboardInterrupt:
        print(f"cluster {args.command}: interrupted", file=stderr)
        return int(ExitStatus.INTERRUPTED)
    finally:
        ctx.close()
        logs.close()


if __name__ == "__main__":
    sys.exit(main())
