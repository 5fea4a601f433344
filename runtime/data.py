"""The runtime's data sources: what rank 0 feeds the model and the last rank scores it against.

``--data`` takes one of these forms:

    synthetic        endless random batches shaped from PIPELINE (the default)
    tensors:PATH     a torch.save'd {"inputs": ..., "labels": ...}, cut along the batch dims
    digits           scikit-learn's 8x8 digits, resized to the model's image input
    cifar10:DIR      CIFAR-10 in its python format, extracted in DIR
    cifar100:DIR     CIFAR-100 likewise
    text:PATH        byte-level language modelling on a local text file

A data set is read in epochs of ``batch_size`` samples a step, in an order drawn afresh each
epoch from a generator seeded with (seed, epoch). An epoch's last, partial batch is kept when it
holds at least ``microbatches`` samples (every microbatch needs one) and dropped otherwise. The
batch of a step depends on nothing but the config and the step, so rank 0 (inputs) and the last
rank (labels) read the same samples without talking.
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from runtime.comm import value_specs
from runtime.stage import RuntimeConfigError

SPLITS = ("train", "test")
FORMS_HELP = "synthetic, digits, tensors:PATH, cifar10:DIR, cifar100:DIR or text:PATH"
# each form, and whether a path follows its colon
_FORMS = {
    "synthetic": False,
    "digits": False,
    "tensors": True,
    "cifar10": True,
    "cifar100": True,
    "text": True,
}
DIGITS_SPLIT_SEED = 0  # the digits train/test split is fixed, whatever --seed says
DIGITS_LEVELS = 16  # digits pixels are whole numbers 0..16
CIFAR_LEVELS = 255
TEXT_VOCAB = 256  # one token per byte value
_EPOCH_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class DataForm:
    """A parsed ``--data``: its kind and the path after the colon, if the kind takes one."""

    kind: str
    path: str | None = None


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps its python-format batches and labels."""

    folder: str
    archive: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    label_key: bytes
    classes: int

    @property
    def files(self) -> tuple[str, ...]:
        return self.train + self.test


CIFAR = {
    "cifar10": CifarLayout(
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        b"labels",
        10,
    ),
    "cifar100": CifarLayout(
        "cifar-100-python", "cifar-100-python.tar.gz", ("train",), ("test",), b"fine_labels", 100
    ),
}


def parse_data(data: str) -> DataForm:
    """Split ``--data`` into its kind and path, rejecting any form not listed above."""
    kind, colon, path = data.partition(":")
    if kind not in _FORMS or _FORMS[kind] != bool(colon) or (colon and not path):
        raise RuntimeConfigError(f"unknown data {data!r}; use {FORMS_HELP}")
    return DataForm(kind, path or None)


def _as_stored(drawn: Any) -> Any:
    """A batch as it was stored, for data that needs no per-batch work."""
    return drawn


@dataclass
class Samples:
    """One split of a data set, held per sample; ``to_inputs`` and ``to_labels`` turn a drawn
    batch into what the model takes (stored compactly, e.g. images as uint8, made per batch)."""

    inputs: dict[str, torch.Tensor]
    input_dims: dict[str, int | None]
    labels: torch.Tensor
    label_dim: int
    summary: str
    to_inputs: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = _as_stored
    to_labels: Callable[[torch.Tensor], torch.Tensor] = _as_stored

    def __len__(self) -> int:
        return self.labels.shape[self.label_dim]


def check_data(config: Any, pipeline: Mapping[str, Any], split: str = "train") -> None:
    """Reject data that is missing, malformed, too small or does not fit the model, before any
    process group exists. Loads the data set; the read is cached for the DataSource built next."""
    if config.microbatches > config.batch_size:
        raise RuntimeConfigError(
            f"--microbatches {config.microbatches} is more than --batch_size {config.batch_size}:"
            " every microbatch needs a sample"
        )
    DataSource(config, pipeline, split).check()


