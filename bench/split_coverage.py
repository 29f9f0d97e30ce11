"""Which timm architectures frzoo can split, measured: one small variant of every timm family.

For every (model, K) with `split.auto=flops`, in its own process with a time limit, through the
functions `frzoo run` uses (frzoo.plan, frzoo.run):

1. plan the run (`frzoo.plan.make_plan`: the algorithm and `split.auto=flops`), build data,
   model, parts and executor (`build`), which checks in eval mode that the chained parts equal the whole model
   bit for bit;
2. check train mode too: the whole model and the chained parts under the same RNG seed give
   `torch.equal` outputs;
3. run one `fr` training step on a batch of 2.

A family is a timm model module (`timm.models.list_modules()`: resnet, regnet, vision_transformer
...); its variant is the one with the fewest parameters (counted on the meta device, no weights
allocated) among the models `timm.list_models` lists, timm's `test_*` configurations aside; the
choice is kept in bench/results/split_coverage_models.json (--reselect counts again). Input:
64x64 where the model's forward accepts it (most convolutional networks; it keeps the run within
minutes), else the variant's default input size (its pretrained_cfg); 3 channels, 10 classes,
batch 2, random weights, no network.

    python bench/split_coverage.py --jobs 1            # every family, K=2 and 4 (docs + JSON)
    python bench/split_coverage.py --models resnet18 vit_tiny_patch16_224 --k 2 --timeout 60

Writes bench/results/split_coverage.json and, with --docs (default docs/partitioning.md), the
table under its "## Coverage" heading. Each (model, K) is one forked process: the parent imports
torch and timm once, so a job pays for its model, not for the imports.
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import re
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
SELECTION = ROOT / "bench/results/split_coverage_models.json"
# A family whose smallest variant is larger is left out (noted under the table): its forward
# takes seconds on one shared core, and a job runs about ten; the run must fit in 15 minutes.
# Except the families issue 13 names: BEiT (smallest: a ViT-Base) and VGG (133M parameters, most
# of them in one 7x7 convolution of its head).
MAX_PARAMS = 35e6
ALWAYS = {"beit", "vgg"}


def families(reselect: bool = False) -> Tuple[Dict[str, str], Dict[str, str]]:
    """{family: its smallest model}, and {family: why it was left out}. Counting every timm
    model's parameters takes minutes, so the choice is kept in SELECTION for this timm version."""
    import timm
    if SELECTION.exists() and not reselect:
        saved = json.loads(SELECTION.read_text())
        if saved.get("timm") == timm.__version__:
            return saved["chosen"], saved["left_out"]
    chosen, left_out = _smallest_per_family()
    SELECTION.parent.mkdir(parents=True, exist_ok=True)
    SELECTION.write_text(json.dumps({"timm": timm.__version__, "chosen": chosen,
                                     "left_out": left_out}, indent=1) + "\n")
    return chosen, left_out


def _smallest_per_family() -> Tuple[Dict[str, str], Dict[str, str]]:
    """A family is a timm model module; its variant the one with the fewest parameters (built
    on the meta device: nothing allocated), leaving out timm's `test_*` configurations, which
    are not architectures anyone trains."""
    import timm
    import torch
    from timm.models import list_modules
    chosen: Dict[str, str] = {}
    left_out: Dict[str, str] = {}
    for family in sorted(list_modules()):
        best: Optional[Tuple[int, str]] = None
        for name in timm.list_models(module=family):
            if name.startswith("test_"):
                continue
            try:
                with torch.device("meta"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = timm.create_model(name, pretrained=False)
            except Exception:  # noqa: BLE001  a variant that needs arguments: try the next
                continue
            params = sum(p.numel() for p in model.parameters())
            if best is None or (params, name) < best:
                best = (params, name)
        if best is None:
            left_out[family] = "no variant builds with default arguments"
        elif best[0] > MAX_PARAMS and family not in ALWAYS:
            left_out[family] = f"smallest variant {best[1]} has {best[0] / 1e6:.0f}M parameters"
        else:
            chosen[family] = best[1]
    return chosen, left_out


SMALL_SIDE = 64  # tried first: a network that halves the side 5 times still ends at 2x2


def default_size(name: str) -> int:
    """The model's default square input side (its pretrained_cfg), 224 when it names none."""
    import timm
    cfg = timm.models.get_pretrained_cfg(name)
    size = getattr(cfg, "input_size", None) if cfg is not None else None
    return int(size[-1]) if size else 224


def input_size(name: str) -> int:
    """The smallest side the run uses: SMALL_SIDE where the model's forward accepts it (most
    convolutional networks), else its default size (ViTs and others with a fixed input size).
    Small inputs keep the run within minutes; the split does not depend on the side."""
    import timm
    import torch
    default = default_size(name)
    cfg = timm.models.get_pretrained_cfg(name)
    if default <= SMALL_SIDE or (cfg is not None and getattr(cfg, "fixed_input_size", False)):
        return default
    try:
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=10).eval()
        with torch.no_grad():
            model(torch.randn(2, 3, SMALL_SIDE, SMALL_SIDE))
    except Exception:  # noqa: BLE001  too small for it: its own size
        return default
    return SMALL_SIDE


