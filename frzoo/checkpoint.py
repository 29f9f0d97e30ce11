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
from typing import Any, Dict, List, Sequence

import torch

from .config import recipe_diff
from .errors import FrzooError
from .split import original_key

FORMAT_VERSION = 1
# Recipe keys that may change between a run and its resumption without changing the maths.
RESUMABLE_CHANGES = ("train.epochs", "train.max_steps", "train.eval_every", "train.log_every",
                     "train.checkpoint_every", "train.threads", "train.progress", "run.",
                     "logging.", "devices", "data.root", "data.download", "data.num_workers",
                     "data.eval_batch_size", "data.limit_test", "plugins", "executor",
                     # a checkpoint holds one pipeline's state whatever R wrote it: the global
                     # batch stays data.batch_size, only float summation order changes
                     "distributed.replicas")


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


def load_file(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise FrzooError(f"checkpoint '{path}' does not exist.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
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
    taken = recipe.get("algorithm") or {}
    diff = {k: v for k, v in recipe_diff(state["recipe"], recipe).items()
            if not any(k == p or k.startswith(p) for p in RESUMABLE_CHANGES)
            and not _untaken_option(k, taken) and not _unused_loss_scale(k, recipe)}
    if state["partition"] != partition:
        diff["partition"] = (state["partition"], partition)
    if diff:
        lines = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, b_a in
                          list(diff.items())[:6] for a, b in [b_a])
        raise FrzooError(f"cannot resume from '{path}': it was made with a different recipe "
                         f"({lines}). Resume with the run's own recipe ({path.parent.parent}/"
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