class DataSource:
    """Model inputs (rank 0) and labels (last rank) for each step, synthetic or from a data set.

    ``config`` is a :class:`runtime.train.TrainConfig`; this reads its data, batch_size,
    microbatches, seed, loss, vocab_size, num_classes and no_shuffle.
    """

    def __init__(self, config: Any, pipeline: Mapping[str, Any], split: str = "train") -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.config = config
        self.split = split
        self.form = parse_data(config.data)
        self.specs = value_specs(pipeline)
        self.names = list(pipeline["model_inputs"])
        self.output_name = pipeline["model_outputs"][0]
        self.output = self.specs[self.output_name]
        self._loaded: Samples | None = None
        self._epoch_order: tuple[int, torch.Tensor] | None = None

    @property
    def synthetic(self) -> bool:
        return self.form.kind == "synthetic"

    @property
    def steps_per_epoch(self) -> int | None:
        """Batches in one epoch, the last partial one counted only if it is kept; None when the
        data is synthetic and never ends."""
        if self.synthetic:
            return None
        full, rest = divmod(len(self._samples()), self.config.batch_size)
        return full + (1 if rest >= self.config.microbatches else 0)

    @property
    def shuffled(self) -> bool:
        """Whether each epoch is drawn in a fresh order. A data set that fits in one batch is
        read in order: shuffling it would only reorder samples inside the batch, which changes
        nothing but how the batch is cut into microbatches."""
        if self.synthetic or getattr(self.config, "no_shuffle", False):
            return False
        return len(self._samples()) > self.config.batch_size

    @property
    def description(self) -> str:
        """One line for the run log, e.g. ``digits: 1437 train samples, 8x8 -> 32x32, ...``."""
        if self.synthetic:
            return f"synthetic: endless random batches of {self.config.batch_size}"
        order = "shuffled each epoch" if self.shuffled else "in order"
        return (
            f"{self.config.data}: {self._samples().summary}, "
            f"{self.steps_per_epoch} steps per epoch, {order}"
        )

    def check(self) -> None:
        """Load the data set now, raising :class:`RuntimeConfigError` on anything wrong."""
        if not self.synthetic:
            self._samples()

    def inputs(self, step: int) -> dict[str, torch.Tensor]:
        """The model inputs of step ``step``, by name, on the CPU."""
        if self.synthetic:
            return self._synthetic_inputs(step)
        samples, index = self._samples(), self._batch_indices(step)
        drawn = {
            name: _draw(value, samples.input_dims[name], index)
            for name, value in samples.inputs.items()
        }
        return samples.to_inputs(drawn)

    def labels(self, step: int) -> torch.Tensor:
        """The labels of step ``step``: class ids for cross entropy, targets for MSE."""
        if self.synthetic:
            return self._synthetic_labels(step)
        samples = self._samples()
        return samples.to_labels(
            _draw(samples.labels, samples.label_dim, self._batch_indices(step))
        )

    def batch_size(self, inputs: Mapping[str, torch.Tensor]) -> int:
        """The batch size of a step's inputs, read along the first input's batch dimension."""
        name = self.names[0]
        dim = self.specs[name].get("batch_dim")
        return self.config.batch_size if dim is None else inputs[name].shape[dim]

    def step_batch_size(self, step: int) -> int:
        """The batch size of step ``step``, known on every rank without reading or receiving the
        step's data: ``--batch_size``, or the samples left for the last batch of an epoch.

        Equal to :meth:`batch_size` of the step's inputs."""
        if self.synthetic or self.specs[self.names[0]].get("batch_dim") is None:
            return self.config.batch_size
        return len(self._batch_indices(step))

    def _samples(self) -> Samples:
        """The split, loaded and checked against the model on first use."""
        if self._loaded is None:
            _check_path(self.form)
            samples = _LOADERS[self.form.kind](self)
            if len(samples) < self.config.microbatches:
                raise RuntimeConfigError(
                    f"{self.config.data}: the {self.split} split holds {len(samples)} samples,"
                    f" fewer than --microbatches {self.config.microbatches}: use more data or"
                    " fewer microbatches"
                )
            self._loaded = samples
        return self._loaded

    def _batch_indices(self, step: int) -> torch.Tensor:
        """The samples of step ``step``: its slice of its epoch's order."""
        epoch, position = divmod(step, self.steps_per_epoch)
        size = self.config.batch_size
        return self._order(epoch)[position * size : (position + 1) * size]

    def _order(self, epoch: int) -> torch.Tensor:
        """Epoch ``epoch``'s order of the samples, the same on every rank; cached per epoch."""
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            n = len(self._samples())
            if self.shuffled:
                seed = self.config.seed * _EPOCH_SEED_STRIDE + epoch
                order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            else:
                order = torch.arange(n)
            self._epoch_order = (epoch, order)
        return self._epoch_order[1]

    def _generator(self, step: int, stream: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + 2 * step + stream)

    def _shape(self, spec: Mapping[str, Any], drop_last: bool = False) -> list[int]:
        shape = list(spec["shape"])
        if spec.get("batch_dim") is not None:
            shape[spec["batch_dim"]] = self.config.batch_size
        return shape[:-1] if drop_last else shape

    def _synthetic_inputs(self, step: int) -> dict[str, torch.Tensor]:
        generator = self._generator(step, 0)
        made = {}
        for name in self.names:
            spec = self.specs[name]
            dtype = getattr(torch, spec["dtype"])
            shape = self._shape(spec)
            if dtype.is_floating_point:
                made[name] = torch.randn(shape, generator=generator, dtype=dtype)
            else:
                high = self.config.vocab_size or self.output["shape"][-1]
                made[name] = torch.randint(0, high, shape, generator=generator, dtype=dtype)
        return made

    def _synthetic_labels(self, step: int) -> torch.Tensor:
        generator = self._generator(step, 1)
        if self.config.loss == "mse":
            return torch.randn(self._shape(self.output), generator=generator)
        high = self.config.num_classes or self.output["shape"][-1]
        return torch.randint(0, high, self._shape(self.output, drop_last=True), generator=generator)


