"""`cluster report`: bench records from the store as Markdown, CSV, JSON or one self-contained HTML file.

Nothing is re-run: a report reads ``bench_measurements``, ``bench_engines`` and
``bench_trials`` (see :mod:`controller.work.bench.records`), and imports nothing else of
the bench: no scheduler, ipyparallel or torch.  The same store always gives the
same bytes: rows come in a fixed order, times are the stored ones shown in UTC,
no "generated at" line, and the PNGs carry no software or date metadata.

Scaling is computed within one bench (one ``cluster bench --engines 1,2,4``):
speedup = epochs/min on N engines ÷ epochs/min on the bench's smallest engine
count, efficiency = speedup ÷ (N ÷ that smallest count).
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import io
import json
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from controller.errors import UsageError
from controller.formatting import percent
from controller.store import Store
from controller.work.bench.records import PAPER_EPOCHS_PER_MIN, BenchEngine, BenchRecord, BenchTable, BenchTrial

FORMATS = ("md", "csv", "json", "html")

# the table users choose a cloud by, column for column, then what it rests on
COST_COLUMNS = ["Cloud Provider", "Region", "GPU", "Image", "Run time (secs)", "Cost ($/hr)", "Cost / run"]
CSV_FIELDS = [
    "id",
    "bench_id",
    "workload",
    "engines",
    "provider",
    "region",
    "zone",
    "instance_type",
    "gpu",
    "image",
    "market",
    "threads",
    "wall_s",
    "warmup_s",
    "dispatch_s",
    "runs",
    "epochs",
    "images",
    "images_per_s",
    "epochs_per_min",
    "accuracy",
    "price_per_hour",
    "cost",
    "speedup",
    "efficiency",
    "baseline_engines",
    "torch",
    "cuda",
    "state",
    "created_at",
    "paper_epochs_per_min",
]
PAPER_UNIT = f"50k-image epochs/min (paper: {PAPER_EPOCHS_PER_MIN})"
PROVIDER_NAMES = {"aws": "AWS", "local": "local", "ssh": "ssh"}


@dataclass
class Scaling:
    measurement_id: str
    baseline_engines: int
    speedup: float
    efficiency: float


@dataclass
class ReportData:
    records: list[BenchRecord]
    scaling: dict[str, Scaling]  # by measurement id; failed measurements have none
    engines: dict[str, list[BenchEngine]] = field(default_factory=dict)
    trials: dict[str, list[BenchTrial]] = field(default_factory=dict)


def collect(store: Store, bench_ids: Optional[Sequence[str]] = None, workload: Optional[str] = None) -> ReportData:
    bench = BenchTable(store)
    records = bench.records(bench_ids, workload)
    if not records:
        which = f" for {', '.join(bench_ids)}" if bench_ids else ""
        which += f" of workload {workload}" if workload else ""
        raise UsageError(f"no benchmark records{which} in {store.path}; run `cluster bench` first")
    return ReportData(
        records=records,
        scaling=scaling(records),
        engines={r.id: bench.engines(r.id) for r in records},
        trials={r.id: bench.trials(r.id) for r in records},
    )


def scaling(records: Sequence[BenchRecord]) -> dict[str, Scaling]:
    groups: dict[tuple[str, str], list[BenchRecord]] = {}
    for record in records:
        groups.setdefault((record.bench_id, record.workload), []).append(record)
    result = {}
    for group in groups.values():
        completed = [r for r in group if r.state == "completed" and r.epochs_per_min > 0]
        if not completed:
            continue
        base = min(completed, key=lambda r: (r.engines, r.id))
        for record in completed:
            speedup = record.epochs_per_min / base.epochs_per_min
            ideal = record.engines / base.engines
            result[record.id] = Scaling(record.id, base.engines, speedup, speedup / ideal)
    return result


def render(data: ReportData, fmt: str) -> str:
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return {"md": to_markdown, "csv": to_csv, "json": to_json, "html": to_html}[fmt](data)


def report(
    store: Store, fmt: str = "md", bench_ids: Optional[Sequence[str]] = None, workload: Optional[str] = None
) -> str:
    """The report text of the store's bench records in ``fmt`` (md, csv, json, html)."""
    return render(collect(store, bench_ids, workload), fmt)


