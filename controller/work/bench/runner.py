"""Running a bench on a cluster: one measurement per engine count, stored for reports.

``Cluster.bench`` delegates here with itself as the :class:`~controller.work.session.Session`.

Cost: every engine carries its share of its node's $/hour (the spot price the
instance ran at on AWS; ``[cluster] price_per_hour`` spread over the engines for
local and ssh); a measurement costs the sum over its engines × wall hours.
"""

from __future__ import annotations

import collections
import logging
import re
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from controller.config import task_keys
from controller.errors import TaskError, UsageError
from controller.store import NodeRecord, RunRecord, Store, new_id
from controller.work.bench.records import BenchEngine, BenchRecord, BenchResult, BenchTable, BenchTrial
from controller.work.bench.workloads import Workload
from controller.work.bench.workloads import workload as find_workload
from controller.work.jobs import Job, JobSource, ProgressSink
from controller.work.recorder import RunRecorder
from controller.work.session import Session
from engines.spec import TaskResult
from engines.tasks import cifar_task, hardware_info, train_task, warm_up

log = logging.getLogger(__name__)


class BenchSink(ProgressSink):
    """A ProgressSink that also hears when each engine count starts and ends (no-ops here)."""

    def bench_started(self, workload: Workload, engines: list[int], runs: int) -> None: ...

    def bench_finished(self, record: BenchRecord) -> None: ...


@dataclass
class _EngineTally:
    tasks: int = 0
    epochs: int = 0
    images: int = 0
    train_s: float = 0.0
    busy_s: float = 0.0


class BenchSource(JobSource):
    """The JobSource of a measurement: a fixed list of training jobs, stored as they go, tallied per engine."""

    def __init__(self, store: Store, jobs: list[Job]):
        self.recorder = RunRecorder(store)
        self.pending = collections.deque(jobs)
        self.tally: dict[int, _EngineTally] = collections.defaultdict(_EngineTally)
        self.errors: list[tuple[Job, str]] = []

    def next_job(self) -> Optional[Job]:
        return self.pending.popleft() if self.pending else None

    def on_result(self, job: Job, result: TaskResult, engine_id: Optional[int]) -> bool:
        self.recorder.record_result(job, result, engine_id)
        tally = self.tally[engine_id if engine_id is not None else -1]
        tally.tasks += 1
        for epoch in result.epochs:
            tally.epochs += 1
            # images_per_s was computed as len(train) / train_seconds on the engine
            tally.images += round(epoch["images_per_s"] * epoch["train_seconds"])
            tally.train_s += epoch["train_seconds"]
            tally.busy_s += epoch["seconds"]
        return True

    def on_rollback(self, job: Job) -> None:
        self.recorder.roll_back(job.run_id, job.shipped)

    def on_error(self, job: Job, error: BaseException, traceback: str) -> None:
        self.recorder.record_failure(job, traceback)
        self.errors.append((job, f"{type(error).__name__}: {error}"))

    def exhausted(self) -> bool:
        return not self.pending


def region_of(provider: str, zone: str, configured: str = "") -> str:
    """us-east-1a -> us-east-1 on AWS; the configured region when there is no zone."""
    if provider == "aws":
        if re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d+[a-z]", zone or ""):
            return zone[:-1]
        return configured
    return ""


def _joined(values: Sequence[str]) -> str:
    """One value when every engine agrees, else all of them: a mixed cluster shows as mixed."""
    return "+".join(sorted({v for v in values if v}))


@dataclass
class _Placement:
    """Where the engines of the running cluster are: their hardware, nodes and share of the price."""

    infos: dict[int, dict]  # engine id -> hardware_info()
    engine_nodes: dict[int, str]  # engine id -> node id
    nodes: dict[str, NodeRecord]
    shares: dict[int, float]  # engine id -> $/hour


