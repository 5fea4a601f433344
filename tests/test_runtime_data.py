"""Unit tests of the runtime's data sources (runtime/data.py), in this process, without torchrun.

Every CIFAR archive here is a tiny fake written with pickle; nothing is downloaded.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autopipe
from runtime.data import DataSource, check_data
from runtime.stage import RuntimeConfigError, load_generated
from runtime.train import TrainConfig


@dataclass(frozen=True)
class Config:
    """The fields of TrainConfig that the data sources read, no_shuffle included."""

    data: str = "synthetic"
    batch_size: int = 8
    microbatches: int = 2
    seed: int = 0
    loss: str = "cross_entropy"
    vocab_size: int | None = None
    num_classes: int | None = None
    no_shuffle: bool = False


def _spec(shape: list[int], dtype: str = "float32", batch_dim: int | None = 0) -> dict:
    return {
        "shape": shape, "dtype": dtype, "requires_grad": False, "batch_dim": batch_dim,
        "producer": None, "consumers": [0],
    }  # fmt: skip


def _pipeline(inputs: dict[str, dict], output: dict) -> dict:
    """A one-stage PIPELINE with the given model inputs and one output, ``out``."""
    values = {**inputs, "out": {**output, "producer": 0, "consumers": []}}
    stage = {"inputs": list(inputs), "outputs": ["out"], "values": values}
    return {"model_inputs": list(inputs), "model_outputs": ["out"], "stages": [stage]}


def _image_pipeline(channels: int = 3, size: int = 32, classes: int = 10) -> dict:
    return _pipeline({"x": _spec([4, channels, size, size])}, _spec([4, classes]))


def _text_pipeline(length: int = 8, vocab: int = 256) -> dict:
    return _pipeline({"ids": _spec([2, length], "int64")}, _spec([2, length, vocab]))


def _vector_pipeline() -> dict:
    return _pipeline({"x": _spec([8, 3])}, _spec([8, 5]))


def _save_numbered(path: Path, n: int) -> Path:
    """A tensors file whose sample i has x[i, 0] == i and label i, so a batch names its samples."""
    x = torch.randn(n, 3)
    x[:, 0] = torch.arange(n)
    torch.save({"inputs": (x,), "labels": torch.arange(n)}, path)
    return path


def _epochs(source: DataSource, n_epochs: int) -> list[list[int]]:
    """The sample ids each epoch reads, step by step, checking inputs and labels agree."""
    found = []
    for epoch in range(n_epochs):
        ids: list[int] = []
        for step in range(epoch * source.steps_per_epoch, (epoch + 1) * source.steps_per_epoch):
            inputs, labels = source.inputs(step)["x"], source.labels(step)
            assert inputs[:, 0].long().tolist() == labels.tolist()
            ids += labels.tolist()
        found.append(ids)
    return found


def test_synthetic_keeps_the_seeded_stream() -> None:
    config = TrainConfig(model="x", seed=3, batch_size=6)
    source = DataSource(config, _text_pipeline(length=5, vocab=300))
    generator = torch.Generator().manual_seed(3 * 1_000_003 + 2 * 4)
    expected = torch.randint(0, 300, [6, 5], generator=generator)
    assert torch.equal(source.inputs(4)["ids"], expected)
    generator = torch.Generator().manual_seed(3 * 1_000_003 + 2 * 4 + 1)
    assert torch.equal(source.labels(4), torch.randint(0, 300, [6, 5], generator=generator))
    assert source.steps_per_epoch is None
    assert source.batch_size(source.inputs(0)) == 6


def test_a_file_of_one_batch_comes_back_whole_every_step(tmp_path: Path) -> None:
    x, y = torch.randn(8, 3), torch.randint(0, 5, (8,))
    torch.save({"inputs": {"x": x}, "labels": y}, tmp_path / "d.pt")
    config = TrainConfig(model="x", data=f"tensors:{tmp_path / 'd.pt'}", batch_size=8)
    source = DataSource(config, _vector_pipeline())
    assert source.steps_per_epoch == 1 and not source.shuffled
    for step in range(3):
        assert torch.equal(source.inputs(step)["x"], x)
        assert torch.equal(source.labels(step), y)


def test_shuffle_reads_every_sample_once_per_epoch_in_a_new_order(tmp_path: Path) -> None:
    data = f"tensors:{_save_numbered(tmp_path / 'd.pt', 24)}"
    source = DataSource(Config(data=data, batch_size=6), _vector_pipeline())
    assert source.steps_per_epoch == 4 and source.shuffled
    epochs = _epochs(source, 3)
    assert all(sorted(ids) == list(range(24)) for ids in epochs)
    assert len({tuple(ids) for ids in epochs} | {tuple(range(24))}) == 4
    reseeded = DataSource(Config(data=data, batch_size=6, seed=1), _vector_pipeline())
    assert _epochs(reseeded, 1)[0] != epochs[0]


def test_no_shuffle_keeps_the_file_order(tmp_path: Path) -> None:
    data = f"tensors:{_save_numbered(tmp_path / 'd.pt', 24)}"
    source = DataSource(Config(data=data, batch_size=6, no_shuffle=True), _vector_pipeline())
    assert _epochs(source, 2) == [list(range(24))] * 2
    assert "in order" in source.description


def test_ranks_reading_inputs_and_labels_apart_agree(tmp_path: Path) -> None:
    config = Config(data=f"tensors:{_save_numbered(tmp_path / 'd.pt', 30)}", batch_size=4)
    first, last = DataSource(config, _vector_pipeline()), DataSource(config, _vector_pipeline())
    for step in (9, 0, 17, 8, 40):
        assert first.inputs(step)["x"][:, 0].long().tolist() == last.labels(step).tolist()


@pytest.mark.parametrize(("microbatches", "steps", "last"), [(2, 3, 2), (3, 2, 4)])
def test_a_last_partial_batch_is_kept_only_if_every_microbatch_gets_a_sample(
    tmp_path: Path, microbatches: int, steps: int, last: int
) -> None:
    data = f"tensors:{_save_numbered(tmp_path / 'd.pt', 10)}"
    config = Config(data=data, batch_size=4, microbatches=microbatches, no_shuffle=True)
    source = DataSource(config, _vector_pipeline())
    assert source.steps_per_epoch == steps
    assert source.labels(steps - 1).tolist() == list(range(4 * (steps - 1), 4 * (steps - 1) + last))
    assert source.labels(steps).tolist() == [0, 1, 2, 3]


def test_tensors_are_cut_along_a_batch_dim_that_is_not_the_first(tmp_path: Path) -> None:
    x = torch.arange(5).repeat(7, 1)  # [seq 7, batch 5], sample i is all i
    torch.save({"inputs": (x,), "labels": torch.arange(5)}, tmp_path / "d.pt")
    pipeline = _pipeline({"x": _spec([7, 2], "int64", batch_dim=1)}, _spec([2, 5]))
    config = Config(data=f"tensors:{tmp_path / 'd.pt'}", batch_size=2, no_shuffle=True)
    source = DataSource(config, pipeline)
    inputs = source.inputs(1)
    assert inputs["x"].shape == (7, 2) and source.batch_size(inputs) == 2
    assert torch.equal(inputs["x"], torch.tensor([[2, 3]] * 7))


def _digits_split(split: str, channels: int = 1, size: int = 8) -> torch.Tensor:
    """A whole digits split as the model sees it, in one batch read in order."""
    config = Config(data="digits", batch_size=2000, no_shuffle=True)
    return DataSource(config, _image_pipeline(channels, size), split).inputs(0)["x"]


def test_digits_split_fixed_and_normalised_with_the_train_mean_and_std() -> None:
    from sklearn.datasets import load_digits

    train, test = _digits_split("train"), _digits_split("test")
    assert train.shape == (1437, 1, 8, 8) and test.shape == (360, 1, 8, 8)
    assert train.dtype == torch.float32
    assert abs(train.mean().item()) < 1e-4 and abs(train.std(unbiased=False).item() - 1) < 1e-4
    # undo the normalisation: pixel levels 0 and 16 are the train split's extremes
    low, high = train.min(), train.max()
    levels = torch.cat([train, test]).sub(low).div(high - low).mul(16)
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    found = sorted(tuple(image) for image in levels.round().long().reshape(-1, 64).tolist())
    expected = sorted(tuple(image) for image in load_digits().data.astype(int).tolist())
    assert found == expected  # train and test together are every digit, once


def test_digits_resized_to_the_model_input_with_the_same_labels() -> None:
    config = Config(data="digits", batch_size=32, microbatches=4)
    small = DataSource(config, _image_pipeline(1, 8))
    large = DataSource(config, _image_pipeline(3, 32))
    assert large.steps_per_epoch == 45
    assert large.description.startswith("digits: 1437 train samples, 8x8 -> 32x32, 3 channels")
    images, native = large.inputs(50)["x"], small.inputs(50)["x"]
    assert images.shape == (32, 3, 32, 32) and torch.equal(images[:, 0], images[:, 2])
    resized = F.interpolate(native, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(images[:, :1], resized, atol=1e-5)
    assert torch.equal(large.labels(50), small.labels(50))
    assert large.labels(50).dtype == torch.int64 and 0 <= large.labels(50).min() <= 9


def _fake_cifar(folder: Path, files: dict[str, int], label_key: bytes, classes: int) -> dict:
    """Write pickled python-format batches of random images; return their labels by file."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(len(files))
    written = {}
    for name, n in files.items():
        data = torch.randint(0, 256, (n, 3072), generator=generator, dtype=torch.uint8)
        labels = torch.randint(0, classes, (n,), generator=generator).tolist()
        with (folder / name).open("wb") as file:
            pickle.dump({b"data": data.numpy(), label_key: labels, b"batch_label": b"x"}, file)
        written[name] = labels
    return written


