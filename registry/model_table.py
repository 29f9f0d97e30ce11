"""Print the zoo's model table (docs/models.md) from the code: ``python -m frzoo_registry.model_table``.

Parameter counts are measured on freshly built models (num_classes=10 and 100); split presets are
read back from frzoo's registry, so the table cannot drift from what frzoo actually uses.
"""
from __future__ import annotations

import timm

from frzoo.plugins import SPLIT_PRESETS

from .cifar_resnet import ARCH_SPECS

# Reference counts: the FR paper gives one for ResNet164 only (docs/algorithm.md, "The paper's
# setup"); the smaller ones are He et al. 2016, Table 6.
REFERENCE_COUNTS = {
    "cifar_resnet20": "0.27M (He et al.)",
    "cifar_resnet32": "0.46M (He et al.)",
    "cifar_resnet44": "0.66M (He et al.)",
    "cifar_resnet56": "0.85M (He et al.)",
    "cifar_resnet110": "1.7M (He et al.)",
    "cifar_resnet164": "about 2.6M (FR paper)",
}


def _params(name: str, num_classes: int) -> int:
    return sum(p.numel() for p in timm.create_model(name, num_classes=num_classes).parameters())


def _order(name: str) -> int:
    block, depths, widths = ARCH_SPECS[name][:3]
    return (widths[0] != 16, sum(depths))  # the 16/32/64 family first, then by depth


def table() -> str:
    rows = ["| name | block | blocks per stage (total) | shortcut | params, 10 classes | "
            "params, 100 classes | reference count | K=2 | K=3 | K=4 |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name in sorted(ARCH_SPECS, key=_order):
        block, depths, widths, _, shortcut, _ = ARCH_SPECS[name]
        presets = SPLIT_PRESETS.get(name)
        cells = [
            f"`{name}`", block.__name__, f"{list(depths)} ({sum(depths)})",
            "A (zero-pad)" if shortcut == "A" else "B (1x1 conv+BN)",
            f"{_params(name, 10):,}", f"{_params(name, 100):,}",
            REFERENCE_COUNTS.get(name, "-"),
        ] + [", ".join(f"`{p}`" for p in presets[k]) for k in (2, 3, 4)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
