"""From whatever form a split is given in to checked parts: the one place that picks the cut.

The chain of children (frzoo.split.chain) is always tried first: it is exact and needs no
tracing. The traced forward (frzoo.split.fx, fx_parts) takes over at each of three stages where
the chain cannot do the job:

1. resolving names: a point or part the chain cannot reach (inside a module that is not an
   ``nn.Sequential``);
2. building parts: a model that keeps tensors outside the modules of its chain (a ViT's
   ``cls_token``);
3. checking parts: chain parts that do not compute what the model computes (functional code
   between children, as in a Mixer's head).

docs/partitioning.md, "How frzoo chooses", describes the same steps for users.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from torch import Tensor, nn

from ..errors import FrzooError
from . import chain
from .check import EquivalenceReport, check_equivalence
from .fx import fx_partition
from .fx_parts import FxPart, build_fx_parts
from .plan import NotAChainError, Partition, SplitPart
from .rule import points_for_k
from .trace import trace_model


@dataclass
class Split:
    """A resolved split: the partition, its parts once built, their check once run. The partition
    is always the one the parts implement (an fx fallback may have re-grouped the names)."""
    partition: Partition
    parts: Optional[List[SplitPart]] = None
    report: Optional[EquivalenceReport] = None


def resolve(model: nn.Module, *, points: Optional[Sequence[str]] = None,
            parts: Optional[Sequence[Sequence[str]]] = None, k: Optional[int] = None,
            presets: Optional[Dict[int, List[str]]] = None,
            partition: Optional[Partition] = None, build: bool = False,
            sample: Optional[Tensor] = None) -> Split:
    """Resolve a split of `model`, chain first, on the trace where the chain cannot do it.

    The split is given as explicit module lists (`parts`), split points (`points`), a number of
    parts (`k`: its registered preset, else the authors' rule), or an already resolved
    `partition`. With `build` the parts are built too; with a `sample` they are also checked
    against the whole model (and a chain split that fails the check is redone on the trace).
    """
    if partition is None:
        partition = _partition(model, points, parts, k, presets)
    if not build and sample is None:
        return Split(partition)
    partition, built = _build(model, partition)
    if sample is None:
        return Split(partition, built)
    return _checked(model, partition, built, sample)


def _partition(model: nn.Module, points: Optional[Sequence[str]],
               parts: Optional[Sequence[Sequence[str]]], k: Optional[int],
               presets: Optional[Dict[int, List[str]]]) -> Partition:
    """Stage 1, names: the partition the chain gives, else the traced forward's."""
    if parts is None and points is None:  # K parts: a registered preset or the authors' rule
        k = k or 1
        points = presets[k] if presets and k in presets else points_for_k(model, k)
    try:
        return (chain.partition_from_parts(model, parts) if parts is not None
                else chain.partition_from_points(model, list(points or [])))
    except NotAChainError as chain_error:
        wanted = list(points or []) if parts is None else [p[0] for p in parts[1:]]
        partition = _traced_partition(model, wanted, chain_error)
        if parts is not None and partition.to_list() != [list(p) for p in parts]:
            raise FrzooError(f"split.parts does not match the traced forward of "
                             f"{type(model).__name__}; for these split points the parts are "
                             f"{partition.to_list()}. Give split.points instead.") from None
        return partition


def _build(model: nn.Module, partition: Partition) -> Tuple[Partition, List[SplitPart]]:
    """Stage 2, parts: chain parts where the chain's modules hold every tensor, else the same
    points cut on the trace (the partition then is the traced one)."""
    if partition.method == "chain":
        try:
            return partition, list(chain.build_parts(model, partition))
        except NotAChainError as chain_error:  # tensors outside the chain's modules
            try:
                partition = _traced_partition(model, partition.points, chain_error)
            except FrzooError as exc:
                raise FrzooError(f"{chain_error}, and the split on its traced forward is "
                                 f"refused: {exc}") from None
    return partition, list(build_fx_parts(model, partition))


def _checked(model: nn.Module, partition: Partition, built: List[SplitPart],
             sample: Tensor) -> Split:
    """Stage 3, the check: chain parts that do not compute what the model computes are replaced
    by the same points cut on the trace (when that is refused, the report says why)."""
    try:
        report = check_equivalence(model, built, sample)
    except (RuntimeError, TypeError, ValueError) as exc:
        if partition.method == "fx" or partition.num_parts == 1:
            raise
        # chain parts that cannot even run on the model's tensors (the root reshapes between
        # children) differ from the model like any other: cut the trace instead
        report = EquivalenceReport(problem=f"the chained parts fail on the model's input: {exc}")
    if report.exact or partition.method == "fx" or partition.num_parts == 1:
        return Split(partition, built, report)
    try:  # the chain parts differ from the model: cut the same points on the trace
        traced = fx_partition(model, partition.points)
        traced_parts: List[SplitPart] = list(build_fx_parts(model, traced))
    except FrzooError as exc:
        report.fallback_error = str(exc)
        return Split(partition, built, report)
    return Split(traced, traced_parts, check_equivalence(model, traced_parts, sample))


def _traced_partition(model: nn.Module, points: Sequence[str], chain_error: FrzooError) -> Partition:
    """The fx partition for `points`; when the model cannot be traced, the chain's own error."""
    try:
        trace_model(model)
    except FrzooError as trace_error:
        raise FrzooError(f"{chain_error} ({trace_error})") from None
    return fx_partition(model, points)


def original_key(names: Sequence[str], key: str) -> str:
    """A key of a saved part's state_dict -> the whole model's name for it. `names` are the
    part's module names (a checkpoint's partition); the key's form says which kind of part
    saved it, as a checkpoint keeps no part objects."""
    kind = FxPart if FxPart.owns_key(key) else chain.Part
    return kind.original_key(names, key)