CIFAR10_FILES = {**{f"data_batch_{i}": 6 for i in range(1, 6)}, "test_batch": 8}


@pytest.mark.parametrize("inside", [False, True])
def test_cifar10_from_its_folder_or_the_folder_above(tmp_path: Path, inside: bool) -> None:
    labels = _fake_cifar(tmp_path / "cifar-10-batches-py", CIFAR10_FILES, b"labels", 10)
    root = tmp_path / "cifar-10-batches-py" if inside else tmp_path
    config = Config(data=f"cifar10:{root}", batch_size=100, no_shuffle=True)
    train = DataSource(config, _image_pipeline())
    images = train.inputs(0)["x"]
    assert images.shape == (30, 3, 32, 32) and train.steps_per_epoch == 1
    assert train.labels(0).tolist() == sum((labels[f"data_batch_{i}"] for i in range(1, 6)), [])
    means, stds = images.mean(dim=(0, 2, 3)), images.std(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(means, torch.zeros(3), atol=1e-4)
    assert torch.allclose(stds, torch.ones(3), atol=1e-4)
    test = DataSource(config, _image_pipeline(), "test")
    assert test.labels(0).tolist() == labels["test_batch"]
    assert test.inputs(0)["x"].shape == (8, 3, 32, 32)


def test_cifar100_reads_fine_labels_and_resizes(tmp_path: Path) -> None:
    labels = _fake_cifar(
        tmp_path / "cifar-100-python", {"train": 20, "test": 5}, b"fine_labels", 100
    )
    config = Config(data=f"cifar100:{tmp_path}", batch_size=8, microbatches=4, no_shuffle=True)
    source = DataSource(config, _image_pipeline(size=16, classes=100))
    assert source.steps_per_epoch == 3  # 8 + 8 + 4, the last kept: one sample per microbatch
    assert source.inputs(2)["x"].shape == (4, 3, 16, 16)
    assert source.labels(2).tolist() == labels["train"][16:]
    assert "20 train samples, 32x32 -> 16x16, 3 channels" in source.description


def test_text_windows_label_each_byte_with_the_next(tmp_path: Path) -> None:
    text = bytes(range(256)) * 2 + b"tail"  # 516 bytes: 57 windows of 8 + 1, 3 bytes left over
    (tmp_path / "t.txt").write_bytes(text)
    config = Config(data=f"text:{tmp_path / 't.txt'}", batch_size=5, no_shuffle=True)
    train, test = DataSource(config, _text_pipeline()), DataSource(config, _text_pipeline(), "test")
    # 51 and 6 windows: a last batch of 1 cannot be cut into 2 microbatches, so it is dropped
    assert train.steps_per_epoch == 10 and test.steps_per_epoch == 1
    inputs, labels = train.inputs(3)["ids"], train.labels(3)
    assert inputs.dtype == torch.int64 and labels.dtype == torch.int64
    assert inputs.shape == labels.shape == (5, 8)
    assert torch.equal(labels[:, :-1], inputs[:, 1:])
    assert inputs[0].tolist() == list(text[15 * 9 : 15 * 9 + 8])
    assert labels[0].tolist() == list(text[15 * 9 + 1 : 16 * 9])
    assert test.labels(0)[-1].tolist() == list(text[55 * 9 + 1 : 56 * 9])


def test_a_generated_model_takes_the_digits_as_they_come(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 10),
    )  # fmt: skip
    autopipe.compile(model, (torch.randn(4, 3, 12, 12),), n_stages=2, output=tmp_path / "m.py")
    pipeline = load_generated(tmp_path / "m.py").PIPELINE
    config = Config(data="digits", batch_size=16, microbatches=4)
    check_data(config, pipeline)
    source = DataSource(config, pipeline)
    inputs = source.inputs(0)
    assert [value.shape for value in inputs.values()] == [(16, 3, 12, 12)]
    assert model(*inputs.values()).shape == (16, 10)
    assert source.labels(0).shape == (16,)
    assert source.batch_size(inputs) == 16