def _draw(value: torch.Tensor, dim: int | None, index: torch.Tensor) -> torch.Tensor:
    """The samples ``index`` of ``value`` along its batch dim; one without goes whole."""
    return value if dim is None else value.index_select(dim, index)


# Reading files, once per process while a file is unchanged ------------------------------------


@functools.lru_cache(maxsize=8)
def _read_cached(reader: Callable[[Path], Any], path: Path, stamp: tuple[int, int]) -> Any:
    return reader(path)


def _read(reader: Callable[[Path], Any], path: Path) -> Any:
    """``reader(path)``, cached by the file's modification time and size, so that check_data and
    the DataSource built after it read a file once. Callers must not modify what it returns."""
    stat = path.stat()
    return _read_cached(reader, path.resolve(), (stat.st_mtime_ns, stat.st_size))


def _torch_file(path: Path) -> Any:
    return torch.load(path, map_location="cpu")


def _pickle_file(path: Path) -> Any:
    """One CIFAR batch: a pickled dict with bytes keys (trusted, local files only)."""
    with path.open("rb") as file:
        return pickle.load(file, encoding="bytes")


def _byte_file(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.fromfile(path, dtype=np.uint8))


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as uint8 images [N, 1, 8, 8] of levels 0..16, and their class ids."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise RuntimeConfigError(
            "--data digits needs scikit-learn: pip install scikit-learn"
        ) from None
    digits = load_digits()
    images = torch.from_numpy(digits.images).to(torch.uint8).unsqueeze(1)
    return images, torch.from_numpy(digits.target).long()


# Checks: paths, and whether a data set fits the model ------------------------------------------


def _check_path(form: DataForm) -> None:
    """The file or directory the form names must be there."""
    if form.kind in ("tensors", "text") and not Path(form.path).is_file():
        raise RuntimeConfigError(f"--data {form.kind}: no such file {form.path!r}")
    if form.kind in CIFAR:
        _cifar_dir(form)


def _cifar_dir(form: DataForm) -> Path:
    """The folder holding the batches: DIR itself, or the archive's folder inside it."""
    layout, given = CIFAR[form.kind], Path(form.path)
    if not given.is_dir():
        raise RuntimeConfigError(f"--data {form.kind}: no such directory {form.path!r}")
    for folder in (given, given / layout.folder):
        if all((folder / name).is_file() for name in layout.files):
            return folder
    raise RuntimeConfigError(
        f"{form.path!r} holds neither the {form.kind} python-format files"
        f" ({', '.join(layout.files)}) nor a {layout.folder}/ folder with them:"
        f" extract {layout.archive} there"
    )


