"""Starting and stopping one named cluster under one state_dir: ``cluster start`` and ``cluster stop``.

Start: refuse a second live cluster of the name (clean up what is left of a dead one), check the
provider can start (bad input, credentials) before anything runs, then the controller, the slaves, the
wait for their engines, the keeper. Any failure on the way, Ctrl-C included, tears down what was
started. Stop: the keeper, the engines and slaves, then the controller; with the local state lost, or
for every cluster of this tool, the provider also finds nodes by its tags and releases them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from controller.cluster import joining, keeper
from controller.config import ClusterConfig, Config, override
from controller.errors import AlreadyRunningError, ClusterError, ProviderError, UsageError
from controller.ipp import forked_engines, processes
from controller.ipp.launch import controller_alive, load_cluster, new_cluster, start_controller
from controller.ipp.profile import engine_environment, engine_file, profile_dir, secure_files, url_file
from controller.providers import Provider
from controller.providers.base import Resource
from controller.store import LIVE_NODE_STATES, ClusterRecord, NodeRecord, NodeState, Store

log = logging.getLogger(__name__)


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


def check_autoscaling(cfg: ClusterConfig) -> None:
    """min_slaves <= slaves <= max_slaves when autoscaling (max_slaves > 0)."""
    if cfg.max_slaves and not cfg.min_slaves <= cfg.slaves <= cfg.max_slaves:
        raise UsageError(
            f"cluster start: slaves = {cfg.slaves} must lie between min_slaves = {cfg.min_slaves} "
            f"and max_slaves = {cfg.max_slaves} (autoscaling is on: max_slaves > 0)"
        )


def threads_per_engine(cfg: ClusterConfig) -> int:
    """Torch threads per engine: as configured, else the master's cores shared by local engines (remote
    engines use their slave's own cores: 0)."""
    if cfg.threads_per_engine:
        return cfg.threads_per_engine
    if cfg.provider != "local":
        return 0  # the slave's own cores; GPU engines need few
    return max(1, (os.cpu_count() or 1) // cfg.slaves)


def adoption_message(
    name: str, nodes: list[NodeRecord], adopted: list[NodeRecord], added: list[NodeRecord], slaves: int
) -> str:
    """What ``cluster start`` did with the nodes of a cluster whose master restarted (logged, stored, printed)."""
    kept = {n.node_id for n in adopted}
    parts = [
        f"adopted {len(adopted)} slave(s) of cluster {name!r} still up"
        + (f": {', '.join(sorted(kept))}" if kept else "")
    ]
    lost = sorted(n.node_id for n in nodes if n.node_id not in kept)
    if lost and not adopted and not any(n.provider != "local" for n in nodes):
        parts = [f"restarted the engines of cluster {name!r} (local engines do not outlive their master)"]
    elif lost:
        parts.append(f"lost {', '.join(lost)}")
    if added:
        parts.append(f"added {', '.join(n.node_id for n in added)}")
    if len(adopted) > slaves:
        parts.append(f"kept all {len(adopted)} (asked for {slaves}; `cluster scale {slaves}` turns the rest off)")
    return "; ".join(parts)


class Lifecycle:
    """Start and stop the cluster of ``config``; ``provider`` builds the provider of a name (the API's one
    spot that does), ``run_spec`` is the training spec the engines warm up with."""

    def __init__(self, config: Config, store: Store, provider: Callable[[str], Provider], run_spec: Callable[[], dict]):
        self.config = config
        self.store = store
        self.provider = provider
        self.run_spec = run_spec

    @property
    def name(self) -> str:
        return self.config.cluster.name

    # starting ---------------------------------------------------------------------
    def start(self, fresh: bool = False, **overrides: Any) -> ClusterRecord:
        """Start the controller and the slaves; returns the running cluster's record once every engine
        registered. ``overrides``: [cluster] slaves, provider, min_slaves, max_slaves, idle_minutes.

        A cluster of this name whose controller is gone (the master restarted) but whose nodes are still
        up is adopted (``adopt``) unless ``fresh``: then, as always, its nodes are released first."""
        cfg = override(self.config.cluster, "cluster start", **overrides)
        check_autoscaling(cfg)
        adoptable = None if fresh else self.adoptable(cfg)
        if adoptable is not None:
            return self.adopt(*adoptable, cfg)
        self.refuse_second_cluster()
        chosen = self.provider(cfg.provider)
        # bad input, missing credentials: fail before anything starts; where the controller must listen
        engine_ip = chosen.preflight(cfg.slaves)
        threads = threads_per_engine(cfg)
        profile = profile_dir(self.config.state_dir)
        record = self.store.clusters.create(
            name=self.name,
            provider=cfg.provider,
            slaves=cfg.slaves,
            threads_per_engine=threads,
            profile_dir=str(profile),
            ipp_cluster_id="",
            price_per_hour=cfg.price_per_hour,
        )
        self.store.clusters.update(
            record.id,
            ipp_cluster_id=f"{self.name}-{record.id}",
            target=cfg.slaves,
            min_slaves=cfg.min_slaves,
            max_slaves=cfg.max_slaves,
            idle_minutes=cfg.idle_minutes,
            replace_lost=int(cfg.replace_lost),
        )
        record = self.store.clusters.get(record.id)
        return self._run(
            record, cfg, chosen, engine_ip, threads, lambda ipp_cluster: chosen.start(record, ipp_cluster, cfg.slaves)
        )

    # adopting ---------------------------------------------------------------------
    def adoptable(self, cfg: ClusterConfig) -> Optional[tuple[ClusterRecord, list[NodeRecord]]]:
        """The running cluster of this name whose controller is gone, and its nodes the provider still sees
        up; None when there is none (a live controller, a stop or start cut short, another provider)."""
        existing = self.store.clusters.active(self.name)
        if existing is None or existing.state != "running" or controller_alive(existing):
            return None
        if existing.provider != cfg.provider:
            log.info(
                "cluster %s ran on %s, not %s: its nodes are released, not adopted",
                existing.id,
                existing.provider,
                cfg.provider,
            )
            return None
        if not any(n.state == NodeState.RUNNING for n in self.provider(existing.provider).list(existing)):
            return None
        # every node the cluster had, not only those up: ``adopt`` records the others lost
        return existing, [n for n in self.store.nodes.of(existing.id) if n.state in LIVE_NODE_STATES]

    def adopt(self, record: ClusterRecord, nodes: list[NodeRecord], cfg: ClusterConfig) -> ClusterRecord:
        """A new controller for the cluster ``record`` (same record: its runs, sweeps and cost so far stay
        with it), which takes over ``nodes``: no instance launched or released for them. Nodes gone are
        recorded lost; fewer adopted than ``cfg.slaves`` are made up with ``add``; more are all kept (the
        target becomes their count; `cluster scale` turns the extra off). On any failure, Ctrl-C included,
        everything of the cluster is released as after a failed start."""
        profile = Path(record.profile_dir)
        keeper.stop(record)
        # what is left of the old master side (schedulers, tunnel holders, local engines in their grace)
        # ends before the new controller starts: it carries the same marker
        processes.kill_cluster_processes(profile, record.ipp_cluster_id)
        # the old controller's files (ipyparallel's cluster file, the connection files): ipyparallel would
        # read stale ones as the new controller's, which writes its own (new ports, new key)
        for path in (
            profile / "security" / f"cluster-{record.ipp_cluster_id}.json",
            url_file(profile, record.ipp_cluster_id),
            engine_file(profile, record.ipp_cluster_id),
        ):
            path.unlink(missing_ok=True)
        chosen = self.provider(record.provider)
        engine_ip = chosen.preflight(max(cfg.slaves, len(nodes)), adopting=True)
        threads = threads_per_engine(cfg)
        self.store.engines.forget(record.id)  # the old hub's ids
        self.store.clusters.update(
            record.id,
            state="starting",
            error=None,
            controller_pid=None,
            keeper_pid=None,
            threads_per_engine=threads,
            min_slaves=cfg.min_slaves,
            max_slaves=cfg.max_slaves,
            idle_minutes=cfg.idle_minutes,
            replace_lost=int(cfg.replace_lost),
        )
        record = self.store.clusters.get(record.id)

        def take_over(ipp_cluster) -> list[NodeRecord]:
            adopted = chosen.adopt(record, ipp_cluster, nodes)
            added, short = self._make_up(record, chosen, ipp_cluster, cfg.slaves - len(adopted), bool(adopted))
            target = max(cfg.slaves, len(adopted))
            self.store.clusters.update(record.id, slaves=target, target=target)
            message = adoption_message(self.name, nodes, adopted, added, cfg.slaves) + short
            self.store.events.add(record.id, "adopt", message)
            log.info("%s", message)
            return adopted + added

        return self._run(record, cfg, chosen, engine_ip, threads, take_over)

    def _run(
        self,
        record: ClusterRecord,
        cfg: ClusterConfig,
        chosen: Provider,
        engine_ip: str,
        threads: int,
        bring_up: Callable[[Any], list[NodeRecord]],
    ) -> ClusterRecord:
        """The one path of ``start`` and ``adopt``: the controller, the nodes ``bring_up(ipp_cluster)`` returns,
        the wait for their engines, their warm-up, the keeper. Any failure, Ctrl-C included, tears down
        what was started."""
        profile = Path(record.profile_dir)
        ipp_cluster = client = None
        try:
            ipp_cluster = new_cluster(
                profile,
                record.ipp_cluster_id,
                engine_env=engine_environment(threads),
                engine_ip=engine_ip,
                engine_timeout=cfg.engine_timeout,
                master_grace_minutes=cfg.master_grace_minutes,
                engines=forked_engines.ForkedEngineSetLauncher,
            )
            chosen.prepare(record)
            start_controller(
                ipp_cluster,
                cfg.engine_timeout,
                on_start=lambda pid: self.store.clusters.update(record.id, controller_pid=pid),
            )
            secure_files(profile)
            nodes = bring_up(ipp_cluster)
            client = ipp_cluster.connect_client_sync(timeout=cfg.engine_timeout)
            self._wait_for_engines(client, chosen.expected_engines(nodes), cfg.engine_timeout, profile)
            joining.record_engines(self.store, self.config, record, client, threads, nodes, ipp_cluster=ipp_cluster)
            secure_files(profile)
            self.store.clusters.set_state(record.id, "running")
            joining.warm_engines(client, self.run_spec(), cfg.engine_timeout)
            if cfg.replace_lost or cfg.max_slaves:
                keeper.spawn(dataclasses.replace(self.config, cluster=cfg), record, self.store)
            else:  # an adopted cluster's old spec would have the next command revive a keeper not wanted now
                keeper.forget(self.config.state_dir, record.id)
        except BaseException as error:
            self._undo_start(record, chosen, ipp_cluster, error)
            raise
        finally:
            if client is not None:
                client.close()
        return self.store.clusters.get(record.id)

    @staticmethod
    def _make_up(
        record: ClusterRecord, provider: Provider, ipp_cluster, count: int, adopted: bool
    ) -> tuple[list[NodeRecord], str]:
        """``count`` slaves added the normal way, for those lost; returns them and what to add to the adoption
        message. With slaves adopted, a failed add (it released what it started) keeps them: the keeper,
        where one runs, tries again for the target."""
        if count <= 0:
            return [], ""
        try:
            return provider.add(record, ipp_cluster, count), ""
        except ClusterError as error:
            if not adopted:
                raise
            log.warning("adding %d slave(s) for those lost failed: %s", count, error)
            return [], f"; adding {count} slave(s) for those lost failed: {error}"

    @staticmethod
    def _wait_for_engines(client, expected: int, timeout: float, profile: Path) -> None:
        try:
            client.wait_for_engines(expected, timeout=timeout)
        except TimeoutError:
            raise ProviderError(
                f"only {len(client.ids)} of {expected} engines registered within {timeout} s; "
                f"their logs are in {profile / 'log'} (raise [cluster] engine_timeout if slaves are slow)"
            ) from None

    def _undo_start(self, record: ClusterRecord, provider: Provider, ipp_cluster, error: BaseException) -> None:
        log.warning("start failed (%s); stopping what was started", error or type(error).__name__)
        cleaned = False
        try:
            self.teardown(record, provider, ipp_cluster)
            cleaned = True
        except Exception:  # the original error is the one to report; this one goes to the log
            log.exception("clean-up after the failed start failed too")
            cleaned = True  # it ran to its end; what it could not reach, it logged
        finally:
            # never "stopped" while something may still run: a clean-up cut short (a second
            # Ctrl-C) leaves the cluster "failed", which status shows and `cluster stop` finishes
            if cleaned:
                self.store.clusters.set_state(record.id, "stopped", error=f"start failed: {error}")
            else:
                self.store.clusters.set_state(
                    record.id, "failed", error=f"start failed: {error}; its clean-up did not finish: run `cluster stop`"
                )

    def refuse_second_cluster(self) -> None:
        """AlreadyRunningError while a cluster of this name lives; what is left of a dead one is stopped."""
        existing = self.store.clusters.active(self.name)
        if existing is None:
            return
        if existing.state in ("starting", "running", "stopping") and controller_alive(existing):
            raise AlreadyRunningError(
                f"cluster {self.name!r} is already running (started {time.ctime(existing.created_at)}, "
                f"state_dir {self.config.state_dir}); run `cluster stop` first, or use another "
                f"[cluster] name or state_dir"
            )
        log.info("cleaning up what is left of cluster %s (%s, controller gone)", existing.id, existing.state)
        self.stop_record(existing)

    # stopping ---------------------------------------------------------------------
    def stop(self, all_clusters: bool = False, any_owner: bool = False, only: Optional[set[str]] = None) -> Stopped:
        """Stop this cluster (if its record is there); without a record, or with ``all_clusters``, release
        what the provider finds by its tags: this master's only unless ``any_owner``, and of those only
        ``only`` when given."""
        record = self.store.clusters.active(self.name)
        if record is not None:
            self.stop_record(record)  # our own cluster first, whatever the cloud says next
        released: list[str] = []
        if record is None or all_clusters:
            released = self.provider(self.config.cluster.provider).release_orphans(
                self.name, all_clusters, any_owner, only
            )
        return Stopped(self.store.clusters.get(record.id) if record is not None else None, released)

    def stop_plan(self, all_clusters: bool = False, any_owner: bool = False) -> list[Resource]:
        """What ``stop(all_clusters, any_owner)`` would release by tag, beyond this cluster's own record."""
        return self.provider(self.config.cluster.provider).find_orphans(self.name, all_clusters, any_owner)

    def stop_record(self, record: ClusterRecord) -> None:
        self.store.clusters.set_state(record.id, "stopping")
        keeper.stop(record)  # first: it would replace the engines being stopped
        ipp_cluster = load_cluster(Path(record.profile_dir), record.ipp_cluster_id)
        self.teardown(record, self.provider(record.provider), ipp_cluster)
        self.store.clusters.set_state(record.id, "stopped")

    @staticmethod
    def teardown(record: ClusterRecord, provider: Provider, ipp_cluster) -> None:
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