def _error(config: Config, pipeline: dict) -> str:
    with pytest.raises(RuntimeConfigError) as raised:
        check_data(config, pipeline)
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_check_data_accepts_every_form_that_fits(tmp_path: Path) -> None:
    _fake_cifar(tmp_path / "c", CIFAR10_FILES, b"labels", 10)
    (tmp_path / "t.txt").write_bytes(bytes(100))
    check_data(Config(), _vector_pipeline())
    check_data(Config(data="digits"), _image_pipeline())
    check_data(Config(data=f"cifar10:{tmp_path / 'c'}"), _image_pipeline())
    check_data(Config(data=f"text:{tmp_path / 't.txt'}"), _text_pipeline())
    check_data(Config(data=f"tensors:{_save_numbered(tmp_path / 'd.pt', 3)}"), _vector_pipeline())


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("imagenet", "unknown data 'imagenet'; use synthetic, digits, tensors:PATH, cifar10:DIR"),
        ("digits:here", "unknown data 'digits:here'"),
        ("tensors:", "unknown data 'tensors:'"),
        ("tensors:{tmp}/none.pt", "no such file"),
        ("text:{tmp}/none.txt", "no such file"),
        ("cifar10:{tmp}/none", "no such directory"),
        ("cifar100:{tmp}", "nor a cifar-100-python/ folder with them: extract cifar-100-python"),
    ],
)
def test_check_data_names_missing_or_unknown_data(tmp_path: Path, data: str, message: str) -> None:
    config = Config(data=data.format(tmp=tmp_path))
    assert message in _error(config, _image_pipeline(classes=100))


