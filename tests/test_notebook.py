"""notebooks/dispatch.ipynb runs top to bottom against a real local cluster (tiny data) with nbclient."""

from __future__ import annotations

import base64

import nbformat
from nbclient import NotebookClient

from tests.helpers import REPO

NOTEBOOK = REPO / "notebooks" / "dispatch.ipynb"


def test_dispatch_notebook_runs_against_the_local_cluster(local_cluster, tmp_path, monkeypatch):
    # the notebook finds the cluster as a user's would: through cluster.ini ($CLUSTER_CONFIG here)
    monkeypatch.setenv("CLUSTER_CONFIG", str(local_cluster.config.source))
    monkeypatch.delenv("CLUSTER_STATE_DIR", raising=False)
    monkeypatch.delenv("CLUSTER_DATA_DIR", raising=False)
    monkeypatch.setenv("SWEEP_EPOCHS", "2")
    monkeypatch.setenv("SWEEP_SUBSET", "300")
    before = {s.sweep_id for s in local_cluster.sweeps()}
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # raises CellExecutionError, naming the cell, if any cell errors
    NotebookClient(
        notebook, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    tables = [o for o in outputs if "text/html" in o.get("data", {})]
    assert tables and "<table>" in tables[0]["data"]["text/html"] and "val acc" in tables[0]["data"]["text/html"]
    plots = [o for o in outputs if "image/png" in o.get("data", {})]
    assert plots and base64.b64decode(plots[0]["data"]["image/png"]).startswith(b"\x89PNG")

    new = [s for s in local_cluster.sweeps() if s.sweep_id not in before]
    assert len(new) == 1 and new[0].sweep.shown_state == "completed" and len(new[0].trials) == 4
    assert all(t.epochs for t in new[0].trials)
    distributed = [r for r in local_cluster.runs(limit=5) if r.params.get("distributed")]
    assert distributed and distributed[0].state == "completed" and distributed[0].params["distributed"]["world"] == 2
    assert any("test images on engines [0, 1]" in o.get("text", "") for o in outputs)
