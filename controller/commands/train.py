"""train, runs: training runs and their history (controller/work/training.py)."""

from __future__ import annotations

import time

from controller.commands.context import Context
from controller.errors import UsageError
from controller.formatting import epochs_progress, percent

TRAIN_FLAGS = (
    "epochs",
    "lr",
    "l1",
    "batch_size",
    "optimizer",
    "momentum",
    "seed",
    "device",
    "conv1",
    "conv2",
    "hidden",
    "subset",
    "schedule",
)


def register(sub) -> None:
    p = sub.add_parser("train", help="one training run on a free engine, with live progress")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float, help="learning rate (peak of the one-cycle schedule)")
    p.add_argument(
        "--l1",
        type=float,
        help="L1 penalty lambda; each batch's loss += lambda * sum(|w|) / training batches per epoch "
        "(the paper's scaling)",
    )
    p.add_argument("--batch-size", type=int)
    p.add_argument("--optimizer", help="adam or sgd")
    p.add_argument("--momentum", type=float, help="SGD momentum")
    p.add_argument("--schedule", help="onecycle or constant")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--conv1", type=int, help="filters of the first convolution")
    p.add_argument("--conv2", type=int, help="filters of the second convolution")
    p.add_argument("--hidden", type=int, help="units of the hidden layer")
    p.add_argument("--subset", type=int, help="train on the first N images only (0 = all)")
    p.add_argument("--resume", metavar="RUN_ID", help="continue an interrupted run from its last checkpoint")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="one model on every engine at once (torch.distributed: gloo on CPU, NCCL on GPU); "
        "--batch-size stays the global batch, split over the engines",
    )
    p.add_argument(
        "--engines",
        metavar="ID[,ID...]",
        help="with --distributed (or --resume of a distributed run): these engine ids only",
    )
    p.add_argument("--json", action="store_true", help="print the run record as JSON")
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("runs", help="past runs from the store: id, params, accuracy, time")
    p.add_argument("--limit", type=int, default=20, help="newest N runs (0 = all)")
    p.add_argument("--sweep", metavar="SWEEP_ID", help="only the trials of this sweep")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_runs)


def cmd_train(args, ctx: Context) -> int:
    from controller.work.progress import RunProgress

    cluster = ctx.cluster()
    overrides = {name: getattr(args, name) for name in TRAIN_FLAGS if getattr(args, name) is not None}
    if args.resume and overrides:
        raise UsageError(
            f"--resume continues a run with its own parameters; drop "
            f"{', '.join('--' + k.replace('_', '-') for k in overrides)}"
        )
    engines = None
    if args.engines is not None:
        from controller.work.distributed import parse_engine_ids

        engines = parse_engine_ids(args.engines)
    if args.resume and args.distributed:
        raise UsageError("--resume continues a distributed run distributed; drop --distributed")
    with RunProgress(ctx.err_console) as progress:
        try:
            if args.resume:
                result = cluster.resume(args.resume, progress=progress, engines=engines)
            else:
                result = cluster.train(progress=progress, distributed=args.distributed, engines=engines, **overrides)
        except KeyboardInterrupt:
            run = cluster.store.runs.get(cluster.current_run_id) if cluster.current_run_id else None
            if run is not None and run.state == "interrupted":
                at = epochs_progress(run.epochs_done, run.params.get("epochs"), run.batches_done, run.epoch_batches)
                ctx.err_console.print(
                    f"run {run.id} interrupted at epoch {at}; continue it with `cluster train --resume {run.id}`"
                )
            raise
    run = result.run
    if args.json:
        ctx.emit_json(result)
    else:
        distributed = run.params.get("distributed")
        where = (
            f"engines {','.join(map(str, distributed['engines']))} (data-parallel, global batch "
            f"{distributed['global_batch']})"
            if distributed
            else f"engine {run.engine_id}"
        )
        ctx.say(
            f"run {run.id} {run.state}: test accuracy {percent(run.test_accuracy)}, "
            f"validation {percent(run.val_accuracy)}, {run.images_per_s or 0:,.0f} images/s, "
            f"{run.seconds:.1f} s on {where} ({run.device})"
        )
    return 0


def cmd_runs(args, ctx: Context) -> int:
    runs = ctx.cluster().runs(limit=args.limit or None, sweep_id=args.sweep)
    if args.json:
        ctx.emit_json({"runs": runs})
        return 0
    rows = []
    for run in runs:
        p = run.params
        params = (
            f"epochs={p.get('epochs')} lr={p.get('lr')} l1={p.get('l1')} bs={p.get('batch_size')} "
            f"{p.get('optimizer')} {p.get('conv1')}/{p.get('conv2')}/{p.get('hidden')}"
        )
        rows.append(
            [
                run.id,
                time.strftime("%Y-%m-%d %H:%M", time.localtime(run.created_at)),
                run.state,
                epochs_progress(run.epochs_done, p.get("epochs"), run.batches_done, run.epoch_batches),
                params,
                percent(run.val_accuracy),
                percent(run.test_accuracy),
                f"{run.seconds:.1f}",
            ]
        )
    ctx.emit_table("runs", ["id", "started", "state", "epochs", "params", "val acc", "test acc", "seconds"], rows)
    return 0