@pytest.mark.parametrize(
    ("data", "pipeline", "message"),
    [
        ("digits", _vector_pipeline(), "digits feeds one floating image input [B, C, H, W]"),
        ("digits", _text_pipeline(), "the model input 'ids' is int64"),
        ("digits", _image_pipeline(classes=5), "digits has 10 classes"),
        (
            "digits",
            _pipeline({"a": _spec([2, 1, 8, 8]), "b": _spec([2, 1, 8, 8])}, _spec([2, 10])),
            "the model takes 2 inputs (a, b)",
        ),
        ("cifar10:{tmp}", _image_pipeline(channels=1), "cifar10 images have 3 channels"),
        ("cifar100:{tmp}", _image_pipeline(), "cifar100 has 100 classes"),
        ("text:{tmp}/t.txt", _image_pipeline(), "text feeds one integer token input [B, S]"),
        ("text:{tmp}/t.txt", _text_pipeline(vocab=100), "model output must be [B, 8, >= 256]"),
    ],
)
def test_check_data_rejects_data_that_does_not_fit_the_model(
    tmp_path: Path, data: str, pipeline: dict, message: str
) -> None:
    _fake_cifar(tmp_path / "cifar-10-batches-py", CIFAR10_FILES, b"labels", 10)
    _fake_cifar(tmp_path / "cifar-100-python", {"train": 4, "test": 4}, b"fine_labels", 100)
    (tmp_path / "t.txt").write_bytes(bytes(100))
    assert message in _error(Config(data=data.format(tmp=tmp_path)), pipeline)


