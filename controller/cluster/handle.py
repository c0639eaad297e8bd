"""One named cluster as the layers below the API work on it: its configuration and store, the running
record, a connected client, its providers, and what its engines train with.

``controller.api.Cluster`` is this plus what a user can do; the keeper's process and every subsystem
runner (a ``controller.work.session.Session``) take a handle, so nothing below the API imports it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Optional

from controller.cluster import keeper
from controller.config import Config, load_config, override
from controller.errors import CONTROLLER_GONE_WAY_ON, ClusterStateError, NotRunningError, UsageError
from controller.ipp.client import confirm_client_output, connect_client
from controller.ipp.launch import controller_alive
from controller.ipp.profile import url_file
from controller.providers import NO_HOOKS, Hooks, Provider, make_provider
from controller.store import ClusterRecord, Store
from controller.work.roster import StoreRoster
from controller.work.scheduler import Scheduler
from controller.work.watch import Watchdog
from engines.spec import L1_SCALE

log = logging.getLogger(__name__)


class ClusterHandle:
    """One named cluster under one state_dir: config, store, record, client, providers, run specs."""

    def __init__(
        self,
        config: Optional[Config] = None,
        *,
        config_file: Optional[str | os.PathLike] = None,
        provider_hooks: Hooks = NO_HOOKS,
    ):
        self.config = config if config is not None else load_config(config_file)
        self.provider_hooks = provider_hooks  # tests only: where a provider's start fails, SSH addresses
        self.store = Store(self.config.state_dir)
        self._client = None
        self._client_cluster_id: Optional[tuple[int, Optional[int]]] = None

    @property
    def name(self) -> str:
        return self.config.cluster.name

    def close(self) -> None:
        self._close_client()
        self.store.close()

    def _close_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def provider(self, name: Optional[str] = None) -> Provider:
        """The provider ``name`` (default: [cluster] provider) over this cluster's config and store."""
        return make_provider(name or self.config.cluster.provider, self.config, self.store, self.provider_hooks)

    def _revive_keeper(self) -> None:
        record = self.store.clusters.active(self.name)
        if record is not None and record.state == "running":
            keeper.revive(self.config.state_dir, self.store, record)

    @property
    def record(self) -> ClusterRecord:
        record = self.store.clusters.active(self.name)
        if record is None or record.state != "running":
            raise NotRunningError(
                f"no cluster {self.name!r} is running under {self.config.state_dir}; start one with "
                f"`cluster start --slaves N`"
            )
        return record

    @property
    def client(self):
        record = self.record
        # keyed by the controller too: an adopting start gives the same record a new controller
        if self._client is None or self._client_cluster_id != (record.id, record.controller_pid):
            gone = ClusterStateError(
                f"the controller of cluster {self.name!r} (pid {record.controller_pid}) is gone; "
                f"run {CONTROLLER_GONE_WAY_ON}"
            )
            if not controller_alive(record):
                raise gone
            url = url_file(Path(record.profile_dir), record.ipp_cluster_id)
            try:
                self._client = connect_client(url, timeout=15)
            except (OSError, TimeoutError) as error:  # the file vanished, or the controller hangs
                raise ClusterStateError(f"{gone} ({error})") from None
            # a new client misses engine output until its subscription lands; `%px` would wait for ever
            confirm_client_output(self._client, timeout=10)
            self._client_cluster_id = (record.id, record.controller_pid)
            self._revive_keeper()
        return self._client

    @property
    def url_file(self) -> Path:
        record = self.record
        return url_file(Path(record.profile_dir), record.ipp_cluster_id)

    def run_spec(self, **overrides: Any) -> dict:
        """The training section with overrides applied and validated, as an engine RunSpec dict."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self.config.training)}
        if unknown:
            raise UsageError(f"unknown training parameter(s): {', '.join(sorted(unknown))}")
        training = override(self.config.training, "train", **overrides)
        record = self.record
        spec = dataclasses.asdict(training)
        spec.update(
            data_dir=self.engine_data_dir(),
            download=self.config.cluster.download,
            threads=record.threads_per_engine,
            l1_scale=L1_SCALE,
        )  # the stored run records its convention
        return spec

    def engine_data_dir(self) -> str:
        """data_dir as the running cluster's engines see it (remote slaves have their own)."""
        return self.provider(self.record.provider).engine_data_dir()

    def scheduler(self, **options: Any) -> Scheduler:
        """A scheduler on this cluster's engines that gives up, rather than waits forever, when the
        controller dies or no engine is left for ``[cluster] engine_timeout`` seconds, and kills the engine of
        a task silent for ``[cluster] stall_minutes`` (the task goes on elsewhere)."""
        record = self.record
        watchdog = Watchdog(
            controller_alive=lambda: controller_alive(record), engine_timeout=self.config.cluster.engine_timeout
        )
        options.setdefault("stall_s", self.config.cluster.stall_minutes * 60)
        return Scheduler(self.client, watchdog=watchdog, roster=StoreRoster(self.store, record.id), **options)
