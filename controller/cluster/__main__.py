"""The keeper's process: ``python -m controller.cluster SPEC`` (``keeper.spawn`` starts it).

Its own module because it builds the whole ``Cluster`` (controller/api.py), which imports the keeper
to spawn and stop it: the entry point sits above both.
"""
from __future__ import annotations

import json
import logging
import sys
import threading
from pathlib import Path

from controller.api import Cluster
from controller.cluster.keeper import Keeper, end_with_the_controller
from controller.config import config_from_dict


def main(argv: list[str]) -> int:
    import signal

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(argv[0]).read_text())
    stop_event = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop_event.set())
    signal.signal(signal.SIGINT, lambda *_: stop_event.set())
    with Cluster(config_from_dict(spec["config"])) as cluster:
        end_with_the_controller(cluster.store.clusters.get(spec["cluster_id"]))
        Keeper(cluster, spec["cluster_id"]).run(stop_event)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
