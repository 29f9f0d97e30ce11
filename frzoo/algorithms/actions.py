"""Synchronous pipeline schedules as per-part lists of actions, and the one order both executors
derive from them.

A synchronous schedule (GPipe, 1F1B, ZB-H1: frzoo.algorithms.pipelines) splits a step's batch
into M micro-batches and gives each part a list of actions over them:

    F m   forward micro-batch m (its output goes to the next part)
    B m   full backward of micro-batch m (its input gradient goes to the previous part)
    I m   input-gradient half of B m (sent at once), the weight-gradient half left for ...
    W m   ... the weight gradient of micro-batch m, where the schedule puts it
    U     the optimizer step, once all M micro-batches are done

An action's only inputs from other parts are the activation of F m (from part k-1) and the
delta of B m or I m (from part k+1). :func:`simulate` runs every part's list in lockstep with
those dependencies and returns one global order, or fails naming the parts that wait on each
other. Everything else follows from that order:

- the local executor runs the parts' actions in it (frzoo.executors.local);
- the distributed executor posts the messages of each pair of neighbouring ranks in the order
  the simulation produced them (:func:`pair_messages`). Both ranks derive the same order from
  (K, M, schedule), so NCCL's rules hold (frzoo.executors.schedule): each rank posts a pair's
  sends and receives in that one order, receives as early as the order allows. Why that cannot
  deadlock: a message's producer, in the simulation, made it before any message that follows it
  on the pair, so it never waits for something its peer posts later.

Nothing here imports torch.distributed; the actions are plain values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

FORWARD, BACKWARD, INPUT_GRAD, WEIGHT_GRAD, UPDATE = "F", "B", "I", "W", "U"


@dataclass(frozen=True)
class Action:
    """One thing a part does: `kind` (F, B, I, W, U) on micro-batch `micro` (-1 for U)."""
    kind: str
    micro: int = -1

    def __str__(self) -> str:
        return self.kind if self.micro < 0 else f"{self.kind}{self.micro}"


@dataclass(frozen=True)
class Message:
    """What crosses a cut: the activation of micro-batch `micro` (part k -> k+1) or its delta
    (part k+1 -> k)."""
    kind: str  # "act" or "delta"
    micro: int
    sender: int
    receiver: int


Order = List[Tuple[int, Action]]  # (part index, action), in the order they may run


def needs(part: int, action: Action, num_parts: int) -> Tuple[str, int, int] | None:
    """The message `action` of `part` waits for, as (kind, micro, sender), or None."""
    if action.kind == FORWARD and part > 0:
        return ("act", action.micro, part - 1)
    if action.kind in (BACKWARD, INPUT_GRAD) and part < num_parts - 1:
        return ("delta", action.micro, part + 1)
    return None


def makes(part: int, action: Action, num_parts: int) -> Message | None:
    """The message `action` of `part` sends, or None."""
    if action.kind == FORWARD and part < num_parts - 1:
        return Message("act", action.micro, part, part + 1)
    if action.kind in (BACKWARD, INPUT_GRAD) and part > 0:
        return Message("delta", action.micro, part, part - 1)
    return None


def simulate(lists: Sequence[Sequence[Action]]) -> Order:
    """One valid global order of every part's actions: round by round, each part runs the
    actions at the head of its list whose message has been made. Deterministic, so every rank
    computes the same order. Raises ValueError where parts would wait for each other forever."""
    num_parts = len(lists)
    heads = [0] * num_parts
    made: set = set()
    order: Order = []
    while any(h < len(lst) for h, lst in zip(heads, lists)):
        progressed = False
        for k, lst in enumerate(lists):
            while heads[k] < len(lst):
                action = lst[heads[k]]
                need = needs(k, action, num_parts)
                if need is not None and need not in made:
                    break
                out = makes(k, action, num_parts)
                if out is not None:
                    made.add((out.kind, out.micro, out.sender))
                order.append((k, action))
                heads[k] += 1
                progressed = True
        if not progressed:
            stuck = ", ".join(f"part {k + 1} at {lst[h]}" for k, (h, lst) in
                              enumerate(zip(heads, lists)) if h < len(lst))
            raise ValueError(f"the schedule deadlocks: {stuck} wait for each other")
    return order


def pair_messages(order: Order, num_parts: int, first: int) -> List[Message]:
    """The messages between part `first` and part `first + 1`, in the order `order` makes them:
    the order both ranks of that pair post them in."""
    out = []
    for k, action in order:
        msg = makes(k, action, num_parts)
        if msg is not None and {msg.sender, msg.receiver} == {first, first + 1}:
            out.append(msg)
    return out


def check_lists(lists: Sequence[Sequence[Action]], microbatches: int) -> None:
    """Every part forwards and backpropagates each micro-batch once (I and W together count as
    B), in micro-batch order for the gradient sums, and ends with one update."""
    for k, lst in enumerate(lists):
        seen: Dict[str, List[int]] = {}
        for a in lst[:-1]:
            seen.setdefault(a.kind, []).append(a.micro)
        backward = seen.get(BACKWARD, seen.get(WEIGHT_GRAD, []))
        if seen.get(FORWARD) != list(range(microbatches)) or backward != list(range(microbatches)) \
                or (INPUT_GRAD in seen) != (WEIGHT_GRAD in seen) or lst[-1] != Action(UPDATE):
            raise ValueError(f"part {k + 1}'s actions {' '.join(map(str, lst))} do not run each "
                             f"of the {microbatches} micro-batches once, in order, then U")