def first_line(exc: BaseException) -> str:
    """frzoo's error as it prints it (one line), or the exception type and message with the
    last frzoo function it went through (where frzoo met it)."""
    from frzoo.errors import FrzooError
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, FrzooError):
        return text
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/frzoo/" in f.filename]
    where = ""
    if frames:
        f = frames[-1]
        where = f" (in {f.filename[f.filename.rindex('/frzoo/') + 1:]}:{f.lineno} {f.name})"
    return f"{type(exc).__name__}: {text}{where}"


def one_job(name: str, k: int, size: int, seed: int = 0) -> Dict[str, Any]:
    """Build, check and step `name` split into `k` parts the way `frzoo run` does."""
    import torch
    from frzoo.config import load_recipe
    from frzoo.plan import make_plan
    from frzoo.run import build
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    cfg = load_recipe(None, [
        f"model.name={name}", f"split.k={k}", "split.auto=flops", "algorithm.name=fr",
        "data.name=synthetic", f"data.image_size={size}", "data.batch_size=2",
        "data.num_train=4", "data.num_test=2", "data.augment=none", "train.max_steps=1",
        f"train.seed={seed}", "train.threads=1", "executor=local"])
    run = build(make_plan(cfg))  # the split check (eval mode, then train mode): refuses unless exact
    pipeline, executor = run.pipeline, run.executor
    x, y = next(iter(run.data.train_batches(0, 0)))
    # build() refused unless the parts equal the model in eval mode and, from one seed, in train
    # mode (frzoo.split.check); say so explicitly in case a split skipped the check
    report = pipeline.report
    if report is None or report.train_diff != 0.0:
        raise AssertionError(f"train mode: the chained parts differ from the whole model "
                             f"({None if report is None else report.train_diff})")
    result = executor.train_step((x, y), 0)
    loss = getattr(result, "loss", None)
    if loss is not None and not torch.isfinite(torch.as_tensor(loss)).all():
        raise AssertionError(f"the fr step's loss is {loss}")
    return {"points": list(pipeline.partition.points),
            "method": pipeline.partition.method}


def _child(conn: Any, name: str, k: int, size: Optional[int]) -> None:
    start = time.perf_counter()
    out: Dict[str, Any] = {}
    try:
        out["image_size"] = size = size or input_size(name)
        out.update(one_job(name, k, size))
        out.update(ok=True, reason="ok")
    except BaseException as exc:  # noqa: BLE001  every failure explains itself in one line
        out.update(ok=False, reason=first_line(exc),
                   traceback=traceback.format_exc().strip().splitlines()[-6:])
    out["seconds"] = round(time.perf_counter() - start, 1)
    conn.send(out)
    conn.close()


