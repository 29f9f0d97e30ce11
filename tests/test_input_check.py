"""The input-version check: a part whose forward writes into its input in place, without an
`inplace` attribute frzoo could see, would replay other values; it is an error naming the part
and the module, for every part (frzoo/algorithms/input_check.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from frzoo.algorithms.fr import FeaturesReplay
from frzoo.errors import FrzooError
from frzoo.executors import LocalExecutor
from frzoo.split.chain import Part


class Doubler(nn.Module):
    """Writes into its input: no `inplace` attribute says so."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return x


def model(doubler_at: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)]
    layers.insert(doubler_at, Doubler())
    return nn.Sequential(*layers)


def executor(seq: nn.Sequential, cuts) -> LocalExecutor:
    bounds = [0, *cuts, len(seq)]
    parts = [Part([str(i) for i in range(a, b)], [seq[i] for i in range(a, b)])
             for a, b in zip(bounds, bounds[1:])]
    return LocalExecutor([FeaturesReplay(p, torch.optim.SGD(p.parameters(), lr=0.1), index=i,
                                         num_parts=len(parts), device=torch.device("cpu"),
                                         loss_fn=F.cross_entropy) for i, p in enumerate(parts)])


def steps(ex: LocalExecutor, n: int) -> None:
    g = torch.Generator().manual_seed(1)
    for t in range(n):
        ex.train_step((torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g)), t)


@pytest.mark.parametrize("doubler_at,part", [(2, 2), (0, 1)])
def test_a_part_writing_into_its_input_is_an_error_naming_the_part_and_module(doubler_at, part):
    # K=3: the Doubler starts part `part` (the middle one, or the first); the check runs at
    # that part's first replay and names the module by its name in the model
    seq = model(doubler_at)
    ex = executor(seq, [2, 4])
    with pytest.raises(FrzooError, match=rf"part {part} changed its stored input of sample 0 "
                                         rf".*module '{doubler_at}' writes into it"):
        steps(ex, 3)


def test_an_unchanged_input_passes_and_the_check_survives_a_resume():
    seq = model(4)  # the Doubler is in the last part, which keeps no history
    ex = executor(seq, [2, 3])
    steps(ex, 4)
    algo = ex.algorithms[0]
    state = algo.state_dict()
    algo.load_state_dict(state)
    assert sorted(algo.versions) == [s for s, _ in algo.history]
