"""The paper's λ experiment as the paper defined it: L1 = λ·Σ|w| / (training batches per epoch)."""

from __future__ import annotations

import pytest
import torch

from controller.work.sweep.space import PAPER_L1
from engines.spec import LEGACY_L1_SCALE, stored_params
from engines.workloads.mnist import RunSpec, l1_divisor, mnist_setup
from tests.helpers import real_mnist_dir, running_cluster

DATA = real_mnist_dir()
CHANCE = 0.15  # ten classes: a collapsed network predicts one class, about 10-11 % of the test set


def test_the_penalty_is_divided_by_the_training_batches_per_epoch(tiny_data_dir):
    spec = RunSpec(data_dir=str(tiny_data_dir), l1=2.0, batch_size=128)  # 500 training images: 4 batches
    assert l1_divisor(spec, 500) == 4
    assert l1_divisor(RunSpec(subset=300, batch_size=100), 500) == 3
    work = mnist_setup(spec, torch.device("cpu"))
    output, labels = torch.zeros(2, 10), torch.tensor([1, 2])
    from engines.workloads.cnn import l1_penalty

    expected = torch.nn.functional.nll_loss(output, labels) + 2.0 * l1_penalty(work.model) / 4
    assert torch.allclose(work.loss(output, labels), expected)


def test_runs_stored_without_the_convention_keep_the_old_one():
    assert stored_params({"l1": 0.1})["l1_scale"] == LEGACY_L1_SCALE
    assert l1_divisor(RunSpec.from_dict(stored_params({"l1": 0.1})), 50_000) == 1
    assert stored_params({"l1": 0.1, "l1_scale": "batches"})["l1_scale"] == "batches"
    with pytest.raises(ValueError, match="l1_scale 'per-sample'"):
        l1_divisor(RunSpec(l1_scale="per-sample"), 100)


@pytest.mark.skipif(DATA is None, reason="real MNIST is not in ../shared/data")
def test_the_paper_preset_spans_the_curve(tmp_path):
    """One epoch per trial on the first 10,000 training images (the full test set), on 2 engines.

    With 10,000 images an epoch is 79 batches, so each batch carries 5x the penalty of a full
    50,000-image epoch (391 batches): λ ≤ 0.1 stays above 95 % (6 of 9; measured 95.7-97.0 %) and
    λ ≥ 1 collapses to chance.  On the full 50,000 images λ = 1 also stays above 95 % (7 of 9; see
    the report of this change) and only λ = 10 and 100 are at chance.
    """
    with running_cluster(tmp_path, DATA) as cluster:
        result = cluster.sweep(preset="paper", epochs=1, subset=10_000)
        params = cluster.store.runs.get(result.trials[0].run_id).params
    assert params["l1_scale"] == "batches", "the stored run records its convention"
    by_l1 = {t.params["l1"]: t for t in result.trials}
    assert sorted(by_l1) == sorted(PAPER_L1) and all(t.state == "COMPLETE" for t in result.trials)
    above = [l1 for l1, t in by_l1.items() if t.test_accuracy > 0.95]
    assert sorted(above) == [0.0, 1e-5, 1e-4, 1e-3, 1e-2, 0.1], {l1: t.test_accuracy for l1, t in by_l1.items()}
    assert by_l1[100.0].test_accuracy < CHANCE and by_l1[10.0].test_accuracy < CHANCE
