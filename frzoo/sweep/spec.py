"""A sweep file: loading it, checking it against W&B's sweep schema, and every parameter value
against the recipe, before any trial starts; the `key=value` overrides a trial runs with."""
from __future__ import annotations

import itertools
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from .. import metrics
from ..config import check_size, load_recipe
from ..errors import FrzooError

MAX_COMBINATIONS_CHECKED = 64  # every grid point is loaded up front below this many (~50 ms each)


def import_sweeps() -> Any:
    """W&B's sweep engine, lazily (only sweeps need it), quietly (it warns about pydantic)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import sweeps  # noqa: PLC0415
    except ImportError as exc:
        raise FrzooError(f"sweeps need W&B's sweep engine: `pip install sweeps` ({exc}).") from None
    return sweeps


@dataclass
class SweepSpec:
    """A loaded, validated sweep file."""
    path: Path
    name: str
    recipe: Path
    overrides: List[str]
    config: Dict[str, Any]  # the W&B sweep config: method, metric, parameters, ...

    @property
    def metric(self) -> str:
        return str(self.config["metric"]["name"])

    @property
    def goal(self) -> str:
        return str(self.config["metric"].get("goal", "minimize"))

    @property
    def parameters(self) -> Dict[str, Dict[str, Any]]:
        return self.config["parameters"]

    def identity(self) -> Dict[str, Any]:
        """What must not change between two invocations that continue one local sweep."""
        return {"recipe": str(self.recipe), "overrides": list(self.overrides),
                "config": self.config}


def load_sweep(path: str | Path, extra_overrides: Sequence[str] = ()) -> SweepSpec:
    """Read a sweep file, check it against W&B's sweep schema and every value against the recipe.

    `extra_overrides` (from the command line) are appended to the file's `overrides`.
    """
    path = Path(path)
    if not path.is_file():
        raise FrzooError(f"sweep file '{path}' does not exist.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise FrzooError(f"sweep file '{path}' is not valid YAML: {exc}") from None
    except RecursionError:
        raise FrzooError(f"sweep file '{path}' nests values deeper than the YAML parser can "
                         f"follow.") from None
    check_size(raw, f"sweep file '{path}'")  # an alias bomb, before anything copies it
    if not isinstance(raw, dict):
        raise FrzooError(f"sweep file '{path}' must be a mapping (W&B's sweep YAML plus "
                         f"`recipe:`), not a {type(raw).__name__}.")
    config = dict(raw)
    recipe_value = config.pop("recipe", None)
    if not isinstance(recipe_value, str):
        raise FrzooError(f"sweep file '{path}' needs `recipe: PATH`, the recipe it sweeps over "
                         f"(relative to the sweep file), e.g. `recipe: ../quickstart.yaml`.")
    recipe = (path.parent / recipe_value).resolve()
    if not recipe.is_file():
        raise FrzooError(f"sweep file '{path}': recipe '{recipe_value}' does not exist (looked "
                         f"for {recipe}); give it relative to the sweep file.")
    overrides = config.pop("overrides", None) or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise FrzooError(f"sweep file '{path}': `overrides` must be a list of 'dotted.key=value' "
                         f"strings, got {overrides!r}.")
    config.setdefault("name", path.stem)
    spec = SweepSpec(path=path, name=str(config["name"]), recipe=recipe,
                     overrides=[*overrides, *extra_overrides], config=config)
    _check_schema(spec)
    validate_parameters(spec)
    return spec


def _check_schema(spec: SweepSpec) -> None:
    sweeps = import_sweeps()
    where = f"sweep file '{spec.path}'"
    params = spec.config.get("parameters")
    if not isinstance(params, dict) or not params:
        raise FrzooError(f"{where} needs `parameters:`, a mapping of dotted recipe keys to "
                         f"W&B parameter specs, e.g. `optimizer.lr: {{values: [0.01, 0.1]}}`.")
    for key, param in params.items():
        if not isinstance(param, dict):
            raise FrzooError(f"{where}: parameter '{key}' must be a mapping such as "
                             f"{{values: [...]}}, {{value: ...}} or {{min: .., max: ..}}; got "
                             f"{param!r}.")
        if "parameters" in param:
            raise FrzooError(f"{where}: parameter '{key}' nests `parameters:`; write each "
                             f"recipe key dotted instead (e.g. '{key}.lr: {{values: [...]}}').")
    try:
        violations = sweeps.schema_violations_from_proposed_config(spec.config)
    except ValueError as exc:
        violations = [str(exc)]
    if violations:
        raise FrzooError(f"{where} does not follow W&B's sweep schema: " + "; ".join(violations)
                         + ". See https://docs.wandb.ai/guides/sweeps/sweep-config-keys "
                           "(frzoo adds only `recipe:` and `overrides:`).")
    metric = spec.config.get("metric")
    if not isinstance(metric, dict) or "name" not in metric:
        raise FrzooError(f"{where} needs `metric: {{name: ..., goal: maximize|minimize}}`: the "
                         f"leaderboard, bayes and early termination rank trials by it (e.g. "
                         f"`metric: {{name: test/acc1, goal: maximize}}`).")
    problem = metrics.check_metric_name(str(metric["name"]))
    if problem:
        raise FrzooError(f"{where}: {problem} See docs/wandb.md for the names.")


def plain_value(value: Any) -> Any:
    """numpy scalars (from the sweep engine) as Python values, so YAML/JSON/OmegaConf take them."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    return value


