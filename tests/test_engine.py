"""The engine against references that cannot drift.

- Features Replay with K=1 is plain backprop, bit for bit.
- Plain backprop over K parts is one training loop over the unsplit model, bit for bit.
- Features Replay with K=3 is Algorithm 1 of the paper, re-implemented here from
  docs/algorithm.md without any frzoo engine code, bit for bit (both warm-up variants).
- History lengths, warm-up policies, BatchNorm replay policies, dropout masks in the replay.
"""
from __future__ import annotations

import copy
from typing import List

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from frzoo.algorithms import ForwardResult
from frzoo.algorithms.bp import Backprop
from frzoo.algorithms.fr import FeaturesReplay
from frzoo.executors import LocalExecutor
from frzoo.split.chain import Part

torch.use_deterministic_algorithms(True)


def tiny_model(dropout: float = 0.0) -> nn.Sequential:
    """Conv/BN/ReLU blocks and a classifier: six chain entries, so K=1..3 cut anywhere."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Dropout(dropout),
        nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU()),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        nn.Linear(16, 5),
    )


CUTS = {1: [[0, 1, 2, 3, 4, 5]], 2: [[0, 1, 2], [3, 4, 5]], 3: [[0, 1], [2, 3], [4, 5]]}


def batches(n: int, batch: int = 6):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 3, 8, 8, generator=g), torch.randint(0, 5, (batch,), generator=g))
            for _ in range(n)]


def optimizer(params, lr=0.05) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)


def make_executor(model: nn.Sequential, k: int, algo_cls, lr=0.05, **options) -> LocalExecutor:
    algos = []
    for index, ids in enumerate(CUTS[k]):
        part = Part([str(i) for i in ids], [model[i] for i in ids])
        algos.append(algo_cls(part, optimizer(part.parameters(), lr), index=index, num_parts=k,
                              device=torch.device("cpu"), loss_fn=F.cross_entropy, seed=0,
                              **options))
    return LocalExecutor(algos)


def train(executor: LocalExecutor, data) -> List[float]:
    return [float(executor.train_step((x, y), t).loss) for t, (x, y) in enumerate(data)]


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, ta), (_, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(ta, tb), name


def test_fr_with_one_part_is_backprop_bit_for_bit():
    data = batches(5)
    a, b = tiny_model(), tiny_model()
    loss_a = train(make_executor(a, 1, FeaturesReplay), data)
    loss_b = train(make_executor(b, 1, Backprop), data)
    assert loss_a == loss_b
    assert_same_weights(a, b)


@pytest.mark.parametrize("k", [2, 3])
def test_bp_over_parts_is_one_training_loop_bit_for_bit(k):
    data = batches(5)
    split, whole = tiny_model(), tiny_model()
    losses = train(make_executor(split, k, Backprop), data)
    opt = optimizer(whole.parameters())
    plain = []
    for x, y in data:
        loss = F.cross_entropy(whole(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        plain.append(loss.item())
    assert losses == plain
    assert_same_weights(split, whole)


def reference_last_part(chunk: nn.Module, opt, h: torch.Tensor, y: torch.Tensor,
                        sent: list) -> float:
    """Part K in every reference: ordinary backprop on sample t; its input gradient goes into
    `sent` for part K-1 (when there is one). Returns the loss."""
    K = len(sent)
    h_last = h.clone().requires_grad_(K > 1)
    loss = F.cross_entropy(chunk(h_last), y)
    loss.backward()
    if K > 1:
        sent[K - 2] = h_last.grad
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def bn_snapshot(chunk: nn.Module) -> list:
    return [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
            for m in chunk.modules() if isinstance(m, nn.BatchNorm2d)]


def bn_restore(saved: list) -> None:
    for m, mean, var, n in saved:
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.num_batches_tracked.copy_(n)


def zero_replay(chunk: nn.Module, opt, h_like: torch.Tensor) -> None:
    """The paper's warm-up iteration: replay a ZERO input, backpropagate a ZERO delta, update.
    frzoo does not run this replay (its gradient is zero whatever the weights, and it would feed
    zeros into BatchNorm's running statistics), so the reference undoes its statistics too."""
    saved = bn_snapshot(chunk)
    out = chunk(torch.zeros_like(h_like))
    out.backward(torch.zeros_like(out))
    bn_restore(saved)
    opt.step()
    opt.zero_grad(set_to_none=True)


def algorithm1(model: nn.Sequential, data, k_parts: int, replay_bn: str,
               warmup: str = "skip") -> List[float]:
    """Features Replay as docs/algorithm.md states it, written plainly."""
    chunks = [nn.Sequential(*[model[i] for i in ids]) for ids in CUTS[k_parts]]
    opts = [optimizer(c.parameters()) for c in chunks]
    K = k_parts
    history: List[List[torch.Tensor]] = [[] for _ in range(K)]
    delta_from_above = [None] * K  # delta for part k sent at iteration t-1
    losses = []
    for t, (x, y) in enumerate(data):
        # play: forward-locked, no graph in parts 1..K-1, each keeps its input
        h = x
        for k in range(K - 1):
            history[k].append(h)
            with torch.no_grad():
                h = chunks[k](h)
        sent = [None] * K
        losses.append(reference_last_part(chunks[K - 1], opts[K - 1], h, y, sent))
        # parts k < K: replay the input of iteration t-(K-k) with the current weights
        for k in range(K - 1):
            delay = K - 1 - k
            if t - delay < 0:  # warm-up: no stale sample exists yet
                if warmup == "zeros":  # the paper
                    zero_replay(chunks[k], opts[k], history[k][-1])
                continue  # skip (authors' code): no update yet
            h_old = history[k].pop(0).clone().requires_grad_(k > 0)
            saved = bn_snapshot(chunks[k])
            out = chunks[k](h_old)
            out.backward(delta_from_above[k])
            if replay_bn == "once":  # undo the replay's running-statistics update
                bn_restore(saved)
            if k > 0:
                sent[k - 1] = h_old.grad
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
        delta_from_above = sent
    return losses


@pytest.mark.parametrize("replay_bn", ["once", "twice"])
def test_fr_k3_is_algorithm_1_bit_for_bit(replay_bn):
    data = batches(8)  # warm-up of part 1 is 2 iterations; 6 more in steady state
    ours, reference = tiny_model(), tiny_model()
    losses = train(make_executor(ours, 3, FeaturesReplay, replay_bn=replay_bn), data)
    assert losses == algorithm1(reference, data, 3, replay_bn)
    assert_same_weights(ours, reference)


@pytest.mark.parametrize("k", [2, 3])
def test_fr_warmup_zeros_is_algorithm_1_with_zero_replays_bit_for_bit(k):
    data = batches(8)
    ours, reference = tiny_model(), tiny_model()
    losses = train(make_executor(ours, k, FeaturesReplay, warmup="zeros"), data)
    assert losses == algorithm1(reference, data, k, "once", warmup="zeros")
    assert_same_weights(ours, reference)
    # and the warm-up steps matter: the zero-gradient step of iteration 0 (weight decay alone)
    # moves part 1, while under skip part 1 has not moved. The weights show it; the next loss
    # need not: part 1 ends in BatchNorm, which normalises the decay's uniform shrink away, so
    # whether loss 1 differs is rounding noise (equal on an AVX2 CPU, different on AVX512).
    moved, still, init = tiny_model(), tiny_model(), tiny_model()
    train(make_executor(moved, k, FeaturesReplay, warmup="zeros"), data[:1])
    train(make_executor(still, k, FeaturesReplay, warmup="skip"), data[:1])
    first_conv = lambda model: model[0][0].weight  # noqa: E731  (in part 1 for every k)
    assert torch.equal(first_conv(still), first_conv(init))
    assert not torch.equal(first_conv(moved), first_conv(init))
    skipped = algorithm1(tiny_model(), data, k, "once", warmup="skip")
    assert losses[0] == skipped[0] and losses != skipped


def parameters_of(algo) -> List[torch.Tensor]:
    return [p.detach().clone() for p in algo.part.parameters()]


def test_fr_differs_from_bp_exactly_as_the_delay_says():
    """K=2, warm-up skip. Iteration 0: both compute the same loss and the same last-part update;
    part 1 of FR does not move (no stale sample) while BP's does. Iteration 1: FR's part 1 replays
    sample 0 at its unchanged weights w^0 with the delta part 2 sent for sample 0 at w^0_2, which
    is exactly BP's gradient of iteration 0: FR's part 1 makes BP's first step, one iteration
    late, bit for bit. Its part 2 has meanwhile seen an input from the unmoved part 1, so from
    then on the two differ everywhere."""
    fr = make_executor(tiny_model(), 2, FeaturesReplay)
    bp = make_executor(tiny_model(), 2, Backprop)
    initial = parameters_of(fr.algorithms[0])
    (x0, y0), (x1, y1) = batches(2)
    assert float(fr.train_step((x0, y0), 0).loss) == float(bp.train_step((x0, y0), 0).loss)
    fr_part1, bp_part1 = parameters_of(fr.algorithms[0]), parameters_of(bp.algorithms[0])
    assert all(torch.equal(a, b) for a, b in zip(fr_part1, initial))  # FR part 1: no update
    assert all(not torch.equal(a, b) for a, b in zip(bp_part1, initial))  # BP part 1: updated
    assert all(torch.equal(a, b) for a, b in zip(parameters_of(fr.algorithms[1]),
                                                 parameters_of(bp.algorithms[1])))
    assert float(fr.train_step((x1, y1), 1).loss) != float(bp.train_step((x1, y1), 1).loss)
    assert all(torch.equal(a, b) for a, b in zip(parameters_of(fr.algorithms[0]), bp_part1))
    assert all(not torch.equal(a, b) for a, b in zip(parameters_of(fr.algorithms[1]),
                                                     parameters_of(bp.algorithms[1])))


def test_history_lengths_and_deltas_in_flight():
    ex = make_executor(tiny_model(), 3, FeaturesReplay)
    peaks = [0, 0, 0]
    for t, (x, y) in enumerate(batches(6)):
        h = x
        for algo in ex.algorithms:  # play by hand to observe the history at its peak
            res = algo.forward(h, y if algo.is_last else None, t)
            h = res.output
        for i, algo in enumerate(ex.algorithms):
            if not algo.is_last:
                peaks[i] = max(peaks[i], len(algo.history))
        for k in reversed(range(3)):
            algo = ex.algorithms[k]
            delta = ex.mailboxes[k].popleft() if algo.expects_delta(t) else None
            g = algo.backward(delta, t)
            if algo.sends_delta(t):
                ex.mailboxes[k - 1].append(g)
        assert [len(a.history) for a in ex.algorithms[:2]] == [min(t + 1, 2), min(t + 1, 1)]
    # part k keeps K-k+1 inputs at its peak (K for part 1); the last part keeps none
    assert peaks[:2] == [3, 2]
    assert [a.history_length for a in ex.algorithms] == [3, 2, 0]
    assert [a.staleness for a in ex.algorithms] == [2, 1, 0]
    # between iterations, each link holds exactly one delta (sent at t, used at t+1)
    assert [len(b) for b in ex.mailboxes] == [1, 1, 0]


def test_warmup_skip_makes_no_update_until_a_stale_sample_exists():
    model = tiny_model()
    ex = make_executor(model, 3, FeaturesReplay, warmup="skip")
    first = [p.detach().clone() for p in ex.algorithms[0].part.parameters()]
    for t, (x, y) in enumerate(batches(3)):
        ex.train_step((x, y), t)
        now = [p.detach() for p in ex.algorithms[0].part.parameters()]
        unchanged = all(torch.equal(a, b) for a, b in zip(first, now))
        assert unchanged == (t < 2), t  # part 1 of 3 first updates at iteration 2


def test_warmup_zeros_applies_a_zero_gradient_step():
    model = tiny_model()
    ex = make_executor(model, 2, FeaturesReplay, warmup="zeros")
    before = [p.detach().clone() for p in ex.algorithms[0].part.parameters()]
    x, y = batches(1)[0]
    ex.train_step((x, y), 0)
    after = list(ex.algorithms[0].part.parameters())
    # SGD on a zero loss gradient: only weight decay acts (first step, momentum buffer = grad)
    lr, wd = 0.05, 5e-4
    for b, a in zip(before, after):
        g = wd * b
        expected = b - lr * (g + 0.9 * g)  # nesterov: g + momentum * buf, buf = g
        assert torch.equal(a.detach(), expected)


@pytest.mark.parametrize("policy,per_step", [("once", 1), ("twice", 2)])
def test_replay_bn_policy_counts_running_stat_updates(policy, per_step):
    model = tiny_model()
    ex = make_executor(model, 2, FeaturesReplay, replay_bn=policy)
    steps = 4
    for t, (x, y) in enumerate(batches(steps)):
        ex.train_step((x, y), t)
    bn = model[0][1]
    replays = steps - 1  # part 1 of 2 replays from iteration 1 on
    assert int(bn.num_batches_tracked) == steps + (replays if per_step == 2 else 0)


def test_replay_uses_the_dropout_masks_of_the_play():
    model = tiny_model(dropout=0.5)
    # lr=0: weights frozen, so a replay that reused the play's masks gives identical outputs
    ex = make_executor(model, 2, FeaturesReplay, lr=0.0, replay_bn="once")
    outputs: List[torch.Tensor] = []
    handle = ex.algorithms[0].part.register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone()))
    for t, (x, y) in enumerate(batches(3)):
        ex.train_step((x, y), t)
    handle.remove()
    # calls: play(0), play(1), replay(0), play(2), replay(1)
    assert torch.equal(outputs[0], outputs[2])
    assert torch.equal(outputs[1], outputs[4])
    assert not torch.equal(outputs[0], outputs[1])
    # the masks really are random: zeros appear where dropout dropped
    assert (outputs[0] == 0).float().mean() > 0.3


