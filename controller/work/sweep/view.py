"""The live view of a sweep on the master: trials by state, the best so far, each engine's task.

On a terminal it redraws in place (rich Live); elsewhere (CI logs, pipes) it
prints one line per finished trial and the traceback of a trial that raised.
"""

from __future__ import annotations

import time
from typing import Optional

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from controller.work.jobs import Job, ProgressSink
from controller.work.sweep.source import SweepSource
from engines.spec import TaskResult


def _params(params: dict) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


class SweepProgress(ProgressSink):
    def __init__(
        self, source: SweepSource, console: Optional[Console] = None, engine_pids: Optional[dict[int, int]] = None
    ):
        self.source = source
        self.console = console or Console(stderr=True)
        self.engine_pids = dict(engine_pids or {})  # pid -> engine id, to place what engines publish
        self.activity: dict[int, dict] = {}  # engine id (or -pid while unknown) -> what it is doing
        self.started = time.monotonic()
        self.live = Live(
            console=self.console, auto_refresh=False, transient=False, redirect_stdout=False, redirect_stderr=False
        )
        self.enabled = self.console.is_terminal
        source.listener = self

    def __enter__(self) -> "SweepProgress":
        if self.enabled:
            self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.live.update(self.render(), refresh=True)
            self.live.stop()

    def _print(self, renderable) -> None:
        (self.live.console if self.enabled else self.console).print(renderable, highlight=False)

    # what the scheduler says ----------------------------------------------------------
    def task_progress(self, job: Job, update: dict) -> None:
        pid = int(update.get("pid") or 0)
        engine = self.engine_pids.get(pid, -pid)
        for key, doing in list(self.activity.items()):
            if doing["run_id"] == job.run_id and key != engine:
                del self.activity[key]  # the trial moved on to another engine
        self.activity[engine] = {
            "run_id": job.run_id,
            "trial": job.tag.number,
            "epoch": update.get("epoch"),
            "epochs": update.get("epochs"),
            "batch": update.get("batch"),
            "batches": update.get("batches"),
            "loss": update.get("loss"),
        }

    def task_done(self, job: Job, result: TaskResult, engine_id: Optional[int]) -> None:
        if engine_id is not None and result.pid:
            self.engine_pids[result.pid] = engine_id
            self.activity.pop(-result.pid, None)
        if engine_id is not None:
            last = result.epochs[-1] if result.epochs else {}
            self.activity[engine_id] = {
                "run_id": job.run_id,
                "trial": job.tag.number,
                "epoch": result.completed_epochs,
                "epochs": job.spec["epochs"],
                "batch": None,
                "batches": None,
                "loss": last.get("train_loss"),
                "val": last.get("val_accuracy"),
                "done": True,
            }

    def engine_lost(self, job: Job, error: BaseException) -> None:
        self._print(
            Text(f"trial {job.tag.number}: engine lost ({error}); its task goes to another engine", style="yellow")
        )

    def task_stalled(self, job: Job, engine_id: int, silent_s: float) -> None:
        self._print(
            Text(
                f"trial {job.tag.number}: no progress for {silent_s:.0f} s on engine {engine_id} "
                f"([cluster] stall_minutes); killing that engine",
                style="yellow",
            )
        )

    def tick(self) -> None:
        if self.enabled:
            self.live.update(self.render(), refresh=True)

    # what the source says -------------------------------------------------------------
    def trial_finished(
        self, number: int, state: str, value: Optional[float], params: dict, error: Optional[str]
    ) -> None:
        style = {"COMPLETE": "green", "PRUNED": "yellow"}.get(state, "red")
        shown = f"{value:.2%}" if value is not None else "-"
        self._print(Text(f"trial {number} {state.lower()}: val {shown}  {_params(params)}", style=style))
        if error:
            self._print(Text(error.rstrip(), style="red"))
        for key, doing in list(self.activity.items()):
            if doing["trial"] == number:
                del self.activity[key]

    # drawing ---------------------------------------------------------------------------
    def header(self) -> str:
        tally, source = self.source.tally, self.source
        done = tally.complete + tally.pruned + tally.failed
        best = (
            f"best trial {tally.best_number}: val {tally.best_value:.2%} ({_params(tally.best_params)})"
            if tally.best_number is not None
            else "best: -"
        )
        return (
            f"sweep {source.sweep_id}: {done}/{source.n_trials} done — {tally.complete} complete, "
            f"{tally.pruned} pruned, {len(tally.running)} running, {tally.failed} failed — {best} — "
            f"{time.monotonic() - self.started:.0f} s"
        )

    def render(self) -> Group:
        table = Table(title=None, box=None, pad_edge=False)
        for column in ("engine", "trial", "epoch", "batch", "loss", "params"):
            table.add_column(column)
        for engine in sorted(self.activity, key=lambda e: (e < 0, abs(e))):
            doing = self.activity[engine]
            job = self.source.tally.running.get(doing["trial"])
            params = _params({k: job.spec.get(k) for k in self.source.space.names}) if job else ""
            batch = (
                f"{doing['batch']}/{doing['batches']}"
                if doing.get("batches")
                else (f"val {doing['val']:.2%}" if doing.get("val") is not None else "-")
            )
            loss = f"{doing['loss']:.4f}" if isinstance(doing.get("loss"), float) else "-"
            table.add_row(
                str(engine) if engine >= 0 else f"pid {-engine}",
                str(doing["trial"]),
                f"{doing['epoch']}/{doing['epochs']}",
                batch,
                loss,
                params,
            )
        return Group(Text(self.header(), style="bold"), table)
