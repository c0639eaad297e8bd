"""Batch inference on the master: a trained model applied to a whole split, shards spread over the engines.

The split is cut into contiguous shards (one per engine, or ``shards_per_engine`` each for
load balance) whose boundaries fall on multiples of the evaluation batch, so every batch is
the one a single loop would form.  The checkpoint travels once to each engine that does not
hold it yet (engines/predict.py keeps it); shards go through a load-balanced view, a shard lost
with its engine is sent again, and the predictions are put back in order.
"""

from __future__ import annotations

import concurrent.futures
import csv
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from controller.errors import TaskError, UsageError
from controller.work.watch import STALL_KILLS, discount_pause, is_engine_loss, kill_through_nanny, running_on
from engines.tasks import infer_task, load_model_task, split_size_task

log = logging.getLogger(__name__)

# engines.loop.EVAL_BATCH, a multiple of every batch engines.predict.predict takes: shards start at multiples of it
EVAL_BATCH = 1000
SPLITS = ("test", "val", "train")
FORMATS = (".csv", ".npz")
MAX_RESENDS = 3
ProgressFn = Callable[[int, int], None]  # (images done, images in all)


@dataclass
class InferenceResult:
    split: str
    kind: str  # mnist or cifar
    run_id: Optional[str]
    checkpoint: str  # the key (sha256 prefix) of the checkpoint used
    engines: list[int]
    shards: int
    seconds: float
    predictions: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)
    probabilities: np.ndarray = field(repr=False)

    @property
    def images(self) -> int:
        return len(self.predictions)

    @property
    def accuracy(self) -> float:
        return float((self.predictions == self.labels).mean()) if self.images else 0.0

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def confusion(self) -> list[list[int]]:
        """Rows: true label; columns: prediction."""
        classes = self.probabilities.shape[1] if self.probabilities.ndim == 2 else 10
        counts = np.bincount(self.labels * classes + self.predictions, minlength=classes * classes)
        return counts.reshape(classes, classes).tolist()

    def to_dict(self) -> dict:
        return {
            "run_id": self.run_id,
            "split": self.split,
            "kind": self.kind,
            "checkpoint": self.checkpoint,
            "engines": self.engines,
            "shards": self.shards,
            "images": self.images,
            "accuracy": self.accuracy,
            "seconds": self.seconds,
            "images_per_s": self.images_per_s,
            "confusion": self.confusion(),
        }


