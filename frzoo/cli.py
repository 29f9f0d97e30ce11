"""`frzoo run | plan | models | eval | export | sweep | agent | report`.

Errors that are the user's to fix (FrzooError) print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

from .errors import FrzooError, shorten
from .messages import log, show_on_stderr

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # frzoo never fetches weights: fail fast, not in 47 s


def _split_args(items: Sequence[str]) -> Tuple[Optional[str], List[str]]:
    """RECIPE is the first argument that is not a dotted.key=value (or ~dotted.key) override."""
    recipe = None
    overrides = []
    for item in items:
        if "=" not in item and not item.startswith("~") and recipe is None:
            recipe = item
        else:
            overrides.append(item)
    return recipe, overrides


def _load(items: Sequence[str], resume: Optional[str] = None) -> Tuple[str, Any]:
    from .config import load_recipe
    recipe, overrides = _split_args(items)
    if recipe is None and resume:  # the run's own recipe (the checkpoint holds it too)
        from .checkpoint import run_recipe
        recipe = str(run_recipe(Path(resume), log.info))
    # No recipe file: the schema defaults plus the overrides (handy for quick experiments).
    return recipe or "run", load_recipe(recipe, overrides)


def cmd_run(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf
    from .run import train
    from .stop import explained, sigterm_as_ctrl_c
    sigterm_as_ctrl_c()  # a scheduler's SIGTERM is a Ctrl-C (frzoo.stop)
    recipe_path, cfg = _load(args.args, args.resume)
    resume = args.resume or cfg.run.resume
    if resume:
        out_dir = Path(resume)
    elif cfg.run.out_dir:
        out_dir = Path(cfg.run.out_dir)
    else:
        out_dir = Path("runs") / f"{Path(recipe_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = OmegaConf.merge(cfg, {"run": {"out_dir": str(out_dir), "resume": None}})
    log.info(f"training {shorten(cfg.model.name, quote=False)} with "
             f"{shorten(cfg.algorithm.name)} into {out_dir}")
    with explained(out_dir):  # a stop without a checkpoint: one line naming the last one
        summary = train(cfg, out_dir, resume=bool(resume))
    acc = summary.get("final_test_acc1")
    print(f"done: {summary['steps']} steps, {summary['train_seconds']:.1f} s training, "
          f"{summary['images_per_s']:.0f} img/s, test acc {acc:.2f}% (best "
          f"{summary['best_test_acc1']:.2f}%), outputs in {out_dir}" if acc is not None else
          f"stopped after {summary['steps']} steps; outputs in {out_dir}")
    return 130 if summary.get("interrupted") else 0


def cmd_plan(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf
    from .plan import make_plan
    from .run import build
    from .split import all_cut_points
    plan = make_plan(_load(args.args)[1])  # split.auto: measured as `frzoo run` measures it
    if args.candidates:  # before the build: the list helps most when the recipe's split is invalid
        _print_candidates(plan)
    print("# resolved recipe")
    print(OmegaConf.to_yaml(plan.cfg, resolve=True))
    print("# plan")
    print("\n".join(f"# {line}" for line in plan.describe()) + "\n")
    assert plan.materials is not None
    info = plan.materials.data().info
    pipeline = build(plan).pipeline
    if args.points:
        print("# valid split points, in execution order")
        print("\n".join(all_cut_points(pipeline.model)))
        print()
    _print_partition(plan, pipeline, _predicted_costs(plan.cfg, info, pipeline))
    diffs = ", ".join(f"{d:g}" for d in pipeline.report.max_abs_diff)
    print(f"\nsplit check: the chained parts equal the whole model exactly "
          f"(max |diff| per part: {diffs}; eval mode, random input; the output "
          f"also in train mode from one seed)")
    return 0


def _print_partition(plan: Any, pipeline: Any, costs: List[float]) -> None:
    """The partition table of `frzoo plan`: per part its modules, size, device and cost."""
    rows = pipeline.table()
    name = plan.cfg.algorithm.name
    print(f"# partition: K={len(rows)} parts, algorithm {name}; predicted cost per "
          f"iteration under {name}'s cost model from FLOPs (backward = 2 forwards), "
          f"as a share of the bottleneck part's and of the total")
    header = (f"{'part':>4}  {'modules':<44} {'params':>11}  {'output shape':<18} {'device':<8} "
              f"{'history':>7} {'bottleneck':>10} {'total':>6}")
    print(header)
    print("-" * len(header))
    for row, cost in zip(rows, costs):
        names = row["modules"]
        label = ("<whole model>" if names == [""] else
                 names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]} ({len(names)})")
        shape = _shape_text(row["output_shape"]) or "?"
        print(f"{row['part']:>4}  {label:<44} {row['params']:>11,}  {shape:<18} "
              f"{row['device']:<8} {row['history']:>7} {100 * cost / (max(costs) or 1):>9.0f}% "
              f"{100 * cost / (sum(costs) or 1):>5.0f}%")


def _predicted_costs(cfg: Any, info: Any, pipeline: Any) -> List[float]:
    """Each part's cost per iteration under the algorithm's cost model (fr: 2F + B, the last
    part F + B) with FLOPs for F and 2F for B, counted on a fresh copy of the model on the CPU
    (the pipeline's parts may sit on different devices)."""
    import torch
    from .pipeline import build_model
    from .split import flops_shares
    model = build_model(cfg.model, info, cfg.train.seed)
    sample = torch.randn(1, info.channels, info.image_size, info.image_size)
    return flops_shares(model, pipeline.partition.to_list(), sample, pipeline.algorithm_cls)


def _shape_text(shape: Any) -> str:
    """`64x8x8`; a multi-tensor cut's shapes joined by ` + ` (frzoo.activation)."""
    if shape and isinstance(shape[0], (list, tuple)):
        return " + ".join(_shape_text(s) for s in shape)
    return "x".join(map(str, shape or []))


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def _print_candidates(plan: Any) -> None:
    """Every valid split point of the recipe's model with the block that starts there."""
    import copy
    import torch
    from .split import all_cut_points, profile_blocks
    cfg, info = plan.cfg, plan.materials.data().info
    model = copy.deepcopy(plan.materials.model())  # profiling runs it; the build takes the original
    sample = torch.randn(1, info.channels, info.image_size, info.image_size)
    batch = cfg.data.batch_size
    try:
        blocks = profile_blocks(model, sample)
    except FrzooError as exc:  # not traceable: only the chain's points are known
        print(f"# split candidates: {exc}\n# chain split points instead:")
        print("\n".join(all_cut_points(model)) + "\n")
        return
    print(f"# split candidates of {cfg.model.name} at {info.channels}x{info.image_size}x"
          f"{info.image_size}: cut BEFORE the point; params and FLOPs (2 per multiply-add of "
          f"conv, linear and matrix products, per sample) of the block from this point to the "
          f"next; activation = the tensors sent across the cut, ` + ` between them where several "
          f"cross (per sample; bytes per batch of "
          f"{batch})")
    header = (f"{'point':<40} {'params':>9} {'FLOPs':>9}  {'activation':<16} {'elements':>9} "
              f"{'bytes/batch':>11}")
    print(header)
    print("-" * len(header))
    total_params = total_flops = 0
    for block in blocks:
        shape = _shape_text([s[1:] for s in block.input_shapes])
        label = block.point or "(input)"
        if block.aliases:
            label += f" (= {block.aliases[0]}{', ...' if len(block.aliases) > 1 else ''})"
        numel = sum(int(torch.Size(s[1:]).numel()) for s in block.input_shapes)
        print(f"{label[:40]:<40} {_si(block.params):>9} {_si(block.flops):>9}  {shape:<16} "
              f"{_si(numel):>9} {_si(block.input_bytes * batch):>11}")
        total_params += block.params
        total_flops += block.flops
    print(f"{len(blocks) - 1} points; total {_si(total_params)} parameters, {_si(total_flops)} "
          f"FLOPs per sample\n")


def cmd_models(args: argparse.Namespace) -> int:
    from .models import list_models
    from .plugins import ARCHITECTURES
    names = list_models(args.pattern)
    for name in names:
        print(f"{name}  [{ARCHITECTURES.origin(name)}]" if name in ARCHITECTURES else name)
    print(f"# {len(names)} models", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .config import load_recipe
    from .run import evaluate
    run_dir = Path(args.run_dir)
    cfg = load_recipe(run_dir / "recipe.yaml", args.overrides)
    weights = Path(args.weights) if args.weights else None
    print(json.dumps(evaluate(cfg, run_dir, weights), indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .checkpoint import atomic_save, find_checkpoint, open_checkpoint, weights_of
    path = find_checkpoint(Path(args.run_dir))
    checkpoint = open_checkpoint(path)
    out = Path(args.output) if args.output else path.parent.parent / "final.pt"
    atomic_save(weights_of(checkpoint), out)
    meta = checkpoint.meta
    print(f"wrote {out} (step {meta['progress']['step']}; load it with "
          f"timm.create_model('{meta['recipe']['model']['name']}', ...).load_state_dict)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Create a W&B server sweep (print the agent command), or run it here with --local."""
    import yaml
    from .sweep import LocalSweep, load_sweep, server_sweep_config
    spec = load_sweep(args.sweep_file, args.overrides)  # fails before any trial, naming the key
    if args.name:
        spec.name = spec.config["name"] = args.name
    if args.local:
        sweep = LocalSweep(spec, root=Path(args.dir), wandb_mode=args.wandb, echo=log.info)
        result = sweep.run(count=args.count)
        ranked = sweep.ranked()
        best = ranked[0] if ranked and ranked[0].metric is not None else None
        print(f"sweep '{spec.name}': {len(result.trials)} trials; leaderboard {result.leaderboard}"
              + (f"; best {best.name}: {spec.metric}={best.metric:.4g} "
                 f"({' '.join(f'{k}={v}' for k, v in best.params.items())})" if best else ""))
        if result.interrupted:
            print(f"interrupted; continue with the same command "
                  f"(`frzoo sweep {args.sweep_file} --local ...`).")
        return 130 if result.interrupted else 0
    config = server_sweep_config(spec)
    if args.print_config:
        print(yaml.safe_dump(config, sort_keys=False), end="")
        return 0
    from .logging.wandb import api_key_configured, import_wandb
    if not api_key_configured():
        raise FrzooError("a W&B server sweep needs a W&B API key, and none is configured "
                         "(WANDB_API_KEY or `wandb login`). Run the sweep on this machine with "
                         f"`frzoo sweep {args.sweep_file} --local`, or see the config W&B would "
                         "get with --print-config.")
    from .config import load_recipe
    logging_cfg = load_recipe(spec.recipe, spec.overrides).logging
    project = args.project or logging_cfg.project
    entity = args.entity or logging_cfg.entity
    wandb = import_wandb()
    try:
        sweep_id = wandb.sweep(config, project=project, entity=entity)
    except Exception as exc:  # noqa: BLE001  the server said no: explain, no traceback
        raise FrzooError(f"W&B could not create the sweep ({type(exc).__name__}: {exc}). Check "
                         f"`wandb login` and the project/entity, or run it with --local.") from None
    path = "/".join(p for p in (entity, project, sweep_id) if p)
    print(f"created W&B sweep {path}. Run trials (from this folder, so the recipe path "
          f"resolves) with:\n  frzoo agent {path}\nor\n  wandb agent {path}")
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    """Run a W&B server sweep's trials here: each is the `frzoo run` command the sweep holds."""
    from .logging.wandb import api_key_configured, import_wandb
    if not api_key_configured():
        raise FrzooError("a W&B agent needs a W&B API key, and none is configured "
                         "(WANDB_API_KEY or `wandb login`). Without a server, run sweeps with "
                         "`frzoo sweep SWEEP.yaml --local`.")
    wandb = import_wandb()
    wandb.agent(args.sweep_id, project=args.project, entity=args.entity, count=args.count)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Figures and a markdown summary comparing finished runs (docs/report.md)."""
    from .report import build_report
    out = (Path(args.output) if args.output
           else Path("runs") / f"report-{time.strftime('%Y%m%d-%H%M%S')}")
    report = build_report(args.run_dirs, out)
    print(f"wrote {report.markdown} and {len(report.figures)} figures"
          + (f"; skipped: {'; '.join(dict.fromkeys(report.skipped.values()))}"
             if report.skipped else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="frzoo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="train a recipe")
    p.add_argument("args", nargs="*", metavar="RECIPE [key=value ...]")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("plan", help="print the resolved recipe and partition; train nothing")
    p.add_argument("args", nargs="+", metavar="RECIPE [key=value ...]")
    p.add_argument("--points", action="store_true", help="also list every valid split point")
    p.add_argument("--candidates", action="store_true",
                   help="list every valid split point of the traced forward with the "
                        "parameters, FLOPs and activation size of the block it starts")
    p.set_defaults(fn=cmd_plan)
    p = sub.add_parser("models", help="list architectures (timm's and plugins')")
    p.add_argument("pattern", nargs="?", help="substring or glob, e.g. 'resnet*'")
    p.set_defaults(fn=cmd_models)
    p = sub.add_parser("eval", help="evaluate a run's final.pt (or last checkpoint) on its test set")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--weights", help="a state_dict file to evaluate instead of RUN_DIR/final.pt")
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("export", help="write a run's last checkpoint as a state_dict in the "
                                      "model's own parameter names")
    p.add_argument("run_dir")
    p.add_argument("-o", "--output", help="file to write (default RUN_DIR/final.pt)")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("sweep", help="create a W&B sweep from a sweep file, or run it here "
                                     "with --local")
    p.add_argument("sweep_file", metavar="SWEEP.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="extra recipe overrides for every trial")
    p.add_argument("--local", action="store_true",
                   help="run the sweep on this machine with W&B's sweep engine; no server")
    p.add_argument("--count", type=int, help="--local: run at most N trials this time")
    p.add_argument("--dir", default="runs/sweeps",
                   help="--local: where sweep folders live (default runs/sweeps)")
    p.add_argument("--name", help="sweep name (default: the file's `name:` or its stem)")
    p.add_argument("--wandb", default="offline", choices=("offline", "online", "auto", "disabled"),
                   help="--local: W&B mode of each trial's run (default offline)")
    p.add_argument("--project", help="W&B project (default: the recipe's logging.project)")
    p.add_argument("--entity", help="W&B entity (default: the recipe's logging.entity)")
    p.add_argument("--print-config", action="store_true",
                   help="print the config W&B would get and exit; contacts no server")
    p.set_defaults(fn=cmd_sweep)
    p = sub.add_parser("agent", help="run trials of a W&B server sweep")
    p.add_argument("sweep_id", metavar="SWEEP_ID", help="ENTITY/PROJECT/ID or ID")
    p.add_argument("--project")
    p.add_argument("--entity")
    p.add_argument("--count", type=int, help="run at most N trials")
    p.set_defaults(fn=cmd_agent)
    p = sub.add_parser("report", help="PNG figures and a markdown summary comparing runs")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("-o", "--output", metavar="OUT_DIR",
                   help="folder for report.md and the PNGs (default runs/report-DATE-TIME)")
    p.set_defaults(fn=cmd_report)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    show_on_stderr()  # frzoo's messages as `frzoo: message` on stderr; configured here only
    try:
        return int(args.fn(args))
    except FrzooError as exc:
        print(f"frzoo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # frzoo.stop.StoppedAtOnce says what survives
        print(f"frzoo: {exc or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