# cells ----------------------------------------------------------------------------
def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(timestamp))


def _text(value: Any) -> str:
    return "-" if value in (None, "") else str(value)


def _engines(n: int) -> str:
    return f"{n} engine" if n == 1 else f"{n} engines"


def _money(value: float, places: int) -> str:
    return f"${value:.{places}f}"


def cost_rows(data: ReportData) -> tuple[list[str], list[list[str]]]:
    columns = COST_COLUMNS + ["Workload", "Engines", "Instance type"]
    rows = [
        [
            PROVIDER_NAMES.get(r.provider, r.provider),
            _text(r.region or r.zone),
            _text(r.gpu),
            _text(r.image),
            f"{r.wall_s:.1f}",
            _money(r.price_per_hour, 3),
            _money(r.cost, 4),
            r.workload,
            str(r.engines),
            _text(r.instance_type),
        ]
        for r in data.records
    ]
    return columns, rows


def throughput_rows(data: ReportData) -> tuple[list[str], list[list[str]]]:
    columns = [
        "Bench",
        "Workload",
        "Engines",
        "Run time (secs)",
        "Images/s",
        "Epochs/min",
        PAPER_UNIT,
        "Speedup",
        "Efficiency",
        "Accuracy",
        "Runs",
        "Epochs",
        "State",
    ]
    rows = []
    for r in data.records:
        s = data.scaling.get(r.id)
        rows.append(
            [
                r.bench_id,
                r.workload,
                str(r.engines),
                f"{r.wall_s:.1f}",
                f"{r.images_per_s:,.0f}",
                f"{r.epochs_per_min:.2f}",
                f"{r.paper_epochs_per_min:.2f}",
                f"{s.speedup:.2f}x" if s else "-",
                f"{s.efficiency:.0%}" if s else "-",
                percent(r.accuracy),
                str(r.runs),
                str(r.epochs),
                r.state,
            ]
        )
    return columns, rows


def engine_rows(data: ReportData) -> tuple[list[str], list[list[str]]]:
    columns = [
        "Measurement",
        "Engine",
        "Host",
        "Device",
        "CPU",
        "Threads",
        "Tasks",
        "Busy (secs)",
        "Images/s (training)",
        "$/hr share",
        "torch",
        "CUDA",
    ]
    rows = [
        [
            r.id,
            str(e.engine_id),
            e.host,
            e.device,
            _text(e.cpu),
            str(e.threads),
            str(e.tasks),
            f"{e.busy_s:.1f}",
            f"{e.images_per_s:,.0f}",
            _money(e.price_per_hour, 3),
            _text(e.torch),
            _text(e.cuda),
        ]
        for r in data.records
        for e in data.engines[r.id]
    ]
    return columns, rows


def ranked_trials(trials: Sequence[BenchTrial]) -> list[BenchTrial]:
    """Best validation accuracy first; unfinished trials last; ties by trial number."""
    return sorted(trials, key=lambda t: (t.val_accuracy is None, -(t.val_accuracy or 0.0), t.trial))


def sweep_rows(data: ReportData, record: BenchRecord) -> tuple[list[str], list[list[str]]]:
    columns = ["Rank", "Trial", "λ (L1)", "Val accuracy", "Test accuracy", "Seconds", "Engine", "Run", "State"]
    rows = [
        [
            str(rank),
            str(t.trial),
            "-" if t.l1 is None else f"{t.l1:g}",
            percent(t.val_accuracy),
            percent(t.test_accuracy),
            f"{t.seconds:.1f}",
            _text(t.engine_id),
            t.run_id,
            t.state,
        ]
        for rank, t in enumerate(ranked_trials(data.trials[record.id]), 1)
    ]
    return columns, rows


def sweeps(data: ReportData) -> list[BenchRecord]:
    """Measurements that were sweeps (more than one trial): their ranking is worth a table."""
    return [r for r in data.records if len(data.trials.get(r.id, [])) > 1]


