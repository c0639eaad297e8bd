"""`cluster report` from a fixture store: every format, the numbers, determinism, a self-contained HTML."""

from __future__ import annotations

import base64
import csv
import dataclasses
import io
import json
import re
import struct
import zlib
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

from controller.cli import main
from controller.errors import UsageError
from controller.store import Store
from controller.work.bench import BenchEngine, BenchRecord, BenchTable, BenchTrial
from controller.work.bench.report import COST_COLUMNS, CSV_FIELDS, FORMATS, report

JAN_1 = 1767225600.0  # 2026-01-01 00:00 UTC
PAPER_L1 = (0.0, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)
# validation accuracy per λ: the paper's shape, small penalties help a little, large ones hurt
PAPER_VAL = (0.981, 0.983, 0.985, 0.979, 0.962, 0.91, 0.62, 0.11, 0.10)


def paper_measurement(bench_id: str, engines: int, wall_s: float, price: float, created_at: float):
    measurement_id = f"{bench_id}-e{engines}"
    record = BenchRecord(
        id=measurement_id,
        bench_id=bench_id,
        workload="paper",
        engines=engines,
        provider="local",
        gpu="AMD EPYC (CPU)",
        market="local",
        threads=1,
        wall_s=wall_s,
        runs=9,
        epochs=9,
        images=9 * 50_000,
        images_per_s=9 * 50_000 / wall_s,
        epochs_per_min=9 / (wall_s / 60),
        accuracy=0.984,
        price_per_hour=price,
        cost=price * wall_s / 3600,
        torch="2.14.1",
        cuda="",
        params={"lr": 0.01},
        cluster_id=1,
        created_at=created_at,
    )
    engine_rows = [
        BenchEngine(
            measurement_id=measurement_id,
            engine_id=e,
            host="vm",
            node_id="local",
            device="cpu",
            cpu="AMD EPYC",
            threads=1,
            price_per_hour=price / engines,
            tasks=9 // engines + (e < 9 % engines),
            epochs=9 // engines,
            images=50_000 * (9 // engines),
            train_s=100.0 / engines,
            images_per_s=4000.0,
            torch="2.14.1",
        )
        for e in range(engines)
    ]
    trials = [
        BenchTrial(
            measurement_id=measurement_id,
            trial=i,
            run_id=f"r-{engines}{i:07d}",
            label=f"l1={l1:g}",
            l1=l1,
            lr=0.01,
            epochs=1,
            state="completed",
            val_accuracy=val,
            test_accuracy=val + 0.001,
            seconds=wall_s / 9,
            engine_id=i % engines,
        )
        for i, (l1, val) in enumerate(zip(PAPER_L1, PAPER_VAL))
    ]
    return record, engine_rows, trials


def build_fixture_store(state_dir: Path) -> Store:
    """Two benches: the paper sweep on 1 and 2 local engines ($0.40/h for both), VGG16 on one AWS spot GPU."""
    store = Store(state_dir)
    bench = BenchTable(store)
    # saved out of order on purpose: the report must sort
    bench.save(*paper_measurement("b-fixture1", 2, 72.0, 0.40, JAN_1 + 200))
    bench.save(*paper_measurement("b-fixture1", 1, 120.0, 0.20, JAN_1 + 60))
    vgg = BenchRecord(
        id="b-fixture2-e1",
        bench_id="b-fixture2",
        workload="cifar10-vgg16",
        engines=1,
        provider="aws",
        region="us-east-1",
        zone="us-east-1a",
        instance_type="g4dn.xlarge",
        gpu="Tesla T4",
        image="ami-0123456789abcdef0",
        market="spot",
        threads=4,
        wall_s=1800.0,
        runs=1,
        epochs=5,
        images=225_000,
        images_per_s=125.0,
        epochs_per_min=5 / 30,
        accuracy=0.8512,
        price_per_hour=0.526,
        cost=0.526 * 1800 / 3600,
        torch="2.14.1+cu130",
        cuda="13.0",
        params={"model": "vgg16"},
        cluster_id=2,
        created_at=JAN_1 + 3600,
    )
    bench.save(
        vgg,
        [
            BenchEngine(
                measurement_id=vgg.id,
                engine_id=0,
                host="ip-10-0-0-5",
                node_id="i-0abc",
                device="cuda:Tesla T4",
                gpu="Tesla T4",
                cpu="Intel Xeon",
                threads=4,
                instance_type="g4dn.xlarge",
                zone="us-east-1a",
                price_per_hour=0.526,
                tasks=5,
                epochs=5,
                images=225_000,
                train_s=1700.0,
                images_per_s=132.35,
                torch="2.14.1+cu130",
                cuda="13.0",
            )
        ],
        [
            BenchTrial(
                measurement_id=vgg.id,
                trial=0,
                run_id="r-vgg00001",
                label="vgg16",
                lr=0.05,
                epochs=5,
                state="completed",
                val_accuracy=0.85,
                test_accuracy=0.8512,
                seconds=1790.0,
                engine_id=0,
            )
        ],
    )
    return store


@pytest.fixture
def fixture_store(tmp_path) -> Iterator[Store]:
    store = build_fixture_store(tmp_path / "state")
    yield store
    store.close()


def md_rows(text: str, header_start: str) -> list[list[str]]:
    """The rows of the Markdown table whose header starts with ``header_start``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return [rows[0]] + rows[2:]


def test_markdown_has_the_cost_table_with_the_numbers(fixture_store):
    text = report(fixture_store, "md")
    table = md_rows(text, "| Cloud Provider")
    assert table[0][:7] == COST_COLUMNS
    # oldest first: paper on 1 engine, paper on 2, then VGG16
    assert [row[7:9] for row in table[1:]] == [["paper", "1"], ["paper", "2"], ["cifar10-vgg16", "1"]]
    assert table[3][:7] == ["AWS", "us-east-1", "Tesla T4", "ami-0123456789abcdef0", "1800.0", "$0.526", "$0.2630"]
    # cost = $/hour × hours: 0.20 × 120/3600 and 0.40 × 72/3600
    assert table[1][4:7] == ["120.0", "$0.200", "$0.0067"]
    assert table[2][4:7] == ["72.0", "$0.400", "$0.0080"]

    scaling = md_rows(text, "| Bench | Workload | Engines")
    by_engines = {(row[0], row[2]): row for row in scaling[1:]}
    # epochs/min 4.5 on one engine, 7.5 on two: speedup 1.67, efficiency 83 %
    assert by_engines[("b-fixture1", "1")][5:6] + by_engines[("b-fixture1", "1")][7:9] == ["4.50", "1.00x", "100%"]
    assert by_engines[("b-fixture1", "2")][5:6] + by_engines[("b-fixture1", "2")][7:10] == [
        "7.50",
        "1.67x",
        "83%",
        "98.40%",
    ]
    # beside epochs/min: the paper's unit, 50,000-image epochs per minute, from images/s
    record = {r.id: r for r in BenchTable(fixture_store).records(None, None)}["b-fixture1-e2"]
    assert scaling[0][6] == "50k-image epochs/min (paper: 14.59)"
    assert by_engines[("b-fixture1", "2")][6] == f"{record.images_per_s * 60 / 50_000:.2f}"
    assert "2026-01-01 00:01 UTC to 2026-01-01 01:00 UTC" in text

    sweep = md_rows(text, "| Rank")
    assert [row[2] for row in sweep[1:4]] == ["0.0001", "1e-05", "0"]  # best validation accuracy first
    assert sweep[1][3] == "98.50%"


def test_csv_has_every_field_and_raw_numbers(fixture_store):
    rows = list(csv.DictReader(io.StringIO(report(fixture_store, "csv"))))
    assert list(rows[0]) == CSV_FIELDS
    assert [r["id"] for r in rows] == ["b-fixture1-e1", "b-fixture1-e2", "b-fixture2-e1"]
    for row in rows:
        hours = float(row["wall_s"]) / 3600
        assert float(row["cost"]) == pytest.approx(float(row["price_per_hour"]) * hours)
    assert float(rows[2]["cost"]) == pytest.approx(0.263)
    assert float(rows[0]["cost"]) == pytest.approx(0.2 * 120 / 3600)
    assert float(rows[1]["speedup"]) == pytest.approx(7.5 / 4.5)
    assert float(rows[1]["efficiency"]) == pytest.approx(7.5 / 4.5 / 2)
    assert rows[2]["instance_type"] == "g4dn.xlarge" and rows[2]["zone"] == "us-east-1a"
    assert rows[2]["torch"] == "2.14.1+cu130" and rows[2]["cuda"] == "13.0"


def test_json_holds_measurements_engines_and_ranked_sweeps(fixture_store):
    document = json.loads(report(fixture_store, "json"))
    assert document["columns"] == COST_COLUMNS
    measurements = {r["id"]: r for r in document["measurements"]}
    assert measurements["b-fixture2-e1"]["cost"] == pytest.approx(0.526 * 0.5)
    assert measurements["b-fixture2-e1"]["price_per_hour"] == 0.526
    assert measurements["b-fixture1-e2"]["baseline_engines"] == 1
    assert len(document["engines"]) == 1 + 2 + 1
    assert {e["measurement_id"] for e in document["engines"]} == set(measurements)
    assert set(document["sweeps"]) == {"b-fixture1-e1", "b-fixture1-e2"}  # VGG16 was one run, not a sweep
    ranked = document["sweeps"]["b-fixture1-e2"]
    assert [t["l1"] for t in ranked[:3]] == [1e-4, 1e-5, 0.0]
    assert [t["val_accuracy"] for t in ranked] == sorted(PAPER_VAL, reverse=True)


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def png_chunks(data: bytes) -> list[bytes]:
    """Walk the PNG chunk by chunk, checking every CRC; returns the chunk types."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, kinds = 8, []
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind, body = data[position + 4 : position + 8], data[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length : position + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in chunk {kind!r}"
        kinds.append(kind)
        position += 12 + length
    return kinds


def test_html_is_self_contained_and_its_images_decode(fixture_store):
    from matplotlib import image as mpimg

    text = report(fixture_store, "html")
    page = _Page()
    page.feed(text)
    page.close()
    tags = [t for t, _ in page.tags]
    assert tags[0] == "html" and "table" in tags
    assert not {"script", "link", "iframe", "object", "embed"} & set(tags)
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", text, re.IGNORECASE)
    assert "@import" not in text and "url(" not in text
    for tag, attrs in page.tags:
        assert "href" not in attrs, f"<{tag}> links out: {attrs['href']}"
    images = [attrs["src"] for tag, attrs in page.tags if tag == "img"]
    assert len(images) == 2 + 2  # scaling, accuracy vs time, one per paper sweep
    for src in images:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        kinds = png_chunks(data)
        assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"tEXt" not in kinds
        pixels = mpimg.imread(io.BytesIO(data), format="png")
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert pixels.std() > 0  # something is drawn
    assert "<td>AWS</td>" in text and '<td class="num">$0.2630</td>' in text


def test_same_store_same_report(tmp_path):
    first = build_fixture_store(tmp_path / "a")
    second = build_fixture_store(tmp_path / "b")
    try:
        for fmt in FORMATS:
            out = report(first, fmt)
            assert out == report(first, fmt), f"{fmt}: two exports of one store differ"
            assert out == report(second, fmt), f"{fmt}: two stores with the same records differ"
    finally:
        first.close()
        second.close()


def test_filters_and_an_empty_store(fixture_store, tmp_path):
    only_vgg = list(csv.DictReader(io.StringIO(report(fixture_store, "csv", workload="cifar10-vgg16"))))
    assert [r["id"] for r in only_vgg] == ["b-fixture2-e1"]
    one_bench = list(csv.DictReader(io.StringIO(report(fixture_store, "csv", bench_ids=["b-fixture1"]))))
    assert [r["engines"] for r in one_bench] == ["1", "2"]
    with Store(tmp_path / "empty") as empty, pytest.raises(UsageError, match="run `cluster bench` first"):
        report(empty, "md")
    with pytest.raises(UsageError, match="--format"):
        report(fixture_store, "pdf")


def test_a_failed_measurement_has_no_speedup(tmp_path):
    with Store(tmp_path / "state") as store:
        record, engines, trials = paper_measurement("b-failed", 1, 30.0, 0.0, JAN_1)
        record.state, record.error, record.epochs, record.epochs_per_min = "failed", "DataError: gone", 0, 0.0
        BenchTable(store).save(record, engines, trials[:1])
        row = md_rows(report(store, "md"), "| Bench | Workload")[1]
        assert row[7:9] == ["-", "-"] and row[-1] == "failed"
        (flat,) = csv.DictReader(io.StringIO(report(store, "csv")))
        assert flat["speedup"] == "" and flat["state"] == "failed" and float(flat["cost"]) == 0.0
        assert report(store, "html").count("data:image/png;base64,") == 2  # the plots are drawn, empty


def test_cli_report_writes_every_format(tmp_path, monkeypatch):
    monkeypatch.delenv("CLUSTER_CONFIG", raising=False)
    monkeypatch.delenv("CLUSTER_STATE_DIR", raising=False)
    build_fixture_store(tmp_path / "state").close()
    ini = tmp_path / "cluster.ini"
    ini.write_text(f"[cluster]\nname = test\nstate_dir = {tmp_path / 'state'}\n")
    for fmt in FORMATS:
        out = tmp_path / "out" / f"report.{fmt}"
        stderr = io.StringIO()
        assert main(["--config", str(ini), "report", "--out", str(out)], stdout=io.StringIO(), stderr=stderr) == 0
        with Store(tmp_path / "state") as store:
            assert out.read_text() == report(store, fmt)  # the format follows the suffix
    stdout = io.StringIO()
    assert (
        main(
            ["--config", str(ini), "report", "--format", "csv", "--bench", "b-fixture2"],
            stdout=stdout,
            stderr=io.StringIO(),
        )
        == 0
    )
    assert stdout.getvalue().splitlines()[1].startswith("b-fixture2-e1,b-fixture2,cifar10-vgg16,1,aws,")
    stderr = io.StringIO()
    assert main(["--config", str(ini), "report", "--bench", "b-nothing"], stdout=io.StringIO(), stderr=stderr) == 2
    assert "no benchmark records for b-nothing" in stderr.getvalue()


def test_a_store_written_with_bench_runs_keeps_its_measurements(tmp_path):
    """Before schema 5 a measurement was a "bench run": table bench_runs, columns bench_run_id."""
    import sqlite3

    from controller.store import schema

    record, engines, trials = paper_measurement("b-old", 2, 72.0, 0.40, JAN_1)
    with sqlite3.connect(tmp_path / "cluster.db") as db:
        db.executescript(schema.TABLES_V1)  # the tables as they were, bench_runs among them
        for table, row in (
            [("bench_runs", {**dataclasses.asdict(record), "params": json.dumps(record.params)})]
            + [("bench_engines", dataclasses.asdict(e)) for e in engines]
            + [("bench_trials", dataclasses.asdict(t)) for t in trials]
        ):
            row = {("bench_run_id" if k == "measurement_id" else k): v for k, v in row.items()}
            db.execute(
                f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})", list(row.values())
            )
    with Store(tmp_path) as store:
        assert schema.version(store.db) == schema.LATEST
        table = BenchTable(store)
        assert table.records() == [record]
        assert table.engines(record.id) == engines and table.trials(record.id) == trials
        assert "| b-old | paper | 2 |" in report(store, "md")
        names = {row["name"] for row in store.execute("SELECT name FROM sqlite_master")}
        assert not {n for n in names if "bench_runs" in n}
        columns = {row["name"] for row in store.execute("PRAGMA table_info(bench_trials)")}
        assert "measurement_id" in columns and "bench_run_id" not in columns