def test_forward_result_of_last_part_has_loss_and_logits():
    ex = make_executor(tiny_model(), 2, FeaturesReplay)
    x, y = batches(1)[0]
    res = ex.train_step((x, y), 0)
    assert isinstance(res, ForwardResult) and res.logits.shape == (6, 5)
    assert not res.loss.requires_grad


def resumed_midway(cls, data, stop: int) -> nn.Module:
    """Train `stop` steps, snapshot every state, rebuild from scratch, restore, run the rest."""
    b = tiny_model()
    ex_b = make_executor(b, 3, cls)
    for t, (x, y) in enumerate(data[:stop]):
        ex_b.train_step((x, y), t)
    snap = copy.deepcopy({"exec": ex_b.state_dict(),
                          "parts": [(al.part.state_dict(), al.optimizer.state_dict(), al.state_dict())
                                    for al in ex_b.algorithms]})
    c = tiny_model()
    ex_c = make_executor(c, 3, cls)
    ex_c.load_state_dict(snap["exec"])
    for al, (ps, os_, st) in zip(ex_c.algorithms, snap["parts"]):
        al.part.load_state_dict(ps)
        al.optimizer.load_state_dict(os_)
        al.load_state_dict(st)
    for t, (x, y) in enumerate(data[stop:], start=stop):
        ex_c.train_step((x, y), t)
    return c


