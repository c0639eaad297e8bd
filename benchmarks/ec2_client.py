"""What an EC2 client costs the master: ours (controller/providers/aws/ec2.py) against plain boto3.

Every command that talks to EC2 makes clients (`cluster status` lists the slaves, `start` and `stop`
make several, the keeper one per pass). Plain boto3 makes a session and a client, and each new session
parses EC2's service model and the endpoint tables again. Ours gives each client its own session, so
credentials are read afresh, but shares one loader of that parsed data. Clients are only made, never
used: nothing is sent (the endpoint is a closed local port). Both alternate in rounds in this process
after one warm-up each; printed: CPU seconds per client (medians over the rounds) and their ratio.

    python benchmarks/ec2_client.py
    python benchmarks/ec2_client.py --rounds 9 --clients 10 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from common import REPO  # noqa: F401 - puts the checkout on sys.path

from controller.config import load_config
from controller.providers.aws import ec2 as ec2_calls

ENDPOINT = "http://127.0.0.1:9"


def plain_boto3(region: str) -> object:
    import boto3

    return boto3.session.Session(region_name=region).client("ec2", endpoint_url=ENDPOINT)


def cpu_per_client(make, clients: int) -> float:
    start = time.process_time()
    for _ in range(clients):
        make()
    return (time.process_time() - start) / clients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=5, help="clients made per round by each")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "benchmark")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "benchmark")
    ini = Path(os.environ.get("TMPDIR", "/tmp")) / "ec2_client_bench.ini"
    ini.write_text(f"[cluster]\nname = bench\nprovider = aws\n[aws]\nregion = us-east-1\nendpoint_url = {ENDPOINT}\n")
    config = load_config(ini, environ={})
    ours, plain = (lambda: ec2_calls.client(config)), (lambda: plain_boto3("us-east-1"))
    ours(), plain()  # imports and first parse, for both
    samples: dict[str, list[float]] = {"ours": [], "boto3": []}
    for _ in range(args.rounds):
        samples["ours"].append(cpu_per_client(ours, args.clients))
        samples["boto3"].append(cpu_per_client(plain, args.clients))
    ini.unlink()
    medians = {name: statistics.median(values) for name, values in samples.items()}
    ratio = medians["ours"] / medians["boto3"]
    if args.json:
        print(
            json.dumps(
                {
                    "cpu_s_per_client": medians,
                    "ours/boto3": round(ratio, 3),
                    "rounds": args.rounds,
                    "clients_per_round": args.clients,
                }
            )
        )
        return
    print(f"{'':28}{'ours':>10}{'boto3':>10}{'ours/boto3':>12}")
    print(f"{'CPU seconds per client':28}{medians['ours']:>10.4f}{medians['boto3']:>10.4f}{ratio:>11.2f}x")
    print(f"(median of {args.rounds} rounds of {args.clients} clients each, alternating)")


if __name__ == "__main__":
    main()
