"""The zoo's split presets for timm models: valid, exact, and what split.auto=flops computes."""
from __future__ import annotations

import pytest
import timm
import torch

from frzoo.split import check_equivalence, resolve
from frzoo.plugins import SPLIT_PRESETS
from frzoo_registry.timm_presets import PRESETS, compute


@pytest.mark.parametrize("arch", sorted(PRESETS))
def test_preset_is_registered_exact_and_current(arch):
    assert SPLIT_PRESETS.get(arch) == PRESETS[arch]
    assert compute(arch) == PRESETS[arch]  # regenerate with python -m frzoo_registry.timm_presets
    model = timm.create_model(arch, num_classes=10)
    for k, points in PRESETS[arch].items():
        parts = resolve(model, points=points, build=True).parts
        assert len(parts) == k
        assert check_equivalence(model, parts, torch.randn(2, 3, 64, 64)).exact
