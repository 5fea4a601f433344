"""Training checkpoints of a pipeline: one file per stage, committed together, resumable.

Every rank writes its own stage file into ``<directory>/step_<step>/``; after a barrier rank 0
commits the step by rewriting ``<directory>/latest.json``, then removes older steps. Each file is
written to a temporary name, flushed to disk and renamed, so a crash at any point leaves the
previous committed checkpoint whole. The stage files keep the original model's keys, so they
merge back into one state dict for the unpartitioned model:

    python -m runtime.checkpoint merge CHECKPOINTS -o model.pt [--model generated_models/X.py]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import torch
from torch import Tensor

from runtime.cli import OneLineParser, fail
from runtime.stage import RuntimeConfigError, load_generated

log = logging.getLogger(__name__)

PROG = "runtime.checkpoint"
LATEST = "latest.json"
STEP_PREFIX = "step_"
FORMAT_VERSION = 1
_RESERVED_META = ("step", "n_stages", "format")


@dataclass
class StageState:
    """What one rank saves and restores: weights, optimizer, scheduler, RNG and free-form data.

    Files are read back with ``torch.load(weights_only=True)``, so ``extra`` holds plain data:
    numbers, strings, tensors, and lists, tuples and dicts of them.
    """

    step: int
    model: dict[str, Tensor]
    optimizer: dict
    scheduler: dict | None
    rng: dict
    extra: dict


def step_folder(directory: str | Path, step: int) -> Path:
    """The folder that holds the stage files of ``step``."""
    return Path(directory) / f"{STEP_PREFIX}{step:08d}"


def stage_file(directory: str | Path, step: int, rank: int) -> Path:
    """The file of stage ``rank`` at ``step``."""
    return step_folder(directory, step) / f"stage_{rank}.pt"


def pipeline_meta(model_path: str | Path, pipeline: Mapping[str, Any]) -> dict[str, Any]:
    """The ``meta`` for :func:`commit` that lets :func:`merge` find and check the model file."""
    return {
        "model": str(model_path),
        "model_name": pipeline["model"],
        "n_state_keys": len(pipeline["state_keys"]),
    }


def _fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable; some platforms cannot open folders."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _write_atomically(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through a temporary file in the same folder, fsync it, then rename it."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _to_cpu(value: Any) -> Any:
    """``value`` with every tensor inside dicts, lists and tuples moved to the CPU."""
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if type(value) is dict:
        return {key: _to_cpu(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_to_cpu(item) for item in value)
    return value


def capture_rng() -> dict:
    """The CPU and current CUDA device's RNG states, so dropout continues identically."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def restore_rng(rng: dict) -> None:
    """Set the RNG states that :func:`capture_rng` returned."""
    torch.set_rng_state(rng["torch"].cpu())
    cuda = rng.get("cuda")
    if cuda is None:
        return
    if torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda.cpu())
    else:
        log.warning("the checkpoint has a CUDA RNG state but CUDA is not available; ignored")


def save_stage(directory: str | Path, rank: int, n_stages: int, state: StageState) -> Path:
    """Write stage ``rank``'s state atomically to ``<directory>/step_<step>/stage_<rank>.pt``.

    Tensors are moved to the CPU so the file loads on any machine. The step counts only once
    :func:`commit` has seen every stage's file.
    """
    if not 0 <= rank < n_stages:
        raise ValueError(f"rank {rank} is outside the {n_stages} stages")
    path = stage_file(directory, state.step, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT_VERSION,
        "rank": rank,
        "n_stages": n_stages,
        "step": state.step,
        "model": _to_cpu(state.model),
        "optimizer": _to_cpu(state.optimizer),
        "scheduler": _to_cpu(state.scheduler),
        "rng": _to_cpu(state.rng),
        "extra": state.extra,
    }
    _write_atomically(path, lambda stream: torch.save(payload, stream))
    log.info("saved stage %d of step %d to %s", rank, state.step, path)
    return path


def _saved_steps(directory: Path) -> list[int]:
    """The steps that have a ``step_*`` folder under ``directory``, newest first."""
    steps = []
    for path in directory.glob(f"{STEP_PREFIX}*"):
        number = path.name.removeprefix(STEP_PREFIX)
        if path.is_dir() and number.isdigit():
            steps.append(int(number))
    return sorted(steps, reverse=True)


def _is_complete(directory: Path, step: int, n_stages: int) -> bool:
    """Whether every stage's file of ``step`` is there."""
    return all(stage_file(directory, step, rank).is_file() for rank in range(n_stages))


def _remove_old_steps(directory: Path, step: int, n_stages: int, keep_last: int) -> None:
    """Delete step folders older than ``step``, but the newest ``keep_last - 1`` complete ones."""
    older = [saved for saved in _saved_steps(directory) if saved < step]
    kept = [saved for saved in older if _is_complete(directory, saved, n_stages)]
    kept = kept[: keep_last - 1]
    for old in older:
        if old not in kept:
            shutil.rmtree(step_folder(directory, old), ignore_errors=True)
            log.info("removed checkpoint step %d", old)


