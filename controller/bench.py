"""`cluster bench`: a standard workload on 1..N engines of the running cluster, recorded for reports.

A *bench* is one ``cluster bench`` invocation; it holds one *bench run* per
engine count asked for (``--engines 1,2,4``).  A bench run executes the whole
workload (the paper's λ sweep, one CNN run, a CIFAR-10 run) on exactly that many
engines and records, in tables of its own beside the runs:

- ``bench_runs``: where it ran (provider, region/zone, instance type, GPU or CPU
  model, image), engine count, wall time, images/s, epochs/min, final accuracy,
  $/hour and cost per run, torch/CUDA versions;
- ``bench_engines``: the same per engine (tasks, images, its share of the price);
- ``bench_trials``: the training runs it consisted of (rows in ``runs`` too),
  so a report ranks the sweep without re-running anything.

Cost: every engine carries its share of its node's $/hour (the spot price the
instance ran at on AWS; ``[cluster] price_per_hour`` spread over the engines for
local and ssh); a bench run costs the sum over its engines × wall hours.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from .errors import TaskError, UsageError
from .runs import RunRecorder
from .scheduler import Job, ProgressSink
from .store import NodeRecord, RunRecord, Store, load_json, new_id
from .sweep.space import PAPER_L1  # the paper's λ grid, one definition for sweeps and benches

if TYPE_CHECKING:
    from .api import Cluster

log = logging.getLogger(__name__)




# records ------------------------------------------------------------------------
# the paper's throughput: the λ sweep on 8 GPU servers, in epochs of its 50,000 training images per minute
PAPER_EPOCHS_PER_MIN = 14.59
PAPER_EPOCH_IMAGES = 50_000


@dataclass
class BenchRecord:
    """One workload on one engine count: a row of the report's main table."""

    id: str
    bench_id: str
    workload: str
    engines: int
    provider: str
    region: str = ""
    zone: str = ""
    instance_type: str = ""
    gpu: str = ""  # the GPU's name; the CPU's model (with " (CPU)") when the engines have no GPU
    image: str = ""  # AMI or image; empty for local
    market: str = ""  # spot, on-demand, local, ssh
    threads: int = 0
    wall_s: float = 0.0  # the workload alone: from the first task sent to the last result stored
    warmup_s: float = 0.0  # loading the data on every engine first (slowest engine), not in wall_s
    dispatch_s: float = 0.0  # mean seconds from a task's submission to its start on an engine
    runs: int = 0
    epochs: int = 0  # epochs trained, summed over runs
    images: int = 0  # images trained, summed over runs and epochs
    images_per_s: float = 0.0  # images / wall_s: the cluster's throughput, overheads included
    epochs_per_min: float = 0.0
    accuracy: Optional[float] = None  # test accuracy of the best run by validation accuracy
    price_per_hour: float = 0.0  # the used engines' share of their nodes' $/hour
    cost: float = 0.0  # price_per_hour × wall_s / 3600
    torch: str = ""
    cuda: str = ""
    params: dict = field(default_factory=dict)
    state: str = "completed"
    error: Optional[str] = None
    cluster_id: Optional[int] = None
    created_at: float = 0.0

    @property
    def paper_epochs_per_min(self) -> float:
        """Throughput in the paper's unit, 50,000-image epochs per minute, whatever --subset was used."""
        return self.images_per_s * 60 / PAPER_EPOCH_IMAGES

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["paper_epochs_per_min"] = self.paper_epochs_per_min
        return values


@dataclass
class BenchEngine:
    bench_run_id: str
    engine_id: int
    host: str = ""
    node_id: str = ""
    device: str = ""
    gpu: str = ""
    cpu: str = ""
    threads: int = 0
    instance_type: str = ""
    zone: str = ""
    price_per_hour: float = 0.0
    tasks: int = 0
    epochs: int = 0
    images: int = 0
    train_s: float = 0.0
    busy_s: float = 0.0  # training and evaluating; wall_s × engines minus this is dispatch, I/O, idling
    images_per_s: float = 0.0  # while training: images / train_s
    torch: str = ""
    cuda: str = ""


