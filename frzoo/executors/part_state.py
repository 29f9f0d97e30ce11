"""One part's checkpoint entries, named so that any layout can read them back.

A checkpoint (frzoo.checkpoint_files) is one flat namespace of tensors; each process writes the
entries of the parts it runs:

    model/<name>              weights and buffers, under the UNSPLIT model's names (final.pt's)
    optim/<name>/<field>      the optimizer's state of parameter <name> (momentum_buffer, exp_avg,
                              exp_avg_sq, step), keyed by the parameter, not its index
    part<k>/r<r>/layout       JSON (uint8): what belongs to this layout only, for part k (0-based)
    part<k>/r<r>/t<i>         of replica r: the algorithm's state (Features Replay's history, with
                              its step numbers), the fp16 loss scaler, the deltas part k made that
                              part k-1 has not used (`sent`, with their scales), and the part's
                              model keys and parameter order (to rebuild format 1's per-part view)

The `model/` and `optim/` entries do not depend on the split, K, the devices, the replica count,
the executor or the algorithm: a resume with another layout reads them by name. The `part` entries
do, and are read only by a resume with the same partition and algorithm (frzoo.checkpoint
.carries_layout); the R copies of a part write the same `model/` and `optim/` entries, which
DCP stores once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from torch import Tensor

from ..algorithms.base import PartAlgorithm
from ..checkpoint import OLD_FORMAT, OldCheckpoint, find_checkpoint, open_checkpoint
from ..checkpoint_files import decode_json, encode_json
from .shards import concat_shards, merge_part_states, shard_state, shard_tensors
from .topology import Layout

Entries = Dict[str, Tensor]


# ---------------------------------------------------------------- nested values <-> entries
def flatten(value: Any, prefix: str, out: Entries) -> Any:
    """`value` (dicts with str keys, lists, tuples, tensors, numbers, str, None) as a JSON
    skeleton; each tensor goes into `out` under `prefix` + a running number."""
    if isinstance(value, Tensor):
        key = f"{prefix}t{sum(k.startswith(prefix) for k in out)}"
        out[key] = value.detach()
        return {"t": key}
    if isinstance(value, dict):
        return {"d": {str(k): flatten(v, prefix, out) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return {"l": [flatten(v, prefix, out) for v in value]}
    return {"v": value}


def unflatten(skeleton: Any, tensors: Entries) -> Any:
    if "t" in skeleton:
        return tensors[skeleton["t"]]
    if "d" in skeleton:
        return {k: unflatten(v, tensors) for k, v in skeleton["d"].items()}
    if "l" in skeleton:
        return [unflatten(v, tensors) for v in skeleton["l"]]
    return skeleton["v"]


def layout_prefix(part: int, replica: int) -> str:
    return f"part{part}/r{replica}/"


# ---------------------------------------------------------------- saving
def model_names(algo: PartAlgorithm) -> Tuple[Dict[str, str], List[str]]:
    """{the part's state_dict key: the unsplit model's name}, and the unsplit names of the
    optimizer's parameters in its own order (the order of its state's indices)."""
    part = algo.part
    keys = {key: part.original_key(part.names, key) for key in part.state_dict()}
    by_id = {id(p): part.original_key(part.names, n) for n, p in part.named_parameters()}
    order = [by_id[id(p)] for group in algo.optimizer.param_groups for p in group["params"]]
    return keys, order


def part_entries(algo: PartAlgorithm, replica: int, sent: Sequence[Any],
                 sent_scales: Sequence[float]) -> Entries:
    """The entries part `algo.index` of replica `replica` writes; `sent`: the deltas it made
    that the previous part has not used (checkpoint form, frzoo.activation.to_saved)."""
    keys, order = model_names(algo)
    out: Entries = {f"model/{keys[key]}": value.detach()
                    for key, value in algo.part.state_dict().items()}
    for index, fields in algo.optimizer.state_dict()["state"].items():
        for field, value in fields.items():
            if isinstance(value, Tensor):  # SGD without momentum keeps None: nothing to keep
                out[f"optim/{order[index]}/{field}"] = value.detach()
    prefix = layout_prefix(algo.index, replica)
    layout = {"algorithm": algo.state_dict(), "sent": list(sent), "sent_scales": list(sent_scales),
              "loss_scale": algo.scaler.state_dict() if algo.scaler is not None else None,
              "batch_keys": list(type(algo).batch_state_keys), "model_keys": list(keys.items()),
              "params": order, "param_groups": algo.optimizer.state_dict()["param_groups"]}
    out[prefix + "layout"] = encode_json(flatten(layout, prefix, out))
    return out


# ---------------------------------------------------------------- loading
def load_weights(algo: PartAlgorithm, checkpoint: Any) -> None:
    """The part's weights and its parameters' optimizer state, by the unsplit model's names,
    whatever layout wrote them."""
    keys, order = model_names(algo)
    checkpoint.read_into({f"model/{keys[key]}": value
                          for key, value in algo.part.state_dict().items()})
    wanted = [key for name in order for key in checkpoint.keys(f"optim/{name}/")]
    read = checkpoint.read_new(wanted) if wanted else {}
    state: Dict[int, Dict[str, Tensor]] = {}
    for index, name in enumerate(order):
        prefix = f"optim/{name}/"
        fields = {k[len(prefix):]: v for k, v in read.items() if k.startswith(prefix)}
        if fields:
            state[index] = fields
    groups = algo.optimizer.state_dict()["param_groups"]  # the recipe's; the lr is set per step
    algo.optimizer.load_state_dict({"state": state, "param_groups": groups})


def read_layout(checkpoint: Any, part: int, replica: int) -> Dict[str, Any]:
    prefix = layout_prefix(part, replica)
    read = checkpoint.read_new([prefix + "layout", *[k for k in checkpoint.keys(prefix)
                                                     if k != prefix + "layout"]])
    return unflatten(decode_json(read[prefix + "layout"]), read)


def layout_state(checkpoint: Any, algo: PartAlgorithm, replica: int, replicas: int
                 ) -> Dict[str, Any]:
    """Part `algo.index`'s layout entries for replica `replica` of `replicas`: the saved
    replica's own where R is unchanged, else the rows of every saved replica concatenated (one
    pipeline's state, frzoo.executors.shards) and cut to this replica's."""
    saved = int(checkpoint.meta.get("replicas", 1))
    if saved == replicas:
        return read_layout(checkpoint, algo.index, replica)
    keys = type(algo).batch_state_keys
    copies = [read_layout(checkpoint, algo.index, r) for r in range(saved)]
    state = merge_part_states(copies, keys)  # replica 0's, with every replica's rows
    state["sent"] = concat_shards([c["sent"] for c in copies])
    if replicas == 1:
        return state
    layout = Layout(algo.index + replica * algo.num_parts, algo.num_parts, replicas)
    state = shard_state(state, keys, layout)
    state["sent"] = shard_tensors(state["sent"], layout)
    return state


def load_layout(algo: PartAlgorithm, state: Dict[str, Any]) -> None:
    """The algorithm's carried state and the fp16 scaler's, from :func:`layout_state`."""
    algo.load_state_dict(state["algorithm"])
    if algo.scaler is not None and state.get("loss_scale") is not None:
        algo.scaler.load_state_dict(state["loss_scale"])


def as_format1(checkpoint: Any) -> Dict[str, Any]:
    """A format-2 checkpoint in format 1's form (one dict: recipe, partition, progress, per part
    its state_dict, optimizer state_dict and algorithm state, the mailboxes; the replicas' rows
    concatenated into one pipeline's), as `torch.save` would store it as `last.pt`, which
    frzoo resumes: for tools, tests and a move back to an older frzoo."""
    meta = checkpoint.meta
    parts, sent, scales = [], [], []
    for k in range(len(meta["partition"])):
        copies = [read_layout(checkpoint, k, r) for r in range(int(meta.get("replicas", 1)))]
        layout = merge_part_states(copies, copies[0]["batch_keys"])
        layout["sent"] = concat_shards([c["sent"] for c in copies])
        model = checkpoint.read_new([f"model/{name}" for _, name in layout["model_keys"]])
        optimizer: Dict[str, Any] = {"state": {}, "param_groups": layout["param_groups"]}
        for index, name in enumerate(layout["params"]):
            keys = checkpoint.keys(f"optim/{name}/")
            if keys:
                optimizer["state"][index] = {key.rsplit("/", 1)[1]: value for key, value
                                             in checkpoint.read_new(keys).items()}
        part = {"model": {local: model[f"model/{name}"] for local, name in layout["model_keys"]},
                "optimizer": optimizer, "algorithm": layout["algorithm"]}
        if layout["loss_scale"] is not None:
            part["loss_scale"] = layout["loss_scale"]
        parts.append(part)
        sent.append(layout["sent"])
        scales.append(layout["sent_scales"])
    executor: Dict[str, Any] = {"mailboxes": sent[1:] + [[]]}
    if any("loss_scale" in part for part in parts):
        executor["delta_scales"] = scales[1:] + [[]]
    return {"format": OLD_FORMAT, "recipe": meta["recipe"], "partition": meta["partition"],
            "progress": meta["progress"], "parts": parts, "executor": executor}


def read_checkpoint(path: Path) -> Dict[str, Any]:
    """The checkpoint `path` names (a run folder: its newest), whichever format, in format 1's
    form (:func:`as_format1`)."""
    checkpoint = open_checkpoint(find_checkpoint(path))
    return checkpoint.legacy if isinstance(checkpoint, OldCheckpoint) else as_format1(checkpoint)