def commit(directory: str | Path, step: int, n_stages: int, meta: dict, keep_last: int = 1) -> None:
    """Make ``step`` the latest checkpoint once every stage's file is there; rank 0 only.

    Call it after a barrier that follows every rank's :func:`save_stage`. ``latest.json`` is
    replaced atomically before older steps are removed, so a crash leaves one usable checkpoint.
    """
    directory = Path(directory)
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    clashing = sorted(set(meta) & set(_RESERVED_META))
    if clashing:
        raise ValueError(f"meta must not set {clashing[0]!r}: commit writes it")
    missing = [rank for rank in range(n_stages) if not stage_file(directory, step, rank).is_file()]
    if missing:
        raise RuntimeConfigError(
            f"cannot commit step {step}: {stage_file(directory, step, missing[0])} is missing; "
            "every rank must save its stage, into one folder that all ranks share"
        )
    record = {"format": FORMAT_VERSION, "step": step, "n_stages": n_stages, **meta}
    text = json.dumps(record, indent=2) + "\n"
    _write_atomically(directory / LATEST, lambda stream: stream.write(text.encode()))
    log.info("committed checkpoint step %d in %s", step, directory)
    _remove_old_steps(directory, step, n_stages, keep_last)


def _read_latest(directory: str | Path) -> dict[str, Any] | None:
    """The record of the latest committed checkpoint, or None when nothing was committed."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise RuntimeConfigError(f"{str(directory)!r} is a file, not a checkpoint folder")
    path = directory / LATEST
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise RuntimeConfigError(f"cannot read {str(path)!r}: {error}") from None
    if not isinstance(record, dict) or not all(
        isinstance(record.get(key), int) for key in ("step", "n_stages")
    ):
        raise RuntimeConfigError(f"{str(path)!r} has no integer step and n_stages")
    return record


def _require_latest(directory: str | Path) -> dict[str, Any]:
    """Like :func:`_read_latest`, but a folder without a committed checkpoint is an error."""
    record = _read_latest(directory)
    if record is None:
        if not Path(directory).is_dir():
            raise RuntimeConfigError(f"no checkpoint folder {str(directory)!r}")
        raise RuntimeConfigError(
            f"no committed checkpoint in {str(directory)!r} (no {LATEST}): "
            "pass the folder a training run saved its checkpoints to"
        )
    return record


def latest_step(directory: str | Path) -> int | None:
    """The step of the latest committed checkpoint in ``directory``; None when there is none."""
    record = _read_latest(directory)
    return None if record is None else int(record["step"])


def _check_stage_count(
    directory: str | Path, record: Mapping[str, Any], n_stages: int, hint: str
) -> None:
    """The checkpoint must have as many stages as the model it is used with."""
    saved = int(record["n_stages"])
    if saved != n_stages:
        raise RuntimeConfigError(
            f"the checkpoint in {str(directory)!r} was written for {saved} stages but the model "
            f"has {n_stages}: {hint}"
        )


def _read_stage_file(directory: str | Path, step: int, rank: int, map_location: Any) -> dict:
    """The payload of one stage file, checked against the step and rank it should hold."""
    path = stage_file(directory, step, rank)
    if not path.is_file():
        raise RuntimeConfigError(
            f"the checkpoint of step {step} has no file for stage {rank} ({str(path)!r}): "
            "the folder is incomplete; restore it or start from another checkpoint"
        )
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch.load raises many kinds on a damaged file
        raise RuntimeConfigError(
            f"cannot read stage file {str(path)!r} ({type(error).__name__}): it is damaged; "
            "restore it or start from another checkpoint"
        ) from None
    if not isinstance(payload, dict) or (payload.get("step"), payload.get("rank")) != (step, rank):
        raise RuntimeConfigError(
            f"{str(path)!r} does not hold stage {rank} of step {step}; the folder was altered"
        )
    return payload


def load_stage(
    directory: str | Path, rank: int, n_stages: int, map_location: Any = "cpu"
) -> StageState:
    """Stage ``rank``'s state from the latest committed checkpoint in ``directory``."""
    record = _require_latest(directory)
    _check_stage_count(
        directory,
        record,
        n_stages,
        "resume with the generated file it was trained with, or merge it "
        f"(python -m {PROG} merge) and start from it with --init_checkpoint",
    )
    payload = _read_stage_file(directory, int(record["step"]), rank, map_location)
    return StageState(
        step=payload["step"],
        model=payload["model"],
        optimizer=payload["optimizer"],
        scheduler=payload["scheduler"],
        rng=payload["rng"],
        extra=payload["extra"],
    )