def _single_input(source: DataSource, feeds: str) -> tuple[str, Mapping[str, Any]]:
    """The model's one input, which ``feeds`` describes; a model with more inputs cannot fit."""
    if len(source.names) != 1:
        raise RuntimeConfigError(
            f"{source.form.kind} feeds {feeds}, but the model takes {len(source.names)} inputs"
            f" ({', '.join(source.names)}): use tensors:PATH"
        )
    return source.names[0], source.specs[source.names[0]]


def _check_class_loss(source: DataSource) -> None:
    if source.config.loss != "cross_entropy":
        raise RuntimeConfigError(
            f"{source.form.kind} has class labels: use --loss cross_entropy,"
            f" not {source.config.loss}"
        )


def _image_input(source: DataSource, classes: int) -> tuple[str, Mapping[str, Any]]:
    """The model's image input [B, C, H, W]; its output must score ``classes`` classes."""
    kind, feeds = source.form.kind, "one floating image input [B, C, H, W]"
    name, spec = _single_input(source, feeds)
    if (
        not getattr(torch, spec["dtype"]).is_floating_point
        or len(spec["shape"]) != 4
        or spec.get("batch_dim") != 0
    ):
        raise RuntimeConfigError(
            f"{kind} feeds {feeds}, but the model input {name!r} is {spec['dtype']}"
            f" {spec['shape']} with batch dim {spec.get('batch_dim')}"
        )
    shape = source.output["shape"]
    if len(shape) != 2 or shape[-1] < classes:
        raise RuntimeConfigError(
            f"{kind} has {classes} classes, one per image, so the model output must be"
            f" [B, >= {classes}]; {source.output_name!r} is {shape}"
        )
    _check_class_loss(source)
    return name, spec


def _token_input(source: DataSource) -> tuple[str, Mapping[str, Any]]:
    """The model's token input [B, S]; its output must score every byte at every position."""
    feeds = "one integer token input [B, S]"
    name, spec = _single_input(source, feeds)
    if (
        getattr(torch, spec["dtype"]).is_floating_point
        or len(spec["shape"]) != 2
        or spec.get("batch_dim") != 0
    ):
        raise RuntimeConfigError(
            f"text feeds {feeds}, but the model input {name!r} is {spec['dtype']}"
            f" {spec['shape']} with batch dim {spec.get('batch_dim')}"
        )
    shape, length = source.output["shape"], spec["shape"][1]
    if len(shape) != 3 or shape[1] != length or shape[-1] < TEXT_VOCAB:
        raise RuntimeConfigError(
            f"text predicts one of {TEXT_VOCAB} bytes at each of the {length} positions, so the"
            f" model output must be [B, {length}, >= {TEXT_VOCAB}]; {source.output_name!r} is"
            f" {shape}"
        )
    _check_class_loss(source)
    return name, spec


# Loaders: one per form, each returning the split as Samples ------------------------------------


def _load_tensors(source: DataSource) -> Samples:
    """The whole file, for either split: it is a data set of its own."""
    path = source.form.path
    saved = _read(_torch_file, Path(path))
    if not isinstance(saved, Mapping) or not {"inputs", "labels"} <= set(saved):
        raise RuntimeConfigError(
            f"{path!r} must hold a dict with 'inputs' and 'labels':"
            " torch.save({'inputs': (x, ...), 'labels': y}, PATH)"
        )
    inputs = _named_inputs(saved["inputs"], source.names, path)
    dims = {name: source.specs[name].get("batch_dim") for name in source.names}
    for name, value in inputs.items():
        _check_saved_input(path, name, value, source.specs[name])
    batched = [name for name in source.names if dims[name] is not None]
    if not batched:
        raise RuntimeConfigError(
            f"{path!r}: no model input has a batch dimension to draw samples along"
        )
    counts = {name: inputs[name].shape[dims[name]] for name in batched}
    n = counts[batched[0]]
    label_dim = source.output.get("batch_dim") or 0
    labels = saved["labels"]
    if not isinstance(labels, torch.Tensor) or labels.dim() <= label_dim:
        raise RuntimeConfigError(f"{path!r}: 'labels' must be a tensor with a batch dimension")
    if set(counts.values()) != {n} or labels.shape[label_dim] != n:
        raise RuntimeConfigError(
            f"{path!r}: the inputs hold {counts} samples but the labels {labels.shape[label_dim]}"
        )
    return Samples(inputs, dims, labels, label_dim, f"{n} samples")


