"""start, status, scale, remove, stop: a cluster's life (controller/cluster)."""

from __future__ import annotations

import time

from controller.commands.context import Context
from controller.errors import ExitStatus, UsageError
from controller.formatting import duration


def register(sub) -> None:
    p = sub.add_parser("start", help="start the controller and the slaves' engines in the background")
    p.add_argument("--slaves", type=int, help="number of slaves (default: [cluster] slaves)")
    p.add_argument("--provider", help="local, ssh or aws (default: [cluster] provider)")
    p.add_argument("--min-slaves", type=int, help="autoscaling: idle slaves are turned off down to this many")
    p.add_argument(
        "--max-slaves", type=int, help="autoscaling: slaves are turned on for waiting jobs up to this many (0 = off)"
    )
    p.add_argument("--idle-minutes", type=float, help="autoscaling: a slave idle this long is turned off")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="after a master restart: release the slaves still up and start new ones, instead of "
        "adopting them (the default)",
    )
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(handler=cmd_start)

    p = sub.add_parser("status", help="the controller and every engine: id, host, pid, device, state, uptime")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("scale", help="turn slaves on or off until N serve; removed ones are drained first")
    p.add_argument("slaves", type=int, metavar="N", help="number of slaves the cluster keeps")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(handler=cmd_scale)

    p = sub.add_parser(
        "remove", help="drain named slaves (tasks stop at a batch boundary, go on elsewhere), then turn them off"
    )
    p.add_argument("nodes", nargs="+", metavar="NODE", help="node ids, as `cluster status` lists them")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(handler=cmd_remove)

    p = sub.add_parser("stop", help="stop every engine, slave and the controller; history is kept")
    p.add_argument(
        "--all",
        action="store_true",
        help="also every node this tool tagged in the provider for this master (aws: every cluster of "
        "this user@host in the region); lists them and asks first",
    )
    p.add_argument("--any-owner", action="store_true", help="with --all: other masters' (users') clusters too")
    p.add_argument("--yes", action="store_true", help="with --all: do not ask (needed without a terminal)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_stop)


def cmd_start(args, ctx: Context) -> int:
    cluster = ctx.cluster()
    ctx.err_console.print(f"starting cluster {cluster.name!r} ({args.provider or ctx.config.cluster.provider}) ...")
    began = time.time()
    status = cluster.start(
        slaves=args.slaves,
        provider=args.provider,
        min_slaves=args.min_slaves,
        max_slaves=args.max_slaves,
        idle_minutes=args.idle_minutes,
        fresh=args.fresh,
    )
    for event in status.events:  # after a master restart: what was adopted, lost, added
        if event.kind == "adopt" and event.at >= began:
            ctx.err_console.print(event.detail, markup=False, highlight=False, soft_wrap=True)
    if args.json:
        ctx.emit_json(status)
    else:
        show_status(ctx, status)
    return 0


def cmd_status(args, ctx: Context) -> int:
    status = ctx.cluster().status()
    if args.json:
        ctx.emit_json(status)
    else:
        show_status(ctx, status)
    return 0


def show_status(ctx: Context, status) -> None:
    if status.state in ("none", "stopped"):
        ctx.say(f"cluster {status.name!r}: not running" + (f" (last error: {status.error})" if status.error else ""))
        return
    ctx.say(
        f"cluster {status.name!r} ({status.provider}): {status.state}, up {duration(status.uptime_s)}, "
        f"controller pid {status.controller.get('pid')} {status.controller.get('state')}"
    )
    ctx.say(f"connection file: {status.url_file}")
    if status.hint:
        ctx.say(status.hint)
    if status.price_per_hour:
        ctx.say(f"cost: ${status.price_per_hour:.3f}/h, ${status.cost_so_far:.3f} so far")
    scaling = status.autoscale or {}
    size = f"slaves: target {status.target}, current {status.current}, pending {status.pending}"
    if scaling.get("max_slaves"):
        size += (
            f"; autoscaling {scaling['min_slaves']}..{scaling['max_slaves']}, idle slaves off after "
            f"{scaling['idle_minutes']:g} min"
        )
    size += "; lost slaves replaced" if status.replace_lost else "; lost slaves not replaced"
    if status.keeper.get("pid"):
        size += f" (keeper pid {status.keeper['pid']} {status.keeper.get('state')})"
    ctx.say(size)
    ctx.emit_table(
        "engines",
        ["id", "node", "host", "pid", "device", "threads", "state", "leaving", "uptime"],
        [
            [e.id, e.node_id, e.host, e.pid, e.device, e.threads, e.state, e.leaving, duration(e.uptime_s)]
            for e in status.engines
        ],
    )
    if status.nodes:
        now = time.time()
        up = {
            n.node_id: max(0.0, (n.terminated_at or now) - n.launched_at) if n.launched_at else None
            for n in status.nodes
        }
        stops = {k: f"in {duration(max(0.0, v - now))}" for k, v in (status.idle_stops or {}).items()}
        columns = ["node", "state", "engines", "uptime", "idle stop", "note"]
        rows = [
            [n.node_id, n.state, n.engines, duration(up[n.node_id]), stops.get(n.node_id, ""), n.note or ""]
            for n in status.nodes
        ]
        if status.provider != "local":
            columns += ["instance", "type", "zone", "market", "$/h", "cost", "public ip"]
            for row, n in zip(rows, status.nodes):
                row += [
                    n.instance_id,
                    n.instance_type,
                    n.zone,
                    n.market,
                    f"{n.price_per_hour:.3f}",
                    f"${n.price_per_hour * (up[n.node_id] or 0) / 3600:.3f}",
                    n.public_ip,
                ]
        ctx.emit_table("nodes", columns, rows)
    if status.events:
        ctx.emit_table(
            "resize decisions and faults (newest last)",
            ["at", "kind", "what and why"],
            [[time.strftime("%H:%M:%S", time.localtime(e.at)), e.kind, e.detail] for e in status.events],
        )


def cmd_stop(args, ctx: Context) -> int:
    if args.any_owner and not args.all:
        raise UsageError("--any-owner widens --all: give both (`cluster stop --all --any-owner`)")
    cluster = ctx.cluster()
    only = None
    if args.all:
        plan = cluster.stop_plan(all_clusters=True, any_owner=args.any_owner)
        if plan:
            from rich.table import Table

            table = Table(title=f"stop --all will end ({len(plan)})", title_justify="left")
            for column in ("kind", "id", "cluster", "owner", "detail"):
                table.add_column(column)
            for item in plan:
                table.add_row(item.kind, item.id, item.cluster, item.owner, item.detail)
            ctx.err_console.print(table)
            if not args.yes:
                if not ctx.can_ask():
                    raise UsageError(
                        f"stop --all would end the {len(plan)} resource(s) listed above and there is "
                        f"no terminal to ask on; run it again with --yes to confirm"
                    )
                if not ctx.ask(f"end these {len(plan)} resource(s)?"):
                    ctx.err_console.print("cancelled: nothing was stopped")
                    return int(ExitStatus.ERROR)
        only = {item.id for item in plan}
    stopped = cluster.stop(all_clusters=args.all, any_owner=args.any_owner, only=only)
    record, released = stopped.cluster, stopped.released
    if args.json:
        ctx.emit_json(stopped.to_dict())
        return 0
    if released:
        ctx.say(f"released by tag: {', '.join(released)}")
    if record is None:
        ctx.say(f"no cluster {ctx.config.cluster.name!r} is running; nothing to stop")
    else:
        ctx.say(f"cluster {record.name!r} stopped; its runs stay in {ctx.config.state_dir}")
    return 0


def cmd_scale(args, ctx: Context) -> int:
    cluster = ctx.cluster()
    ctx.err_console.print(f"scaling cluster {cluster.name!r} to {args.slaves} slave(s) ...")
    status = cluster.scale(args.slaves)
    ctx.emit_json(status) if args.json else show_status(ctx, status)
    return 0


def cmd_remove(args, ctx: Context) -> int:
    cluster = ctx.cluster()
    ctx.err_console.print(f"draining and removing {', '.join(args.nodes)} ...")
    status = cluster.remove(args.nodes)
    ctx.emit_json(status) if args.json else show_status(ctx, status)
    return 0
