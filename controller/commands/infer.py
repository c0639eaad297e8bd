"""infer: apply a trained model to a whole split, spread over the engines."""

from __future__ import annotations

from controller.commands.context import Context
from controller.errors import UsageError
from controller.formatting import percent
from controller.work.bench.workloads import WORKLOADS

# spelled out rather than imported: building the parser must not import ipyparallel and torch
SPLITS = ("test", "val", "train")


def register(sub) -> None:
    p = sub.add_parser(
        "infer",
        help="predict a whole split with a trained model over the engines; accuracy, confusion, images/s",
        description="The split is cut into contiguous shards, one per engine (or --shards-per-engine); each "
        "engine loads the model once and keeps it for later calls; predictions come back in order.",
    )
    p.add_argument("--run", metavar="RUN_ID", help="the model of this run (its last checkpoint)")
    p.add_argument("--checkpoint", metavar="PATH", help="a checkpoint file instead of a run")
    p.add_argument(
        "--workload",
        choices=list(WORKLOADS),
        help="check the model is this workload's (MNIST for paper/mnist-cnn, CIFAR-10 for the others)",
    )
    p.add_argument("--split", default="test", choices=SPLITS, help="which split to predict (default: test)")
    p.add_argument("--engines", metavar="ID[,ID...]", help="these engine ids only (default: every engine)")
    p.add_argument("--shards-per-engine", type=int, default=1, help="more, smaller shards for load balance")
    p.add_argument(
        "--out", metavar="FILE", help="write the predictions: .csv (index, label, prediction, probabilities) or .npz"
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=cmd_infer)


def cmd_infer(args, ctx: Context) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from controller.work.distributed import parse_engine_ids

    if (args.run is None) == (args.checkpoint is None):
        raise UsageError("give one of --run RUN_ID or --checkpoint PATH")
    cluster = ctx.cluster()
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=ctx.err_console,
        transient=True,
        disable=not ctx.err_console.is_terminal,
    )
    task = bar.add_task(f"inference on {args.split}", total=None)
    with bar:
        result = cluster.infer(
            args.run,
            checkpoint=args.checkpoint,
            split=args.split,
            workload=args.workload,
            engines=parse_engine_ids(args.engines),
            shards_per_engine=args.shards_per_engine,
            out=args.out,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    summary = result.to_dict()
    summary["out"] = args.out
    if args.json:
        ctx.emit_json(summary)
        return 0
    ctx.say(
        f"{result.images:,} {args.split} images on engines {','.join(map(str, result.engines))} "
        f"({result.shards} shards): accuracy {percent(result.accuracy)}, {result.images_per_s:,.0f} images/s, "
        f"{result.seconds:.2f} s"
    )
    confusion = result.confusion()
    ctx.emit_table(
        "confusion (rows: label, columns: prediction)",
        ["label", *map(str, range(len(confusion)))],
        [[str(label), *row] for label, row in enumerate(confusion)],
    )
    if args.out:
        ctx.say(f"predictions written to {args.out}")
    return 0
