"""Plugins: the installed example package, recipe `.py` plugins, registries and their errors.

The example plugin (examples/frzoo-example-plugin) must be pip-installed: the tests go through
its real entry point, as a user's plugin would. CI (.ci/run) installs it with the README's test
command.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
import timm
import torch
import yaml
from timm.models import _registry as timm_registry

from frzoo import plugins
from frzoo.pipeline import build_pipeline, resolve_algorithm
from frzoo.cli import main
from frzoo.config import load_recipe
from frzoo.data import build_data
from frzoo.errors import FrzooError, RecipeError
from frzoo.executors import LocalExecutor
from frzoo.models import create_model
from frzoo.plugins import (ALGORITHMS, ARCHITECTURES, DATASETS, SPLIT_PRESETS, PluginImportError,
                            PluginWarning, load_plugin, register_algorithm,
                            register_architecture, register_dataset, register_split_presets)
from frzoo.run import train

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "frzoo-example-plugin"
INSTALL_HINT = (f"the example plugin is not installed; run `python -m pip install -e "
                f"{EXAMPLE.relative_to(REPO)}` (the README's test command and .ci/run do it).")
ME = re.escape(__name__)  # this module's name, as registrations made here report it
QUIET = ["train.progress=false", "train.max_steps=3", "data.batch_size=16"]


@pytest.fixture(scope="module")
def example_installed() -> None:
    """Fails (not skips) when the example is not installed: CI must exercise entry points."""
    try:
        dist = metadata.distribution("frzoo-example-plugin")
    except metadata.PackageNotFoundError:
        pytest.fail(INSTALL_HINT)
    eps = [ep for ep in dist.entry_points if ep.group == plugins.ENTRY_POINT_GROUP]
    assert [(ep.name, ep.value) for ep in eps] == [("example", "frzoo_example_plugin")], eps


@pytest.fixture
def scratch():
    """Registrations made by the test are forgotten afterwards (frzoo's and timm's)."""
    regs = (ARCHITECTURES, DATASETS, ALGORITHMS, SPLIT_PRESETS)
    plugins.load_entry_point_plugins()
    saved = [(dict(r._items), dict(r._origin)) for r in regs]
    timm_before = set(timm_registry._model_entrypoints)
    yield
    for r, (items, origin) in zip(regs, saved):
        r._items, r._origin = items, origin
    for name in set(timm_registry._model_entrypoints) - timm_before:
        timm_registry._model_entrypoints.pop(name)
        timm_registry._clear_model_entries(name)


def run_cli(*args: str, capsys) -> tuple:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def subprocess_env(*paths: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), env.get("PYTHONPATH", "")])
    return env


# ---------------------------------------------------------------- the installed example
def test_example_found_through_its_entry_point_in_a_fresh_process(example_installed):
    # A fresh interpreter that never imports the plugin: `frzoo models` must find it anyway.
    proc = subprocess.run([sys.executable, "-m", "frzoo.cli", "models", "example_"],
                          capture_output=True, text=True, timeout=120, cwd="/",
                          env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["example_tinynet  [frzoo_example_plugin.models]"]


def test_example_registrations_and_timm(example_installed):
    assert "example_tinynet" in ARCHITECTURES and "example_stripes" in DATASETS
    assert ARCHITECTURES.origin("example_tinynet") == "frzoo_example_plugin.models"
    assert DATASETS.origin("example_stripes") == "frzoo_example_plugin.data"
    assert SPLIT_PRESETS.get("example_tinynet")[3] == ["stage1.1", "stage2"]
    model = timm.create_model("example_tinynet", num_classes=4, in_chans=1)
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 4)
    # timm's register_model appends names to the module's __all__; frzoo undoes that so that
    # `from module import *` keeps working (the entrypoint does not live in the plugin module).
    import frzoo_example_plugin.models as models
    import frzoo_registry.cifar_resnet as zoo
    for module in (models, zoo):
        assert all(hasattr(module, name) for name in module.__all__), module.__name__


def test_recipe_with_plugin_architecture_and_dataset_trains_fr(example_installed, tmp_path):
    # No split given: two devices ask for K=2, and the architecture's K=2 preset is used.
    cfg = load_recipe(None, ["model.name=example_tinynet", "data.name=example_stripes",
                             "devices=[cpu,cpu]", "algorithm.name=fr", *QUIET])
    summary = train(cfg, tmp_path / "r")
    assert (summary["steps"], summary["num_parts"], summary["algorithm"]) == (3, 2, "fr")
    table = json.loads((tmp_path / "r" / "partition.json").read_text())
    assert [row["modules"] for row in table] == [["stem", "stage1"], ["stage2", "pool", "fc"]]
    # the exported weights load into the timm-created architecture, strictly
    model = timm.create_model("example_tinynet", num_classes=4)
    model.load_state_dict(torch.load(tmp_path / "r" / "final.pt", weights_only=True))


def test_plan_and_models_show_the_plugin(example_installed, capsys):
    args = ["model.name=example_tinynet", "data.name=example_stripes"]
    code, out, err = run_cli("plan", *args, "devices=[cpu,cpu]", capsys=capsys)
    assert code == 0, err
    assert "partition: K=2 parts" in out and "stem .. stage1 (2)" in out
    assert "equal the whole model exactly" in out
    code, out, err = run_cli("plan", *args, "split.k=4", capsys=capsys)
    assert code == 0 and "partition: K=4 parts" in out and "stage2.1 .. fc (3)" in out
    code, out, _ = run_cli("models", "tinynet", capsys=capsys)
    assert code == 0 and "example_tinynet  [frzoo_example_plugin.models]" in out


def test_example_recipe_with_a_py_file_algorithm_plugin(example_installed, tmp_path, monkeypatch):
    # The recipe shipped with the example, as the docs run it (from the repository root): its
    # `plugins:` list names examples/clipped_bp.py, which registers the algorithm `clipped_bp`.
    monkeypatch.chdir(REPO)
    cfg = load_recipe("examples/example_recipe.yaml", QUIET)
    summary = train(cfg, tmp_path / "r")
    assert (summary["steps"], summary["num_parts"], summary["algorithm"]) == (3, 2, "clipped_bp")
    cls = ALGORITHMS.get("clipped_bp")
    assert cls.__module__ == ALGORITHMS.origin("clipped_bp") == "frzoo_plugin_clipped_bp"
    assert cls.updates >= 6  # 3 steps x 2 parts
    # its option, as the recipe sets it, is what the run records
    saved = yaml.safe_load((tmp_path / "r" / "recipe.yaml").read_text())
    assert saved["algorithm"] == {"name": "clipped_bp", "max_norm": 1.0}
    # the same file under another spelling is the same plugin, not a second registration
    assert load_plugin(str(REPO / "examples" / "clipped_bp.py")) is sys.modules[cls.__module__]


def clipped_norms(*overrides: str) -> list:
    """One step of the example recipe; per part, the norm of the gradient its optimizer applied."""
    cfg = load_recipe("examples/example_recipe.yaml", [*QUIET, *overrides])
    data = build_data(cfg.data, cfg.train.seed)
    job = build_pipeline(cfg, data.info)
    norms = []
    for algo in job.algorithms:
        def step(algo=algo, inner=algo.optimizer.step):
            grads = [p.grad for p in algo.part.parameters() if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
            return inner()
        algo.optimizer.step = step
    LocalExecutor(job.algorithms).train_step(next(iter(data.train_batches(0))), 0)
    return norms


def test_a_plugin_algorithm_takes_its_own_option(example_installed, monkeypatch):
    # clipped_bp declares `max_norm` (default 1.0): each part's applied gradient has that norm
    # when its own is larger, as it is here for both small values
    monkeypatch.chdir(REPO)
    for max_norm in (1e-3, 2e-3):
        assert clipped_norms(f"algorithm.max_norm={max_norm}") == \
            [pytest.approx(max_norm, rel=1e-4)] * 2
    assert all(n > 2e-3 for n in clipped_norms("algorithm.max_norm=1e9"))  # clipping is off
    # the class checks its options: unknown ones, wrong types and its own rules (frzoo.rules)
    for override, message in (
            ("algorithm.max_norms=1", r"algorithm 'clipped_bp' \(ClippedBackprop\) takes no option "
                                      r"'max_norms'; its options: max_norm \(float, default 1\.0\)\. "
                                      r"Did you mean 'max_norm'\?"),
            ("algorithm.max_norm=big", r"algorithm.max_norm='big' must be of type float"),
            ("algorithm.max_norm=0", r"^algorithm.max_norm=0.0 must be positive \(algorithm "
                                     r"'clipped_bp' \(ClippedBackprop\)\)\.$"),
            ("algorithm.max_norm=.nan", r"^algorithm.max_norm=nan must be finite \(not nan or "
                                        r"inf\) \(algorithm 'clipped_bp' \(ClippedBackprop\)\)\.$")):
        with pytest.raises(RecipeError, match=message):
            resolve_algorithm(load_recipe("examples/example_recipe.yaml", [override]))
    # fr's option under clipped_bp is another registered algorithm's: dropped, and the other way
    # round clipped_bp's max_norm under fr (docs/recipes.md, "Switching the algorithm")
    cfg = resolve_algorithm(load_recipe("examples/example_recipe.yaml", ["algorithm.warmup=skip"]))
    assert dict(cfg.algorithm) == {"name": "clipped_bp", "max_norm": 1.0}
    cfg = resolve_algorithm(load_recipe("examples/example_recipe.yaml",
                                        ["algorithm.max_norm=0.5", "algorithm.name=fr"]))
    assert dict(cfg.algorithm) == {"name": "fr", "warmup": "skip", "replay_bn": "once"}


# ---------------------------------------------------------------- duplicates
def test_duplicate_registration_is_an_error_unless_overriding(example_installed, scratch):
    with pytest.raises(FrzooError, match=r"architecture 'example_tinynet' is already registered "
                                         r"\(by frzoo_example_plugin\.models\); " + ME +
                                         r" registers it again\. Rename it, or pass override=True"):
        register_architecture("example_tinynet")(lambda **kw: torch.nn.Identity())
    assert ARCHITECTURES.origin("example_tinynet") == "frzoo_example_plugin.models"
    with pytest.raises(FrzooError, match=r"dataset 'synthetic' is already registered \(by "
                                         r"frzoo\.data\.builtin\)"):
        register_dataset("synthetic")(lambda cfg: None)
    with pytest.raises(FrzooError, match=r"algorithm 'fr' is already registered"):
        register_algorithm("fr")(type("Other", (), {}))
    with pytest.raises(FrzooError, match=r"split preset 'example_tinynet' is already registered "
                                         r"\(by frzoo_example_plugin\.models\); " + ME):
        register_split_presets("example_tinynet", {2: ["stage1"]})
    # override=True replaces, in frzoo and in timm
    register_architecture("_test_arch")(lambda **kw: torch.nn.Identity())
    register_architecture("_test_arch", override=True)(lambda **kw: torch.nn.Flatten())
    assert isinstance(timm.create_model("_test_arch"), torch.nn.Flatten)
    # presets for a timm model, without registering an architecture
    register_split_presets("resnet34", {2: ["layer3"]})
    assert SPLIT_PRESETS.get("resnet34") == {2: ["layer3"]}


def test_timm_names_and_bad_presets_are_refused_without_a_trace(scratch):
    with pytest.raises(FrzooError, match=r"architecture 'resnet18' .* is already a timm model; "
                                         r"registering it would replace timm's"):
        register_architecture("resnet18")(lambda **kw: torch.nn.Identity())
    assert "resnet18" not in ARCHITECTURES
    with pytest.raises(FrzooError, match=r"split preset of '_test_bad' for K=3 .* is \['a'\]; a "
                                         r"K-part preset is a list of K-1 module names"):
        register_architecture("_test_bad", split_presets={3: ["a"]})(lambda **kw: None)
    assert "_test_bad" not in ARCHITECTURES and not timm.is_model("_test_bad")


# ---------------------------------------------------------------- unknown names
def test_unknown_names_suggest_and_say_where_names_come_from(example_installed):
    where = (r"installed plugins \(entry point group 'frzoo\.plugins'.*recipe's `plugins:` list")
    with pytest.raises(FrzooError, match=r"unknown dataset 'example_stripe'\. Did you mean: "
                                         r"example_stripes\?.*" + where):
        DATASETS.get("example_stripe")
    with pytest.raises(FrzooError, match=r"unknown algorithm 'frr'\. Did you mean: fr\b.*" + where):
        ALGORITHMS.get("frr")
    with pytest.raises(FrzooError, match=r"unknown model 'example_tinynett'\. Did you mean: "
                                         r"example_tinynet\b.*" + where):
        create_model("example_tinynett")


def test_unknown_name_from_a_recipe_is_one_line_from_the_cli(example_installed, tmp_path, capsys):
    code, _, err = run_cli("run", "model.name=example_tinynet", "data.name=example_stripe",
                           f"run.out_dir={tmp_path}", *QUIET, capsys=capsys)
    assert code == 2 and "unknown dataset 'example_stripe'" in err and "Traceback" not in err


# ---------------------------------------------------------------- errors inside plugins
BROKEN = """\
import torch
from frzoo import register_architecture, register_dataset