# Markdown ---------------------------------------------------------------------------
def _md_table(columns: list[str], rows: list[list[str]]) -> str:
    def cell(value: str) -> str:
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, columns)) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def _summary_line(data: ReportData) -> str:
    first, last = data.records[0].created_at, data.records[-1].created_at
    benches = sorted({r.bench_id for r in data.records})
    return (
        f"{len(data.records)} measurement(s) from {len(benches)} bench(es), "
        f"{_utc(first)} to {_utc(last)}. Cost / run = $/hr × run time; speedup and efficiency are "
        f"relative to the smallest engine count of the same bench."
    )


def to_markdown(data: ReportData) -> str:
    parts = [
        "# Benchmark report",
        "",
        _summary_line(data),
        "",
        "## Cost per run",
        "",
        _md_table(*cost_rows(data)),
        "",
        "## Throughput, scaling and accuracy",
        "",
        _md_table(*throughput_rows(data)),
        "",
        "## Engines",
        "",
        _md_table(*engine_rows(data)),
    ]
    for record in sweeps(data):
        parts += [
            "",
            f"## Sweep {record.id} ({record.workload}, {_engines(record.engines)}): ranked",
            "",
            _md_table(*sweep_rows(data, record)),
        ]
    return "\n".join(parts) + "\n"


# CSV and JSON -------------------------------------------------------------------------
def _flat(data: ReportData, record: BenchRecord) -> dict[str, Any]:
    values = record.to_dict()
    s = data.scaling.get(record.id)
    values.update(
        speedup=s.speedup if s else None,
        efficiency=s.efficiency if s else None,
        baseline_engines=s.baseline_engines if s else None,
    )
    return values


def to_csv(data: ReportData) -> str:
    """One row per measurement, raw numbers (seconds, $/hour, $), for spreadsheets and diffs."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for record in data.records:
        row = _flat(data, record)
        writer.writerow({k: "" if row[k] is None else row[k] for k in CSV_FIELDS})
    return buffer.getvalue()


def to_json(data: ReportData) -> str:
    document = {
        "columns": COST_COLUMNS,
        "measurements": [_flat(data, r) for r in data.records],
        "engines": [dataclasses.asdict(e) for r in data.records for e in data.engines[r.id]],
        "sweeps": {r.id: [dataclasses.asdict(t) for t in ranked_trials(data.trials[r.id])] for r in sweeps(data)},
    }
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


# HTML ---------------------------------------------------------------------------------
STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 72em;
       color: #222; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; margin: 0 1em 1em 0; }
figcaption { font-size: 0.85em; color: #555; }
"""