def run_bench(
    session: Session,
    workload: str = "paper",
    engines: Optional[Sequence[int]] = None,
    epochs: Optional[int] = None,
    subset: Optional[int] = None,
    progress: Optional[BenchSink] = None,
    data_dir: Optional[str] = None,
) -> BenchResult:
    """Run ``workload`` once per engine count on the running cluster; store and return the measurements."""
    chosen = find_workload(workload)
    if epochs is not None and epochs < 1:
        raise UsageError(f"--epochs {epochs}: expected 1 or more")
    if subset is not None and subset < 0:
        raise UsageError(f"--subset {subset}: expected 0 (all) or more")
    sink = progress or BenchSink()
    record = session.record
    client = session.client
    alive = sorted(client.ids)
    counts = list(engines) if engines else [len(alive)]
    if not alive or max(counts) > len(alive):
        raise UsageError(
            f"--engines {','.join(map(str, counts))}: cluster {session.name!r} has {len(alive)} live engine(s); "
            f"start more with `cluster start --slaves {max(counts)}`"
        )

    engine_nodes = {e.engine_id: e.node_id for e in session.store.engines.of(record.id)}
    nodes = {n.node_id: n for n in session.store.nodes.of(record.id)}
    placement = _Placement(
        infos=dict(zip(alive, client[alive].apply_async(hardware_info, record.threads_per_engine).get(timeout=120))),
        engine_nodes=engine_nodes,
        nodes=nodes,
        shares={
            eid: _price_share(nodes.get(engine_nodes.get(eid, "")), record.price_per_hour, record.slaves)
            for eid in alive
        },
    )

    bench_id = new_id("b-")
    table = BenchTable(session.store)
    specs = _specs(session, chosen, epochs, subset, data_dir)
    used = alive[: max(counts)]
    try:
        warmup_s = max(client[used].apply_async(warm_up, specs[0][1], chosen.kind).get(timeout=600))
    except Exception as error:  # noqa: BLE001 - a remote error names the engine's exception
        raise TaskError(
            f"bench {bench_id}: the engines could not load the {chosen.name} data "
            f"({type(error).__name__}: {error}); nothing was run",
            getattr(error, "traceback", "") or "",
        ) from None
    records: list[BenchRecord] = []
    for count in counts:
        targets = alive[:count]
        jobs, labels = _jobs(session, specs, task=cifar_task if chosen.kind == "cifar" else train_task)
        sink.bench_started(chosen, targets, len(jobs))
        source = BenchSource(session.store, jobs)
        started = time.perf_counter()
        try:
            stats = session.scheduler(targets=targets).run(source, sink)
        except BaseException:
            RunRecorder(session.store).mark_interrupted(job.run_id for job in jobs)
            raise
        wall = time.perf_counter() - started
        measurement, engine_rows, trials = _summarise(
            session, bench_id, chosen, targets, jobs, labels, source, wall, placement
        )
        measurement.warmup_s = warmup_s
        overheads = stats.dispatch_overheads
        measurement.dispatch_s = sum(overheads) / len(overheads) if overheads else 0.0
        table.save(measurement, engine_rows, trials)
        records.append(measurement)
        sink.bench_finished(measurement)
        if source.errors:
            job, message = source.errors[0]
            raise TaskError(
                f"bench {bench_id}: run {job.run_id} failed on its engine ({message}); "
                f"`cluster runs` shows its traceback; the failed measurement is stored as "
                f"{measurement.id}",
                failed.error or "" if (failed := session.store.runs.get(job.run_id)) is not None else "",
            )
    return BenchResult(bench_id=bench_id, records=records)


def _price_share(node: Optional[NodeRecord], cluster_price: float, slaves: int) -> float:
    """$/hour that one engine stands for: its node's price over the node's engines."""
    if node is not None:
        return node.price_per_hour / max(1, node.engines)
    return cluster_price / max(1, slaves)


def _specs(
    session: Session, workload: Workload, epochs: Optional[int], subset: Optional[int], data_dir: Optional[str]
) -> list[tuple[str, dict]]:
    """(label, engine spec) per training run of the workload, validated, not yet stored."""
    specs = []
    for label, overrides in workload.runs(epochs):
        if workload.kind == "mnist":
            if subset is not None:
                overrides = {**overrides, "subset": subset}
            spec = session.run_spec(**overrides)
        else:
            from engines.workloads.cifar import CifarSpec  # torch: only a CIFAR-10 bench needs it on the master

            training = session.config.training
            spec = CifarSpec(
                model=workload.model,
                epochs=overrides.get("epochs", workload.default_epochs or 5),
                seed=training.seed,
                device=training.device,
                subset=subset or 0,
                data_dir=session.engine_data_dir(),
                threads=session.record.threads_per_engine,
                **task_keys(training),
            ).to_dict()
        if data_dir is not None:
            spec["data_dir"] = str(data_dir)
        specs.append((label, spec))
    return specs


