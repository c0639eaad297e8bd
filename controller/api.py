"""The Python API that the CLI and the notebooks share.

    from controller import Cluster
    cluster = Cluster()                 # reads cluster.ini as the CLI does
    cluster.start(slaves=2)
    run = cluster.train(epochs=1)       # a RunResult: the stored run and its epochs
    cluster.stop()
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from engines.tasks import L1_SCALE

from . import ipcluster, processes
from .bench.runner import run_bench
from .bench.workloads import workload as find_workload
from .config import ClusterConfig, Config, load_config, metadata_url, override, task_keys
from .errors import (AlreadyRunningError, ClusterLostError, ClusterStateError, NotRunningError, ProviderError,
                     TaskError, UsageError)
from .leases import Leases
from .providers import NO_HOOKS, Hooks, Provider, make_provider
from .providers.base import Resource
from .report import report
from .roster import StoreRoster
from .runs import RunRecorder, SingleRun
from .scheduler import Job, ProgressSink, Scheduler, Watchdog
from .store import ClusterRecord, EngineRecord, EpochRecord, EventRecord, NodeRecord, RunRecord, Store, new_id
from .sweep.records import SweepResult

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class EngineStatus:
    id: int
    host: str
    pid: int
    device: str
    threads: int
    state: str  # idle, busy, dead, unregistered
    uptime_s: float
    queued: int = 0
    node_id: str = ""
    leaving: str = ""  # drain, notice, lost: it gets no new task


@dataclass
class ClusterStatus:
    name: str
    state: str  # running, degraded, stopped, failed, none
    provider: str = ""
    # the size: the slaves it keeps (`scale`, the autoscaler), those serving now and those still coming up
    target: Optional[int] = None
    current: int = 0
    pending: int = 0
    autoscale: dict = field(default_factory=dict)  # min_slaves, max_slaves, idle_minutes (max 0: off)
    replace_lost: bool = False
    keeper: dict = field(default_factory=dict)  # pid, state
    idle_stops: dict = field(default_factory=dict)  # node id -> when autoscaling turns it off (epoch seconds)
    events: list[EventRecord] = field(default_factory=list)  # the latest resize decisions, with their reasons
    cluster_id: Optional[int] = None
    profile_dir: str = ""
    url_file: str = ""
    controller: dict = field(default_factory=dict)
    engines: list[EngineStatus] = field(default_factory=list)
    nodes: list[NodeRecord] = field(default_factory=list)
    created_at: Optional[float] = None
    uptime_s: float = 0.0
    price_per_hour: float = 0.0
    cost_so_far: float = 0.0
    error: Optional[str] = None
    hint: str = ""  # what to do next, when the cluster cannot go on as it is

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Stopped:
    """What ``Cluster.stop`` ended: this cluster's record (None when none was running) and what the
    provider found by its tags and released (local state lost, or ``--all``)."""

    cluster: Optional[ClusterRecord] = None
    released: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.cluster is not None or bool(self.released)

    def to_dict(self) -> dict:
        return {"stopped": self.cluster is not None, "cluster": self.cluster, "released": self.released}


@dataclass
class RunResult:
    run: RunRecord
    epochs: list[EpochRecord]

    def to_dict(self) -> dict:
        record = dataclasses.asdict(self.run)
        record["epochs"] = [dataclasses.asdict(e) for e in self.epochs]
        return record


def check_autoscaling(cfg: ClusterConfig) -> None:
    """min_slaves <= slaves <= max_slaves when autoscaling (max_slaves > 0)."""
    if cfg.max_slaves and not cfg.min_slaves <= cfg.slaves <= cfg.max_slaves:
        raise UsageError(f"cluster start: slaves = {cfg.slaves} must lie between min_slaves = {cfg.min_slaves} "
                         f"and max_slaves = {cfg.max_slaves} (autoscaling is on: max_slaves > 0)")


class Cluster:
    """One named cluster under one state_dir: start, status, train, runs, stop."""

    def __init__(self, config: Optional[Config] = None, *, config_file: Optional[str | os.PathLike] = None,
                 provider_hooks: Hooks = NO_HOOKS):
        self.config = config if config is not None else load_config(config_file)
        self.provider_hooks = provider_hooks  # tests only: where a provider's start fails, SSH addresses
        self.store = Store(self.config.state_dir)
        self._client = None
        self._client_cluster_id: Optional[int] = None
        self.current_run_id: Optional[str] = None  # the run train()/resume() is on (for Ctrl-C hints)

    @classmethod
    def connect(cls, config: Optional[Config] = None, *, config_file: Optional[str | os.PathLike] = None) -> "Cluster":
        """The running cluster (raises NotRunningError if there is none), with its client connected."""
        cluster = cls(config, config_file=config_file)
        cluster.client  # noqa: B018 - connects, or raises with a clear message
        return cluster

    @property
    def name(self) -> str:
        return self.config.cluster.name

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self.store.close()

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # lifecycle ----------------------------------------------------------------
    def provider(self, name: Optional[str] = None) -> Provider:
        return make_provider(name or self.config.cluster.provider, self.config, self.store, self.provider_hooks)

    def threads_per_engine(self, slaves: int, provider: str) -> int:
        if self.config.cluster.threads_per_engine:
            return self.config.cluster.threads_per_engine
        if provider != "local":
            return 0  # the slave's own cores; GPU engines need few
        return max(1, (os.cpu_count() or 1) // slaves)

    def start(self, slaves: Optional[int] = None, provider: Optional[str] = None, *,
              min_slaves: Optional[int] = None, max_slaves: Optional[int] = None,
              idle_minutes: Optional[float] = None) -> ClusterStatus:
        """Start the controller and ``slaves`` slaves; returns once every engine registered.

        ``max_slaves`` > 0 turns autoscaling on: slaves are added for waiting jobs up to it, and slaves idle
        for ``idle_minutes`` are turned off down to ``min_slaves``. With ``[cluster] replace_lost`` or
        autoscaling, a background keeper process holds the cluster to its target (controller/elastic).
        On any failure, Ctrl-C included, everything started so far is stopped again.
        """
        cfg = override(self.config.cluster, "cluster start", slaves=slaves, provider=provider,
                       min_slaves=min_slaves, max_slaves=max_slaves, idle_minutes=idle_minutes)
        check_autoscaling(cfg)
        self._refuse_second_cluster()
        chosen = self.provider(cfg.provider)
        # bad input, missing credentials: fail before anything starts; where the controller must listen
        engine_ip = chosen.preflight(cfg.slaves)
        threads = self.threads_per_engine(cfg.slaves, cfg.provider)
        profile = ipcluster.profile_dir(self.config.state_dir)
        record = self.store.create_cluster(
            name=self.name, provider=cfg.provider, slaves=cfg.slaves, threads_per_engine=threads,
            profile_dir=str(profile), ipp_cluster_id="", price_per_hour=cfg.price_per_hour)
        self.store.update_cluster(record.id, ipp_cluster_id=f"{self.name}-{record.id}", target=cfg.slaves,
                                  min_slaves=cfg.min_slaves, max_slaves=cfg.max_slaves, idle_minutes=cfg.idle_minutes,
                                  replace_lost=int(cfg.replace_lost))
        record = self.store.cluster(record.id)
        ipp_cluster = client = None
        try:
            ipp_cluster = ipcluster.new_cluster(
                profile, record.ipp_cluster_id, engine_env=ipcluster.engine_environment(threads),
                engine_ip=engine_ip, engine_timeout=cfg.engine_timeout,
                master_grace_minutes=cfg.master_grace_minutes)
            ipp_cluster.start_controller_sync()
            self.store.update_cluster(record.id, controller_pid=ipcluster.controller_pid(ipp_cluster))
            ipcluster.secure_files(profile)
            nodes = chosen.start(record, ipp_cluster, cfg.slaves)
            expected = chosen.expected_engines(nodes)
            client = ipp_cluster.connect_client_sync(timeout=cfg.engine_timeout)
            try:
                client.wait_for_engines(expected, timeout=cfg.engine_timeout)
            except TimeoutError:
                raise ProviderError(
                    f"only {len(client.ids)} of {expected} engines registered within {cfg.engine_timeout} s; "
                    f"their logs are in {profile / 'log'} (raise [cluster] engine_timeout if slaves are slow)"
                ) from None
            self._record_engines(record, client, threads, nodes, ipp_cluster=ipp_cluster)
            ipcluster.secure_files(profile)
            self.store.set_cluster_state(record.id, "running")
            self._warm_engines(client)
            if cfg.replace_lost or cfg.max_slaves:
                from .elastic import keeper

                pid = keeper.spawn(dataclasses.replace(self.config, cluster=cfg), record)
                self.store.update_cluster(record.id, keeper_pid=pid)
        except BaseException as error:
            log.warning("start failed (%s); stopping what was started", error or type(error).__name__)
            cleaned = False
            try:
                self._teardown(record, chosen, ipp_cluster)
                cleaned = True
            except Exception:  # the original error is the one to report; this one goes to the log
                log.exception("clean-up after the failed start failed too")
                cleaned = True  # it ran to its end; what it could not reach, it logged
            finally:
                # never "stopped" while something may still run: a clean-up cut short (a second
                # Ctrl-C) leaves the cluster "failed", which status shows and `cluster stop` finishes
                if cleaned:
                    self.store.set_cluster_state(record.id, "stopped", error=f"start failed: {error}")
                else:
                    self.store.set_cluster_state(
                        record.id, "failed",
                        error=f"start failed: {error}; its clean-up did not finish: run `cluster stop`")
            raise
        finally:
            if client is not None:
                client.close()
        return self.status()

    def _warm_engines(self, client, targets: Optional[list[int]] = None) -> None:
        """Every engine (or ``targets``) loads the data set and the training code as part of `start` (or
        `scale`), so the first run after it is as fast as the next. A failure here is only logged: the first
        run reports it in full."""
        from engines.tasks import warm_up

        loading = client[targets if targets is not None else client.ids].apply_async(warm_up, self.run_spec())
        try:
            seconds = loading.get(timeout=self.config.cluster.engine_timeout)
            log.info("engines loaded the data set in %.1f s", max(seconds))
        except Exception as error:  # noqa: BLE001 - the data may be missing: `train` says so clearly
            log.warning("engines could not load the data set in advance (%s); the first run will", error)

    @staticmethod
    def _controller_alive(record: ClusterRecord) -> bool:
        """The record's controller still runs (its pid alive *and* carrying this cluster's marker)."""
        return processes.is_marked(record.controller_pid, Path(record.profile_dir), record.ipp_cluster_id)

    def _refuse_second_cluster(self) -> None:
        existing = self.store.active_cluster(self.name)
        if existing is None:
            return
        if existing.state in ("starting", "running", "stopping") and self._controller_alive(existing):
            raise AlreadyRunningError(
                f"cluster {self.name!r} is already running (started {time.ctime(existing.created_at)}, "
                f"state_dir {self.config.state_dir}); run `cluster stop` first, or use another "
                f"[cluster] name or state_dir")
        log.info("cleaning up what is left of cluster %s (%s, controller gone)", existing.id, existing.state)
        self._stop_record(existing)

    def _record_engines(self, record: ClusterRecord, client, threads: int, nodes: list[NodeRecord],
                        engine_ids: Optional[list[int]] = None, ipp_cluster=None) -> None:
        """The one path every new engine takes (at `start` and `scale`): it reports itself, installs the
        drain handler (engines.tasks.engine_info), and is stored with the node it runs on."""
        from engines.tasks import engine_info

        ids = list(engine_ids) if engine_ids is not None else list(client.ids)
        infos = client[ids].apply_async(engine_info, threads).get(timeout=60)
        self._watch_notices(client, record.provider, ids)
        host_to_node = {n.host: n.node_id for n in nodes}
        host_to_node.update({n.private_ip: n.node_id for n in nodes if n.private_ip})
        # local slaves share one host: their engine sets (named by node id) know their engines' pids
        pid_to_node = {pid: node for pid, node in ipcluster.engine_set_pids(ipp_cluster).items()
                       if node in {n.node_id for n in nodes}}
        only = nodes[0].node_id if len(nodes) == 1 else ""
        now = time.time()
        self.store.record_engines(record.id, [
            EngineRecord(engine_id=engine_id, host=info["host"], pid=info["pid"], device=info["device"],
                         threads=info["threads"],
                         node_id=pid_to_node.get(info["pid"]) or host_to_node.get(info["host"], only),
                         registered_at=now)
            for engine_id, info in zip(ids, infos)
        ])

    def _watch_notices(self, client, provider: str, engine_ids: list[int]) -> None:
        """These engines poll the metadata service for spot notices (engines/notices.py), where there is one."""
        url = metadata_url(self.config.cluster, provider)
        if url:
            from engines.notices import watch

            client[engine_ids].apply_async(watch, url).get(timeout=60)
            log.info("engines watch %s for spot interruption notices", url)

    def stop(self, all_clusters: bool = False, any_owner: bool = False,
             only: Optional[set[str]] = None) -> Stopped:
        """Stop every engine, slave and the controller; history stays. Safe to run twice.

        Without a record (local state lost), or with ``all_clusters``, the provider
        also looks for nodes by its own tags (the cloud's truth) and releases them:
        this master's (user@host) only, unless ``any_owner``; ``only`` limits that to
        the ids ``stop_plan`` listed and the user agreed to.
        """
        record = self.store.active_cluster(self.name)
        if self._client is not None:
            self._client.close()
            self._client = None
        if record is not None:
            self._stop_record(record)  # our own cluster first, whatever the cloud says next
        released = self._release_orphans(all_clusters, any_owner, only) if record is None or all_clusters else []
        return Stopped(self.store.cluster(record.id) if record is not None else None, released)

    def stop_plan(self, all_clusters: bool = False, any_owner: bool = False) -> "list[Resource]":
        """What ``stop(all_clusters, any_owner)`` would release by tag, beyond this cluster's own record."""
        return self.provider().find_orphans(self.name, all_clusters, any_owner)

    def _release_orphans(self, all_clusters: bool, any_owner: bool = False, only: Optional[set[str]] = None) -> list[str]:
        return self.provider().release_orphans(self.name, all_clusters, any_owner, only)

    def _stop_record(self, record: ClusterRecord) -> None:
        from .elastic import keeper

        self.store.set_cluster_state(record.id, "stopping")
        keeper.stop(record)  # first: it would replace the engines being stopped
        provider = self.provider(record.provider)
        ipp_cluster = ipcluster.load_cluster(Path(record.profile_dir), record.ipp_cluster_id)
        self._teardown(record, provider, ipp_cluster)
        self.store.set_cluster_state(record.id, "stopped")

    def _teardown(self, record: ClusterRecord, provider: Provider, ipp_cluster) -> None:
        """Engines and slaves first (they may need the controller to say goodbye), then the controller."""
        try:
            provider.stop(record, ipp_cluster)
        finally:
            if ipp_cluster is not None:
                try:
                    ipp_cluster.stop_controller_sync()
                except Exception:
                    log.warning("ipyparallel could not stop the controller cleanly", exc_info=True)
                ipp_cluster.remove_cluster_file()
            # every provider: a controller stopped while still starting can orphan its schedulers
            processes.kill_cluster_processes(Path(record.profile_dir), record.ipp_cluster_id)

    # status -------------------------------------------------------------------
    def status(self) -> ClusterStatus:
        record = self.store.active_cluster(self.name)
        if record is None:
            last = self.store.latest_cluster(self.name)
            return ClusterStatus(name=self.name, state="stopped" if last else "none",
                                 error=last.error if last else None)
        profile = Path(record.profile_dir)
        url = ipcluster.url_file(profile, record.ipp_cluster_id)
        controller_alive = self._controller_alive(record)
        registered, queues = self._registered_engines(url) if controller_alive else (set(), {})
        now = time.time()
        engines = []
        for engine in self.store.engines(record.id):
            if record.provider == "local" and not processes.is_marked(engine.pid, profile, record.ipp_cluster_id):
                state = "dead"
            elif engine.engine_id not in registered:
                state = "unregistered"
            else:
                queue = queues.get(engine.engine_id, {})
                state = "busy" if queue.get("tasks", 0) or queue.get("queue", 0) else "idle"
            engines.append(EngineStatus(
                id=engine.engine_id, host=engine.host, pid=engine.pid, device=engine.device,
                threads=engine.threads, state=state, uptime_s=now - (engine.registered_at or now),
                queued=queues.get(engine.engine_id, {}).get("queue", 0), node_id=engine.node_id or ""))
        nodes = self.provider(record.provider).list(record)
        released = {n.node_id for n in nodes if n.state in ("stopped", "terminated", "gone")}
        leaving = self.store.leaving_engines(record.id)
        for engine in engines:
            engine.leaving = leaving.get(engine.id, "")
            if engine.node_id in released and engine.state in ("dead", "unregistered"):
                engine.state = "removed"
        engines_shown = engines
        engines = [e for e in engines if e.state != "removed"]
        alive = [e for e in engines if e.state in ("idle", "busy")]
        if not controller_alive:
            state = "failed"
        elif record.state != "running" or len(alive) == len(engines):
            state = record.state
        else:
            state = "degraded"
        uptime = now - record.created_at
        price = sum(n.price_per_hour for n in nodes if n.state not in ("terminated", "stopped"))
        from .elastic.resize import LIVE_NODE_STATES, PENDING_NODE_STATES

        serving = [n for n in nodes if n.state in LIVE_NODE_STATES and n.state not in PENDING_NODE_STATES]
        idle_stops = {}
        if record.max_slaves and len(serving) > record.min_slaves:
            idle_stops = {n.node_id: n.idle_since + record.idle_minutes * 60 for n in serving if n.idle_since}
        keeper_alive = processes.is_marked(record.keeper_pid, profile, record.ipp_cluster_id)
        return ClusterStatus(
            name=self.name, state=state, provider=record.provider, cluster_id=record.id,
            profile_dir=str(profile), url_file=str(url),
            target=record.target if record.target is not None else record.slaves, current=len(serving),
            pending=sum(n.state in PENDING_NODE_STATES for n in nodes),
            autoscale={"min_slaves": record.min_slaves or 0, "max_slaves": record.max_slaves or 0,
                       "idle_minutes": record.idle_minutes or 0.0},
            replace_lost=bool(record.replace_lost),
            keeper={"pid": record.keeper_pid, "state": "running" if keeper_alive else
                    ("dead" if record.keeper_pid else "none")},
            idle_stops=idle_stops, events=self.store.events(record.id, limit=10),
            controller={"pid": record.controller_pid, "state": "running" if controller_alive else "dead"},
            engines=engines_shown, nodes=nodes, created_at=record.created_at, uptime_s=uptime,
            price_per_hour=price, cost_so_far=price * uptime / 3600, error=record.error,
            hint=self._controller_lost_hint(record, nodes) if not controller_alive else "")

    # master restart ------------------------------------------------------------
    def _controller_lost_hint(self, record: ClusterRecord, nodes: list[NodeRecord]) -> str:
        """After the master restarted (or its controller died): what still runs and bills, and how to go on.

        A new controller cannot adopt the engines that wait for the old one (docs/elastic.md says why),
        so the way on is stop, start, and resume what was running from its checkpoints.
        """
        up = [n for n in nodes if n.state not in ("terminated", "stopped", "gone", "shutting-down")]
        parts = ["the controller is gone (the master restarted, or it was killed)"]
        if up and record.provider != "local":
            parts.append(f"{len(up)} node(s) still up and billed; their engines wait "
                         f"{self.config.cluster.master_grace_minutes:g} min for a controller, then quit")
        runs = [r for r in self.store.runs(limit=200)
                if r.cluster_id == record.id and r.state in ("running", "interrupted")]
        sweeps = sorted({r.sweep_id for r in runs if r.sweep_id})
        resume = [f"`cluster sweep --resume {s}`" for s in sweeps]
        resume += [f"`cluster train --resume {r.id}`" for r in runs if not r.sweep_id]
        parts.append("run `cluster stop` (ends them), then `cluster start`"
                     + (", then " + " and ".join(resume) if resume else ""))
        return "; ".join(parts)

    # resizing -------------------------------------------------------------------
    def scale(self, slaves: int, *, why: str = "") -> ClusterStatus:
        """Turn slaves on or off until ``slaves`` serve; returns once the new engines joined (they take work
        from a sweep or bench already running) or the removed ones were drained and released."""
        from .elastic.resize import Resizer, choose_to_remove, live_nodes, resize_lock

        if not 0 <= slaves <= 256:
            raise UsageError(f"scale {slaves}: expected a number of slaves from 0 to 256")
        record = self.record
        if record.max_slaves and not (record.min_slaves or 0) <= slaves <= record.max_slaves:
            raise UsageError(f"scale {slaves}: this cluster autoscales between {record.min_slaves} and "
                             f"{record.max_slaves} slaves (min_slaves/max_slaves); stay in that range")
        with resize_lock(self.config.state_dir, record.id):
            record = self.record
            nodes = [n for n in live_nodes(self.store, record.id)]
            before = record.target if record.target is not None else len(nodes)
            why = why or f"cluster scale {slaves}"
            self.store.update_cluster(record.id, target=slaves)
            self.store.add_event(record.id, "scale", f"target {before} -> {slaves} ({len(nodes)} serving): {why}")
            resizer = Resizer(self)
            if slaves > len(nodes):
                try:
                    resizer.add(slaves - len(nodes), why)
                except BaseException as error:  # nothing was added: the target stays what it was
                    self.store.update_cluster(record.id, target=before)
                    self.store.add_event(record.id, "error", f"target back to {before}: {why} failed: {error}")
                    raise
            elif slaves < len(nodes):
                resizer.remove(choose_to_remove(nodes, len(nodes) - slaves, self._busy_nodes(record)), why)
        return self.status()

    def remove(self, node_ids: list[str], *, why: str = "") -> ClusterStatus:
        """Drain these slaves (their tasks stop at a batch boundary and go on elsewhere), then release them;
        the cluster's target shrinks by as many."""
        from .elastic.resize import Resizer, live_nodes, resize_lock

        if not node_ids:
            raise UsageError("remove: name at least one node (`cluster status` lists them)")
        record = self.record
        with resize_lock(self.config.state_dir, record.id):
            record = self.record
            live = {n.node_id: n for n in live_nodes(self.store, record.id)}
            unknown = [n for n in node_ids if n not in live]
            if unknown:
                raise UsageError(f"remove {' '.join(unknown)}: no such running node; running: "
                                 f"{', '.join(live) or 'none'}")
            chosen = [live[n] for n in dict.fromkeys(node_ids)]
            before = record.target if record.target is not None else len(live)
            target = max(0, before - len(chosen))
            why = why or f"cluster remove {' '.join(node_ids)}"
            self.store.update_cluster(record.id, target=target)
            self.store.add_event(record.id, "scale", f"target {before} -> {target}: {why}")
            Resizer(self).remove(chosen, why)
        return self.status()

    def _busy_nodes(self, record: ClusterRecord) -> set[str]:
        """Nodes with an engine that runs or holds a task now."""
        client = self.client
        queues = client.queue_status()
        busy = {e for e, q in queues.items() if isinstance(e, int) and (q.get("tasks") or q.get("queue"))}
        return {e.node_id for e in self.store.engines(record.id) if e.engine_id in busy}

    @staticmethod
    def _registered_engines(url: Path) -> tuple[set[int], dict]:
        try:
            client = ipcluster.connect(url, timeout=5)
        except Exception:
            return set(), {}
        try:
            queues = client.queue_status()
            return set(client.ids), {k: v for k, v in queues.items() if isinstance(k, int)}
        finally:
            client.close()

    # the client -----------------------------------------------------------------
    @property
    def record(self) -> ClusterRecord:
        record = self.store.active_cluster(self.name)
        if record is None or record.state != "running":
            raise NotRunningError(
                f"no cluster {self.name!r} is running under {self.config.state_dir}; start one with "
                f"`cluster start --slaves N`")
        return record

    @property
    def client(self):
        record = self.record
        if self._client is None or self._client_cluster_id != record.id:
            gone = ClusterStateError(
                f"the controller of cluster {self.name!r} (pid {record.controller_pid}) is gone; "
                f"run `cluster stop` to clean up, then `cluster start`")
            if not self._controller_alive(record):
                raise gone
            url = ipcluster.url_file(Path(record.profile_dir), record.ipp_cluster_id)
            try:
                self._client = ipcluster.connect(url, timeout=15)
            except (OSError, TimeoutError) as error:  # the file vanished, or the controller hangs
                raise ClusterStateError(f"{gone} ({error})") from None
            self._client_cluster_id = record.id
        return self._client

    @property
    def url_file(self) -> Path:
        record = self.record
        return ipcluster.url_file(Path(record.profile_dir), record.ipp_cluster_id)

    # training -------------------------------------------------------------------
    def run_spec(self, **overrides: Any) -> dict:
        """The training section with overrides applied and validated, as an engine RunSpec dict."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self.config.training)}
        if unknown:
            raise UsageError(f"unknown training parameter(s): {', '.join(sorted(unknown))}")
        training = override(self.config.training, "train", **overrides)
        record = self.record
        spec = dataclasses.asdict(training)
        spec.update(data_dir=self.engine_data_dir(), download=self.config.cluster.download,
                    threads=record.threads_per_engine, l1_scale=L1_SCALE)  # the stored run records its convention
        return spec

    def engine_data_dir(self) -> str:
        """data_dir as the running cluster's engines see it (remote slaves have their own)."""
        return self.provider(self.record.provider).engine_data_dir()

    def train(self, progress: Optional[ProgressSink] = None, *, distributed: bool = False,
              engines: Optional[list[int]] = None, **overrides: Any) -> RunResult:
        """One training run on a free engine; returns when it ends (Ctrl-C leaves it resumable).

        ``distributed=True``: one model on every engine (or on ``engines``, ids) with torch.distributed,
        the global batch ``batch_size`` split over them (controller/distributed.py).
        """
        if engines is not None and not distributed:
            raise UsageError("--engines chooses the engines of a --distributed run; add --distributed")
        spec = self.run_spec(**overrides)
        run_id = new_id("r-")
        spec["run_id"] = run_id
        leases = Leases(self.store)
        with leases.hold("run", run_id):
            self.store.create_run(RunRecord(id=run_id, params=spec, cluster_id=self.record.id))
            self.current_run_id = run_id
            if distributed:
                return self._execute_distributed(Job(run_id=run_id, spec=spec), progress, engines)
            return self._execute(Job(run_id=run_id, spec=spec), progress)

    def resume(self, run_id: str, progress: Optional[ProgressSink] = None,
               engines: Optional[list[int]] = None) -> RunResult:
        """Continue a run from its last checkpoint to the end of its epoch budget.

        A distributed run resumes distributed, on every engine or on ``engines`` (any count: the
        global batch stays the run's ``batch_size``)."""
        run = self.store.run(run_id)
        if run is None:
            raise UsageError(f"--resume {run_id}: no such run; `cluster runs` lists them")
        if run.state == "completed":
            raise UsageError(f"--resume {run_id}: the run already completed all {run.epochs_done} epochs")
        from engines.tasks import task_for

        leases = Leases(self.store)
        if run.sweep_id:  # a trial: its sweep's master may be training it right now
            leases.check_free("sweep", run.sweep_id)
        # before anything else: a second master must not touch the run (or its checkpoint files) at all
        with leases.hold("run", run_id):
            stored = self.store.load_checkpoint(run_id)
            checkpoint = stored[1] if stored else None
            # progress recorded after the stored checkpoint (kept on an engine, checkpoint_minutes) is redone
            position = RunRecorder(self.store).resume_from_checkpoint(run_id)
            self.store.update_run(run_id, state="running", error=None, finished_at=None, cluster_id=self.record.id)
            job = Job(run_id=run_id, spec=self._resumed_spec(run.params), checkpoint=checkpoint,
                      epochs_done=position[0], batches_done=position[1], shipped=position, task=task_for(run.params))
            self.current_run_id = run_id
            if run.params.get("distributed"):
                return self._execute_distributed(job, progress, engines)
            if engines is not None:
                raise UsageError(f"--engines: run {run_id} is not distributed; it resumes on one free engine")
            return self._execute(job, progress)

    def _resumed_spec(self, params: dict) -> dict:
        """A stored run's spec, with how this cluster cuts it into tasks (not what it trains) from now."""
        from engines.tasks import stored_params

        training = self.config.training
        return {**stored_params(params), **task_keys(training)}

    def scheduler(self, **options: Any) -> Scheduler:
        """A scheduler on this cluster's engines that gives up, rather than waits forever, when the
        controller dies or no engine is left for ``[cluster] engine_timeout`` seconds."""
        record = self.record
        watchdog = Watchdog(controller_alive=lambda: self._controller_alive(record),
                            engine_timeout=self.config.cluster.engine_timeout)
        return Scheduler(self.client, watchdog=watchdog, roster=StoreRoster(self.store, record.id), **options)

    def _execute_distributed(self, job: Job, progress: Optional[ProgressSink],
                             engines: Optional[list[int]]) -> RunResult:
        from .distributed import DistributedRun, choose_engines

        chosen = choose_engines(list(self.client.ids), engines)
        record = self.record
        private = {n.node_id: n.private_ip for n in self.store.nodes(record.id) if n.private_ip}
        addresses = {e.engine_id: private[e.node_id] for e in self.store.engines(record.id) if e.node_id in private}
        try:
            DistributedRun(self.client, self.store, chosen, addresses=addresses).run(job, progress)
        except BaseException:
            RunRecorder(self.store).mark_interrupted([job.run_id])
            raise
        return self.run_result(job.run_id)

    def _execute(self, job: Job, progress: Optional[ProgressSink]) -> RunResult:
        source = SingleRun(self.store, job)
        try:
            self.scheduler().run(source, progress)
        except BaseException as error:
            source.recorder.mark_interrupted([job.run_id])
            run = self.store.run(job.run_id)
            if isinstance(error, ClusterLostError) and run is not None:
                raise ClusterLostError(
                    f"{error}; run {run.id} is stored up to epoch {run.epochs_done}: `cluster stop`, "
                    f"`cluster start`, then continue it with `cluster train --resume {run.id}`") from None
            raise
        if source.error is not None:
            raise TaskError(f"run {job.run_id} failed on its engine: {source.error}", source.traceback)
        return self.run_result(job.run_id)

    def run_result(self, run_id: str) -> RunResult:
        run = self.store.run(run_id)
        if run is None:
            raise UsageError(f"no run {run_id!r}; `cluster runs` lists them")
        return RunResult(run=run, epochs=self.store.epochs(run_id))

    def runs(self, limit: Optional[int] = None, sweep_id: Optional[str] = None) -> list[RunRecord]:
        return self.store.runs(limit=limit, sweep_id=sweep_id)

    # inference -------------------------------------------------------------------
    def infer(self, run_id: Optional[str] = None, *, checkpoint: Optional[str | os.PathLike] = None,
              split: str = "test", workload: Optional[str] = None, engines: Optional[list[int]] = None,
              shards_per_engine: int = 1, out: Optional[str | os.PathLike] = None, progress=None,
              data_dir: Optional[str] = None):
        """Apply a trained model to a whole split over the engines; an InferenceResult (controller/infer.py).

        The model is a run's last checkpoint (``run_id``) or a checkpoint file; each engine loads it once
        and keeps it for later calls.  ``workload`` (paper, mnist-cnn, cifar10-vgg16, cifar10-resnet18)
        checks the checkpoint is of that kind; ``out`` writes a .csv or .npz of the predictions.
        ``progress``: a callable (images done, images in all).  ``data_dir``: where the engines find the
        data set (default: the run's own, else [cluster] data_dir).
        """
        from .distributed import choose_engines
        from .infer import Inference, write_predictions

        if (run_id is None) == (checkpoint is None):
            raise UsageError("infer: give one of --run RUN_ID or --checkpoint PATH")
        if run_id is not None:
            run = self.store.run(run_id)
            if run is None:
                raise UsageError(f"--run {run_id}: no such run; `cluster runs` lists them")
            data_dir = data_dir or run.params.get("data_dir")
            stored = self.store.load_checkpoint(run_id)
            if stored is None:
                raise UsageError(f"--run {run_id}: the run has no checkpoint yet")
            data = stored[1]
        else:
            try:
                data = Path(checkpoint).expanduser().read_bytes()
            except OSError as error:
                raise UsageError(f"--checkpoint {checkpoint}: {error.strerror or error}") from None
        expect_kind = find_workload(workload).kind if workload is not None else None
        if out is not None and Path(out).suffix not in (".csv", ".npz"):
            raise UsageError(f"--out {out}: expected a .csv or .npz file name")
        job = Inference(self.client, choose_engines(list(self.client.ids), engines),
                        shards_per_engine=shards_per_engine, threads=self.record.threads_per_engine)
        result = job.run(data, split, data_dir or str(self.config.data_dir), run_id=run_id, expect_kind=expect_kind,
                         progress=progress)
        if out is not None:
            write_predictions(result, Path(out))
        return result

    # benchmarks and reports ------------------------------------------------------
    def bench(self, workload: str = "paper", engines: Optional[list[int]] = None, epochs: Optional[int] = None,
              subset: Optional[int] = None, progress=None, data_dir: Optional[str] = None):
        """Run a standard workload on each engine count in ``engines`` (default: all); a BenchResult."""
        return run_bench(self, workload=workload, engines=engines, epochs=epochs, subset=subset,
                         progress=progress, data_dir=data_dir)

    def report(self, fmt: str = "md", bench_ids: Optional[list[str]] = None, workload: Optional[str] = None) -> str:
        """The stored bench records as md, csv, json or html text; needs no running cluster."""
        return report(self.store, fmt, bench_ids=bench_ids, workload=workload)

    # sweeps ----------------------------------------------------------------------
    def sweep(self, params: Any = None, *, preset: Optional[str] = None, trials: Optional[int] = None,
              sampler: Optional[str] = None, pruner: str = "none", seed: int = 0, resume: Optional[str] = None,
              progress: Any = None, task: Any = None, **overrides: Any) -> SweepResult:
        """Train many settings at once, one trial per free engine, until the sweep ends.

        ``params``: ``{"lr": [0.01, 0.05], "hidden": "int:50:500"}`` or ``["lr=log:1e-3:1e-1", ...]``;
        ``preset="paper"``: the paper's lambda grid.  ``sampler``: grid (default for lists), random or
        tpe (default for ranges); ``pruner``: none, median or asha.  ``overrides``: [training] values
        every trial shares (epochs, subset, ...).  ``resume=SWEEP_ID`` continues a stopped sweep.
        ``progress``: a callable (SweepSource) -> ProgressSink, e.g. ``controller.sweep.view.SweepProgress``.
        ``task``: the engine function (defaults to engines.tasks.train_task).
        Ctrl-C leaves the sweep resumable; returns the ranked results.
        """
        from .sweep import runner  # optuna: loaded by the sweep commands only, not by every command

        if resume is not None:
            if params or preset or trials or sampler or pruner != "none" or overrides:
                raise UsageError(f"--resume {resume} continues a sweep with its own settings; give nothing else")
            return runner.resume_sweep(self, resume, progress=progress, task=task)
        return runner.run_sweep(self, params, preset=preset, trials=trials, sampler=sampler, pruner=pruner,
                                seed=seed, progress=progress, task=task, **overrides)

    def sweeps(self, limit: Optional[int] = None) -> list[SweepResult]:
        """Past sweeps, newest first (the cluster need not be running)."""
        from .sweep import runner  # optuna, as above

        return runner.sweeps(self, limit)

    def results(self, sweep_id: str) -> SweepResult:
        """A sweep's trials ranked by validation accuracy, and its best configuration."""
        from .sweep import runner  # optuna, as above

        return runner.results(self, sweep_id)
