"""Hyper-parameter sweeps: W&B's sweep YAML over dotted recipe keys, on a W&B server or locally.

A sweep file is W&B's own sweep config (``method``, ``metric``, ``parameters``, ``early_terminate``,
``run_cap``, ``name``) whose parameter names are dotted recipe keys (``optimizer.lr``,
``split.points``, ``algorithm.name``), plus two frzoo keys that W&B never sees:

* ``recipe``: the recipe the sweep varies (a path relative to the sweep file), and
* ``overrides``: ``dotted.key=value`` overrides applied to every trial before the parameters.

Two ways to run one, both validated the same way before any trial starts (every value of every
parameter is loaded into the recipe, so an unknown key or a bad value fails at once, naming it):

* with a W&B server, :func:`server_sweep_config` turns it into the config ``wandb.sweep`` takes, with
  a ``command`` that runs each trial as a plain ``frzoo run RECIPE ... key=value ...``;
* without one, :class:`LocalSweep` asks W&B's own sweep engine (the ``sweeps`` package: grid,
  random, bayes, hyperband early termination) for each next trial, trains it in this process
  (see :meth:`LocalSweep._run_trial` for why in-process), logs it as a W&B run grouped under the
  sweep (offline by default), and keeps its state in ``runs/sweeps/<name>/`` so that running the
  same command again continues where it stopped.
"""
from .leaderboard import Trial
from .local import LocalSweep, LocalSweepResult, TrialWatcher
from .server import server_sweep_config
from .spec import SweepSpec, load_sweep, override, param_overrides, validate_parameters

__all__ = ["SweepSpec", "load_sweep", "validate_parameters", "server_sweep_config", "LocalSweep",
           "LocalSweepResult", "Trial", "TrialWatcher", "override", "param_overrides"]
