"""bench, report: measure a standard workload on the cluster; export what the store holds."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from controller.commands.context import Context
from controller.formatting import percent
from controller.work.bench.records import PAPER_EPOCHS_PER_MIN
from controller.work.bench.report import FORMATS, scaling
from controller.work.bench.workloads import WORKLOADS, parse_engine_counts


def register(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="run a standard workload on 1..N engines; record time, throughput, cost",
        description="Workloads: " + "; ".join(f"{w.name}: {w.description}" for w in WORKLOADS.values()),
    )
    p.add_argument("--workload", default="paper", choices=list(WORKLOADS), help="what to run (default: paper)")
    p.add_argument(
        "--engines",
        metavar="N[,N...]",
        help="engine counts to run it on, e.g. 1,2,4 for a scaling curve (default: every engine)",
    )
    p.add_argument("--epochs", type=int, help="epochs per run (default: the workload's)")
    p.add_argument("--subset", type=int, help="train on the first N training images only (0 = all)")
    p.add_argument("--json", action="store_true", help="print the records as JSON")
    p.set_defaults(handler=cmd_bench)

    p = sub.add_parser("report", help="export the stored bench records: md, csv, json or html (no re-run)")
    p.add_argument(
        "--format", default=None, choices=list(FORMATS), help="output format (default: from --out's suffix, else md)"
    )
    p.add_argument("--out", metavar="FILE", help="write here instead of stdout")
    p.add_argument("--bench", action="append", metavar="BENCH_ID", help="only this bench (repeatable)")
    p.add_argument("--workload", help="only this workload")
    p.set_defaults(handler=cmd_report)


def cmd_bench(args, ctx: Context) -> int:
    from controller.work.bench.view import BenchProgress  # the scheduler's sink: ipyparallel, only when a bench runs

    cluster = ctx.cluster()
    counts = parse_engine_counts(args.engines)
    with BenchProgress(ctx.err_console) as progress:
        result = cluster.bench(
            workload=args.workload, engines=counts, epochs=args.epochs, subset=args.subset, progress=progress
        )
    if args.json:
        ctx.emit_json(result)
        return 0
    ctx.emit_table(
        f"bench {result.bench_id}: {args.workload}",
        [
            "engines",
            "run time (s)",
            "images/s",
            "epochs/min",
            f"50k-image epochs/min (paper: {PAPER_EPOCHS_PER_MIN})",
            "speedup",
            "efficiency",
            "accuracy",
            "$/hr",
            "cost / run",
        ],
        summary_rows(result.records),
        caption=f"`cluster report --bench {result.bench_id}` exports it (md, csv, json, html)",
    )
    return 0


def summary_rows(records) -> list[list[str]]:
    scale = scaling(records)
    return [
        [
            r.engines,
            f"{r.wall_s:.1f}",
            f"{r.images_per_s:,.0f}",
            f"{r.epochs_per_min:.2f}",
            f"{r.paper_epochs_per_min:.2f}",
            f"{scale[r.id].speedup:.2f}x" if r.id in scale else "-",
            f"{scale[r.id].efficiency:.0%}" if r.id in scale else "-",
            percent(r.accuracy),
            f"${r.price_per_hour:.3f}",
            f"${r.cost:.4f}",
        ]
        for r in records
    ]


def cmd_report(args, ctx: Context) -> int:
    fmt = args.format or _format_from(args.out) or "md"
    text = ctx.cluster().report(fmt, bench_ids=args.bench, workload=args.workload)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        ctx.err_console.print(f"wrote {fmt} report to {out}")
    else:
        ctx.stdout.write(text)
    return 0


def _format_from(out: Optional[str]) -> Optional[str]:
    if not out:
        return None
    suffix = Path(out).suffix.lower().lstrip(".")
    return {"md": "md", "markdown": "md", "csv": "csv", "json": "json", "html": "html", "htm": "html"}.get(suffix)
