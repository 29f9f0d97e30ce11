"""Hostile recipes (issue 22, items 2, 9, 10 and 11): refused when the recipe loads, before
anything starts, in one line naming the key or the file, the value (shortened) and the rule."""
from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from frzoo.cli import main
from frzoo.config import MAX_VALUES, check_master_addr, load_recipe
from frzoo.errors import FrzooError, RecipeError, shorten
from frzoo.pipeline import resolve_algorithm

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.name=synthetic", "data.num_train=16", "data.num_test=8", "data.batch_size=8",
        "data.image_size=16", "split.points=[layer3]", "train.max_steps=2",
        "train.progress=false", "train.threads=1"]


def one_line_error(capsys, *args: str) -> str:
    capsys.readouterr()
    code = main(list(args))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("frzoo: error:")]
    assert code == 2 and len(lines) == 1, err[:3000]
    assert "Traceback" not in err and len(err) < 3000  # no value echoed in full, anywhere
    return lines[0]


# ---------------------------------------------------------------- item 9: numbers
@pytest.mark.parametrize("override, says", [
    ("optimizer.lr=nan", "optimizer.lr=nan must be finite (not nan or inf)."),
    ("optimizer.momentum=inf", "optimizer.momentum=inf must be finite (not nan or inf)."),
    ("distributed.timeout_s=nan", "distributed.timeout_s=nan must be finite"),
    ("distributed.timeout_s=inf", "distributed.timeout_s=inf must be finite"),
    ("distributed.timeout_s=1e300", "distributed.timeout_s=1e+300 must be more than 0 and at "
                                    "most 31536000 (seconds; a year at most)."),
    ("distributed.master_port=99999", "distributed.master_port=99999 must be between 0 and "
                                      "65535 (0: pick a free port)."),
    ("distributed.master_port=-1", "distributed.master_port=-1 must be between 0 and 65535"),
    ("optimizer.betas=[0.9,1.0]", "optimizer.betas=[0.9, 1.0] must be at least 0 and below 1 "
                                  "(every entry)."),
    ("optimizer.part_lr_scale=[2,.nan]", "optimizer.part_lr_scale=[2.0, nan] must be finite"),
    ("optimizer.schedule.min_lr_ratio=2", "optimizer.schedule.min_lr_ratio=2.0 must be between "
                                          "0 and 1."),
    ("optimizer.schedule.milestones=[-1]", "optimizer.schedule.milestones=[-1.0] must be zero "
                                           "or more (every entry)."),
    ("train.seed=9223372036854775808", "train.seed=9223372036854775808 must be between"),
    ("train.trace.start=-1", "train.trace.start=-1 must be zero or more."),
    ("train.trace={start: 3, steps: 0}", "train.trace.steps=0 must be positive."),
    ("train.trace=5", "train.trace=5 must be a mapping of its keys (start, steps), or null (off)."),
])
def test_every_number_is_finite_and_in_range_before_anything_starts(tmp_path, capsys,
                                                                    override, says):
    line = one_line_error(capsys, "run", "model.name=test_resnet", *TINY, override,
                          f"run.out_dir={tmp_path / 'r'}")
    assert line == f"frzoo: error: {says}" or says in line, line
    assert not (tmp_path / "r").exists()  # refused before the run folder


def test_an_unresolvable_master_addr_is_named_not_blamed_on_the_port(tmp_path, capsys):
    with pytest.raises(FrzooError, match=r"^distributed.master_addr='no-such-host.invalid' does "
                                         r"not resolve to an address \("):
        check_master_addr("no-such-host.invalid")
    with pytest.raises(FrzooError, match=r"'192.0.2.1' \(192.0.2.1\) is not an address of this "
                                         r"machine"):
        check_master_addr("192.0.2.1")  # TEST-NET-1: never local
    check_master_addr("127.0.0.1")
    check_master_addr("localhost")
    # the launcher asks before it spawns anything or makes the run folder
    line = one_line_error(capsys, "run", "model.name=test_resnet", *TINY, "executor=distributed",
                          "distributed.master_addr=no-such-host.invalid",
                          f"run.out_dir={tmp_path / 'r'}")
    assert "distributed.master_addr='no-such-host.invalid'" in line and "port" not in line
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- item 10: compile backend
def test_an_unknown_compile_backend_is_refused_when_the_recipe_loads():
    with pytest.raises(RecipeError, match=r"^train.compile_backend='inductr' is not a "
                                          r"torch.compile backend here; known: .*aot_eager.*eager"
                                          r".*inductor.*Did you mean 'inductor'\?$"):
        load_recipe(None, ["model.name=x", "train.compile=true", "train.compile_backend=inductr"])
    for name in ("inductor", "eager", "aot_eager"):
        load_recipe(None, ["model.name=x", "train.compile=true", f"train.compile_backend={name}"])