def _jobs(session: Session, specs: list[tuple[str, dict]], task: Callable[..., dict]) -> tuple[list[Job], list[str]]:
    """A stored training run and a job per spec: every engine count gets runs of its own."""
    jobs, labels = [], []
    for label, spec in specs:
        spec = dict(spec)
        run_id = new_id("r-")
        spec["run_id"] = run_id
        session.store.runs.create(RunRecord(id=run_id, params=spec, cluster_id=session.record.id))
        jobs.append(Job(run_id=run_id, spec=spec, task=task))
        labels.append(label)
    return jobs, labels


def _summarise(
    session: Session,
    bench_id: str,
    workload: Workload,
    targets: list[int],
    jobs: list[Job],
    labels: list[str],
    source: BenchSource,
    wall: float,
    placement: _Placement,
) -> tuple[BenchRecord, list[BenchEngine], list[BenchTrial]]:
    store, record = session.store, session.record
    nodes, engine_nodes = placement.nodes, placement.engine_nodes
    measurement_id = f"{bench_id}-e{len(targets)}"
    engine_rows = []
    for eid in targets:
        info, tally = placement.infos[eid], source.tally.get(eid, _EngineTally())
        node = nodes.get(engine_nodes.get(eid, ""))
        engine_rows.append(
            BenchEngine(
                measurement_id=measurement_id,
                engine_id=eid,
                host=info["host"],
                node_id=engine_nodes.get(eid, ""),
                device=info["device"],
                gpu=info["gpu"],
                cpu=info["cpu"],
                threads=info["threads"],
                instance_type=node.instance_type if node else "",
                zone=node.zone if node else "",
                price_per_hour=placement.shares[eid],
                tasks=tally.tasks,
                epochs=tally.epochs,
                images=tally.images,
                train_s=tally.train_s,
                busy_s=tally.busy_s,
                images_per_s=tally.images / tally.train_s if tally.train_s else 0.0,
                torch=info["torch"],
                cuda=info["cuda"],
            )
        )
    trials = []
    for number, (job, label) in enumerate(zip(jobs, labels)):
        run = store.runs.get(job.run_id)
        assert run is not None, f"run {job.run_id} of the bench is stored"
        trials.append(
            BenchTrial(
                measurement_id=measurement_id,
                trial=number,
                run_id=job.run_id,
                label=label,
                l1=job.spec.get("l1"),
                lr=job.spec.get("lr"),
                epochs=run.epochs_done,
                state=run.state,
                val_accuracy=run.val_accuracy,
                test_accuracy=run.test_accuracy,
                seconds=run.seconds,
                engine_id=run.engine_id,
            )
        )
    finished = [t for t in trials if t.state == "completed" and t.val_accuracy is not None]
    best = max(finished, key=lambda t: (t.val_accuracy, -t.trial)) if finished else None
    used_nodes = [nodes[engine_nodes[e]] for e in targets if engine_nodes.get(e) in nodes]
    provider = record.provider
    gpus = _joined([e.gpu for e in engine_rows]) or (_joined([e.cpu for e in engine_rows]) + " (CPU)")
    price = sum(e.price_per_hour for e in engine_rows)
    epochs_done = sum(e.epochs for e in engine_rows)
    images = sum(e.images for e in engine_rows)
    measurement = BenchRecord(
        id=measurement_id,
        bench_id=bench_id,
        workload=workload.name,
        engines=len(targets),
        provider=provider,
        region=_joined([region_of(provider, n.zone, session.config.aws.region) for n in used_nodes]),
        zone=_joined([n.zone for n in used_nodes]),
        instance_type=_joined([n.instance_type for n in used_nodes]),
        gpu=gpus,
        image=_joined([n.image for n in used_nodes]),
        market=_joined([n.market for n in used_nodes]),
        threads=engine_rows[0].threads if engine_rows else 0,
        wall_s=wall,
        runs=len(jobs),
        epochs=epochs_done,
        images=images,
        images_per_s=images / wall if wall else 0.0,
        epochs_per_min=epochs_done / (wall / 60) if wall else 0.0,
        accuracy=best.test_accuracy if best else None,
        price_per_hour=price,
        cost=price * wall / 3600,
        torch=_joined([e.torch for e in engine_rows]),
        cuda=_joined([e.cuda for e in engine_rows]),
        params={k: v for k, v in jobs[0].spec.items() if k not in ("run_id", "l1")} if jobs else {},
        state="failed" if source.errors else "completed",
        error=source.errors[0][1] if source.errors else None,
        cluster_id=record.id,
        created_at=time.time(),
    )
    log.info("measurement %s: %s on %d engine(s) in %.1f s", measurement_id, workload.name, len(targets), wall)
    return measurement, engine_rows, trials
