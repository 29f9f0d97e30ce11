"""What a checkpoint holds, what may change on resume, and the model's weights from any checkpoint.

A checkpoint holds everything the next iteration depends on: per part the weights, optimizer
state and the algorithm's carried state (Features Replay's history), the deltas in flight
between parts, the step and the data position (the step: epoch and batch follow from it). RNG
state is not needed: dropout masks and augmentation are seeded from (seed, step) (see
frzoo.algorithms.base.step_seed and frzoo.data), so none is stored.

Format 2 (frzoo.checkpoint_files) is a torch.distributed.checkpoint folder every process writes
its own part of; format 1 (`checkpoints/last.pt`, one file gathered to the leader, written by
frzoo before it) still resumes: :func:`open_checkpoint` opens either. Loading never executes
code from the files (``weights_only=True``; DCP's index through an allow-list).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Union

import torch
from omegaconf import OmegaConf

from . import rundir
from .checkpoint_files import META_KEY, DcpCheckpoint, FORMAT_VERSION, encode_json, fsync_dir
from .config import recipe_diff
from .errors import FrzooError
from .split import original_key

OLD_FORMAT = 1  # checkpoints/last.pt
# Recipe keys that may change between a run and its resumption (docs/recipes.md lists them with
# the reason): how long, how often to log, evaluate and save, where the files are, which process
# runs which part and how they connect; and the layout: the split and the algorithm, whose
# change drops what belongs to the old layout (carries_layout) but not the weights and the
# optimizer state, which are stored by parameter name.
RESUMABLE_CHANGES = ("train.epochs", "train.max_steps", "train.eval_every", "train.log_every",
                     "train.checkpoint_every", "train.checkpoint_async", "train.threads",
                     "train.progress", "train.trace", "run.",
                     "logging.", "devices", "data.root", "data.download", "data.num_workers",
                     "data.eval_batch_size", "data.limit_test", "plugins", "executor",
                     # a checkpoint holds one pipeline's state whatever R wrote it: the global
                     # batch stays data.batch_size, only float summation order changes
                     "distributed.replicas",
                     # how the processes reach each other, and how long they wait: the fix a
                     # stall's or a busy port's message recommends must be allowed on resume
                     "distributed.timeout_s", "distributed.master_addr",
                     "distributed.master_port", "distributed.backend",
                     # another layout: weights and optimizer state carry over by name, the old
                     # pipeline's histories and deltas in flight do not (layout_note)
                     "split.", "algorithm.")


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
        fsync_dir(path.parent)  # the rename itself survives a power cut
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
    if not isinstance(state, dict) or state.get("format") != OLD_FORMAT:
        raise FrzooError(f"checkpoint '{path}' is not a frzoo checkpoint of format "
                         f"{OLD_FORMAT}.")
    return state


class OldCheckpoint:
    """A format-1 checkpoint (`last.pt`), read whole; `legacy` is its state, which the
    executors load as frzoo before format 2 did (same layout only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.legacy = load_file(path)
        self.meta = {"format": OLD_FORMAT, "replicas": 1,
                     **{k: self.legacy[k] for k in ("recipe", "partition", "progress")}}


Checkpoint = Union[DcpCheckpoint, OldCheckpoint]


def open_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint at `path`: a format-2 folder or a format-1 file, its meta (recipe,
    partition, progress, replicas) read, its tensors read when asked."""
    if path.is_dir():
        return DcpCheckpoint(path)
    return OldCheckpoint(path)


def find_checkpoint(path: Path) -> Path:
    """The checkpoint `path` names: a run folder (its newest checkpoint), a checkpoint folder
    (format 2) or a checkpoint file (format 1)."""
    if path.is_file() or (path / ".metadata").is_file():
        return path
    if not path.is_dir():
        raise FrzooError(f"'{path}' does not exist; give a run folder or a checkpoint.")
    found = rundir.checkpoint_path(path)
    if not found.exists():
        raise FrzooError(f"'{path}' holds no checkpoint (no {found.parent}/step-* folder, no "
                         f"{found}); give a run folder or a checkpoint.")
    return found


def meta_entry(*, recipe: Dict[str, Any], partition: List[List[str]],
               progress: Dict[str, Any], replicas: int) -> Dict[str, Any]:
    """The leader's `meta` entry of a checkpoint: the resolved recipe, the partition it was
    written with, the progress (step, best accuracy, clocks, lr horizon) and the replica count
    (whose copies of each part's history it holds)."""
    return {META_KEY: encode_json({"format": FORMAT_VERSION, "recipe": recipe,
                                   "partition": partition, "progress": progress,
                                   "replicas": replicas})}


def check_compatible(meta: Dict[str, Any], recipe: Dict[str, Any], path: Path) -> None:
    """Refuse to resume with a different model, optimizer or data, saying what differs."""
    _refuse(recipe_changes(meta["recipe"], recipe, path), path)


def carries_layout(meta: Dict[str, Any], recipe: Dict[str, Any],
                   partition: List[List[str]]) -> bool:
    """Whether a resume keeps the layout the checkpoint was written with: the same partition and
    the same algorithm section. Then everything carries over, bit for bit; else only the weights
    and the optimizer state (the rule: :func:`layout_note`)."""
    was, now = meta["recipe"].get("algorithm") or {}, recipe.get("algorithm") or {}
    # the options the algorithm takes (an old checkpoint may hold options it never took)
    return meta["partition"] == partition and all(was.get(k) == v for k, v in now.items())


def layout_note(meta: Dict[str, Any], recipe: Dict[str, Any], partition: List[List[str]],
                staleness: Sequence[int]) -> str:
    """The one line a resume with another layout says at start: what changed, what carried over,
    and the rule for the rest. The rule: the old pipeline's histories and deltas in flight (and a
    DDG weight copy, the fp16 loss scale) are dropped, and the new pipeline starts its warm-up
    afresh at the resumed step, as a first start does at step 0 (`staleness`: the new parts')."""
    step, k_now, k_was = meta["progress"]["step"], len(partition), len(meta["partition"])
    was, now = meta["recipe"]["algorithm"], recipe["algorithm"]
    changes = [f"K={k_now} (was {k_was})" if k_now != k_was else
               ("another partition" if meta["partition"] != partition else "")]
    if was["name"] != now["name"]:
        changes.append(f"algorithm {now['name']} (was {was['name']})")
    elif was != now:
        changes.append("other algorithm options")
    if max(staleness, default=0) == 0:
        rule = f"{now['name']} keeps no state between steps, so it starts as it would"
    else:
        verb = "steps on a zero gradient in" if now.get("warmup") == "zeros" else "skips"
        rule = (f"{now['name']} restarts its warm-up: part k {verb} its first {k_now}-k "
                f"updates")
    return (f"resumed step {step} with {' and '.join(c for c in changes if c)}: weights and "
            f"optimizer state carried; the old layout's histories and deltas in flight are "
            f"dropped and {rule} (docs/checkpoints.md)")


def recipe_changes(saved: Dict[str, Any], recipe: Dict[str, Any],
                   path: Path) -> Dict[str, tuple]:
    """{key: (saved, now)} for each recipe key that differs and may not change on resume."""
    taken = recipe.get("algorithm") or {}
    return {k: v for k, v in recipe_diff(saved, recipe).items()
            if not any(k == p or k.startswith(p) for p in RESUMABLE_CHANGES)
            and not _untaken_option(k, taken) and not _unused_loss_scale(k, recipe)}


def check_recipe(saved: Dict[str, Any], recipe: Dict[str, Any], path: Path, *,
                 skip: Sequence[str] = ()) -> None:
    """:func:`check_compatible`, for the check before any process starts (frzoo.preflight);
    keys starting with one of `skip` are left to the full check."""
    diff = recipe_changes(saved, recipe, path)
    _refuse({k: v for k, v in diff.items() if not k.startswith(tuple(skip))}, path)


def _refuse(diff: Dict[str, tuple], path: Path) -> None:
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


def run_recipe(run_dir: Path, echo: Callable[[str], None]) -> Path:
    """The recipe `frzoo run --resume RUN_DIR` starts from: RUN_DIR/recipe.yaml. The checkpoint
    holds the same recipe, so where the file is gone (deleted, or only checkpoints/ copied) it is
    written back from the checkpoint, and the user is told."""
    path = run_dir / "recipe.yaml"
    checkpoint = rundir.checkpoint_path(run_dir)
    if path.is_file():
        return path
    if not checkpoint.exists():
        raise FrzooError(f"nothing to resume in '{run_dir}': neither {path} nor a checkpoint "
                         f"in {checkpoint.parent} exists.")
    meta = open_checkpoint(checkpoint).meta
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # rundir.remove_partial_files' form
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(meta["recipe"])))
    os.replace(tmp, path)
    echo(f"{path} is missing; the checkpoint holds the run's recipe, so it was written back "
         f"from {checkpoint} (step {meta['progress']['step']}) and the run resumes with it.")
    return path


def export_state_dict(parts_states: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Merge per-part states (already in original names) into one CPU state_dict."""
    out: Dict[str, torch.Tensor] = {}
    for state in parts_states:
        for key, value in state.items():
            out[key] = value.detach().cpu().clone()
    return out


def export_from_checkpoint(state: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The model's state_dict in its own parameter names, from a format-1 checkpoint's state."""
    return {original_key(names, key): value
            for names, part in zip(state["partition"], state["parts"])
            for key, value in part["model"].items()}


def weights_of(checkpoint: Checkpoint) -> Dict[str, torch.Tensor]:
    """The model's state_dict in its own parameter names, from a checkpoint of either format."""
    if isinstance(checkpoint, OldCheckpoint):
        return export_from_checkpoint(checkpoint.legacy)
    keys = checkpoint.keys("model/")
    return {k[len("model/"):]: v for k, v in checkpoint.read_new(keys).items()}
