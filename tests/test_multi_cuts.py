"""Cuts crossed by several tensors: a residual block's skip and branch, a ViT block's residual
stream and branch (frzoo.activation).

- the chained parts equal the whole model bit for bit, in eval and in train mode (drop-path on);
- Features Replay at K=3 with a mid-block cut equals a plain re-implementation of Algorithm 1
  written here with tuples, bit for bit;
- a checkpoint taken with tuples in the history and the mailboxes resumes bit for bit.
"""
from __future__ import annotations

import copy
import functools
from typing import List

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from frzoo.algorithms.bp import Backprop
from frzoo.algorithms.ddg import DecoupledBackprop
from frzoo.algorithms.fr import FeaturesReplay
from frzoo.executors import LocalExecutor
from frzoo.split import resolve
from frzoo.split.fx_parts import FxPart

torch.use_deterministic_algorithms(True)

# name: (constructor kwargs, image size, split points with a multi-tensor cut)
MODELS = {
    "resnet18": (dict(drop_path_rate=0.2, zero_init_last=False), 32, ["layer2.0.conv2", "layer4"]),
    "test_vit": (dict(img_size=32, drop_path_rate=0.2), 32, ["blocks.1.attn", "blocks.3.mlp"]),
}


_THREADS = torch.get_num_threads()


def setup_module():  # tiny tensors: one thread is faster, and kinder to a shared machine
    torch.set_num_threads(1)


def teardown_module():
    torch.set_num_threads(_THREADS)


def model_of(name: str) -> nn.Module:
    torch.manual_seed(0)
    kwargs, _, _ = MODELS[name]
    return timm.create_model(name, num_classes=5, **kwargs)


