"""The one path every new engine takes, at ``cluster start`` and when a resize adds slaves.

It reports itself (host, pid, device, threads) and installs the drain handler
(``engines.tasks.engine_info``), watches the metadata service for spot notices where there
is one, is stored with the node it runs on, and loads the data set ahead of the first run. Before all
that, its requests and its output are confirmed to get through (``confirm_output``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

from controller.config import Config, metadata_url
from controller.errors import ProviderError
from controller.ipp.client import confirm_output, connect_client, silence_report
from controller.ipp.launch import engine_set_pids
from controller.ipp.profile import url_file
from controller.store import ClusterRecord, EngineRecord, NodeRecord, Store

log = logging.getLogger(__name__)

# engine_info waits for the imports a local engine began at startup (engines/process/startup.py): torch and our
# training code (with torch._dynamo too, as before engines/optim.py, four engines at once on two loaded
# cores took 25 s)
REPORT_TIMEOUT_S = 120
# a registered engine answers its first empty cell in well under a second (seconds, when it is remote and
# its host busy): one silent for this long is asked again through a new client
FIRST_CONTACT_S = 40


def record_engines(
    store: Store,
    config: Config,
    record: ClusterRecord,
    client,
    threads: int,
    nodes: list[NodeRecord],
    engine_ids: Optional[list[int]] = None,
    ipp_cluster=None,
) -> None:
    """Ask the engines ``engine_ids`` (default: every registered one) who they are, and store each with its
    node: local slaves by their engine set's pids (they share one host), remote ones by their address."""
    from engines.tasks import engine_info

    ids = list(engine_ids) if engine_ids is not None else list(client.ids)
    asking = first_contact(client, ids, record)
    try:
        infos = asking[ids].apply_async(engine_info, threads).get(timeout=REPORT_TIMEOUT_S)
        watch_notices(config, asking, record.provider, ids)
    finally:
        if asking is not client:
            asking.close()
    host_to_node = {n.host: n.node_id for n in nodes}
    host_to_node.update({n.private_ip: n.node_id for n in nodes if n.private_ip})
    pid_to_node = {
        pid: node for pid, node in engine_set_pids(ipp_cluster).items() if node in {n.node_id for n in nodes}
    }
    only = nodes[0].node_id if len(nodes) == 1 else ""
    now = time.time()
    store.engines.put(
        record.id,
        [
            EngineRecord(
                engine_id=engine_id,
                host=info["host"],
                pid=info["pid"],
                device=info["device"],
                threads=info["threads"],
                node_id=pid_to_node.get(info["pid"]) or host_to_node.get(info["host"], only),
                registered_at=now,
            )
            for engine_id, info in zip(ids, infos)
        ],
    )


def first_contact(client, ids: list[int], record: ClusterRecord):
    """The client to ask the new engines ``ids`` through: ``client``, or a new one when they stay silent to it.

    An engine just registered may not be connected to every scheduler and relay yet, and ZeroMQ drops what
    is sent to a peer not there yet (a PUB its output; a ROUTER, unless told otherwise, a request), so empty
    cells go until each engine's output comes back. Engines that registered and then stayed silent to the
    master for minutes were seen twice in some 25 runs of the test suite on a loaded 2-core master (once one
    engine, once both of a cluster), and the cause is not known: after FIRST_CONTACT_S they are asked again
    through a new client, and what the controller says of them is logged, so that the next occurrence shows
    where the messages stopped."""
    silent = confirm_output(client, ids, FIRST_CONTACT_S)
    if not silent:
        return client
    report = silence_report(client, silent)
    log.warning(
        "engine(s) %s silent to the master for %d s (%s); asking again through a new client",
        silent,
        FIRST_CONTACT_S,
        report,
    )
    fresh = connect_client(url_file(Path(record.profile_dir), record.ipp_cluster_id), timeout=15)
    still = confirm_output(fresh, silent, REPORT_TIMEOUT_S - FIRST_CONTACT_S)
    if still:
        report = silence_report(fresh, still)
        fresh.close()
        raise ProviderError(
            f"engine(s) {', '.join(map(str, still))} registered but answered nothing within "
            f"{REPORT_TIMEOUT_S} s, through two clients ({report}); their logs are in "
            f"{Path(record.profile_dir) / 'log'}"
        )
    log.warning("engine(s) %s answered a new client: the first client had stopped hearing them", silent)
    return fresh


def watch_notices(config: Config, client, provider: str, engine_ids: list[int]) -> None:
    """These engines poll the metadata service for spot notices (engines/process/notices.py), where there is one."""
    url = metadata_url(config.cluster, provider)
    if url:
        from engines.process.notices import watch

        client[engine_ids].apply_async(watch, url).get(timeout=60)
        log.info("engines watch %s for spot interruption notices", url)


def warm_engines(client, spec: dict, timeout: float, targets: Optional[list[int]] = None) -> None:
    """Every engine (or ``targets``) loads the data set and the training code of ``spec`` now, so the first
    run after `start` (or `scale`) is as fast as the next. A failure here is only logged: the first run
    reports it in full."""
    from engines.tasks import warm_up

    loading = client[targets if targets is not None else client.ids].apply_async(warm_up, spec)
    try:
        seconds = loading.get(timeout=timeout)
        log.info("engines loaded the data set in %.1f s", max(seconds))
    except Exception as error:  # noqa: BLE001 - the data may be missing: `train` says so clearly
        log.warning("engines could not load the data set in advance (%s); the first run will", error)
