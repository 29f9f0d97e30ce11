"""Save and restore a run, and export the trained model in its own parameter names.

A checkpoint holds everything the next iteration depends on: per part the weights, optimizer
state and the algorithm's carried state (Features Replay's history), the deltas in flight
between parts, the step and the data position. RNG state is not needed: dropout masks and
augmentation are seeded from (seed, step) (see frzoo.algorithms.base.step_seed and frzoo.data).
Files are written to a temporary name and renamed, so a killed run keeps its last complete one.
Loading never executes code from the file (``weights_only=True``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import torch
from omegaconf import OmegaConf

from .config import recipe_diff
from .errors import FrzooError
from .split import original_key

FORMAT_VERSION = 1
# Recipe keys that may change between a run and its resumption without changing the maths
# (docs/recipes.md lists them with the reason): how long, how often to log, evaluate and save,
# where the files are, which process runs which part and how they connect.
RESUMABLE_CHANGES = ("train.epochs", "train.max_steps", "train.eval_every", "train.log_every",
                     "train.checkpoint_every", "train.threads", "train.progress", "train.trace",
                     "run.",
                     "logging.", "devices", "data.root", "data.download", "data.num_workers",
                     "data.eval_batch_size", "data.limit_test", "plugins", "executor",
                     # a checkpoint holds one pipeline's state whatever R wrote it: the global
                     # batch stays data.batch_size, only float summation order changes
                     "distributed.replicas",
                     # how the processes reach each other, and how long they wait: the fix a
                     # stall's or a busy port's message recommends must be allowed on resume
                     "distributed.timeout_s", "distributed.master_addr",
                     "distributed.master_port", "distributed.backend")


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`.

    Whatever stops the write (a kill, a full disk), `path` holds either the previous complete
    file or the new complete one, never a part of one. A failed write is a one-line FrzooError.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    sink = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            sink = _Sink(fh)
            torch.save(obj, sink)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)  # the rename itself survives a power cut
    except (OSError, RuntimeError) as exc:
        # torch's zip writer turns a failed write into a RuntimeError; the sink kept the cause
        cause = sink.error if sink is not None and sink.error is not None else exc
        if not isinstance(cause, OSError):
            raise
        kept = "the previous version is kept" if path.exists() else "no earlier version exists"
        raise FrzooError(f"could not write '{path}' ({cause.strerror or cause}); {kept}. Free "
                         f"space or choose a writable run.out_dir.") from None
    finally:
        if tmp.exists():
            tmp.unlink()


class _Sink:
    """The file torch.save writes to, remembering the OSError of a failed write."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.error: Any = None

    def write(self, data: Any) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_file(path: Path, mmap: bool = False) -> Dict[str, Any]:
    """The checkpoint at `path`, checked; `mmap`: its tensors mapped from the file, not read
    (to look at its recipe and progress before anything is built)."""
    if not path.is_file():
        raise FrzooError(f"checkpoint '{path}' does not exist.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt files raise many types
        raise FrzooError(f"checkpoint '{path}' is unreadable ({(str(exc).strip().splitlines() or [type(exc).__name__])[0]}); "
                         f"it may be truncated or not a frzoo checkpoint.") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise FrzooError(f"checkpoint '{path}' is not a frzoo checkpoint of format "
                         f"{FORMAT_VERSION}.")
    return state


def checkpoint_state(*, recipe: Dict[str, Any], partition: List[List[str]],
                     parts: List[Dict[str, Any]], executor_state: Dict[str, Any],
                     progress: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "recipe": recipe,
        "partition": partition,
        "progress": progress,  # step, epoch, batch (next to run), best accuracy ...
        "parts": parts,  # per part: model, optimizer, algorithm state
        "executor": executor_state,
    }


def check_compatible(state: Dict[str, Any], recipe: Dict[str, Any],
                     partition: List[List[str]], path: Path) -> None:
    """Refuse to resume with a different model, split, algorithm or data, saying what differs."""
    diff = recipe_changes(state["recipe"], recipe, path)
    if state["partition"] != partition:
        diff["partition"] = (state["partition"], partition)
    _refuse(diff, path)


def recipe_changes(saved: Dict[str, Any], recipe: Dict[str, Any],
                   path: Path) -> Dict[str, tuple]:
    """{key: (saved, now)} for each recipe key that differs and may not change on resume. The
    algorithm is refused first, on its own: its options and state belong to it."""
    old, new = (saved.get("algorithm") or {}).get("name"), (recipe.get("algorithm") or {}).get("name")
    if old != new:
        raise FrzooError(f"cannot resume from '{path}': the algorithm cannot change on resume "
                         f"(algorithm.name: {old!r} in the checkpoint, {new!r} now; its state and "
                         f"options belong to it). Resume with algorithm.name={old}, or start a "
                         f"new run.")
    taken = recipe.get("algorithm") or {}
    return {k: v for k, v in recipe_diff(saved, recipe).items()
            if not any(k == p or k.startswith(p) for p in RESUMABLE_CHANGES)
            and not _untaken_option(k, taken) and not _unused_loss_scale(k, recipe)}


def check_recipe(saved: Dict[str, Any], recipe: Dict[str, Any], path: Path, *,
                 skip: Sequence[str] = ()) -> None:
    """The recipe half of :func:`check_compatible`, for the check before any process starts
    (frzoo.preflight); keys starting with one of `skip` are left to the full check."""
    diff = recipe_changes(saved, recipe, path)
    _refuse({k: v for k, v in diff.items() if not k.startswith(tuple(skip))}, path)


def _refuse(diff: Dict[str, tuple], path: Path) -> None:
    if diff:
        lines = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, b_a in
                          list(diff.items())[:6] for a, b in [b_a])
        split = " and so another partition" if any(k.startswith("split.") for k in diff) else ""
        raise FrzooError(f"cannot resume from '{path}': it was made with a different recipe "
                         f"({lines}){split}. Resume with the run's own recipe ({path.parent.parent}/"
                         f"recipe.yaml) or start a new run.")