def override(key: str, value: Any) -> str:
    """`key=value` that frzoo's override parser reads back as exactly `value`.

    Non-strings are written as JSON (a YAML subset: lists, numbers, true/false, null); a string
    is written bare unless it would read back as something else (`"1e-3"`, `"true"`), then quoted.
    """
    from omegaconf import OmegaConf  # noqa: PLC0415
    value = plain_value(value)
    if isinstance(value, str):
        plain = f"{key}={value}"
        try:
            if OmegaConf.select(OmegaConf.from_dotlist([plain]), key) == value:
                return plain
        except Exception:  # noqa: BLE001  unparsable bare: quote it
            pass
    return f"{key}={json.dumps(value)}"


def param_overrides(params: Dict[str, Any]) -> List[str]:
    return [override(key, value) for key, value in params.items()]


def candidate_values(key: str, param: Dict[str, Any]) -> List[Any]:
    """The values of one parameter to check up front: all listed values, or a distribution's ends
    and middle (W&B's own parameter class computes them, so log/q distributions come out right)."""
    if "values" in param:
        return [plain_value(v) for v in param["values"]]
    if "value" in param:
        return [plain_value(param["value"])]
    import numpy as np  # noqa: PLC0415
    import_sweeps()
    from sweeps.params import HyperParameter  # noqa: PLC0415
    try:
        hp = HyperParameter(key, param)
        points = hp.ppf(np.array([0.0, 0.5, 1.0]))
    except Exception as exc:  # noqa: BLE001
        raise FrzooError(f"sweep parameter '{key}': {param!r} is not a valid W&B parameter spec "
                         f"({exc}).") from None
    out = []
    for v in np.atleast_1d(points).tolist():
        if isinstance(v, float) and not math.isfinite(v):
            continue
        out.append(int(v) if param.get("distribution", "").startswith(("int", "q_")) and
                   float(v).is_integer() else v)
    return out


def validate_trial(spec: SweepSpec, params: Dict[str, Any],
                   models: Optional[Dict[str, Any]] = None) -> Any:
    """The trial's resolved recipe, or a FrzooError naming the bad key and the fix.

    With `models` (a cache, model config -> built model), the split is also resolved against the
    model, so a split point the model does not have fails here rather than in its trial.
    """
    cfg = load_recipe(spec.recipe, [*spec.overrides, *param_overrides(params)])
    _check_build_rules(cfg)
    if models is not None:
        _check_split(cfg, models)
    return cfg


def _check_build_rules(cfg: Any) -> None:
    """Rules load_recipe leaves to build time that a sweep should catch before its first trial."""
    from ..pipeline import algorithm_of, load_plugins, num_parts_requested  # noqa: PLC0415
    load_plugins(cfg.plugins)  # a recipe plugin may register the algorithm
    algorithm_of(cfg)  # an unknown name or option, or a bad value; quietly (no note per trial)
    k = num_parts_requested(cfg)
    if cfg.devices is not None and k is not None and len(cfg.devices) != k:
        raise FrzooError(f"devices lists {len(cfg.devices)} devices but the split gives {k} "
                         f"parts; sweeping K needs `devices=null` (every part on cpu) in the "
                         f"sweep's overrides, or one device per part.")


def _check_split(cfg: Any, models: Dict[str, Any]) -> None:
    """Resolve the split on the model (built once per model config; no data, no devices)."""
    from types import SimpleNamespace  # noqa: PLC0415
    from omegaconf import OmegaConf  # noqa: PLC0415
    from ..pipeline import build_model, build_partition  # noqa: PLC0415
    key = json.dumps(OmegaConf.to_container(cfg.model, resolve=True), sort_keys=True)
    if key not in models:
        # Module names do not depend on the class count or input channels: any will do here.
        info = SimpleNamespace(num_classes=cfg.data.num_classes, channels=cfg.data.channels)
        models[key] = build_model(cfg.model, info, cfg.train.seed)  # type: ignore[arg-type]
    build_partition(models[key], cfg)


def validate_parameters(spec: SweepSpec) -> None:
    """Load every value of every parameter into the recipe (and every grid point, when few)."""
    where = f"sweep file '{spec.path}'"
    models: Dict[str, Any] = {}
    try:
        validate_trial(spec, {}, models)
    except FrzooError as exc:
        raise FrzooError(f"{where}: the recipe with the sweep's overrides is invalid: {exc}") from None
    values = {key: candidate_values(key, param) for key, param in spec.parameters.items()}
    for key, vals in values.items():
        for value in vals:
            try:
                validate_trial(spec, {key: value}, models)
            except FrzooError as exc:
                kind = "is not a recipe key" if "unknown key" in str(exc) else \
                    f"value {json.dumps(value)} is rejected"
                raise FrzooError(f"{where}: parameter '{key}' {kind}: {exc}") from None
    if len(values) > 1 and math.prod(len(v) for v in values.values()) <= MAX_COMBINATIONS_CHECKED:
        for combo in itertools.product(*values.values()):
            params = dict(zip(values, combo))
            try:
                validate_trial(spec, params, models)
            except FrzooError as exc:
                raise FrzooError(f"{where}: the combination {json.dumps(params)} is invalid: "
                                 f"{exc}") from None