def _html_table(columns: list[str], rows: list[list[str]]) -> str:
    def numeric(value: str) -> bool:
        return value[:1].isdigit() or value[:1] in "$-" and value[1:2].isdigit()

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "\n".join(
        "<tr>"
        + "".join(f'<td class="num">{html.escape(v)}</td>' if numeric(v) else f"<td>{html.escape(v)}</td>" for v in row)
        + "</tr>"
        for row in rows
    )
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _png(figure) -> str:
    buffer = io.BytesIO()
    # no Software/date chunks: the same data gives the same bytes
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def plots(data: ReportData) -> list[tuple[str, str]]:
    """(caption, base64 PNG) for speedup/efficiency vs engines, accuracy vs wall time, each sweep."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or state in a library

    figures = []
    groups: dict[tuple[str, str], list[BenchRecord]] = {}
    for record in data.records:
        groups.setdefault((record.bench_id, record.workload), []).append(record)

    fig = Figure(figsize=(9, 3.4))
    speed, eff = fig.subplots(1, 2)
    top = 1
    for (bench_id, workload), group in groups.items():
        group = sorted((r for r in group if r.id in data.scaling), key=lambda r: r.engines)
        if not group:
            continue
        xs = [r.engines for r in group]
        top = max(top, *xs)
        label = f"{workload} ({bench_id})"
        speed.plot(xs, [data.scaling[r.id].speedup for r in group], marker="o", label=label)
        eff.plot(xs, [data.scaling[r.id].efficiency * 100 for r in group], marker="o", label=label)
    speed.plot([1, top], [1, top], linestyle="--", color="grey", label="ideal (from 1 engine)")
    speed.set(xlabel="engines", ylabel="speedup (×)", title="Speedup against engine count")
    eff.axhline(100, linestyle="--", color="grey")
    eff.set(xlabel="engines", ylabel="efficiency (%)", title="Efficiency against engine count", ylim=(0, 110))
    for axes in (speed, eff):
        axes.set_xticks(sorted({r.engines for r in data.records if r.id in data.scaling}) or [1])
        axes.grid(alpha=0.3)
    speed.legend(fontsize=7)
    fig.tight_layout()
    figures.append(
        ("Speedup and efficiency against engine count (epochs/min relative to the smallest count)", _png(fig))
    )

    fig = Figure(figsize=(6, 3.6))
    axes = fig.subplots()
    for (bench_id, workload), group in groups.items():
        points = [(r.wall_s, r.accuracy * 100, r.engines) for r in group if r.accuracy is not None]
        if points:
            axes.scatter([p[0] for p in points], [p[1] for p in points], label=f"{workload} ({bench_id})")
            for wall, acc, n in points:
                axes.annotate(f"{n}e", (wall, acc), textcoords="offset points", xytext=(4, 4), fontsize=7)
    axes.set(xlabel="wall time (s)", ylabel="test accuracy (%)", title="Accuracy against wall time")
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=7)
    fig.tight_layout()
    figures.append(("Final test accuracy against wall time; labels are engine counts", _png(fig)))

    for record in sweeps(data):
        trials = [t for t in data.trials[record.id] if t.val_accuracy is not None and t.l1 is not None]
        if not trials:
            continue
        fig = Figure(figsize=(6, 3.4))
        axes = fig.subplots()
        # λ = 0 cannot sit on a log axis: it is drawn one decade left of the smallest positive λ
        lambdas = [t.l1 or 0.0 for t in trials]
        positive = [l1 for l1 in lambdas if l1 > 0]
        floor = min(positive) / 10 if positive else 1e-6
        l1_axis = [l1 if l1 > 0 else floor for l1 in lambdas]
        axes.plot(l1_axis, [(t.val_accuracy or 0) * 100 for t in trials], marker="o", label="validation")
        axes.plot(l1_axis, [(t.test_accuracy or 0) * 100 for t in trials], marker="s", label="test")
        axes.set_xscale("log")
        axes.set(
            xlabel=f"λ (L1); λ=0 drawn at {floor:g}",
            ylabel="accuracy (%)",
            title=f"Sweep {record.id}: accuracy against λ",
        )
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
        fig.tight_layout()
        figures.append(
            (
                f"Sweep {record.id} ({_engines(record.engines)}): accuracy against λ; throughput "
                f"{record.paper_epochs_per_min:.2f} 50,000-image epochs/min (the paper: "
                f"{PAPER_EPOCHS_PER_MIN} on 8 GPU servers)",
                _png(fig),
            )
        )
    return figures


def to_html(data: ReportData) -> str:
    """One self-contained page: inline CSS, tables, PNGs as data: URIs; no scripts, no network."""
    sections = [
        "<h2>Cost per run</h2>",
        _html_table(*cost_rows(data)),
        "<h2>Throughput, scaling and accuracy</h2>",
        _html_table(*throughput_rows(data)),
        "<h2>Plots</h2>",
    ]
    for caption, png in plots(data):
        sections.append(
            f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{png}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    sections += ["<h2>Engines</h2>", _html_table(*engine_rows(data))]
    for record in sweeps(data):
        sections += [
            f"<h2>Sweep {html.escape(record.id)} ({html.escape(record.workload)}, "
            f"{_engines(record.engines)}): ranked</h2>",
            _html_table(*sweep_rows(data, record)),
        ]
    body = "\n".join(sections)
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>Benchmark report</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"<h1>Benchmark report</h1>\n<p>{html.escape(_summary_line(data))}</p>\n{body}\n</body>\n</html>\n"
    )