@register_architecture("{name}_arch", split_presets={{2: ["1"]}})
def {name}_arch(**kwargs):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(2))

@register_dataset("{name}_data")
def {name}_data(cfg):
    raise AssertionError("never built")

def fail():
    raise RuntimeError("boom in {name}")

fail()
"""


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def _assert_rolled_back(name: str) -> None:
    for reg, key in ((ARCHITECTURES, f"{name}_arch"), (SPLIT_PRESETS, f"{name}_arch"),
                     (DATASETS, f"{name}_data")):
        assert key not in reg, f"{reg.kind} {key} survived the failed import"
    assert not timm.is_model(f"{name}_arch")


def test_recipe_py_plugin_that_raises_names_itself_and_keeps_the_traceback(tmp_path):
    plugin = _write(tmp_path / "broken_py.py", BROKEN.format(name="broken_py"))
    cfg = load_recipe(None, ["model.name=test_resnet", f"plugins=[{plugin}]", *QUIET])
    for _ in range(2):  # a retry reports the same error, not a duplicate registration
        with pytest.raises(PluginImportError) as info:
            train(cfg, tmp_path / "r")
        message = str(info.value)
        assert message.startswith(f"plugin '{plugin}' failed to import: RuntimeError: boom in "
                                  f"broken_py\nOriginal traceback:\nTraceback")
        assert f'File "{plugin}", line 15, in <module>' in message
        assert 'line 13, in fail' in message
        assert 'raise RuntimeError("boom in broken_py")' in message
        _assert_rolled_back("broken_py")


def test_module_plugins_that_fail(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginImportError, match=r"plugin 'no_such_frzoo_plugin' is not an "
                                                r"importable module \(No module named"):
        load_plugin("no_such_frzoo_plugin")
    _write(tmp_path / "needs_dep_plugin.py", "import no_such_dependency_xyz\n")
    with pytest.raises(PluginImportError) as info:
        load_plugin("needs_dep_plugin")
    assert "plugin 'needs_dep_plugin' failed to import: ModuleNotFoundError: No module named " \
           "'no_such_dependency_xyz'" in str(info.value)
    assert "needs_dep_plugin.py\", line 1" in str(info.value)
    # a package whose second module fails: what its first module registered is undone too
    _write(tmp_path / "half_pkg" / "__init__.py", "from . import good, bad\n")
    _write(tmp_path / "half_pkg" / "good.py", BROKEN.split("def fail")[0].format(name="half"))
    _write(tmp_path / "half_pkg" / "bad.py", "raise ValueError('half broken')\n")
    with pytest.raises(PluginImportError, match=r"plugin 'half_pkg' failed to import: "
                                                r"ValueError: half broken"):
        load_plugin("half_pkg")
    _assert_rolled_back("half")
    assert not any(m.startswith("half_pkg") for m in sys.modules)
    # a plugin registering a taken name is reported as that plugin's import error
    _write(tmp_path / "dup_plugin.py", """\
        from frzoo import register_dataset
        register_dataset("synthetic")(lambda cfg: None)
        """)
    with pytest.raises(PluginImportError, match=r"(?s)plugin 'dup_plugin' failed to import: "
                                                r"FrzooError: dataset 'synthetic' is already "
                                                r"registered \(by frzoo\.data\.builtin\); dup_plugin "
                                                r"registers it again.*dup_plugin\.py"):
        load_plugin("dup_plugin")


def _fake_installed_plugin(root: Path, name: str, body: str = BROKEN) -> Path:
    """A broken plugin 'installed' as pip would: a module plus a .dist-info with entry points."""
    _write(root / f"{name}.py", body.format(name=name))
    info = root / f"{name}-0.1.dist-info"
    _write(info / "METADATA", f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\n"
                              f"Version: 0.1\n")
    _write(info / "entry_points.txt", f"[frzoo.plugins]\nbroken = {name}\n")
    return root


def _skipped_when_installed(tmp_path: Path, monkeypatch, name: str, body: str, why: str) -> None:
    """Install a failing plugin, rescan the entry points: it is skipped with a warning that
    names it and says `why`, and whatever it registered is undone."""
    root = _fake_installed_plugin(tmp_path / "site", name, body)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(plugins, "_entry_points_loaded", False)  # rescan the entry points
    monkeypatch.setattr(plugins, "PLUGIN_ERRORS", {})
    dist = name.replace("_", "-")
    with pytest.warns(PluginWarning, match=rf"frzoo plugin 'broken' = {name} \(distribution "
                                           rf"{dist}\) failed to import and is skipped \({why}"):
        assert "test_resnet" not in ARCHITECTURES
    _assert_rolled_back(name)


def test_broken_installed_plugin_does_not_break_other_runs(tmp_path, monkeypatch):
    _skipped_when_installed(tmp_path, monkeypatch, "broken_ep", BROKEN,
                            r"RuntimeError: boom in broken_ep\)")
    # a run that does not need it trains
    cfg = load_recipe(None, ["model.name=test_resnet", "data.image_size=16", *QUIET])
    assert train(cfg, tmp_path / "r")["steps"] == 3
    # a run that names what it would have registered says why it is missing, with the traceback
    with pytest.raises(FrzooError) as info:
        create_model("broken_ep_arch")
    message = str(info.value)
    assert "unknown model 'broken_ep_arch'" in message
    assert "Note: installed plugin 'broken' = broken_ep (distribution broken-ep) failed to " \
           "import, so nothing it registers is available:\nTraceback" in message
    assert 'broken_ep.py", line 13, in fail' in message and message.endswith(
        "RuntimeError: boom in broken_ep")
    with pytest.raises(FrzooError, match=r"(?s)unknown dataset 'broken_ep_data'.*Note: installed "
                                         r"plugin 'broken'.*RuntimeError: boom in broken_ep"):
        DATASETS.get("broken_ep_data")


def test_broken_installed_plugin_from_the_cli(tmp_path):
    root = _fake_installed_plugin(tmp_path / "site", "broken_cli")
    proc = subprocess.run(
        [sys.executable, "-m", "frzoo.cli", "run", "model.name=test_resnet", "data.image_size=16",
         *QUIET, f"run.out_dir={tmp_path / 'r'}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=subprocess_env(root))
    assert proc.returncode == 0, proc.stderr
    assert "PluginWarning: frzoo plugin 'broken' = broken_cli (distribution broken-cli) failed " \
           "to import and is skipped (RuntimeError: boom in broken_cli)" in proc.stderr
    assert "done: 3 steps" in proc.stdout


# A plugin that stops the process at import: sys.exit(), or argparse on frzoo's own command line.
EXITS = BROKEN.split("def fail")[0] + "import sys\nsys.exit(0)\n"
PARSES_ARGV = BROKEN.split("def fail")[0] + """\
import argparse
parser = argparse.ArgumentParser()
parser.add_argument("--width", type=int, default=8)
args = parser.parse_args()
"""


@pytest.mark.parametrize("body,says", [
    (EXITS, "it called sys.exit(0) while importing"),
    (PARSES_ARGV, "it parsed the command line with argparse and exited (status 2; argparse said '"),
], ids=["sys_exit", "argparse"])
def test_recipe_plugin_that_exits_at_import_is_one_line_and_status_2(tmp_path, body, says):
    """Not frzoo's exit 0 with nothing trained, nor a usage line that reads like frzoo's own."""
    plugin = _write(tmp_path / "exiting_plugin.py", body.format(name="exiting"))
    recipe = _write(tmp_path / "recipe.yaml", f"plugins: ['{plugin}']\n")
    proc = subprocess.run(
        [sys.executable, "-m", "frzoo.cli", "run", str(recipe), "model.name=test_resnet",
         "data.image_size=16", *QUIET, f"run.out_dir={tmp_path / 'r'}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=subprocess_env())
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    # frzoo's own progress lines may come first; the problem is one line, and the last
    lines = proc.stderr.strip().splitlines()
    assert not any("usage:" in line or "Traceback" in line for line in lines), proc.stderr
    assert [line for line in lines if "error" in line] == lines[-1:], proc.stderr
    assert lines[-1].startswith(f"frzoo: error: plugin '{plugin}' failed to import: {says}")
    assert "if __name__ == \"__main__\":" in lines[-1]
    assert "done:" not in proc.stdout


def test_installed_plugin_that_exits_at_import_is_skipped(tmp_path, monkeypatch):
    """An installed plugin's exit is a failed import like any other: skipped with a warning, and
    what it registered before exiting is undone; frzoo goes on."""
    _skipped_when_installed(tmp_path, monkeypatch, "exit_ep", EXITS,
                            r"PluginExit: it called sys\.exit\(0\)")


def test_a_bug_inside_a_plugin_builder_keeps_its_traceback(scratch):
    @register_architecture("_test_buggy")
    def _test_buggy(num_classes: int = 10) -> torch.nn.Module:
        return torch.nn.Linear(num_classes, "two")  # a TypeError deep inside torch

    with pytest.raises(TypeError) as info:
        create_model("_test_buggy", {"num_classes": 3})
    assert any(f"architecture '_test_buggy', registered by {__name__}" in note
               for note in getattr(info.value, "__notes__", []))
    # kwargs the builder does not take are the recipe's fault: one line, no traceback
    with pytest.raises(FrzooError, match=r"model '_test_buggy' rejected model\.kwargs "
                                         r"\{'width': 3\}"):
        create_model("_test_buggy", {"width": 3})


def test_the_zoo_is_a_plugin_on_the_public_api():
    eps = {ep.name: ep.value for ep in metadata.distribution("frzoo").entry_points
           if ep.group == plugins.ENTRY_POINT_GROUP}
    assert eps == {"registry": "frzoo_registry"}
    assert ARCHITECTURES.origin("cifar_resnet20") == "frzoo_registry.cifar_resnet"
    # the zoo imports nothing private from frzoo (only the names a third-party plugin uses)
    public = {"register_architecture", "register_dataset", "register_algorithm",
              "register_split_presets", "ARCHITECTURES", "DATASETS", "ALGORITHMS",
              "SPLIT_PRESETS", "FrzooError", "fr_split_points"}
    for path in (REPO / "registry").glob("*.py"):
        for line in path.read_text().splitlines():
            if line.startswith(("from frzoo ", "from frzoo.")):
                names = {n.strip() for n in line.split(" import ")[1].split(",")}
                assert names <= public, (path, line)


def test_old_names_still_work_for_one_release_with_a_warning():
    """frzoo.registry (now frzoo.plugins) and frzoo_zoo (now frzoo_registry) are aliases of the
    same module objects, each with a FutureWarning, so plugins written against them keep working."""
    code = ("import warnings; warnings.simplefilter('always')\n"
            "import frzoo.registry as old, frzoo.plugins as new\n"
            "import frzoo_zoo.cifar_resnet as old_zoo, frzoo_registry.cifar_resnet as new_zoo\n"
            "assert old is new and old_zoo is new_zoo\n"
            "assert old.register_architecture is new.register_architecture\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "frzoo.registry is now frzoo.plugins" in done.stderr
    assert "frzoo_zoo is now frzoo_registry" in done.stderr
