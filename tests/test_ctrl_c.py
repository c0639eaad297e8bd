"""A second Ctrl-C during the clean-up of an interrupted `cluster start` never marks the cluster stopped.

Both interrupts come at fixed points of a real local start (the provider's start and stop raise
KeyboardInterrupt, as a SIGINT arriving there would), not after a sleep.
"""

from __future__ import annotations

import pytest

from controller.api import Cluster
from controller.providers.local import LocalProvider
from tests.helpers import cluster_pids, make_config, wait_until


def test_a_second_ctrl_c_during_clean_up_leaves_the_cluster_failed_and_stop_finishes_it(
    tmp_path, tiny_data_dir, monkeypatch
):
    real_start, real_stop = LocalProvider.start, LocalProvider.stop
    interrupts = []

    def start_then_ctrl_c(self, *args):
        real_start(self, *args)  # engines launched: there is something to clean up
        interrupts.append("start")
        raise KeyboardInterrupt

    def ctrl_c_again(self, *args):
        if interrupts == ["start"]:
            interrupts.append("clean-up")
            raise KeyboardInterrupt
        return real_stop(self, *args)

    monkeypatch.setattr(LocalProvider, "start", start_then_ctrl_c)
    monkeypatch.setattr(LocalProvider, "stop", ctrl_c_again)
    cluster = Cluster(make_config(tmp_path, tiny_data_dir, slaves=1))
    try:
        with pytest.raises(KeyboardInterrupt):
            cluster.start()
        assert interrupts == ["start", "clean-up"]
        record = cluster.store.clusters.latest("test")
        assert record.state == "failed" and "run `cluster stop`" in record.error, record
        assert cluster.status().state == "failed"  # shown, not hidden as stopped

        cluster.stop()
        assert cluster.store.clusters.latest("test").state == "stopped"
        assert wait_until(lambda: not cluster_pids(cluster.config.state_dir), timeout=20)
    finally:
        cluster.stop()
        cluster.close()