def _named_inputs(saved: Any, names: list[str], path: str) -> dict[str, torch.Tensor]:
    """The saved inputs by model input name, from a dict by name or a sequence in order."""
    if isinstance(saved, Mapping):
        missing = [name for name in names if name not in saved]
        if missing:
            raise RuntimeConfigError(f"{path!r}: 'inputs' has no {missing[0]!r}")
        return {name: saved[name] for name in names}
    if isinstance(saved, torch.Tensor):
        saved = (saved,)
    if not isinstance(saved, Sequence) or len(saved) != len(names):
        raise RuntimeConfigError(
            f"{path!r}: 'inputs' must be a tuple of {len(names)} tensors"
            f" ({', '.join(names)}) or a dict by those names"
        )
    return dict(zip(names, saved))


def _check_saved_input(path: str, name: str, value: Any, spec: Mapping[str, Any]) -> None:
    """A saved input must have the model's dtype and shape, but for its number of samples."""
    dim = spec.get("batch_dim")
    expected = list(spec["shape"])
    if isinstance(value, torch.Tensor) and value.dim() == len(expected) and dim is not None:
        expected[dim] = value.shape[dim]
    if (
        not isinstance(value, torch.Tensor)
        or list(value.shape) != expected
        or value.dtype != getattr(torch, spec["dtype"])
    ):
        found = (
            f"{str(value.dtype).removeprefix('torch.')} {list(value.shape)}"
            if isinstance(value, torch.Tensor)
            else type(value).__name__
        )
        raise RuntimeConfigError(
            f"{path!r}: input {name!r} is {found}, but the model takes {spec['dtype']}"
            f" {list(spec['shape'])}, with any size along batch dim {dim}"
        )


def _load_digits(source: DataSource) -> Samples:
    """A fixed 80/20 split of the digits, normalised with the train split's mean and std."""
    name, spec = _image_input(source, classes=10)
    images, labels = _digits()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    cut = len(order) * 8 // 10
    picked = order[:cut] if source.split == "train" else order[cut:]
    mean, std = channel_stats(images[order[:cut]], DIGITS_LEVELS)
    return _image_samples(
        source, name, spec, images[picked], labels[picked], DIGITS_LEVELS, mean, std
    )


def _load_cifar(source: DataSource) -> Samples:
    """A CIFAR split, normalised with the train split's per-channel mean and std."""
    layout = CIFAR[source.form.kind]
    name, spec = _image_input(source, classes=layout.classes)
    if spec["shape"][1] != 3:
        raise RuntimeConfigError(
            f"{source.form.kind} images have 3 channels, but the model input {name!r} takes"
            f" {spec['shape'][1]}"
        )
    folder = _cifar_dir(source.form)
    train_images, train_labels = _cifar_files(folder, layout.train, layout.label_key)
    if source.split == "train":
        images, labels = train_images, train_labels
    else:
        images, labels = _cifar_files(folder, layout.test, layout.label_key)
    mean, std = channel_stats(train_images, CIFAR_LEVELS)
    return _image_samples(source, name, spec, images, labels, CIFAR_LEVELS, mean, std)