def sample(name: str, batch: int = 4, seed: int = 0) -> torch.Tensor:
    """A batch at the model's image size, the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, 3) + (MODELS[name][1],) * 2, generator=g)


def chained(parts, x):
    h = (x,)
    for part in parts[:-1]:
        out = part(*h)
        h = out if isinstance(out, tuple) else (out,)
    return parts[-1](*h)


@functools.lru_cache(maxsize=None)
def split_of(name: str):
    model = model_of(name)
    split = resolve(model, points=MODELS[name][2], build=True, sample=sample(name))
    return model, split


@pytest.mark.parametrize("name", list(MODELS))
def test_a_mid_block_cut_sends_several_tensors_and_equals_the_model(name):
    model, split = split_of(name)
    parts = split.parts
    assert split.report.exact and split.partition.method == "fx"
    assert all(isinstance(p, FxPart) for p in parts)
    x = sample(name)
    model.eval()
    with torch.no_grad():
        first = parts[0](x)
        assert isinstance(first, tuple) and len(first) == 2  # the skip and the branch
        assert torch.equal(chained(parts, x), model(x))
    model.train()  # drop-path and batch statistics, with the same RNG stream
    with torch.no_grad():
        torch.manual_seed(3)
        whole = model(x)
        torch.manual_seed(3)
        assert torch.equal(chained(parts, x), whole)
        torch.manual_seed(4)
        assert not torch.equal(chained(parts, x), whole)  # drop-path is really on


# ---------------------------------------------------------------- Features Replay, plainly
def optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def algorithm1_tuples(parts, data) -> List[float]:
    """Algorithm 1 (docs/algorithm.md) for parts that take and return tuples, written plainly:
    replay_bn 'twice', warm-up 'skip', the play's RNG reused in the replay by seeding every
    forward of (sample, part) the same way frzoo does (step_seed, seed 0)."""
    from frzoo.algorithms.base import seeded, step_seed
    K = len(parts)
    opts = [optimizer(p.parameters()) for p in parts]
    history: List[list] = [[] for _ in range(K)]
    delta_from_above: list = [None] * K
    losses = []
    cpu = torch.device("cpu")
    for t, (x, y) in enumerate(data):
        h = (x,)
        for k in range(K - 1):
            history[k].append(h)
            with torch.no_grad(), seeded(step_seed(0, t, k), cpu):
                h = as_tuple(parts[k](*h))
        sent: list = [None] * K
        leaves = tuple(v.detach().requires_grad_(True) for v in h)
        with seeded(step_seed(0, t, K - 1), cpu):
            loss = F.cross_entropy(parts[K - 1](*leaves), y)
        loss.backward()
        sent[K - 2] = tuple(v.grad for v in leaves)
        opts[K - 1].step()
        opts[K - 1].zero_grad(set_to_none=True)
        losses.append(loss.item())
        for k in range(K - 1):
            if t - (K - 1 - k) < 0:
                continue
            old = tuple(v.detach().requires_grad_(k > 0) for v in history[k].pop(0))
            with seeded(step_seed(0, t - (K - 1 - k), k), cpu):
                out = as_tuple(parts[k](*old))
            torch.autograd.backward(list(out), list(delta_from_above[k]))
            if k > 0:
                sent[k - 1] = tuple(v.grad for v in old)
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
        delta_from_above = sent
    return losses


def executor_of(parts, algo_cls=FeaturesReplay, **options) -> LocalExecutor:
    return LocalExecutor([algo_cls(p, optimizer(p.parameters()), index=i, num_parts=len(parts),
                                   device=torch.device("cpu"), loss_fn=F.cross_entropy, seed=0,
                                   **options) for i, p in enumerate(parts)])


def data(name: str, n: int):
    g = torch.Generator().manual_seed(7)
    return [(sample(name, seed=100 + t), torch.randint(0, 5, (4,), generator=g))
            for t in range(n)]


def fresh_parts(name: str):
    model = model_of(name)
    split = resolve(model, points=MODELS[name][2], build=True)
    model.train()
    return model, split.parts


@pytest.mark.parametrize("name", list(MODELS))
def test_fr_k3_with_a_mid_block_cut_is_algorithm_1_bit_for_bit(name):
    batches = data(name, 6)
    ours_model, ours = fresh_parts(name)
    ref_model, ref = fresh_parts(name)
    ex = executor_of(ours, replay_bn="twice")
    losses = [float(ex.train_step(b, t).loss) for t, b in enumerate(batches)]
    assert losses == algorithm1_tuples(ref, batches)
    for (n, a), (_, b) in zip(ours_model.state_dict().items(), ref_model.state_dict().items()):
        assert torch.equal(a, b), n
    # the history holds tuples: part 1 keeps the model's input, part 2 the skip and the branch
    assert [len(h) for _, h in ex.algorithms[1].history] == [2]


@pytest.mark.parametrize("algo_cls", [FeaturesReplay, DecoupledBackprop, Backprop])
def test_checkpoint_with_tuples_in_history_and_mailboxes_resumes_bit_for_bit(algo_cls):
    name = "resnet18"
    batches = data(name, 6)
    _, parts = fresh_parts(name)
    straight = executor_of(parts, algo_cls)
    losses = [float(straight.train_step(b, t).loss) for t, b in enumerate(batches)]
    final = [copy.deepcopy(p.state_dict()) for p in parts]

    _, parts = fresh_parts(name)
    first = executor_of(parts, algo_cls)
    for t, b in enumerate(batches[:3]):
        first.train_step(b, t)
    parts_state, executor_state = first.gather_checkpoint()
    if algo_cls is not Backprop:  # a delta in flight per link: the 2-tuple one as a list
        assert [type(d) for box in executor_state["mailboxes"] for d in box] == \
            [list, torch.Tensor]
    path_state = {"parts": parts_state, "executor": executor_state}
    import io
    buffer = io.BytesIO()
    torch.save(path_state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    _, parts = fresh_parts(name)
    resumed = executor_of(parts, algo_cls)
    resumed.load_checkpoint(loaded)
    rest = [float(resumed.train_step(b, t).loss) for t, b in enumerate(batches) if t >= 3]
    assert rest == losses[3:]
    for p, state in zip(parts, final):
        for key, value in p.state_dict().items():
            assert torch.equal(value, state[key]), key


def test_a_one_tensor_checkpoint_keeps_its_old_form():
    """A cut crossed by one tensor saves its history and mailbox entries as plain tensors, as
    before multi-tensor cuts: old checkpoints load, new ones read the same."""
    from frzoo import activation
    t = torch.randn(2, 3)
    assert activation.to_saved((t,)) is not None and torch.equal(activation.to_saved((t,)), t)
    assert activation.from_saved(t, torch.device("cpu"))[0] is t
    two = activation.to_saved((t, None))
    assert isinstance(two, list) and two[1] is None
    assert activation.from_saved(two, torch.device("cpu"))[1] is None