@dataclass
class BenchTrial:
    bench_run_id: str
    trial: int
    run_id: str
    label: str = ""
    l1: Optional[float] = None
    lr: Optional[float] = None
    epochs: int = 0
    state: str = ""
    val_accuracy: Optional[float] = None
    test_accuracy: Optional[float] = None
    seconds: float = 0.0
    engine_id: Optional[int] = None


@dataclass
class BenchResult:
    bench_id: str
    records: list[BenchRecord]

    def to_dict(self) -> dict:
        return {"bench_id": self.bench_id, "records": [r.to_dict() for r in self.records]}


# the store ------------------------------------------------------------------------
class BenchStore:
    """The bench tables inside the cluster's store (controller/schema.py)."""

    def __init__(self, store: Store):
        self.store = store

    def save(self, record: BenchRecord, engines: Sequence[BenchEngine], trials: Sequence[BenchTrial]) -> None:
        values = dataclasses.asdict(record)
        values["params"] = json.dumps(record.params, sort_keys=True)
        self._insert("bench_runs", values)
        for engine in engines:
            self._insert("bench_engines", dataclasses.asdict(engine))
        for trial in trials:
            self._insert("bench_trials", dataclasses.asdict(trial))

    def _insert(self, table: str, values: dict) -> None:
        columns = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        self.store.execute(f"INSERT OR REPLACE INTO {table} ({columns}) VALUES ({marks})", values.values())

    def records(self, bench_ids: Optional[Sequence[str]] = None, workload: Optional[str] = None) -> list[BenchRecord]:
        """Bench runs, oldest first (then by engine count): a stable order for reports."""
        sql, params = "SELECT * FROM bench_runs", []
        where = []
        if bench_ids:
            where.append(f"bench_id IN ({', '.join('?' for _ in bench_ids)})")
            params += list(bench_ids)
        if workload:
            where.append("workload = ?")
            params.append(workload)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at, bench_id, engines, id"
        records = []
        for row in self.store.execute(sql, params):
            values = {k: row[k] for k in row.keys()}
            values["params"] = load_json(values["params"] or "{}",
                                         f"{self.store.path}: the params of bench run {values.get('id')}")
            records.append(BenchRecord(**values))
        return records

    def engines(self, bench_run_id: str) -> list[BenchEngine]:
        rows = self.store.execute("SELECT * FROM bench_engines WHERE bench_run_id = ? ORDER BY engine_id", (bench_run_id,))
        return [BenchEngine(**{k: row[k] for k in row.keys()}) for row in rows]

    def trials(self, bench_run_id: str) -> list[BenchTrial]:
        rows = self.store.execute("SELECT * FROM bench_trials WHERE bench_run_id = ? ORDER BY trial", (bench_run_id,))
        return [BenchTrial(**{k: row[k] for k in row.keys()}) for row in rows]


# workloads ------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    kind: str  # mnist or cifar: which engine task and which spec
    default_epochs: Optional[int]  # per run; None = [training] epochs
    model: str = ""

    def runs(self, epochs: Optional[int]) -> list[tuple[str, dict]]:
        """(label, spec overrides) per training run of the workload."""
        epochs = epochs or self.default_epochs
        extra = {"epochs": epochs} if epochs else {}
        if self.name == "paper":
            return [(f"l1={l1:g}", {"l1": l1, **extra}) for l1 in PAPER_L1]
        return [(self.model or "cnn", extra)]


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("paper", "the paper's λ sweep: 9 L1 penalties, one epoch per trial", "mnist", 1),
    Workload("mnist-cnn", "one training run of the default CNN ([training] settings)", "mnist", None),
    Workload("cifar10-vgg16", "torchvision VGG16 on CIFAR-10, 5 epochs", "cifar", 5, "vgg16"),
    Workload("cifar10-resnet18", "torchvision ResNet18 on CIFAR-10, 5 epochs", "cifar", 5, "resnet18"),
)}


def parse_engine_counts(text: Optional[str]) -> Optional[list[int]]:
    """'1,2,4' -> [1, 2, 4] (sorted, unique); None stays None (= every engine)."""
    if text is None or not str(text).strip():
        return None
    try:
        counts = sorted({int(part) for part in str(text).split(",") if part.strip()})
    except ValueError:
        raise UsageError(f"--engines {text!r}: expected engine counts like 1,2,4") from None
    if not counts or counts[0] < 1:
        raise UsageError(f"--engines {text!r}: every count must be 1 or more")
    return counts