def run_job(name: str, k: int, size: Optional[int], timeout: float) -> Dict[str, Any]:
    """One (model, K) in a forked process (at side `size`, or :func:`input_size`'s); killed
    after `timeout` seconds."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    start = time.perf_counter()
    proc = ctx.Process(target=_child, args=(child, name, k, size), daemon=True)
    proc.start()
    child.close()
    result: Optional[Dict[str, Any]] = None
    if parent.poll(timeout):
        try:
            result = parent.recv()
        except EOFError:
            result = None
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if result is None:
        elapsed = time.perf_counter() - start
        result = ({"ok": False, "reason": f"timeout: no result within {timeout:.0f} s"}
                  if elapsed >= timeout else
                  {"ok": False, "reason": f"the process died (exit code {proc.exitcode}), e.g. "
                                          f"out of memory"})
        result["seconds"] = round(elapsed, 1)
    return result


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import timm
    import torch
    return (f"{cpu}, {os.cpu_count()} cores (shared), Python {platform.python_version()}, "
            f"torch {torch.__version__}, timm {timm.__version__}")


def markdown(report: Dict[str, Any]) -> str:
    rows = report["results"]
    ok = sum(r["ok"] for r in rows)
    lines = [
        "## Coverage",
        "",
        f"`bench/split_coverage.py` splits one small variant of every timm family (the one with "
        f"the fewest parameters per timm model module) with `split.auto=flops` at K = "
        f"{', '.join(map(str, report['k']))}, each in its own process with a "
        f"{report['timeout']:.0f} s limit, through `frzoo run`'s own functions: the split check "
        f"(eval mode, bit for bit), the same check in train mode (`torch.equal`, same seed), and "
        f"one `fr` step on a batch of 2 (side {SMALL_SIDE} where the model accepts it, else its "
        f"default input size; column `side`).",
        "",
        f"**{ok} of {len(rows)} (model, K) pairs work ({100 * ok / max(1, len(rows)):.0f}%)**, "
        f"{len({r['model'] for r in rows})} models. Command: `{report['command']}`; machine: "
        f"{report['machine']}; {report['date']}; {report['total_seconds']:.0f} s in all. "
        f"Results: `bench/results/split_coverage.json`.",
    ]
    if report.get("left_out"):
        lines += ["", "Left out: " + "; ".join(f"{f} ({why})" for f, why in
                                              sorted(report["left_out"].items())) + "."]
    lines += ["", "| model | family | side | K | result | s |", "|---|---|---|---|---|---|"]
    for r in rows:
        reason = r["reason"].replace("|", "\\|")
        if len(reason) > 200:
            reason = reason[:197] + "..."
        lines.append(f"| {r['model']} | {r['family']} | {r.get('image_size', '?')} | {r['k']} | "
                     f"{reason} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def write_docs(path: Path, section: str) -> None:
    """Replace the "## Coverage" section of `path` (up to the next "## " heading), or append it."""
    text = path.read_text()
    match = re.search(r"^## Coverage\n.*?(?=^## |\Z)", text, flags=re.M | re.S)
    if match:
        text = text[:match.start()] + section + ("\n" if match.end() < len(text) else "") + text[match.end():]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help="model names (default: every family's "
                                                     "smallest variant)")
    parser.add_argument("--k", nargs="+", type=int, default=[2, 4], help="numbers of parts")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds per (model, K)")
    parser.add_argument("--image-size", type=int, help="input side for every model (default: "
                        f"{SMALL_SIDE} where the model accepts it, else its default size)")
    parser.add_argument("--jobs", type=int, default=1, help="(model, K) processes at a time")
    parser.add_argument("--reselect", action="store_true",
                        help="count the parameters of every timm model again to pick each "
                             "family's smallest variant (minutes; kept in " + SELECTION.name + ")")
    parser.add_argument("--out", default=str(ROOT / "bench/results/split_coverage.json"))
    parser.add_argument("--docs", default=str(ROOT / "docs/partitioning.md"),
                        help="markdown file whose '## Coverage' section gets the table ('' = none)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    warnings.simplefilter("ignore")
    import torch
    import timm  # noqa: F401  imported once, before the forks
    import frzoo.run  # noqa: F401
    torch.set_num_threads(1)
    start = time.perf_counter()
    left_out: Dict[str, str] = {}
    if args.models:
        picked = {name: name for name in args.models}
        family_of = {name: _family(name) for name in args.models}
    else:
        chosen, left_out = families(args.reselect)
        picked = {model: family for family, model in chosen.items()}
        family_of = picked
        print(f"{len(chosen)} families: their smallest variants picked in "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    results: List[Dict[str, Any]] = []
    # --jobs N: N forked jobs at a time (threads only wait for them); results in a fixed order
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [(name, k, pool.submit(run_job, name, k, args.image_size, args.timeout))
                   for name in picked for k in args.k]
        for name, k, future in futures:
            r = future.result()
            r.update(model=name, family=family_of[name], k=k)
            results.append(r)
            print(f"{name:<40} K={k}  {r['seconds']:6.1f} s  {r['reason'][:150]}",
                  file=sys.stderr, flush=True)
    report = {
        "command": "python bench/split_coverage.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "k": args.k, "timeout": args.timeout, "total_seconds": round(time.perf_counter() - start),
        "ok": sum(r["ok"] for r in results), "pairs": len(results),
        "left_out": left_out, "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    if args.docs:
        write_docs(Path(args.docs), markdown(report))
    print(f"{report['ok']} of {report['pairs']} (model, K) pairs work; {out}", file=sys.stderr)
    return 0


def _family(name: str) -> str:
    """The timm module that registers `name` (its family)."""
    import timm
    for family in timm.models.list_modules():
        if name in timm.list_models(module=family):
            return family
    return "?"


if __name__ == "__main__":
    sys.exit(main())
