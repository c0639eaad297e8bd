"""How long `cluster start` takes on SSH slaves that were bootstrapped before, against a full bootstrap.

The slaves are real OpenSSH servers in network namespaces (tests/netns.py: needs root and `ip netns`),
two of them, one engine each. Each round times, on the same two slaves:

- **full**: the slaves' bootstrap stamps removed first, so `start` uploads the engine code and runs the
  import check (`import engines, ipyparallel, torch, numpy`) before it starts the engines: what every
  `start` did before this change, and what a new slave still gets;
- **stamped**: the stamps the full start left in place, so `start` only looks the modules up and starts
  the engines: a slave started again (`cluster stop` today, `cluster start` tomorrow), or adopted.

Each `start` runs until every engine registered, reported itself and loaded the data set; a `stop`
follows each. Printed: the medians of the rounds and the ratio stamped / full, measured in the same run
round by round (the machine's load moves both).

    sudo .venv/bin/python benchmarks/ssh_start.py            # real MNIST from ../shared/data
    sudo .venv/bin/python benchmarks/ssh_start.py --rounds 5 --json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import data_dir

from controller.api import Cluster  # noqa: E402
from controller.config import load_config  # noqa: E402
from tests.netns import SLAVE_USER, NetnsHosts, client_key, unavailable  # noqa: E402

SUBNET = 95  # namespaces 10.213.95.0/24 and up: apart from the tests'


def config_for(folder: Path, hosts: NetnsHosts, data: Path):
    ini = folder / "cluster.ini"
    ini.write_text(f"""
[cluster]
name = bench-ssh
provider = ssh
slaves = {len(hosts.hosts)}
state_dir = {folder / "state"}
data_dir = {data}
threads_per_engine = 1
download = false
replace_lost = false

[ssh]
hosts = {", ".join(h.address for h in hosts.hosts)}
user = {SLAVE_USER}
key_file = {hosts.key}
python = {sys.executable}
tunnel = never
""")
    return load_config(ini, environ={})


def timed_start(cluster: Cluster) -> float:
    began = time.perf_counter()
    cluster.start()
    seconds = time.perf_counter() - began
    cluster.stop()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the start's own warnings (two interfaces: CurveZMQ) are expected
    reason = unavailable()
    if reason:  # `make bench` runs every benchmark: this one says why it cannot run here, and lets the rest go on
        print(f"ssh_start.py skipped: it needs namespace slaves ({reason})")
        return
    data = data_dir()
    rounds: dict[str, list[float]] = {"full": [], "stamped": []}
    with (
        tempfile.TemporaryDirectory(prefix="ssh-start-") as tmp,
        NetnsHosts(2, Path(tmp) / "netns", first_subnet=SUBNET) as hosts,
    ):
        hosts.key = client_key(hosts.workdir)
        for host in hosts.hosts:
            host.authorize(hosts.key)
        cluster = Cluster(config_for(Path(tmp), hosts, data))
        try:
            timed_start(cluster)  # copies the data set to the slaves once: no round pays for that
            for number in range(1, args.rounds + 1):
                for host in hosts.hosts:
                    (host.dir / "home" / ".cluster-engine" / "engines.stamp").unlink(missing_ok=True)
                rounds["full"].append(timed_start(cluster))
                rounds["stamped"].append(timed_start(cluster))
                if not args.json:
                    print(
                        f"round {number}: full {rounds['full'][-1]:.2f} s, stamped {rounds['stamped'][-1]:.2f} s",
                        flush=True,
                    )
        finally:
            cluster.stop()
            cluster.close()
    full, stamped = statistics.median(rounds["full"]), statistics.median(rounds["stamped"])
    result = {
        "slaves": 2,
        "rounds": args.rounds,
        "full_s": rounds["full"],
        "stamped_s": rounds["stamped"],
        "median_full_s": full,
        "median_stamped_s": stamped,
        "stamped_over_full": stamped / full,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"\ncluster start on 2 SSH slaves, median of {args.rounds} rounds:")
    print(f"  full bootstrap (upload + import check)   {full:6.2f} s")
    print(f"  stamped (modules looked up, no import)   {stamped:6.2f} s")
    print(f"  stamped / full                           {stamped / full:6.2f}x")


if __name__ == "__main__":
    main()
