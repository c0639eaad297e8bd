"""Live progress on the master's terminal, fed by what engines publish while they train."""

from __future__ import annotations

from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from controller.work.jobs import Job, ProgressSink
from engines.spec import TaskResult


def epoch_line(run_id: str, metrics: dict, epochs: int) -> str:
    return (
        f"{run_id} epoch {metrics['epoch']}/{epochs}: loss {metrics['train_loss']:.4f}  "
        f"val {metrics['val_accuracy']:.2%}  test {metrics['test_accuracy']:.2%}  "
        f"{metrics['images_per_s']:,.0f} img/s  {metrics['seconds']:.1f} s"
    )


class RunProgress(ProgressSink):
    """A bar per run (batches of the current epoch) and a line per finished epoch.

    On a terminal the bar animates; elsewhere (CI logs, pipes) only the epoch lines show.
    """

    def __init__(self, console: Optional[Console] = None):
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
            disable=not self.console.is_terminal,
        )
        self.tasks: dict[str, TaskID] = {}
        self.printed: set[tuple[str, int]] = set()

    def __enter__(self) -> "RunProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def _task(self, job: Job) -> TaskID:
        if job.run_id not in self.tasks:
            self.tasks[job.run_id] = self.progress.add_task(job.run_id, total=None, loss="-")
        return self.tasks[job.run_id]

    def task_submitted(self, job: Job) -> None:
        self.progress.update(
            self._task(job), description=f"{job.run_id} epoch {job.epochs_done + 1}/{job.spec['epochs']}"
        )

    def task_progress(self, job: Job, update: dict) -> None:
        task = self._task(job)
        if update.get("done"):
            self._epoch_done(job, update["done"])
        elif update.get("batches"):
            loss = update.get("loss")
            self.progress.update(
                task,
                total=update["batches"],
                completed=update["batch"],
                description=f"{job.run_id} epoch {update['epoch']}/{update['epochs']}",
                loss=f"{loss:.4f}" if loss is not None else "-",
            )

    def task_done(self, job: Job, result: TaskResult, engine_id: Optional[int]) -> None:
        for metrics in result.epochs:
            self._epoch_done(job, metrics, engine_id)

    def _epoch_done(self, job: Job, metrics: dict, engine_id: Optional[int] = None) -> None:
        key = (job.run_id, metrics["epoch"])
        if key in self.printed:
            return
        self.printed.add(key)
        where = f"  [engine {engine_id}]" if engine_id is not None else ""
        self.progress.console.print(epoch_line(job.run_id, metrics, job.spec["epochs"]) + where, highlight=False)

    def engine_lost(self, job: Job, error: BaseException) -> None:
        self.progress.console.print(
            f"{job.run_id}: engine lost ({error}); retrying on another engine", style="yellow", highlight=False
        )

    def task_stalled(self, job: Job, engine_id: int, silent_s: float) -> None:
        self.progress.console.print(
            f"{job.run_id}: no progress for {silent_s:.0f} s on engine {engine_id} "
            f"([cluster] stall_minutes); killing that engine",
            style="yellow",
            highlight=False,
        )

    def job_failed(self, job: Job, error: BaseException) -> None:
        self.progress.console.print(f"{job.run_id} failed: {error}", style="red", highlight=False)