# progress ------------------------------------------------------------------------
class BenchSink(ProgressSink):
    """A ProgressSink that also hears when each engine count starts and ends (no-ops here)."""

    def bench_started(self, workload: Workload, engines: list[int], runs: int) -> None: ...

    def bench_finished(self, record: BenchRecord) -> None: ...


# running ----------------------------------------------------------------------------
@dataclass
class _EngineTally:
    tasks: int = 0
    epochs: int = 0
    images: int = 0
    train_s: float = 0.0
    busy_s: float = 0.0


class BenchSource:
    """The JobSource of a bench run: a fixed list of jobs, stored as they go, tallied per engine."""

    def __init__(self, store: Store, jobs: list[Job]):
        self.recorder = RunRecorder(store)
        self.pending = collections.deque(jobs)
        self.tally: dict[int, _EngineTally] = collections.defaultdict(_EngineTally)
        self.errors: list[tuple[Job, str]] = []

    def next_job(self) -> Optional[Job]:
        return self.pending.popleft() if self.pending else None

    def on_result(self, job: Job, result: dict, engine_id: Optional[int]) -> bool:
        self.recorder.record_result(job, result, engine_id)
        tally = self.tally[engine_id if engine_id is not None else -1]
        tally.tasks += 1
        for epoch in result["epochs"]:
            tally.epochs += 1
            # images_per_s was computed as len(train) / train_seconds on the engine
            tally.images += round(epoch["images_per_s"] * epoch["train_seconds"])
            tally.train_s += epoch["train_seconds"]
            tally.busy_s += epoch["seconds"]
        return True

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


def run_bench(cluster: "Cluster", workload: str = "paper", engines: Optional[Sequence[int]] = None,
              epochs: Optional[int] = None, subset: Optional[int] = None,
              progress: Optional[BenchSink] = None, data_dir: Optional[str] = None) -> BenchResult:
    """Run ``workload`` once per engine count on the running cluster; store and return the records."""
    from engines.tasks import cifar_task, hardware_info, train_task, warm_up

    if workload not in WORKLOADS:
        raise UsageError(f"--workload {workload!r}: expected one of {', '.join(WORKLOADS)}")
    chosen = WORKLOADS[workload]
    if epochs is not None and epochs < 1:
        raise UsageError(f"--epochs {epochs}: expected 1 or more")
    if subset is not None and subset < 0:
        raise UsageError(f"--subset {subset}: expected 0 (all) or more")
    sink = progress or BenchSink()
    record = cluster.record
    status = cluster.status()
    alive = sorted(e.id for e in status.engines if e.state in ("idle", "busy"))
    counts = list(engines) if engines else [len(alive)]
    if not alive or max(counts) > len(alive):
        raise UsageError(
            f"--engines {','.join(map(str, counts))}: cluster {cluster.name!r} has {len(alive)} live engine(s); "
            f"start more with `cluster start --slaves {max(counts)}`")

    client = cluster.client
    infos = dict(zip(alive, client[alive].apply_async(hardware_info, record.threads_per_engine).get(timeout=120)))
    engine_nodes = {e.id: e.node_id for e in status.engines}
    nodes = {n.node_id: n for n in status.nodes}
    shares = {eid: _price_share(nodes.get(engine_nodes.get(eid, "")), record.price_per_hour, record.slaves)
              for eid in alive}

    bench_id = new_id("b-")
    bench_store = BenchStore(cluster.store)
    specs = _specs(cluster, chosen, epochs, subset, data_dir)
    used = alive[:max(counts)]
    try:
        warmup_s = max(client[used].apply_async(warm_up, specs[0][1], chosen.kind).get(timeout=600))
    except Exception as error:  # noqa: BLE001 - a remote error names the engine's exception
        raise TaskError(f"bench {bench_id}: the engines could not load the {chosen.name} data "
                        f"({type(error).__name__}: {error}); nothing was run",
                        getattr(error, "traceback", "") or "") from None
    records: list[BenchRecord] = []
    for count in counts:
        targets = alive[:count]
        jobs, labels = _jobs(cluster, specs, task=cifar_task if chosen.kind == "cifar" else train_task)
        sink.bench_started(chosen, targets, len(jobs))
        source = BenchSource(cluster.store, jobs)
        started = time.perf_counter()
        try:
            stats = cluster.scheduler(targets=targets).run(source, sink)
        except BaseException:
            RunRecorder(cluster.store).mark_interrupted(job.run_id for job in jobs)
            raise
        wall = time.perf_counter() - started
        bench_record, engine_rows, trials = _summarise(
            cluster, bench_id, chosen, targets, jobs, labels, source, wall, infos, nodes, engine_nodes, shares)
        bench_record.warmup_s = warmup_s
        overheads = stats.dispatch_overheads
        bench_record.dispatch_s = sum(overheads) / len(overheads) if overheads else 0.0
        bench_store.save(bench_record, engine_rows, trials)
        records.append(bench_record)
        sink.bench_finished(bench_record)
        if source.errors:
            job, message = source.errors[0]
            raise TaskError(f"bench {bench_id}: run {job.run_id} failed on its engine ({message}); "
                            f"`cluster runs` shows its traceback; the failed bench run is stored as "
                            f"{bench_record.id}", cluster.store.run(job.run_id).error or "")
    return BenchResult(bench_id=bench_id, records=records)