# ---------------------------------------------------------------- item 11: long values
def test_long_values_are_shortened_in_messages(tmp_path, capsys):
    assert shorten("x" * 10_000_000) == f"'{'x' * 29}...{'x' * 29}' (10000002 characters)"
    assert shorten("short") == "'short'" and shorten(3) == "3"
    huge = "x" * 1_000_000  # 10 MB behaves the same; PyYAML reads 1 MB in a second
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name: {huge}}}\n")
    line = one_line_error(capsys, "run", str(recipe), *TINY, f"run.out_dir={tmp_path / 'r'}")
    assert "unknown model 'xxx" in line and "(1000002 characters)" in line and len(line) < 1500
    huge = "x" * 100_000
    for layer, says in (({"optimizer": {huge: 1}}, "unknown key 'optimizer.xxx"),
                        ({"optimizer": {"name": huge}}, "optimizer.name='xxx"),
                        ({"data": {"batch_size": huge}}, "bad value for 'data.batch_size'")):
        recipe.write_text(yaml.safe_dump({"model": {"name": "m"}, **layer}))
        with pytest.raises(RecipeError) as info:
            load_recipe(recipe)
        assert says in str(info.value) and len(str(info.value)) < 1000, str(info.value)[:300]
    with pytest.raises(FrzooError) as info:
        resolve_algorithm(load_recipe(None, ["model.name=m", f"algorithm.{'y' * 100_000}=1"]))
    assert "takes no option 'yyy" in str(info.value) and len(str(info.value)) < 1000


def test_resume_with_another_algorithm_is_answered_by_the_resume_check(tmp_path, capsys):
    """The recipe's fr options do not make bp fail on resume: they are dropped with a note, and
    the resume check (which since docs/checkpoints.md accepts another algorithm) says in one line
    what carried over."""
    out = tmp_path / "run"
    assert main(["run", "model.name=test_resnet", *TINY, "algorithm.warmup=zeros",
                 f"run.out_dir={out}"]) == 0
    capsys.readouterr()
    assert main(["run", "--resume", str(out), "algorithm.name=bp"]) == 0
    err = capsys.readouterr().err
    assert "takes no option" not in err and "ignores options of other algorithms" in err, err
    assert "with algorithm bp (was fr): weights and optimizer state carried" in err, err


# ---------------------------------------------------------------- item 2: YAML alias bombs
def alias_bomb(indent: str = "") -> str:
    """Nine lists, each aliasing the previous one nine times: 9^9 values once expanded."""
    lines = [f"{indent}a: &a [{', '.join(['lol'] * 9)}]"]
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{indent}{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    return "\n".join(lines) + "\n"


def flow_bomb() -> str:
    """The same bomb as one YAML flow value, for a command-line override."""
    items = [f"&a [{', '.join(['1'] * 9)}]"]
    items += [f"&{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi")]
    return f"[{', '.join(items)}]"


BOUNDED = r"""
import sys
from frzoo.cli import main
from frzoo.config import load_recipe
from frzoo.sweep.spec import load_sweep
folder = sys.argv[1]
for what, call in [
        ("top", lambda: load_recipe(folder + "/top.yaml")),
        ("kwargs", lambda: load_recipe(folder + "/kwargs.yaml")),
        ("base", lambda: load_recipe(folder + "/child.yaml")),
        ("override", lambda: load_recipe(None, ["model.name=m", "model.kwargs.x=" + sys.argv[2]])),
        ("sweep", lambda: load_sweep(folder + "/sweep.yaml"))]:
    try:
        call()
        print(what, "accepted")
    except Exception as exc:
        print(what, type(exc).__name__, exc)
print("cli", main(["run", folder + "/top.yaml"]))
"""


def limit_memory() -> None:
    """Runs in the child before it starts: 6 GB of address space (importing torch maps about
    3.5 GB), so an unbounded expansion fails fast instead of taking the machine."""
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))


def test_yaml_alias_bombs_are_refused_before_omegaconf_sees_them(tmp_path):
    (tmp_path / "top.yaml").write_text(alias_bomb())
    (tmp_path / "kwargs.yaml").write_text("model:\n  name: test_resnet\n  kwargs:\n"
                                          + alias_bomb("    "))
    (tmp_path / "child.yaml").write_text("_base_: top.yaml\nmodel: {name: test_resnet}\n")
    (tmp_path / "sweep.yaml").write_text("recipe: child.yaml\nmethod: grid\n" + alias_bomb())
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", BOUNDED, str(tmp_path), flow_bomb()], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=240,
                          preexec_fn=limit_memory)
    results = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    bounded = f"holds more than {MAX_VALUES} values once its YAML aliases (*name) are expanded"
    for what, where in (("top", f"recipe '{tmp_path}/top.yaml'"),
                        ("kwargs", f"recipe '{tmp_path}/kwargs.yaml'"),
                        ("base", f"recipe '{tmp_path}/top.yaml'"),
                        ("override", "override 'model.kwargs.x=[&a"),
                        ("sweep", f"sweep file '{tmp_path}/sweep.yaml'")):
        assert results[what].startswith(f"RecipeError {where}") and bounded in results[what], \
            (what, results.get(what), proc.stderr[-2000:])
    assert results["cli"] == "2"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("frzoo: error:")]
    assert len(errors) == 1 and bounded in errors[0] and "Traceback" not in proc.stderr


def test_deep_nesting_is_refused_in_one_line(tmp_path):
    (tmp_path / "deep.yaml").write_text("model: {name: m, kwargs: {x: " + "[" * 100 + "]" * 100
                                        + "}}\n")
    with pytest.raises(RecipeError, match=r"nests values more than 64 levels deep"):
        load_recipe(tmp_path / "deep.yaml")
    (tmp_path / "deeper.yaml").write_text("x: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(RecipeError, match=r"deeper\.yaml' nests values deeper than the YAML parser"):
        load_recipe(tmp_path / "deeper.yaml")