def test_executor_state_roundtrip_continues_identically():
    data = batches(7)
    a = tiny_model()
    train(make_executor(a, 3, FeaturesReplay), data)
    assert_same_weights(a, resumed_midway(FeaturesReplay, data, 4))


# ---------------------------------------------------------------- DDG, the paper's baseline
from frzoo.algorithms.ddg import DecoupledBackprop  # noqa: E402


def ddg_reference(model: nn.Sequential, data, k_parts: int) -> List[float]:
    """DDG written plainly: part k backpropagates, K-k iterations later, the graph it built then
    (with the weights it had then), and applies that gradient to its current weights."""
    chunks = [nn.Sequential(*[model[i] for i in ids]) for ids in CUTS[k_parts]]
    opts = [optimizer(c.parameters()) for c in chunks]
    K = k_parts
    stored: List[list] = [[] for _ in range(K)]
    delta_from_above = [None] * K
    losses = []
    for t, (x, y) in enumerate(data):
        h = x
        for k in range(K - 1):
            snapshot = copy.deepcopy(chunks[k])  # the weights of iteration t, kept with the graph
            for bn_live, bn_copy in zip(chunks[k].modules(), snapshot.modules()):
                if isinstance(bn_live, nn.BatchNorm2d):  # buffers are the live ones
                    bn_copy.running_mean = bn_live.running_mean
                    bn_copy.running_var = bn_live.running_var
                    bn_copy.num_batches_tracked = bn_live.num_batches_tracked
            inp = h.detach().requires_grad_(k > 0)
            out = snapshot(inp)
            stored[k].append((inp, out, snapshot))
            h = out.detach()
        sent = [None] * K
        losses.append(reference_last_part(chunks[K - 1], opts[K - 1], h, y, sent))
        for k in range(K - 1):
            if t - (K - 1 - k) < 0:
                continue
            inp, out, snapshot = stored[k].pop(0)
            out.backward(delta_from_above[k])
            for live, old in zip(chunks[k].parameters(), snapshot.parameters()):
                live.grad = old.grad
            if k > 0:
                sent[k - 1] = inp.grad
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
        delta_from_above = sent
    return losses