def _cifar_files(
    folder: Path, names: tuple[str, ...], label_key: bytes
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batches ``names`` joined: uint8 images [N, 3, 32, 32] and int64 class ids [N]."""
    batches = [_cifar_batch(folder / name, label_key) for name in names]
    images = torch.cat([images for images, _ in batches])
    return images.reshape(-1, 3, 32, 32), torch.cat([labels for _, labels in batches])


def _cifar_batch(path: Path, label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """One pickled batch: b"data" uint8 [N, 3072] (the 32x32 planes of R, G, B) and N labels."""
    batch = _read(_pickle_file, path)
    data = batch.get(b"data") if isinstance(batch, Mapping) else None
    labels = batch.get(label_key) if isinstance(batch, Mapping) else None
    if (
        data is None
        or labels is None
        or np.shape(data)[1:] != (3 * 32 * 32,)
        or len(labels) != len(data)
    ):
        raise RuntimeConfigError(
            f"{str(path)!r} is not a python-format CIFAR batch: it needs b'data', uint8"
            f" [N, 3072], and N {label_key!r}"
        )
    images = torch.as_tensor(np.asarray(data, dtype=np.uint8))
    return images, torch.as_tensor(list(labels), dtype=torch.int64)


def _load_text(source: DataSource) -> Samples:
    """Non-overlapping windows of S + 1 bytes: the first S are the input, the last S the labels
    (the next byte at each position); the first 90% of windows train, the rest test."""
    name, spec = _token_input(source)
    length = spec["shape"][1]
    data = _read(_byte_file, Path(source.form.path))
    n = len(data) // (length + 1)
    windows = data[: n * (length + 1)].view(n, length + 1)
    cut = n * 9 // 10
    windows = windows[:cut] if source.split == "train" else windows[cut:]
    dtype = getattr(torch, spec["dtype"])
    return Samples(
        inputs={name: windows[:, :-1]},
        input_dims={name: 0},
        labels=windows[:, 1:],
        label_dim=0,
        summary=f"{len(windows)} {source.split} windows of {length}+1 bytes",
        to_inputs=lambda drawn: {name: drawn[name].to(dtype)},
        to_labels=lambda drawn: drawn.long(),
    )


_LOADERS: dict[str, Callable[[DataSource], Samples]] = {
    "tensors": _load_tensors,
    "digits": _load_digits,
    "cifar10": _load_cifar,
    "cifar100": _load_cifar,
    "text": _load_text,
}


# Images -----------------------------------------------------------------------------------------


def channel_stats(images: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 images [N, C, H, W] scaled to [0, 1] by ``levels``,
    counted from a histogram of the 256 byte values so no float copy of the set is made."""
    values = torch.arange(256, dtype=torch.float64) / levels
    means, stds = [], []
    for channel in range(images.shape[1]):
        counts = torch.bincount(images[:, channel].reshape(-1), minlength=256).double()
        mean = (counts * values).sum() / counts.sum()
        means.append(mean)
        stds.append(((counts * (values - mean) ** 2).sum() / counts.sum()).sqrt())
    return torch.stack(means).float(), torch.stack(stds).float()


@dataclass(frozen=True)
class ImageBatch:
    """Turns a batch of stored uint8 images into the model's input: scaled to [0, 1], normalised
    per channel, resized bilinearly to the model's H x W, repeated to its channels."""

    name: str
    levels: int
    mean: torch.Tensor
    std: torch.Tensor
    size: tuple[int, int]
    channels: int
    dtype: torch.dtype

    def __call__(self, drawn: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images = drawn[self.name].float() / self.levels
        # a constant channel is only centred, never divided by zero
        std = self.std.clamp_min(1e-12)
        images = (images - self.mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        if tuple(images.shape[-2:]) != self.size:
            images = F.interpolate(images, size=self.size, mode="bilinear", align_corners=False)
        if images.shape[1] != self.channels:
            images = images.expand(-1, self.channels, -1, -1)
        return {self.name: images.to(self.dtype).contiguous()}


def _image_samples(
    source: DataSource,
    name: str,
    spec: Mapping[str, Any],
    images: torch.Tensor,
    labels: torch.Tensor,
    levels: int,
    mean: torch.Tensor,
    std: torch.Tensor,
) -> Samples:
    """Stored images with the per-batch steps that make them fit the model's input ``spec``."""
    _, channels, height, width = spec["shape"]
    stored = f"{images.shape[2]}x{images.shape[3]}"
    sizes = stored if stored == f"{height}x{width}" else f"{stored} -> {height}x{width}"
    return Samples(
        inputs={name: images},
        input_dims={name: 0},
        labels=labels,
        label_dim=0,
        summary=f"{len(labels)} {source.split} samples, {sizes}, {channels} channels",
        to_inputs=ImageBatch(
            name, levels, mean, std, (height, width), channels, getattr(torch, spec["dtype"])
        ),
    )
