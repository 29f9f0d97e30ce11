"""Split points -> parts, and the check that the parts compute what the whole model computes."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from frzoo.errors import FrzooError
from frzoo.split import Partition, all_cut_points, check_equivalence, points_for_k, resolve

RESNETS = [
    ("resnet18", ["layer2", "layer3.1", "layer4"]),
    ("resnet10t", ["layer2"]),  # deep tiered stem (conv1 is a Sequential)
    ("resnet26d", ["layer3.0", "layer3.1"]),  # avg-pool downsample shortcut
    ("seresnet18", ["layer3"]),  # squeeze-excitation blocks
    ("resnet50", ["layer2.1", "layer3.4", "layer4.2"]),  # bottleneck, K=4
    ("test_resnet", ["layer3"]),
]


@pytest.mark.parametrize("name,points", RESNETS)
def test_split_equals_whole_model(name, points):
    model = timm.create_model(name, num_classes=7)
    parts = resolve(model, points=points, build=True).parts
    assert len(parts) == len(points) + 1
    x = torch.randn(2, 3, 48, 48)
    report = check_equivalence(model, parts, x)
    assert report.exact, report
    # and in train mode (BatchNorm batch statistics), chaining the parts by hand
    model.train()
    torch.manual_seed(0)
    whole = model(x)
    torch.manual_seed(0)
    h = x
    for part in parts:
        h = part(h)
    assert torch.equal(h, whole)


def test_every_parameter_lands_in_exactly_one_part_and_export_keeps_names():
    model = timm.create_model("resnet18", num_classes=3)
    parts = resolve(model, points=["layer3.1"], build=True).parts
    merged = {}
    for part in parts:
        merged.update(part.original_state_dict())
    assert list(merged) == list(model.state_dict())
    fresh = timm.create_model("resnet18", num_classes=3)
    fresh.load_state_dict(merged)  # strict


def test_explicit_parts_equal_points():
    model = timm.create_model("test_resnet", num_classes=3)
    by_points = resolve(model, points=["layer3"]).partition
    names = [list(p) for p in by_points.parts]
    assert resolve(model, parts=names).partition == by_points
    with pytest.raises(FrzooError, match="missing: fc"):
        resolve(model, parts=[names[0], names[1][:-1]])
    with pytest.raises(FrzooError, match="execution order"):
        resolve(model, parts=[names[1], names[0]])


def test_unknown_point_suggests_close_names_and_lists_valid_ones():
    model = timm.create_model("resnet18", num_classes=3)
    with pytest.raises(FrzooError, match=r"'layer5' is not a module.*Did you mean: layer.*Valid points"):
        resolve(model, points=["layer5"])


def test_cut_inside_a_residual_block_is_cut_on_the_trace():
    # the chain cannot reach it; the trace can, and sends the skip and the branch (before
    # multi-tensor cuts this was refused)
    model = timm.create_model("resnet18", num_classes=3)
    split = resolve(model, points=["layer3.1.conv2"], sample=torch.randn(2, 3, 32, 32))
    assert split.partition.method == "fx" and split.report.exact


def test_points_out_of_order_or_first_module_are_refused():
    model = timm.create_model("resnet18", num_classes=3)
    with pytest.raises(FrzooError, match="execution order"):
        resolve(model, points=["layer3", "layer2"])
    with pytest.raises(FrzooError, match="execution order"):
        resolve(model, points=["layer3", "layer3"])
    with pytest.raises(FrzooError, match="first part would be empty"):
        resolve(model, points=["conv1"])


def test_cut_points_are_listed_in_execution_order_at_every_depth():
    model = timm.create_model("resnet18", num_classes=3)
    points = all_cut_points(model)
    assert points[:4] == ["bn1", "act1", "maxpool", "layer1"]
    assert points.index("layer3") < points.index("layer3.0") < points.index("layer3.1") < points.index("layer4")
    assert "layer3.1.conv1" not in points


def test_k_rule_is_ceil_chunks_of_blocks():
    model = timm.create_model("resnet18", num_classes=3)  # 8 blocks
    assert points_for_k(model, 2) == ["layer3.0"]
    assert points_for_k(model, 4) == ["layer2.0", "layer3.0", "layer4.0"]
    with pytest.raises(FrzooError, match="only 8 blocks"):
        points_for_k(model, 9)


def test_model_whose_forward_is_not_a_chain_is_split_on_its_trace():
    # the root owns cls_token and pos_embed: the chain parts would leave them out, so the parts
    # are cut from the traced forward instead (tests/test_fx_split.py has the details)
    from frzoo.split.fx_parts import FxPart
    vit = timm.create_model("test_vit", num_classes=3, img_size=32)
    parts = resolve(vit, points=["blocks"], build=True).parts
    assert all(isinstance(p, FxPart) for p in parts)
    assert check_equivalence(vit, parts, torch.randn(2, 3, 32, 32)).exact


class Scaled(nn.Module):
    """Two children with functional code between them: not a chain."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        return self.b(self.a(x) * 2)


def test_functional_code_between_children_is_caught_by_the_check():
    model = Scaled()
    parts = resolve(model, points=["b"], build=True).parts
    report = check_equivalence(model, parts, torch.randn(3, 4))
    assert not report.exact and report.first_bad_part() == 0


def test_whole_model_partition_is_the_model_itself():
    vit = timm.create_model("test_vit", num_classes=3)
    parts = resolve(vit, partition=Partition((("",),)), build=True).parts
    assert parts[0].blocks[0] is vit
    assert check_equivalence(vit, parts, torch.randn(2, 3, 32, 32)).exact
    assert list(parts[0].original_state_dict()) == list(vit.state_dict())


def test_cut_before_a_container_and_inside_it():
    model = timm.create_model("resnet18", num_classes=3)
    partition = resolve(model, points=["layer3", "layer3.1"]).partition
    assert partition.parts[1] == ("layer3.0",)
    assert partition.parts[2][0] == "layer3.1"
    parts = resolve(model, partition=partition, build=True).parts
    assert check_equivalence(model, parts, torch.randn(2, 3, 32, 32)).exact
