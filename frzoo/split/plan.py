"""The canonical partition, what every part offers, and the checks both ways of cutting share.

A partition is an explicit list of module names per part; split points, the `split.k` rule,
registered presets and `split.auto` all compile into it. It is cut either on the forward chain of
children (``method="chain"``, frzoo.split.chain) or on the traced forward (``method="fx"``,
frzoo.split.fx). Code outside this package sees only :class:`Partition` and :class:`SplitPart`,
never which kind of part it holds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from torch import Tensor, nn

from ..errors import FrzooError

WHOLE_MODEL = ""  # the name of the single part of an unsplit model: the root itself


@dataclass(frozen=True)
class Partition:
    """Module names per part, in execution order. Part k runs ``parts[k]`` one after another
    (``method="chain"``), or the stretch of the traced forward that starts at its first name
    (``method="fx"``: see frzoo.split.fx)."""
    parts: Tuple[Tuple[str, ...], ...]
    method: str = "chain"

    @property
    def num_parts(self) -> int:
        return len(self.parts)

    def to_list(self) -> List[List[str]]:
        return [list(p) for p in self.parts]

    @property
    def points(self) -> List[str]:
        """The split points: the first module of every part but the first."""
        return [p[0] for p in self.parts[1:]]


class SplitPart(nn.Module):
    """What every part offers, whichever way it was cut: it takes one tensor and returns one,
    runs the model's own modules (`names`, in execution order) and gives its state in the whole
    model's names. Trainers, checkpoints and exports use only this."""

    names: List[str]

    def original_state_dict(self) -> Dict[str, Tensor]:
        """This part's state in the whole model's parameter names."""
        return {self.original_key(self.names, key): value
                for key, value in self.state_dict().items()}

    @classmethod
    def original_key(cls, names: Sequence[str], key: str) -> str:
        """A key of this kind of part's state_dict -> the whole model's name for it."""
        raise NotImplementedError


class NotAChainError(FrzooError):
    """A split the chain split cannot make (the fx split may)."""


def list_valid(valid: Sequence[str], listing: str) -> str:
    """The valid points for an error message; long lists are cut, pointing at `listing` (the
    `frzoo plan` flag that prints them all)."""
    if len(valid) <= 60:
        return f"Valid points: {', '.join(valid)}."
    return (f"Valid points ({len(valid)}): {', '.join(valid[:25])}, ..., "
            f"{', '.join(valid[-10:])}; `frzoo plan RECIPE {listing}` lists them all.")


def check_disjoint(parts: Sequence[nn.Module]) -> None:
    """Every parameter in one part: a tensor two parts update would be two diverging copies."""
    seen: Dict[int, int] = {}
    for k, part in enumerate(parts):
        for t in part.parameters():
            if seen.setdefault(id(t), k) != k:
                raise FrzooError(f"a parameter is shared between part {seen[id(t)] + 1} and part "
                                 f"{k + 1} (tied weights); move the cut so both users are in "
                                 f"one part.")
