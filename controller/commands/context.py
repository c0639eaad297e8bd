"""What a CLI handler gets besides its arguments: streams, the configuration, output helpers."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional, TextIO

from rich.console import Console
from rich.table import Table

from controller.config import Config, load_config


def to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def make_console(stream: TextIO) -> Console:
    """Rich output that never wraps lines mid-word and, in pipes and logs, is wide enough for tables."""
    interactive = hasattr(stream, "isatty") and stream.isatty()
    return Console(file=stream, highlight=False, soft_wrap=True, width=None if interactive else 200)


@dataclass
class Context:
    args: argparse.Namespace
    stdout: TextIO
    stderr: TextIO
    stdin: Optional[TextIO] = None  # for questions (``stop --all``); None: no terminal to ask on
    _config: Optional[Config] = None
    _cluster: Any = None
    _console: Optional[Console] = field(default=None, repr=False)

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.args.config)
        return self._config

    def cluster(self):
        """The API object for the configured cluster (imported lazily: it pulls in ipyparallel)."""
        if self._cluster is None:
            from controller.api import Cluster

            self._cluster = Cluster(self.config)
        return self._cluster

    @property
    def console(self) -> Console:
        if self._console is None:
            self._console = make_console(self.stdout)
        return self._console

    @property
    def err_console(self) -> Console:
        return make_console(self.stderr)

    def emit_json(self, value: Any) -> None:
        json.dump(to_jsonable(value), self.stdout, indent=2, sort_keys=True)
        self.stdout.write("\n")

    def emit_table(self, title: str, columns: list[str], rows: list[list[Any]], caption: str = "") -> None:
        table = Table(title=title, caption=caption or None, title_justify="left")
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*("" if cell is None else str(cell) for cell in row))
        self.console.print(table)

    def say(self, message: str) -> None:
        self.console.print(message)

    def can_ask(self) -> bool:
        return self.stdin is not None and hasattr(self.stdin, "isatty") and self.stdin.isatty()

    def ask(self, question: str) -> bool:
        """A yes/no question on the terminal; anything but y/yes is no."""
        self.stderr.write(f"{question} [y/N] ")
        self.stderr.flush()
        answer = self.stdin.readline() if self.stdin is not None else ""
        return answer.strip().lower() in ("y", "yes")

    def close(self) -> None:
        if self._cluster is not None:
            self._cluster.close()
