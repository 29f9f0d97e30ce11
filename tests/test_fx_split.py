"""Cutting models whose forward is not a chain of children, on their torch.fx trace.

For each architecture and K: the chained parts equal the whole model bit for bit (eval mode, and
train mode with the same RNG seed), one Features Replay iteration per part runs on them and
changes every part's weights, and the partition frzoo picks on its own (chain first, fx when the
chain is not the forward) is exact too. Inputs are tiny (32x32 or 64x64, batch 2) and big models
are shrunk through their constructor kwargs, so the file runs in a few minutes on two cores.
"""
from __future__ import annotations

import copy
import functools

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from frzoo.algorithms.fr import FeaturesReplay
from frzoo.checkpoint import export_from_checkpoint
from frzoo.errors import FrzooError
from frzoo.executors import LocalExecutor
from frzoo.split import check_equivalence, profile_blocks, resolve
from frzoo.split.chain import Part
from frzoo.split.fx import fx_partition
from frzoo.split.fx_parts import FxPart, build_fx_parts
from frzoo.split.trace import trace_model

# name: (constructor kwargs, input size, {K: split points}, whether the chain split can never be
# exact: root-owned tensors or functional code between the root's children)
ARCHS = {
    # ViT / DeiT: cls token and position embedding owned by the root; tokens pooled by indexing
    "test_vit": (dict(img_size=32, drop_path_rate=0.1), 32,
                 {2: ["blocks.3"], 3: ["blocks.2", "blocks.4"],
                  4: ["pos_drop", "blocks.2", "blocks.5.norm2"]}, True),
    "vit_tiny_patch16_224": (dict(img_size=32), 32,
                             {2: ["blocks.6"], 3: ["blocks.4", "blocks.8"],
                              4: ["blocks.3", "blocks.6", "blocks.9"]}, True),
    "deit_tiny_patch16_224": (dict(img_size=32), 32,
                              {2: ["blocks.5"], 3: ["blocks.1", "norm"]}, True),
    "test_vit_relpos": (dict(img_size=32), 32,
                        {2: ["blocks.4"], 3: ["blocks.3", "blocks.6"],
                         4: ["blocks.2", "blocks.5", "norm"]}, True),
    # Swin (shrunk: 4 stages of 1-2 blocks, window 2 at 64x64): stages are not Sequential
    "swin_tiny_patch4_window7_224": (
        dict(img_size=64, window_size=2, embed_dim=24, depths=(1, 1, 2, 1), num_heads=(1, 1, 1, 1),
             drop_path_rate=0.1), 64,
        {2: ["layers.2"], 3: ["layers.1", "layers.2.blocks.1"],
         4: ["layers.1", "layers.2", "layers.3"]}, False),
    # ConvNeXt: ConvNeXtStage is not Sequential; LayerNorm2d and layer scale are functional
    "test_convnext": (dict(drop_path_rate=0.1), 32,
                      {2: ["stages.1"], 3: ["stages.1.blocks.1", "stages.3"],
                       4: ["stages.1", "stages.2.blocks.2", "head"]}, False),
    "convnext_atto": (dict(), 32, {2: ["stages.2"], 3: ["stages.1", "stages.2.blocks.3"]}, False),
    # EfficientNet / MobileNetV3: cuts between blocks and inside blocks without a skip
    "test_efficientnet": (dict(drop_path_rate=0.1), 32,
                          {2: ["blocks.3"], 3: ["blocks.2", "blocks.4"],
                           4: ["blocks.1", "blocks.3.0.conv_dw", "conv_head"]}, False),
    "efficientnet_b0": (dict(), 32, {2: ["blocks.4"], 3: ["blocks.3", "blocks.5.1"]}, False),
    "mobilenetv3_small_050": (dict(), 32,
                              {2: ["blocks.3"], 3: ["blocks.2.1", "blocks.4"],
                               4: ["blocks.1", "blocks.3", "conv_head"]}, False),
    # RegNet: stages are plain modules (not Sequential), so blocks inside them need the trace
    "regnetx_002": (dict(), 32, {2: ["s3"], 3: ["s2", "s4"], 4: ["s2", "s3.b3", "s4"]}, False),
    # DenseNet (growth 8, 2 layers per dense block): dense blocks concatenate all features
    "densenet121": (dict(growth_rate=8, block_config=(2, 2, 2, 2)), 32,
                    {2: ["features.transition2"],
                     3: ["features.denseblock2", "features.transition3"],
                     4: ["features.transition1", "features.denseblock3", "global_pool"]}, False),
    # VGG (hidden width of the ConvMlp pre-logits cut 64x to 64: 11M instead of 133M parameters)
    "vgg11": (dict(mlp_ratio=1 / 64), 32,
              {2: ["features.11"], 3: ["features.6", "pre_logits"],
               4: ["features.3", "features.11", "head"]}, False),
    # MLP-Mixer: mean over tokens between the last norm and the head
    "mixer_s16_224": (dict(img_size=32), 32,
                      {2: ["blocks.4"], 3: ["blocks.2", "norm"],
                       4: ["blocks.2", "blocks.5", "head"]}, True),
    # ResNets: chain models; the fx path must agree with them
    "resnet18": (dict(), 32, {2: ["layer3"], 3: ["layer2", "layer4"],
                              4: ["layer1.0.act2", "layer3.1", "layer4"]}, False),
    "resnet26d": (dict(), 32, {2: ["layer3.0"], 3: ["layer2", "layer4.1"]}, False),
    "test_resnet": (dict(), 32, {2: ["layer3"], 3: ["layer2", "layer4"]}, False),
    # ByobNet / NFNet: stages are Sequential, NF blocks scale their input (functional code)
    "test_byobnet": (dict(), 32, {2: ["stages.2"], 3: ["stages.1", "final_conv"]}, False),
    "test_nfnet": (dict(), 32, {2: ["stages.1"], 3: ["stem.conv4", "stages.3"],
                                4: ["stages", "stages.2", "head"]}, False),
    # MaxViT / CoAtNet: window and grid attention, relative position tables in buffers
    "test_maxvit": (dict(img_size=32), 32, {2: ["stages.2"], 3: ["stages.1", "stages.3"]}, False),
    "test_coatnet": (dict(img_size=32), 32,
                     {2: ["stages.2"], 3: ["stages.1", "stages.2.blocks.1"]}, False),
    "test_mambaout": (dict(), 32, {2: ["stages.2"], 3: ["stages.1", "stages.2.blocks.1"]}, False),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is faster, and kinder to a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CASES = [pytest.param(name, k, id=f"{name}-K{k}")
         for name, (_, _, points, _) in ARCHS.items() for k in points]


@functools.lru_cache(maxsize=None)
def model_of(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=5, **ARCHS[name][0])


def sample(name: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    size = ARCHS[name][1]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def chained(parts, x):
    for part in parts:
        x = part(x)
    return x


@pytest.mark.parametrize("name,k", CASES)
def test_split_equals_the_model_and_trains_with_features_replay(name, k):
    model = model_of(name)
    points = ARCHS[name][2][k]
    x = sample(name)
    partition = fx_partition(model, points)
    parts = build_fx_parts(model, partition)
    assert len(parts) == k and all(isinstance(p, FxPart) for p in parts)
    assert all(p.names[0] == point or p.names[0].startswith(point + ".")  # a container point
               for p, point in zip(parts[1:], points))  # starts at its first child

    # eval mode, bit for bit; every part takes one tensor and returns one tensor
    model.eval()
    with torch.no_grad():
        assert torch.equal(chained(parts, x), model(x))
    # train mode (drop-path, BatchNorm batch statistics) with the same RNG stream
    model.train()
    with torch.no_grad():
        torch.manual_seed(1)
        whole = model(x)
        torch.manual_seed(1)
        assert torch.equal(chained(parts, x), whole)

    # every parameter in exactly one part, the model's own objects
    ids = [id(p) for part in parts for p in part.parameters()]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}

    # what frzoo picks by itself (chain first, fx when the chain is not the forward) is exact too
    auto = resolve(model, points=points, sample=x)
    picked, auto_parts, report = auto.partition, auto.parts, auto.report
    assert report.exact, report
    assert picked.method == ("fx" if any(isinstance(p, FxPart) for p in auto_parts) else "chain")
    if ARCHS[name][3]:
        assert picked.method == "fx"

    # Features Replay: part k first updates at step K-k; 2K iterations give every part updates
    # with deltas computed after the later parts' first updates (timm zero-inits some heads and
    # last BatchNorms, which makes the first deltas exactly zero)
    saved = copy.deepcopy(model.state_dict())  # the cached model serves the next K unchanged
    before = [{n: p.detach().clone() for n, p in part.named_parameters()} for part in parts]
    algos = [FeaturesReplay(part, torch.optim.SGD(part.parameters(), lr=0.05), index=i,
                            num_parts=k, device=torch.device("cpu"), loss_fn=F.cross_entropy)
             for i, part in enumerate(parts)]
    executor = LocalExecutor(algos)
    for part in parts:
        part.train()
    y = torch.tensor([0, 1])
    for step in range(2 * k):
        result = executor.train_step((sample(name, seed=step + 1), y), step)
        assert torch.isfinite(result.loss)
    for i, part in enumerate(parts):
        changed = [n for n, p in part.named_parameters() if not torch.equal(p, before[i][n])]
        assert changed, f"part {i + 1} of {name} did not change"
    model.load_state_dict(saved)


# ---------------------------------------------------------------- root-owned tensors, export
def test_vit_cls_token_and_pos_embed_stay_the_models_own_parameters():
    model = model_of("test_vit")
    partition = resolve(model, points=["blocks.2"]).partition
    # the chain leaves cls_token out: the fx path takes it
    parts = resolve(model, partition=partition, build=True).parts
    assert all(isinstance(p, FxPart) for p in parts)
    first = dict(parts[0].named_parameters())
    assert first["fx.cls_token"] is model.cls_token
    assert first["fx.pos_embed"] is model.pos_embed
    assert not any("cls_token" in n for n, _ in parts[1].named_parameters())
    # each part's state in the model's own names; together exactly the model's state_dict
    merged = {}
    for part in parts:
        state = part.original_state_dict()
        assert not set(state) & set(merged)
        merged.update(state)
    assert sorted(merged) == sorted(model.state_dict())
    fresh = timm.create_model("test_vit", num_classes=5, **ARCHS["test_vit"][0])
    fresh.load_state_dict(merged)  # strict
    # a checkpoint's parts export through the partition's names as for chain parts
    exported = export_from_checkpoint({"partition": partition.to_list(),
                                       "parts": [{"model": p.state_dict()} for p in parts]})
    assert sorted(exported) == sorted(model.state_dict())


def test_non_persistent_buffers_stay_out_of_the_state():
    model = model_of("swin_tiny_patch4_window7_224")
    parts = build_fx_parts(model, fx_partition(model, ["layers.2"]))
    keys = [k for p in parts for k in p.original_state_dict()]
    assert sorted(keys) == sorted(model.state_dict())


def test_the_recorded_partition_names_every_module_once_in_execution_order():
    model = model_of("test_convnext")
    partition = fx_partition(model, ["stages.1.blocks.1", "stages.3"])
    assert partition.method == "fx"
    assert partition.to_list() == [
        ["stem", "stages.0", "stages.1.downsample", "stages.1.blocks.0"],
        ["stages.1.blocks.1", "stages.2"],
        ["stages.3", "norm_pre", "head"]]
    # the explicit form of the same split is accepted, and a wrong one is refused
    assert resolve(model, parts=partition.to_list()).partition == partition
    with pytest.raises(FrzooError, match="does not match the traced forward"):
        resolve(model, parts=[["stem", "stages.0"], ["stages.1.blocks.1", "stages.2"],
                              ["stages.3", "norm_pre", "head"]])


# ---------------------------------------------------------------- modes and in-place inputs
def test_a_part_follows_the_mode_of_the_models_modules():
    model = model_of("test_convnext")  # drop-path 0.1: the train graph draws random masks
    parts = build_fx_parts(model, fx_partition(model, ["stages.2"]))
    x = sample("test_convnext")
    model.eval()  # as check_equivalence does: the parts' own flags are not touched
    with torch.no_grad():
        assert torch.equal(chained(parts, x), model(x))
    for part in parts:
        part.train()
    assert all(m.training for m in model.modules() if m in set(parts[1].modules()))
    assert "bernoulli" in parts[1].code() and "bernoulli" not in parts[1].code(training=False)


def test_a_part_never_writes_into_its_input():
    model = model_of("resnet18")
    parts = build_fx_parts(model, fx_partition(model, ["layer1.0.act2"]))  # ReLU(inplace=True)
    assert "clone" in parts[1].code()
    h = torch.randn(2, 64, 8, 8)
    kept = h.clone()
    with torch.no_grad():
        parts[1](h)
    assert torch.equal(h, kept)


# ---------------------------------------------------------------- refused cuts
def test_cut_inside_a_vit_block_sends_the_residual_stream_and_the_branch():
    # (refused before multi-tensor cuts: "2 values would cross"; tests/test_multi_cuts.py
    # checks such cuts in depth)
    model = model_of("test_vit")
    split = resolve(model, points=["blocks.1.attn"], sample=sample("test_vit"))
    assert split.report.exact and split.partition.method == "fx"
    assert len(split.report.shapes[0]) == 2  # two tensors cross


def test_a_value_that_is_not_a_tensor_cannot_cross_a_cut():
    class Shapes(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            n = x.shape[0]
            return self.b(self.a(x)).reshape(n, -1)

    with pytest.raises(FrzooError, match=r"cannot cut at 'b'.*is not a tensor"):
        fx_partition(Shapes(), ["b"])  # on the trace (the chain a, b would take it otherwise)


def test_cut_between_the_cls_token_and_the_patches_is_refused():
    # before patch_embed.proj nothing has run yet; inside the root's _pos_embed the patch tokens
    # and the cls token would both cross: no module starts there, so no name reaches it
    model = model_of("test_vit")
    with pytest.raises(FrzooError, match="first part would be empty"):
        resolve(model, points=["patch_embed"])


def test_cut_inside_a_leaf_module_is_refused():
    model = model_of("test_efficientnet")  # bn1 is BatchNormAct2d, traced as one operation
    with pytest.raises(FrzooError, match=r"runs inside 'bn1' \(BatchNormAct2d\), which is "
                                         r"traced as one operation.*near it"):
        resolve(model, points=["bn1.act"])


def test_points_out_of_order_and_unknown_points_are_refused():
    model = model_of("test_convnext")
    with pytest.raises(FrzooError, match="execution order"):
        resolve(model, points=["stages.2.blocks.1", "stages.1.blocks.1"])
    with pytest.raises(FrzooError, match=r"'stages.9' is not a module.*Did you mean"):
        fx_partition(model, ["stages.9"])


class CalledTwice(nn.Module):
    """A module used on both sides of any cut between its calls, and a root tensor too."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.shared = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4))
        self.c = nn.Linear(4, 2)

    def forward(self, x):
        x = self.shared(self.a(x)) * self.scale
        x = self.shared(self.b(x)) * self.scale
        return self.c(x)


def test_weights_used_on_both_sides_of_a_cut_are_refused():
    model = CalledTwice()
    with pytest.raises(FrzooError, match="'shared' runs on both sides"):
        fx_partition(model, ["b"])
    # the chain split leaves the root's `scale` out, and the fx split says why it cannot help
    with pytest.raises(FrzooError, match="keeps tensors outside.*'shared' runs on both sides"):
        resolve(model, points=["b"], build=True).parts
    x = torch.randn(3, 4)
    parts = build_fx_parts(model, fx_partition(model, ["c"]))  # after the last use: fine
    assert torch.equal(chained(parts, x), model(x))


def test_functional_code_between_children_falls_back_to_the_trace():
    from test_partition import Scaled
    model = Scaled()
    x = torch.randn(3, 4)
    chain = resolve(model, points=["b"]).partition
    chain_parts = resolve(model, partition=chain, build=True).parts
    assert chain.method == "chain" and not check_equivalence(model, chain_parts, x).exact
    checked = resolve(model, partition=chain, sample=x)
    assert checked.report.exact and checked.partition.method == "fx"
    assert checked.partition.to_list() == [["a"], ["b"]]


def test_chain_models_keep_the_chain_parts():
    model = model_of("resnet18")
    checked = resolve(model, points=["layer3"], sample=sample("resnet18"))
    assert checked.partition.method == "chain" and all(isinstance(p, Part) for p in checked.parts)
    assert checked.report.exact


def test_a_model_that_cannot_be_traced_keeps_the_chain_error():
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stage = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 2)})

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                x = x * 2
            return self.stage["b"](self.stage["a"](x))

    with pytest.raises(FrzooError, match=r"cannot cut at 'stage.b'.*torch.fx cannot trace"):
        resolve(Untraceable(), points=["stage.b"])


# ---------------------------------------------------------------- candidates
def test_candidates_cover_the_model_and_measure_the_cut():
    model = model_of("resnet18")
    blocks = profile_blocks(model, torch.randn(1, 3, 32, 32))
    assert blocks[0].point == "" and blocks[0].input_shape == (1, 3, 32, 32)
    assert sum(b.params for b in blocks) == sum(p.numel() for p in model.parameters())
    by_point = {b.point: b for b in blocks}
    assert "layer3.1" in by_point  # between blocks, and inside them: skip and branch cross
    inside = by_point["layer3.1.conv2"]
    assert inside.input_shapes == [(1, 256, 2, 2), (1, 256, 2, 2)]
    assert inside.input_bytes == 2 * 256 * 4 * 4
    layer3 = by_point["layer3"]
    assert layer3.input_shape == (1, 128, 4, 4) and layer3.input_bytes == 128 * 16 * 4
    # fc: 512 -> 5 is 2 * 512 * 5 FLOPs
    assert by_point["fc"].flops == 2 * 512 * 5
    # every listed point is accepted by the splitter
    points = [b.point for b in blocks[1:]]
    assert resolve(model, points=points[3:4]).partition.points == points[3:4]


def test_candidates_count_attention_and_root_tensors_of_a_vit():
    model = model_of("test_vit")
    blocks = profile_blocks(model, torch.randn(1, 3, 32, 32))
    assert sum(b.params for b in blocks) == sum(p.numel() for p in model.parameters())
    names = [b.point for b in blocks]
    assert "blocks.1" in names and "blocks.1.attn" in names  # inside: stream and branch cross
    assert len(next(b for b in blocks if b.point == "blocks.1.attn").input_shapes) == 2
    block = next(b for b in blocks if b.point == "blocks.1")
    assert block.input_shape == (1, 5, 64)  # 4 patches + the cls token
    tokens, dim = 5, 64  # qkv, attention (q @ k and attn @ v) and proj
    attention = names.index("blocks.1"), names.index("blocks.1.norm2")  # now several blocks
    assert sum(b.flops for b in blocks[attention[0]:attention[1]]) == \
        2 * tokens * dim * 3 * dim + 4 * tokens * tokens * dim + 2 * tokens * dim * dim
    assert trace_model(model) is trace_model(model)  # traced once per model


def test_plan_lists_the_candidates(capsys):
    from frzoo.cli import main
    code = main(["plan", "model.name=test_vit", "model.kwargs.img_size=16",
                 "model.kwargs.patch_size=4", "data.name=synthetic", "data.num_train=16",
                 "data.num_test=8", "data.batch_size=4", "data.image_size=16",
                 "split.points=[blocks.3]", "--candidates"])
    out = capsys.readouterr().out
    assert code == 0
    assert "# split candidates of test_vit at 3x16x16" in out
    row = next(line for line in out.splitlines() if line.startswith("blocks.1 "))
    # 16 patches + the cls token, 64 wide: 1088 elements, 4 bytes each, batch of 4
    assert row.split()[-3:] == ["17x64", "1.09k", "17.41k"]
    assert "partition: K=2 parts" in out and "equal the whole model exactly" in out


def test_code_that_acts_only_in_training_sends_a_chain_split_to_the_trace():
    """timm's resnet applies its drop_rate dropout functionally before the head: the chain of
    children skips it, which eval mode cannot see. The train-mode comparison does, the split is
    redone on the traced forward (which keeps the dropout), and the check leaves BatchNorm's
    running statistics as they were."""
    from frzoo.split import resolve
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10, drop_rate=0.5)
    before = {n: b.clone() for n, b in model.named_buffers()}
    sample = torch.randn(2, 3, 32, 32)
    split = resolve(model, points=["layer3"], build=True, sample=sample)
    assert split.partition.method == "fx" and split.report.exact
    assert split.report.train_diff == 0.0
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())
    plain = timm.create_model("resnet18", num_classes=10, drop_path_rate=0.2)
    split = resolve(plain, points=["layer3"], build=True, sample=sample)  # drop-path is inside
    assert split.partition.method == "chain" and split.report.exact  # blocks: the chain holds


def test_chain_parts_that_raise_in_the_check_fall_back_to_the_trace():
    """The root flattens between its children: the chain's second part gets a 4-d tensor its
    Linear cannot take and raises inside the split check. That counts as a difference, and the
    same point is cut on the trace, which keeps the flatten."""
    from frzoo.split import resolve

    class Flattening(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 8 * 8, 10)

        def forward(self, x):
            return self.fc(torch.flatten(self.conv(x), 1))

    torch.manual_seed(0)
    split = resolve(Flattening(), points=["fc"], build=True, sample=torch.randn(2, 3, 8, 8))
    assert split.partition.method == "fx" and split.report.exact


# ---------------------------------------------------------------- candidates = accepted cuts
class Interleaved(nn.Module):
    """Twins' and EfficientViM's patterns: ModuleLists never called as a whole, their entries
    called in turn (embed 0, drop 0, block 0, embed 1, ...), and a norm whose tensors the root
    reads itself instead of calling it."""

    def __init__(self) -> None:
        super().__init__()
        self.embeds = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
        self.drops = nn.ModuleList([nn.Dropout(0.1) for _ in range(3)])
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.GELU()) for _ in range(3)])
        self.norms = nn.ModuleList([nn.LayerNorm(4) for _ in range(2)])
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        for embed, drop, block in zip(self.embeds, self.drops, self.blocks):
            x = block(drop(embed(x)))
        x = F.layer_norm(x, (4,), self.norms[0].weight, self.norms[0].bias)
        return self.head(self.norms[1](x))


class SharedModules(nn.Module):
    """CoaT's pattern, a module registered twice (at the root and inside the blocks that call
    it), and a weight tied between two modules."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Linear(4, 4)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), self.pos) for _ in range(2)])
        self.middle = nn.Linear(4, 4)
        self.embed = nn.Linear(4, 4, bias=False)
        self.tail = nn.Linear(4, 4)
        self.head = nn.Linear(4, 4, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        x = self.embed(self.middle(x))
        return self.out(self.head(self.tail(x)))


@pytest.mark.parametrize("model_cls", [Interleaved, SharedModules])
def test_every_candidate_is_a_cut_the_builder_accepts(model_cls):
    """One rule: `split.auto`, `split.k` and `--candidates` offer exactly the cuts that build
    and equal the model, and refuse the others with the same reason."""
    torch.manual_seed(0)
    model = model_cls().eval()
    x = torch.randn(3, 4)
    blocks = profile_blocks(model, x[:1])[1:]
    candidates = [b.point for b in blocks]
    assert candidates
    for point in candidates:
        parts = build_fx_parts(model, fx_partition(model, [point]))
        with torch.no_grad():
            assert torch.equal(chained(parts, x), model(x)), point
    for k in (3, 4):  # several cuts at once too
        points = candidates[::max(1, len(candidates) // (k - 1))][:k - 1]
        parts = build_fx_parts(model, fx_partition(model, points))
        with torch.no_grad():
            assert torch.equal(chained(parts, x), model(x)), points
    offered = {name for b in blocks for name in [b.point, *b.aliases]}
    for point in trace_model(model).eval.first:  # every other module is refused by the builder
        if point not in offered:
            with pytest.raises(FrzooError):
                fx_partition(model, [point])


def test_containers_never_called_are_opened_where_a_cut_falls_inside():
    model = Interleaved()
    partition = fx_partition(model, ["embeds.2"])
    assert partition.to_list() == [
        ["embeds.0", "drops.0", "blocks.0", "embeds.1", "drops.1", "blocks.1"],
        ["embeds.2", "drops.2", "blocks.2", "norms", "head"]]
    assert "embeds.2" in [b.point for b in profile_blocks(model, torch.randn(1, 4))]


def test_a_module_registered_twice_is_listed_once_and_tied_weights_stay_in_one_part():
    model = SharedModules()
    candidates = [b.point for b in profile_blocks(model, torch.randn(1, 4))]
    assert "blocks.1" not in candidates  # `pos` runs in both blocks
    assert "tail" not in candidates and "head" not in candidates  # embed and head share a weight
    assert "middle" in candidates and "out" in candidates
    with pytest.raises(FrzooError, match="'pos' runs on both sides"):
        fx_partition(model, ["blocks.1"])
    with pytest.raises(FrzooError, match="tensor 'embed.weight' is used on both sides"):
        fx_partition(model, ["tail"])
    partition = fx_partition(model, ["middle"])
    assert partition.to_list() == [["pos", "blocks"], ["middle", "embed", "tail", "head", "out"]]
    build_fx_parts(model, partition)  # every parameter in one part


def test_an_in_place_write_through_an_alias_of_the_input_is_cloned_first():
    """NextViT: a cut before an nn.Identity whose output a ReLU(inplace=True) overwrites; the
    Identity returns its input, so the write would land in the received tensor (a leaf that
    requires a gradient in the replay, and the stored input of Features Replay)."""

    class Aliasing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(4, 4)
            self.norm = nn.Identity()
            self.act = nn.ReLU(inplace=True)
            self.fc2 = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc2(self.act(self.norm(self.fc1(x))))

    torch.manual_seed(0)
    model = Aliasing()
    parts = build_fx_parts(model, fx_partition(model, ["norm"]))
    assert "clone" in parts[1].code()
    h = torch.randn(3, 4).requires_grad_()
    kept = h.detach().clone()
    out = parts[1](h)
    out.sum().backward()  # no "leaf Variable ... in-place" error
    assert torch.equal(h.detach(), kept) and h.grad is not None
    assert "clone" not in parts[0].code()
    plain = build_fx_parts(model, fx_partition(model, ["fc2"]))
    assert "clone" not in plain[1].code()  # nothing writes into fc2's input