def test_check_data_wants_cross_entropy_for_class_labels() -> None:
    message = _error(Config(data="digits", loss="mse"), _image_pipeline())
    assert "use --loss cross_entropy, not mse" in message


def test_check_data_wants_a_sample_per_microbatch(tmp_path: Path) -> None:
    data = f"tensors:{_save_numbered(tmp_path / 'd.pt', 3)}"
    message = _error(Config(data=data, batch_size=8, microbatches=4), _vector_pipeline())
    assert "the train split holds 3 samples, fewer than --microbatches 4" in message
    (tmp_path / "t.txt").write_bytes(bytes(40))  # 4 windows of 8 + 1: 3 train, 1 test
    message = _error(Config(data=f"text:{tmp_path / 't.txt'}", microbatches=4), _text_pipeline())
    assert "holds 3 samples" in message
    message = _error(Config(batch_size=2, microbatches=4), _vector_pipeline())
    assert "--microbatches 4 is more than --batch_size 2" in message


@pytest.mark.parametrize(
    ("saved", "message"),
    [
        ({"inputs": (torch.zeros(4, 3),)}, "must hold a dict with 'inputs' and 'labels'"),
        ({"inputs": {"y": torch.zeros(4, 3)}, "labels": torch.zeros(4)}, "'inputs' has no 'x'"),
        ({"inputs": (torch.zeros(4, 3),) * 2, "labels": torch.zeros(4)}, "a tuple of 1 tensors"),
        ({"inputs": (torch.zeros(4, 3).double(),), "labels": torch.zeros(4)}, "is float64 [4, 3]"),
        ({"inputs": (torch.zeros(4, 2),), "labels": torch.zeros(4)}, "takes float32 [8, 3]"),
        ({"inputs": (torch.zeros(4, 3),), "labels": torch.zeros(5)}, "but the labels 5"),
    ],
)
def test_check_data_explains_a_malformed_tensors_file(
    tmp_path: Path, saved: dict, message: str
) -> None:
    torch.save(saved, tmp_path / "d.pt")
    assert message in _error(Config(data=f"tensors:{tmp_path / 'd.pt'}"), _vector_pipeline())


def test_check_data_explains_a_malformed_cifar_batch(tmp_path: Path) -> None:
    _fake_cifar(tmp_path, CIFAR10_FILES, b"labels", 10)
    with (tmp_path / "data_batch_3").open("wb") as file:
        pickle.dump({b"data": [[0] * 100], b"labels": [1]}, file)
    message = _error(Config(data=f"cifar10:{tmp_path}"), _image_pipeline())
    assert "data_batch_3' is not a python-format CIFAR batch" in message
