"""Optimizers per part, the learning-rate schedule, and starting from a state_dict."""
from __future__ import annotations

import math

import pytest
import timm
import torch

from frzoo.config import load_recipe
from frzoo.errors import FrzooError, RecipeError
from frzoo.models import create_model, load_init_checkpoint
from frzoo.optim import build_optimizer, lr_multiplier, part_lr_scales


def schedule(*overrides):
    return load_recipe(None, ["model.name=x", *overrides]).optimizer.schedule


def test_multistep_in_epochs():
    cfg = schedule("optimizer.schedule.name=multistep", "optimizer.schedule.milestones=[150,225]")
    spe = 391  # CIFAR at batch 128
    assert lr_multiplier(0, spe, 300 * spe, cfg) == 1.0
    assert lr_multiplier(150 * spe - 1, spe, 300 * spe, cfg) == 1.0
    assert lr_multiplier(150 * spe, spe, 300 * spe, cfg) == pytest.approx(0.1)
    assert lr_multiplier(225 * spe, spe, 300 * spe, cfg) == pytest.approx(0.01)


def test_cosine_with_warmup():
    cfg = schedule("optimizer.schedule.name=cosine", "optimizer.schedule.warmup_epochs=1",
                   "optimizer.schedule.min_lr_ratio=0.1")
    assert lr_multiplier(0, 10, 100, cfg) == pytest.approx(0.1)  # (step+1)/warmup steps
    assert lr_multiplier(9, 10, 100, cfg) == pytest.approx(1.0)
    assert lr_multiplier(10, 10, 100, cfg) == pytest.approx(1.0)
    assert lr_multiplier(55, 10, 100, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(100, 10, 100, cfg) == pytest.approx(0.1)


def test_optimizers_match_torch_reference():
    p = [torch.nn.Parameter(torch.ones(3))]
    sgd = build_optimizer(p, load_recipe(None, ["model.name=x", "optimizer.nesterov=true"]).optimizer)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["weight_decay"] == 5e-4
    adamw = build_optimizer(p, load_recipe(None, ["model.name=x", "optimizer.name=adamw",
                                                  "optimizer.betas=[0.8,0.9]"]).optimizer)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.8, 0.9)
    with pytest.raises(RecipeError, match="nesterov=true needs"):
        build_optimizer(p, load_recipe(None, ["model.name=x", "optimizer.nesterov=true",
                                              "optimizer.momentum=0"]).optimizer)


def test_part_lr_scale_count():
    assert part_lr_scales([2, 1, 1, 1], 4) == [2.0, 1.0, 1.0, 1.0]
    with pytest.raises(RecipeError, match=r"3 values but the split has 4 parts.*\[2.0, 1.0, 1.0, 1.0\]"):
        part_lr_scales([2, 1, 1], 4)


def test_init_checkpoint_loads_and_rejects_mismatches(tmp_path):
    source = timm.create_model("test_resnet", num_classes=3)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    target = create_model("test_resnet", {"num_classes": 3})
    load_init_checkpoint(target, str(tmp_path / "w.pt"))
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    other = timm.create_model("resnet18", num_classes=3)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(FrzooError, match="does not match the model"):
        load_init_checkpoint(target, str(tmp_path / "other.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FrzooError, match="could not be read"):
        load_init_checkpoint(target, str(tmp_path / "junk.pt"))
    with pytest.raises(FrzooError, match="does not exist"):
        load_init_checkpoint(target, str(tmp_path / "missing.pt"))
