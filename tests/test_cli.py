"""The argument spec: `cluster --help` reads in the order of the work, whatever order modules register in."""

from __future__ import annotations

import argparse
import io

from controller.cli import COMMAND_ORDER, build_parser, in_order_of_work, main


def help_commands(parser: argparse.ArgumentParser) -> list[str]:
    """The command names as `--help` lists them, top to bottom."""
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    listed = parser.format_help().split("COMMAND\n", 1)[1].split("\noptions:", 1)[0]
    return [
        line.split()[0]
        for line in listed.splitlines()
        if line.startswith("    ") and not line.startswith("     ") and line.split()[0] in sub.choices
    ]


def test_help_lists_the_commands_in_the_order_of_the_work():
    listed = help_commands(build_parser())
    known = [name for name in COMMAND_ORDER if name in listed]
    assert listed[: len(known)] == known
    assert set(listed) >= {"start", "status", "stop", "train", "runs", "sweep", "bench", "report", "ssh"}


def test_a_command_missing_from_the_order_falls_behind_in_registration_order():
    parser = argparse.ArgumentParser(prog="cluster")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in ("zeta", "ssh", "alpha", "start", "train"):
        sub.add_parser(name, help=f"the {name} command")
    in_order_of_work(sub)
    assert help_commands(parser) == ["start", "train", "ssh", "zeta", "alpha"]
    assert list(sub.choices) == ["start", "train", "ssh", "zeta", "alpha"]  # usage errors name them so too


def test_an_unknown_command_names_the_choices_in_that_order(capsys):
    assert main(["frobnicate"], stdout=io.StringIO(), stderr=io.StringIO()) == 2
    choices = capsys.readouterr().err.split("choose from ", 1)[1]  # argparse writes to sys.stderr itself
    assert choices.index("'start'") < choices.index("'stop'") < choices.index("'train'") < choices.index("'ssh'")
