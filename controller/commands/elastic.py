"""scale, remove: resize a running cluster (controller/cluster)."""
from __future__ import annotations

from controller.commands.context import Context
from controller.commands.core import show_status


def register(sub) -> None:
    p = sub.add_parser("scale", help="turn slaves on or off until N serve; removed ones are drained first")
    p.add_argument("slaves", type=int, metavar="N", help="number of slaves the cluster keeps")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(handler=cmd_scale)

    p = sub.add_parser("remove", help="drain named slaves (tasks stop at a batch boundary, go on elsewhere), "
                                      "then turn them off")
    p.add_argument("nodes", nargs="+", metavar="NODE", help="node ids, as `cluster status` lists them")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(handler=cmd_remove)


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