def _untaken_option(key: str, taken: Dict[str, Any]) -> bool:
    """An `algorithm.` key the current (resolved) recipe lacks: its algorithm does not take it.

    The recipe a run saves holds every option its algorithm takes. Checkpoints from before
    algorithms declared their options hold fr's `warmup` and `replay_bn` for every algorithm,
    and their build silently dropped those the algorithm did not take, so such a key changed
    nothing and must not block the resume."""
    section, _, option = key.partition(".")
    return section == "algorithm" and option not in taken


def _unused_loss_scale(key: str, recipe: Dict[str, Any]) -> bool:
    """A `train.loss_scale` key of a run that is not fp16: it changes nothing (and checkpoints
    from before the key existed lack it)."""
    return key.startswith("train.loss_scale") and recipe["train"].get("precision") != "fp16"


def run_recipe(run_dir: Path, echo: Callable[[str], None]) -> Path:
    """The recipe `frzoo run --resume RUN_DIR` starts from: RUN_DIR/recipe.yaml. The checkpoint
    holds the same recipe, so where the file is gone (deleted, or only checkpoints/ copied) it is
    written back from the checkpoint, and the user is told."""
    path = run_dir / "recipe.yaml"
    checkpoint = run_dir / "checkpoints" / "last.pt"
    if path.is_file():
        return path
    if not checkpoint.is_file():
        raise FrzooError(f"nothing to resume in '{run_dir}': neither {path} nor {checkpoint} "
                         f"exists.")
    state = load_file(checkpoint, mmap=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # rundir.remove_partial_files' form
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(state["recipe"])))
    os.replace(tmp, path)
    echo(f"{path} is missing; the checkpoint holds the run's recipe, so it was written back "
         f"from {checkpoint} (step {state['progress']['step']}) and the run resumes with it.")
    return path


def export_state_dict(parts_states: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Merge per-part states (already in original names) into one CPU state_dict."""
    out: Dict[str, torch.Tensor] = {}
    for state in parts_states:
        for key, value in state.items():
            out[key] = value.detach().cpu().clone()
    return out


def export_from_checkpoint(state: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The model's state_dict in its own parameter names, from a frzoo checkpoint."""
    return {original_key(names, key): value
            for names, part in zip(state["partition"], state["parts"])
            for key, value in part["model"].items()}