def _price_share(node: Optional[NodeRecord], cluster_price: float, slaves: int) -> float:
    """$/hour that one engine stands for: its node's price over the node's engines."""
    if node is not None:
        return node.price_per_hour / max(1, node.engines)
    return cluster_price / max(1, slaves)


def _specs(cluster: "Cluster", workload: Workload, epochs: Optional[int], subset: Optional[int],
           data_dir: Optional[str]) -> list[tuple[str, dict]]:
    """(label, engine spec) per run of the workload, validated, not yet stored."""
    specs = []
    for label, overrides in workload.runs(epochs):
        if workload.kind == "mnist":
            if subset is not None:
                overrides = {**overrides, "subset": subset}
            spec = cluster.run_spec(**overrides)
        else:
            from engines.cifar import CifarSpec

            training = cluster.config.training
            spec = CifarSpec(model=workload.model, epochs=overrides.get("epochs", workload.default_epochs or 5),
                             seed=training.seed, device=training.device, subset=subset or 0,
                             data_dir=cluster.engine_data_dir(),
                             threads=cluster.record.threads_per_engine).to_dict()
        if data_dir is not None:
            spec["data_dir"] = str(data_dir)
        specs.append((label, spec))
    return specs


def _jobs(cluster: "Cluster", specs: list[tuple[str, dict]], task: Callable[..., dict]) -> tuple[list[Job], list[str]]:
    """A stored run and a job per spec: every engine count gets runs of its own."""
    jobs, labels = [], []
    for label, spec in specs:
        spec = dict(spec)
        run_id = new_id("r-")
        spec["run_id"] = run_id
        cluster.store.create_run(RunRecord(id=run_id, params=spec, cluster_id=cluster.record.id))
        jobs.append(Job(run_id=run_id, spec=spec, task=task))
        labels.append(label)
    return jobs, labels


