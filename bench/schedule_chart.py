"""Text timelines of the synchronous schedules' action lists, with unit costs.

    python bench/schedule_chart.py [--k 3] [--m 4] [--f 1 --b 2 --i 1 --w 1]

Each part runs its list of actions (frzoo.algorithms.pipelines) in order; an action starts when
its part is free and the message it needs (frzoo.algorithms.actions.needs) has been made; a
forward costs F, a backward B, its input-gradient half I and weight-gradient half W (B = I + W),
the update nothing, messages nothing. One character is one time unit. What a run
on real devices shows is in its trace (`train.trace`, docs/report.md): this is the schedule
alone, for K equal parts.
"""
from __future__ import annotations

import argparse
from typing import Dict, List, Tuple

from frzoo.algorithms.actions import makes, needs, simulate
from frzoo.plugins import ALGORITHMS


SYMBOL = {"F": str, "B": lambda m: chr(ord("a") + m), "I": lambda m: chr(ord("A") + m),
          "W": lambda m: "w", "U": lambda m: "u"}


def timeline(name: str, k: int, m: int, cost: Dict[str, int]) -> Tuple[List[str], int]:
    """Each part's row of characters, and the step's length in time units: the actions in the
    order `simulate` gives, each at its earliest start."""
    made: Dict[Tuple[str, int, int], int] = {}  # message -> the time it exists
    free = [0] * k
    rows: List[List[str]] = [[] for _ in range(k)]
    for part, action in simulate(ALGORITHMS.get(name).schedule(k, m)):
        need = needs(part, action, k)
        start = max(free[part], made[need] if need else 0)
        length = cost.get(action.kind, 0)
        rows[part] += ["."] * (start - len(rows[part])) + [SYMBOL[action.kind](action.micro)] * length
        free[part] = start + length
        out = makes(part, action, k)
        if out is not None:
            made[(out.kind, out.micro, out.sender)] = free[part]
    end = max(free)
    return ["".join(r).ljust(end, ".") for r in rows], end


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--m", type=int, default=4)
    for kind, default in (("f", 1), ("b", 2), ("i", 1), ("w", 1)):
        parser.add_argument(f"--{kind}", type=int, default=default)
    args = parser.parse_args()
    cost = {"F": args.f, "B": args.b, "I": args.i, "W": args.w}
    print(f"K={args.k}, M={args.m}; F={args.f}, B={args.b} (I={args.i} + W={args.w}) per "
          f"micro-batch. Forward of micro-batch 0, 1, ..: '0', '1', ..; its backward 'a', 'b', ..; "
          f"zb1's input gradient 'A', 'B', .. and weight gradient 'w'; idle '.'")
    for name in ("gpipe", "1f1b", "zb1"):
        rows, end = timeline(name, args.k, args.m, cost)
        busy = sum(len(r.replace(".", "")) for r in rows)
        print(f"\n{name}: {end} units, idle {100 * (1 - busy / (end * args.k)):.0f}%")
        for part, row in enumerate(rows):
            print(f"  part {part + 1} |{row}|")


if __name__ == "__main__":
    main()
