"""A sweep on a W&B server: the config `wandb.sweep` takes, each trial a plain `frzoo run`."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, Optional

from ..errors import FrzooError
from .spec import SweepSpec, import_sweeps, override


def server_sweep_config(spec: SweepSpec, *, cwd: Optional[Path] = None) -> Dict[str, Any]:
    """The config `wandb.sweep` gets: the sweep file's W&B keys plus the command each trial runs.

    The command is `python -m frzoo.cli run RECIPE OVERRIDES... logging.wandb=true
    logging.mode=online key=value...`: the agent appends each parameter as `key=value` (W&B's
    `${args_no_hyphens}`), which is exactly frzoo's override syntax. The recipe path is relative
    to `cwd` when inside it, so agents run from the same folder on another machine find it.
    """
    cwd = (cwd or Path.cwd()).resolve()
    try:
        recipe = str(spec.recipe.relative_to(cwd))
    except ValueError:
        recipe = str(spec.recipe)
    config = copy.deepcopy(spec.config)
    config["program"] = "frzoo.cli"  # W&B wants one; the command runs it as a module
    config["command"] = ["${env}", "${interpreter}", "-m", "frzoo.cli", "run", recipe,
                         *spec.overrides, "logging.wandb=true", "logging.mode=online",
                         "${args_no_hyphens}"]
    _check_agent_formatting(spec)
    violations = import_sweeps().schema_violations_from_proposed_config(config)
    if violations:  # pragma: no cover - load_sweep checked the same keys
        raise FrzooError(f"the W&B sweep config frzoo generated is invalid: {'; '.join(violations)}")
    return config


def _check_agent_formatting(spec: SweepSpec) -> None:
    """A W&B agent passes `key=str(value)`; refuse values that do not survive that (None)."""
    from omegaconf import OmegaConf  # noqa: PLC0415
    for key, param in spec.parameters.items():
        for value in param.get("values", [param["value"]] if "value" in param else []):
            as_agent = OmegaConf.to_container(OmegaConf.from_dotlist([f"{key}={value}"]))
            as_frzoo = OmegaConf.to_container(OmegaConf.from_dotlist([override(key, value)]))
            if as_agent != as_frzoo:
                raise FrzooError(
                    f"sweep file '{spec.path}': parameter '{key}' value {value!r} would reach "
                    f"`frzoo run` from a W&B agent as '{key}={value}', which reads back as "
                    f"{OmegaConf.select(OmegaConf.create(as_agent), key)!r}. Leave that value out "
                    f"of a server sweep, or run the sweep with --local.")
