"""prices, ip, ssh: the slaves as machines (spot prices before a start; addresses and a shell on a running one)."""

from __future__ import annotations

import shlex
import subprocess

from controller.commands.context import Context
from controller.errors import NotRunningError, UsageError


def register(sub) -> None:
    p = sub.add_parser("prices", help="current spot price per availability zone beside the on-demand price")
    p.add_argument(
        "--instance-types", metavar="TYPES", help="comma-separated instance types (default: [aws] instance_types)"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_prices)

    p = sub.add_parser("ip", help="public and private addresses of every node")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_ip)

    p = sub.add_parser("ssh", help="an interactive shell on a slave (host keys checked)")
    p.add_argument("node", nargs="?", help="node id, instance id, hostname or address (default: the first node)")
    p.add_argument("--print", action="store_true", help="print the ssh command instead of running it")
    p.set_defaults(handler=cmd_ssh)


def cmd_prices(args, ctx: Context) -> int:
    from controller.providers.aws.prices import prices

    kinds = [k.strip() for k in args.instance_types.split(",") if k.strip()] if args.instance_types else None
    if args.instance_types is not None and not kinds:
        raise UsageError("--instance-types: give at least one instance type, e.g. g4dn.xlarge")
    rows = prices(ctx.config, kinds)  # no store, no provider: works before any start
    if args.json:
        ctx.emit_json({"region": ctx.config.aws.region, "prices": rows})
        return 0
    ctx.emit_table(
        f"prices in {ctx.config.aws.region} ($/hour)",
        ["type", "zone", "spot", "on-demand", "saving"],
        [
            [
                r.instance_type,
                r.zone,
                "-" if r.spot is None else f"{r.spot:.4f}",
                "-" if r.on_demand is None else f"{r.on_demand:.4f}",
                f"{1 - r.spot / r.on_demand:.0%}" if r.spot is not None and r.on_demand else "-",
            ]
            for r in rows
        ],
        caption="on-demand: us-east-1 Linux list price",
    )
    return 0


def _nodes(ctx: Context):
    status = ctx.cluster().status()
    if status.state in ("none", "stopped"):
        raise NotRunningError(f"no cluster {status.name!r} is running; start one with `cluster start`")
    return status


def cmd_ip(args, ctx: Context) -> int:
    status = _nodes(ctx)
    if args.json:
        ctx.emit_json(
            {
                "nodes": [
                    {
                        "node": n.node_id,
                        "host": n.host,
                        "public_ip": n.public_ip,
                        "private_ip": n.private_ip,
                        "state": n.state,
                    }
                    for n in status.nodes
                ]
            }
        )
        return 0
    ctx.emit_table(
        "nodes",
        ["node", "host", "public ip", "private ip", "state"],
        [[n.node_id, n.host, n.public_ip, n.private_ip, n.state] for n in status.nodes],
    )
    return 0


def cmd_ssh(args, ctx: Context) -> int:
    status = _nodes(ctx)
    nodes = status.nodes
    if args.node:
        nodes = [n for n in nodes if args.node in (n.node_id, n.instance_id, n.host, n.public_ip, n.private_ip)]
        if not nodes:
            raise UsageError(f"no node {args.node!r}; `cluster ip` lists them")
    if not nodes:
        raise UsageError("the cluster has no nodes")
    command = ctx.cluster().provider(status.provider).ssh_target(nodes[0]).command()
    if args.print:
        ctx.say(shlex.join(command))
        return 0
    return subprocess.call(command)