def _as_pipeline(
    pipeline_or_module: Mapping[str, Any] | ModuleType | str | Path,
) -> Mapping[str, Any]:
    """The ``PIPELINE`` of a generated file given by path, as a module, or as the dict itself."""
    if isinstance(pipeline_or_module, (str, Path)):
        return load_generated(pipeline_or_module).PIPELINE
    if isinstance(pipeline_or_module, ModuleType):
        return pipeline_or_module.PIPELINE
    return pipeline_or_module


def _pipeline_from_record(record: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The ``PIPELINE`` of the generated file named in the checkpoint, when it is still there."""
    path = record.get("model")
    if path is None:
        return None
    if not Path(path).is_file():
        log.warning("model file %s of the checkpoint is gone; keys follow stage order", path)
        return None
    return load_generated(path).PIPELINE


def _join_stages(stage_dicts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """One dict in stage order; a tied key held by several stages keeps its first copy."""
    merged: dict[str, Tensor] = {}
    for rank, state_dict in enumerate(stage_dicts):
        for key, value in state_dict.items():
            if key not in merged:
                merged[key] = value
            elif not torch.equal(merged[key], value):
                log.warning("tied %s differs in stage %d; keeping the first copy", key, rank)
    return merged


def _order_by_pipeline(
    merged: dict[str, Tensor], pipeline: Mapping[str, Any], directory: str | Path
) -> dict[str, Tensor]:
    """``merged`` in the original model's key order, checked to hold exactly its keys."""
    keys = list(pipeline["state_keys"])
    missing = [key for key in keys if key not in merged]
    unknown = sorted(set(merged) - set(keys))
    if missing or unknown:
        problem = f"lacks {missing[0]!r}" if missing else f"has unknown key {unknown[0]!r}"
        raise RuntimeConfigError(
            f"the checkpoint in {str(directory)!r} {problem} of model "
            f"{pipeline.get('model', '?')!r}: pass the generated file it was trained with"
        )
    return {key: merged[key] for key in keys}


def merge(
    directory: str | Path,
    pipeline_or_module: Mapping[str, Any] | ModuleType | str | Path | None = None,
) -> dict[str, Tensor]:
    """One state dict under the original model's keys from the latest committed checkpoint.

    Keys follow ``PIPELINE["state_keys"]`` of the generated file passed in (a path, the module
    or its ``PIPELINE``) or else the one named in the checkpoint; without either, stage order.
    """
    return _merge_committed(directory, _require_latest(directory), pipeline_or_module)


def _merge_committed(
    directory: str | Path,
    record: Mapping[str, Any],
    pipeline_or_module: Mapping[str, Any] | ModuleType | str | Path | None,
) -> dict[str, Tensor]:
    """:func:`merge` of the checkpoint that ``record`` describes."""
    step, n_stages = int(record["step"]), int(record["n_stages"])
    pipeline = (
        _pipeline_from_record(record)
        if pipeline_or_module is None
        else _as_pipeline(pipeline_or_module)
    )
    if pipeline is not None:
        hint = "pass the generated file it was trained with"
        _check_stage_count(directory, record, len(pipeline["stages"]), hint)
    stage_dicts = [
        _read_stage_file(directory, step, rank, "cpu")["model"] for rank in range(n_stages)
    ]
    merged = _join_stages(stage_dicts)
    if pipeline is None:
        return merged
    return _order_by_pipeline(merged, pipeline, directory)


def build_parser() -> argparse.ArgumentParser:
    """The ``merge`` command and its flags."""
    parser = OneLineParser(prog=PROG, description="Work with pipeline training checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    merging = commands.add_parser(
        "merge", help="join the latest checkpoint's stages into one original-model state dict"
    )
    merging.add_argument("directory", help="the checkpoint folder a training run wrote")
    merging.add_argument("-o", "--output", required=True, help="where to write the state dict")
    merging.add_argument(
        "--model", help="generated file, for its key order (default: the one in latest.json)"
    )
    return parser


def _merge_command(args: argparse.Namespace) -> str:
    """Merge, write the state dict atomically, and say what was written."""
    record = _require_latest(args.directory)
    merged = _merge_committed(args.directory, record, args.model)
    output = Path(args.output)
    if not output.parent.is_dir():
        raise RuntimeConfigError(f"no folder {str(output.parent)!r} to write {str(output)!r} in")
    try:
        _write_atomically(output, lambda stream: torch.save(merged, stream))
    except OSError as error:
        raise RuntimeConfigError(f"cannot write {str(output)!r}: {error}") from None
    return (
        f"wrote {args.output}: {len(merged)} tensors from step {record['step']} "
        f"of {record['n_stages']} stages"
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m runtime.checkpoint merge D -o model.pt [--model generated_models/X.py]``."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        print(_merge_command(args))
    except RuntimeConfigError as error:
        fail(PROG, str(error))


if __name__ == "__main__":
    main()