def _summarise(cluster: "Cluster", bench_id: str, workload: Workload, targets: list[int], jobs: list[Job],
               labels: list[str], source: BenchSource, wall: float, infos: dict, nodes: dict,
               engine_nodes: dict, shares: dict) -> tuple[BenchRecord, list[BenchEngine], list[BenchTrial]]:
    store, record = cluster.store, cluster.record
    run_id = f"{bench_id}-e{len(targets)}"
    engine_rows = []
    for eid in targets:
        info, tally = infos[eid], source.tally.get(eid, _EngineTally())
        node = nodes.get(engine_nodes.get(eid, ""))
        engine_rows.append(BenchEngine(
            bench_run_id=run_id, engine_id=eid, host=info["host"], node_id=engine_nodes.get(eid, ""),
            device=info["device"], gpu=info["gpu"], cpu=info["cpu"], threads=info["threads"],
            instance_type=node.instance_type if node else "", zone=node.zone if node else "",
            price_per_hour=shares[eid], tasks=tally.tasks, epochs=tally.epochs, images=tally.images,
            train_s=tally.train_s, busy_s=tally.busy_s, images_per_s=tally.images / tally.train_s if tally.train_s else 0.0,
            torch=info["torch"], cuda=info["cuda"]))
    trials = []
    for number, (job, label) in enumerate(zip(jobs, labels)):
        run = store.run(job.run_id)
        trials.append(BenchTrial(
            bench_run_id=run_id, trial=number, run_id=job.run_id, label=label, l1=job.spec.get("l1"),
            lr=job.spec.get("lr"), epochs=run.epochs_done, state=run.state, val_accuracy=run.val_accuracy,
            test_accuracy=run.test_accuracy, seconds=run.seconds, engine_id=run.engine_id))
    finished = [t for t in trials if t.state == "completed" and t.val_accuracy is not None]
    best = max(finished, key=lambda t: (t.val_accuracy, -t.trial)) if finished else None
    used_nodes = [nodes[engine_nodes[e]] for e in targets if engine_nodes.get(e) in nodes]
    zones = _joined([n.zone for n in used_nodes])
    provider = record.provider
    gpus = _joined([e.gpu for e in engine_rows]) or (_joined([e.cpu for e in engine_rows]) + " (CPU)")
    price = sum(e.price_per_hour for e in engine_rows)
    epochs_done = sum(e.epochs for e in engine_rows)
    images = sum(e.images for e in engine_rows)
    bench_record = BenchRecord(
        id=run_id, bench_id=bench_id, workload=workload.name, engines=len(targets), provider=provider,
        region=_joined([region_of(provider, n.zone, cluster.config.aws.region) for n in used_nodes]),
        zone=zones, instance_type=_joined([n.instance_type for n in used_nodes]), gpu=gpus,
        image=_joined([n.image for n in used_nodes]), market=_joined([n.market for n in used_nodes]),
        threads=engine_rows[0].threads if engine_rows else 0, wall_s=wall, runs=len(jobs), epochs=epochs_done,
        images=images, images_per_s=images / wall if wall else 0.0,
        epochs_per_min=epochs_done / (wall / 60) if wall else 0.0,
        accuracy=best.test_accuracy if best else None, price_per_hour=price, cost=price * wall / 3600,
        torch=_joined([e.torch for e in engine_rows]), cuda=_joined([e.cuda for e in engine_rows]),
        params={k: v for k, v in jobs[0].spec.items() if k not in ("run_id", "l1")} if jobs else {},
        state="failed" if source.errors else "completed",
        error=source.errors[0][1] if source.errors else None,
        cluster_id=record.id, created_at=time.time())
    log.info("bench run %s: %s on %d engine(s) in %.1f s", run_id, workload.name, len(targets), wall)
    return bench_record, engine_rows, trials


class BenchProgress(BenchSink):
    """The terminal's view of a bench: a line per engine count, the runs' own progress, a line per result."""

    def __init__(self, console=None):
        from .progress import RunProgress

        self.runs = RunProgress(console)
        self.console = self.runs.console

    def __enter__(self) -> "BenchProgress":
        self.runs.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.runs.__exit__(*exc)

    def bench_started(self, workload: Workload, engines: list[int], runs: int) -> None:
        self.console.print(f"bench {workload.name} on {len(engines)} engine(s) "
                           f"({', '.join(map(str, engines))}): {runs} run(s)", highlight=False)

    def bench_finished(self, record: BenchRecord) -> None:
        accuracy = "-" if record.accuracy is None else f"{record.accuracy:.2%}"
        self.console.print(
            f"  {record.engines} engine(s): {record.wall_s:.1f} s, {record.epochs_per_min:.2f} epochs/min "
            f"({record.paper_epochs_per_min:.2f} of 50,000 images; the paper: {PAPER_EPOCHS_PER_MIN}), "
            f"{record.images_per_s:,.0f} images/s, accuracy {accuracy}, ${record.cost:.4f} "
            f"at ${record.price_per_hour:.3f}/h", highlight=False)

    # the scheduler's hooks go to the runs' bars and epoch lines
    def task_submitted(self, job: Job) -> None:
        self.runs.task_submitted(job)

    def task_progress(self, job: Job, update: dict) -> None:
        self.runs.task_progress(job, update)

    def task_done(self, job: Job, result: dict, engine_id: Optional[int]) -> None:
        self.runs.task_done(job, result, engine_id)

    def engine_lost(self, job: Job, error: BaseException) -> None:
        self.runs.engine_lost(job, error)

    def job_failed(self, job: Job, error: BaseException) -> None:
        self.runs.job_failed(job, error)