def test_ddg_k3_is_the_plain_reference_bit_for_bit():
    data = batches(7)
    ours, reference = tiny_model(), tiny_model()
    losses = train(make_executor(ours, 3, DecoupledBackprop), data)
    assert losses == ddg_reference(reference, data, 3)
    assert_same_weights(ours, reference)


def test_ddg_with_one_part_is_backprop_and_keeps_k_minus_k_plus_1_graphs():
    data = batches(4)
    a, b = tiny_model(), tiny_model()
    assert train(make_executor(a, 1, DecoupledBackprop), data) == train(make_executor(b, 1, Backprop), data)
    assert_same_weights(a, b)
    ex = make_executor(tiny_model(), 3, DecoupledBackprop)
    assert [al.history_length for al in ex.algorithms] == [3, 2, 0]
    assert [al.staleness for al in ex.algorithms] == [2, 1, 0]
    for t, (x, y) in enumerate(batches(5)):
        ex.train_step((x, y), t)
        assert [len(al.graphs) for al in ex.algorithms[:2]] == [min(t + 1, 2), min(t + 1, 1)]


def test_ddg_state_roundtrip_rebuilds_the_graphs_exactly():
    data = batches(7)
    a = tiny_model()
    train(make_executor(a, 3, DecoupledBackprop), data)
    assert_same_weights(a, resumed_midway(DecoupledBackprop, data, 4))


def test_a_part_starting_with_an_in_place_op_keeps_its_history_intact():
    import timm
    from frzoo.split import resolve
    model = timm.create_model("test_resnet", num_classes=5)
    parts = resolve(model, points=["act1", "layer3"], build=True).parts  # act1: ReLU(inplace)
    algos = [FeaturesReplay(p, optimizer(p.parameters()), index=i, num_parts=3,
                            device=torch.device("cpu"), loss_fn=F.cross_entropy) for i, p in enumerate(parts)]
    ex = LocalExecutor(algos)
    g = torch.Generator().manual_seed(0)
    for t in range(4):
        x, y = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 5, (4,), generator=g)
        ex.train_step((x, y), t)
    assert parts[1].copy_input and not parts[0].copy_input
