"""sweep, sweeps, results: hyperparameter and topology sweeps over every engine."""

from __future__ import annotations

import time

from controller.commands.context import Context
from controller.errors import UsageError
from controller.formatting import duration, percent

SHARED_FLAGS = ("epochs", "subset", "seed")


def register(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="train many settings at once, one per engine, with Optuna (grid, random, TPE) and pruning",
        description="Forms of --param: NAME=V1,V2,... | NAME=log:LO:HI | NAME=uniform:LO:HI | NAME=int:LO:HI | "
        "NAME=float:LO:HI; NAME is one of lr, l1, momentum, batch_size, optimizer, conv1, conv2, "
        "hidden, epochs. Ctrl-C leaves the sweep resumable with --resume.",
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=FORM",
        help="a parameter to vary (repeatable), e.g. lr=0.01,0.05 or lr=log:1e-3:1e-1 or hidden=int:50:500",
    )
    p.add_argument("--preset", help="a named sweep: paper (L1 lambda 0, 1e-5 ... 100 on the default CNN)")
    p.add_argument("--trials", type=int, help="number of trials (default: the grid's size, or 20 for a search)")
    p.add_argument(
        "--sampler",
        choices=("grid", "random", "tpe"),
        help="default: grid when every parameter is a list of values, else tpe",
    )
    p.add_argument(
        "--pruner",
        choices=("none", "median", "asha"),
        default=None,
        help="early stopping between epochs (default: none)",
    )
    p.add_argument("--epochs", type=int, help="epoch budget of every trial (default: [training] epochs)")
    p.add_argument("--subset", type=int, help="train on the first N images only (0 = all)")
    p.add_argument("--seed", type=int, help="seed of the sampler (default 0; the trials train with [training] seed)")
    p.add_argument("--resume", metavar="SWEEP_ID", help="continue a sweep whose master was stopped")
    p.add_argument("--json", action="store_true", help="print the sweep record and its trials as JSON")
    p.set_defaults(handler=cmd_sweep)

    p = sub.add_parser("sweeps", help="past sweeps: id, space, trials, best")
    p.add_argument("--limit", type=int, default=20, help="newest N sweeps (0 = all)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_sweeps)

    p = sub.add_parser("results", help="a sweep's trials ranked by validation accuracy, and the best configuration")
    p.add_argument("sweep_id", metavar="SWEEP_ID")
    p.add_argument("--json", action="store_true", help='{"trials": [...], "best": {...}} with Optuna\'s state names')
    p.set_defaults(handler=cmd_results)


def cmd_sweep(args, ctx: Context) -> int:
    from controller.work.sweep import runner
    from controller.work.sweep.view import SweepProgress

    shared = {name: getattr(args, name) for name in SHARED_FLAGS if getattr(args, name) is not None}
    if args.resume:
        given = [
            f"--{k}"
            for k in ("param", "preset", "trials", "sampler", "pruner", *SHARED_FLAGS)
            if getattr(args, k) not in (None, [])
        ]
        if given:
            raise UsageError(f"--resume {args.resume} continues a sweep with its own settings; drop {', '.join(given)}")
    else:
        # every spec is checked before anything connects or starts
        runner.plan(
            args.param,
            preset=args.preset,
            trials=args.trials,
            sampler=args.sampler,
            pruner=args.pruner or "none",
            overrides={k: v for k, v in shared.items() if k != "seed"},
        )
    cluster = ctx.cluster()
    console = ctx.err_console
    seed = shared.pop("seed", 0)

    running: dict[str, str] = {}  # the sweep this command is on, for the Ctrl-C hint

    def view(source):
        running["sweep_id"] = source.sweep_id
        return SweepProgress(
            source, console, engine_pids={e.pid: e.engine_id for e in cluster.store.engines.of(cluster.record.id)}
        )

    try:
        if args.resume:
            result = cluster.sweep(resume=args.resume, progress=view)
        else:
            result = cluster.sweep(
                args.param,
                preset=args.preset,
                trials=args.trials,
                sampler=args.sampler,
                pruner=args.pruner or "none",
                seed=seed,
                progress=view,
                **shared,
            )
    except KeyboardInterrupt:
        sweep_id = running.get("sweep_id") or args.resume
        if sweep_id:
            console.print(f"sweep {sweep_id} interrupted; continue it with `cluster sweep --resume {sweep_id}`")
        raise
    if args.json:
        ctx.emit_json(result.to_dict() | {"makespan_s": result.makespan_s})
    else:
        show_results(ctx, result)
        ctx.say(f"sweep {result.sweep_id} finished in {duration(result.makespan_s)}")
    return 0


def cmd_sweeps(args, ctx: Context) -> int:
    found = ctx.cluster().sweeps(limit=args.limit or None)
    if args.json:
        ctx.emit_json({"sweeps": [r.to_dict() for r in found]})
        return 0
    rows = []
    for result in found:
        sweep, counts, best = result.sweep, result.counts(), result.best
        finished = counts["COMPLETE"] + counts["PRUNED"] + counts["FAIL"]
        rows.append(
            [
                sweep.id,
                time.strftime("%Y-%m-%d %H:%M", time.localtime(sweep.created_at)),
                sweep.shown_state,
                sweep.search_space.describe(),
                f"{sweep.sampler}/{sweep.pruner}",
                f"{finished}/{sweep.n_trials} ({counts['PRUNED']} pruned, {counts['FAIL']} failed)",
                f"#{best.number} {percent(best.val_accuracy)}" if best else "-",
            ]
        )
    ctx.emit_table("sweeps", ["id", "started", "state", "space", "sampler/pruner", "trials", "best (val)"], rows)
    return 0


def cmd_results(args, ctx: Context) -> int:
    result = ctx.cluster().results(args.sweep_id)
    if args.json:
        ctx.emit_json(result.to_dict())
    else:
        show_results(ctx, result)
    return 0


def show_results(ctx: Context, result) -> None:
    names = result.sweep.search_space.names
    rows = []
    for rank, t in enumerate(result.trials, 1):
        error = (t.error or "").strip().splitlines()[-1:] if t.state == "FAIL" else []
        rows.append(
            [
                rank,
                t.number,
                t.state,
                *(_fmt(t.params.get(n)) for n in names),
                percent(t.val_accuracy),
                percent(t.test_accuracy),
                f"{t.epochs_done}/{t.epochs_budget}",
                ",".join(map(str, t.engines)) or "-",
                f"{t.seconds:.1f}",
                error[0] if error else "",
            ]
        )
    sweep = result.sweep
    ctx.emit_table(
        f"sweep {sweep.id} ({sweep.shown_state}): {sweep.search_space.describe()}, "
        f"{sweep.sampler} sampler, {sweep.pruner} pruner",
        ["rank", "trial", "state", *names, "val acc", "test acc", "epochs", "engines", "seconds", "error"],
        rows,
    )
    best = result.best
    if best is None:
        ctx.say("no trial completed yet")
    else:
        ctx.say(
            f"best: trial {best.number} ({' '.join(f'{k}={_fmt(v)}' for k, v in best.params.items())}): "
            f"validation {percent(best.val_accuracy)}, test {percent(best.test_accuracy)}"
        )


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