def shard_bounds(n: int, shards: int, batch: int = EVAL_BATCH) -> list[tuple[int, int]]:
    """``shards`` contiguous [start, stop) ranges covering 0..n, cut at multiples of ``batch``
    (fewer when there are fewer batches than shards)."""
    batches = -(-n // batch)
    shards = max(1, min(shards, batches))
    cuts = [round(i * batches / shards) * batch for i in range(shards)] + [n]
    return [(min(a, n), min(b, n)) for a, b in zip(cuts, cuts[1:]) if min(a, n) < min(b, n)]


def write_predictions(result: InferenceResult, path: Path) -> Path:
    """CSV (index, label, prediction, p0..p9) or npz (the same arrays), chosen by the file's suffix;
    written to a temporary name and renamed, so a reader never sees half a file."""
    path = Path(path)
    if path.suffix not in FORMATS:
        raise UsageError(f"--out {path}: expected a .csv or .npz file name")
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".csv":
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            classes = result.probabilities.shape[1]
            writer.writerow(["index", "label", "prediction", *(f"p{c}" for c in range(classes))])
            for index, (label, prediction, probs) in enumerate(
                zip(result.labels, result.predictions, result.probabilities)
            ):
                writer.writerow([index, int(label), int(prediction), *(f"{p:.6g}" for p in probs)])
    else:
        with open(tmp, "wb") as handle:
            np.savez_compressed(
                handle,
                index=np.arange(result.images),
                labels=result.labels,
                predictions=result.predictions,
                probabilities=result.probabilities,
            )
    tmp.replace(path)
    return path


@dataclass
class _Shard:
    """A shard running on an engine, as the master last heard of it."""

    engine: int
    heard_at: float  # when it began, last reported images done, or its engine was last told to die
    done: int = 0
    kills: int = 0


class Inference:
    """One inference job over ``engines`` of a connected ipyparallel client.

    ``stall_s`` (``[cluster] stall_minutes``; 0: never): a shard that began and reports no images done for that
    long (a hung CUDA kernel: the engine's heartbeat goes on) has its engine killed through its nanny, and is
    sent again like a shard whose engine was lost."""

    def __init__(
        self,
        client,
        engines: list[int],
        *,
        shards_per_engine: int = 1,
        threads: int = 0,
        device: str = "auto",
        poll_s: float = 0.1,
        stall_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if shards_per_engine < 1:
            raise UsageError(f"--shards-per-engine {shards_per_engine}: expected 1 or more")
        self.client = client
        self.engines = list(engines)
        self.shards_per_engine = shards_per_engine
        self.threads = threads
        self.device = device
        self.poll_s = poll_s
        self.stall_s = stall_s
        self.clock = clock
        self.loaded_now: list[int] = []  # engines the checkpoint was sent to by this call

    def ensure_model(self, key: str, checkpoint: bytes) -> dict:
        """Load the model on every engine that does not hold it yet; the checkpoint's spec and kind."""
        view = self.client[self.engines]
        held = view.apply_async(load_model_task, key, None).get(timeout=60)
        missing = [e for e, info in zip(self.engines, held) if not info["loaded"]]
        if missing:
            loaded = (
                self.client[missing]
                .apply_async(load_model_task, key, checkpoint, self.device, self.threads)
                .get(timeout=300)
            )
            held = loaded
        self.loaded_now = missing
        return held[0]

    def run(
        self,
        checkpoint: bytes,
        split: str,
        data_dir: str,
        *,
        run_id: Optional[str] = None,
        expect_kind: Optional[str] = None,
        progress: Optional[ProgressFn] = None,
    ) -> InferenceResult:
        if split not in SPLITS:
            raise UsageError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
        key = hashlib.sha256(checkpoint).hexdigest()[:20]
        started = time.perf_counter()
        info = self.ensure_model(key, checkpoint)
        kind = info["kind"]
        if expect_kind and kind != expect_kind:
            raise UsageError(f"--workload: the checkpoint holds a {kind} model, not a {expect_kind} one")
        n = self.client[self.engines[0]].apply_async(split_size_task, kind, data_dir, split).get(timeout=300)
        bounds = shard_bounds(n, len(self.engines) * self.shards_per_engine)
        parts = self._predict(key, kind, data_dir, split, bounds, n, progress)
        seconds = time.perf_counter() - started
        starts = sorted(parts)
        covered = [i for s in starts for i in range(parts[s]["start"], parts[s]["stop"])]
        if covered != list(range(n)):  # every image exactly once, in order
            raise TaskError(f"inference returned images {len(covered)} of {n}, or out of order")
        return InferenceResult(
            split=split,
            kind=kind,
            run_id=run_id,
            checkpoint=key,
            engines=self.engines,
            shards=len(bounds),
            seconds=seconds,
            predictions=np.concatenate([parts[s]["predictions"] for s in starts]) if starts else np.zeros(0, int),
            labels=np.concatenate([parts[s]["labels"] for s in starts]) if starts else np.zeros(0, int),
            probabilities=(
                np.concatenate([parts[s]["probabilities"] for s in starts]) if starts else np.zeros((0, 10), np.float32)
            ),
        )

    def _predict(
        self,
        key: str,
        kind: str,
        data_dir: str,
        split: str,
        bounds: list[tuple[int, int]],
        n: int,
        progress: Optional[ProgressFn],
    ) -> dict[int, dict]:
        view = self._view()
        pending = {view.apply_async(infer_task, key, kind, data_dir, split, a, b): (a, b, 0) for a, b in bounds}
        parts: dict[int, dict] = {}
        running: dict[object, _Shard] = {}
        listened_at: Optional[float] = None
        try:
            while pending:
                done, _ = concurrent.futures.wait(
                    list(pending), timeout=self.poll_s, return_when=concurrent.futures.FIRST_COMPLETED
                )
                now = self.clock()
                listened_at = discount_pause(running.values(), listened_at, now)
                for result in done:
                    running.pop(result, None)
                    a, b, resends = pending.pop(result)
                    try:
                        parts[a] = result.get()  # type: ignore[attr-defined]  # an ipyparallel AsyncResult
                    except Exception as error:  # noqa: BLE001 - an engine loss is retried, the rest raised
                        if not is_engine_loss(error) or resends + 1 >= MAX_RESENDS:
                            raise TaskError(
                                f"inference of images {a}:{b} failed: {error}", getattr(error, "traceback", "") or ""
                            ) from None
                        log.warning("images %d:%d lost their engine; sending them again", a, b)
                        # a view names its engines: one that still names the lost engine refuses new tasks
                        view = self._view()
                        pending[view.apply_async(infer_task, key, kind, data_dir, split, a, b)] = (a, b, resends + 1)
                if self.stall_s:
                    self._kill_stalled(pending, running, now)
                if progress is not None:
                    in_flight = sum(r.data.get("infer", {}).get("done", 0) for r in pending if isinstance(r.data, dict))
                    progress(sum(p["stop"] - p["start"] for p in parts.values()) + in_flight, n)
        except BaseException:
            try:
                self.client.abort([r for r in pending if not r.done()])
            except Exception:
                log.debug("abort failed", exc_info=True)
            raise
        return parts

    def _view(self):
        """A load-balanced view over the job's engines still registered."""
        registered = set(self.client.ids)
        live = [engine for engine in self.engines if engine in registered]
        if not live:
            raise TaskError(f"inference: every engine of {self.engines} was lost; `cluster status` shows the engines")
        return self.client.load_balanced_view(live)

    def _kill_stalled(self, pending: dict, running: dict[object, _Shard], now: float) -> None:
        for result, (a, b, _) in pending.items():
            engine = running_on(result)
            if engine is None:
                continue  # queued behind another shard: not silent, waiting
            done = result.data.get("infer", {}).get("done", 0) if isinstance(result.data, dict) else 0
            shard = running.get(result)
            if shard is None:
                running[result] = shard = _Shard(engine, now, done)
            if done != shard.done:
                shard.done, shard.heard_at = done, now
                continue
            silent = now - shard.heard_at
            if silent < self.stall_s:
                continue
            if shard.kills >= STALL_KILLS:
                raise TaskError(
                    f"inference of images {a}:{b}: engine {engine} reported nothing for {silent:.0f} s "
                    f"and did not die after {STALL_KILLS} kills (its nanny may be gone); stop the "
                    f"cluster's engines on that slave by hand",
                    "",
                )
            shard.kills += 1
            shard.heard_at = now
            log.warning(
                "images %d:%d: engine %d reported nothing for %.0f s ([cluster] stall_minutes = %g); killing "
                "that engine, the images go to another",
                a,
                b,
                engine,
                silent,
                self.stall_s / 60,
            )
            kill_through_nanny(self.client, engine)
