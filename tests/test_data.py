"""MNIST on disk: torchvision's layout, the paper's split, and errors that name the file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engines.data import DataError, load_mnist, normalise, read_idx, write_idx, write_synthetic_mnist
from tests.helpers import real_mnist_dir


def test_synthetic_files_load_with_a_five_to_one_train_validation_split(tmp_path):
    write_synthetic_mnist(tmp_path, n_train=600, n_test=100)
    data = load_mnist(tmp_path)
    assert (len(data.train), len(data.val), len(data.test)) == (500, 100, 100)
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape[1:] == (28, 28)
    assert data.train.labels.dtype == torch.int64


def test_the_data_set_is_loaded_once_per_process(tmp_path):
    write_synthetic_mnist(tmp_path)
    assert load_mnist(tmp_path) is load_mnist(tmp_path)


@pytest.mark.skipif(real_mnist_dir() is None, reason="real MNIST is not at ../shared/data")
def test_real_mnist_is_split_as_the_paper_does():
    data = load_mnist(real_mnist_dir())
    assert (len(data.train), len(data.val), len(data.test)) == (50_000, 10_000, 10_000)
    # the validation set is the last 10,000 images of the training file
    full = read_idx(real_mnist_dir() / "MNIST" / "raw" / "train-images-idx3-ubyte", 0x803)
    assert torch.equal(data.val.images, torch.from_numpy(full[50_000:].copy()))


def test_batches_are_normalised_to_zero_mean_unit_variance():
    images = torch.full((4, 28, 28), 255, dtype=torch.uint8)
    batch = normalise(images)
    assert batch.shape == (4, 1, 28, 28)
    assert batch[0, 0, 0, 0].item() == pytest.approx((1 - 0.1307) / 0.3081)


def test_a_truncated_file_is_an_error_naming_the_file(tmp_path):
    write_synthetic_mnist(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match=f"{path}: truncated or padded IDX file"):
        load_mnist(tmp_path)


def test_a_wrong_magic_number_is_an_error_naming_the_file(tmp_path):
    write_synthetic_mnist(tmp_path)
    labels = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    write_idx(labels, np.zeros((600, 28, 28), dtype=np.uint8))  # images where labels belong
    with pytest.raises(DataError, match=f"{labels}: wrong magic number 0x00000803, expected 0x00000801"):
        load_mnist(tmp_path)


def test_missing_files_without_download_say_where_to_put_them(tmp_path):
    with pytest.raises(DataError) as error:
        load_mnist(tmp_path / "empty", download=False)
    message = str(error.value)
    assert str(tmp_path / "empty" / "MNIST" / "raw") in message
    assert "train-images-idx3-ubyte" in message and "$CLUSTER_DATA_DIR" in message


def test_a_label_of_ten_is_a_data_error_naming_the_file_not_a_device_assert(tmp_path):
    from engines.workloads.mnist import train_epochs

    folder = write_synthetic_mnist(tmp_path, n_train=60, n_test=10) / "MNIST" / "raw"
    labels = read_idx(folder / "train-labels-idx1-ubyte", 0x801).copy()
    labels[7] = 10
    write_idx(folder / "train-labels-idx1-ubyte", labels)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: label 10 at index 7; MNIST labels are 0 to 9"):
        train_epochs({"data_dir": str(tmp_path), "epochs": 1, "threads": 1})


def test_images_that_are_not_28_by_28_are_a_data_error_naming_the_file(tmp_path):
    folder = write_synthetic_mnist(tmp_path, n_train=60, n_test=10) / "MNIST" / "raw"
    write_idx(folder / "t10k-images-idx3-ubyte", np.zeros((10, 32, 32), np.uint8))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: images are 32 x 32, expected 28 x 28"):
        load_mnist(tmp_path)
