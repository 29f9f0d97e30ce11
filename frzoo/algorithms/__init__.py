"""Per-part algorithms: what one part does in one iteration. Registered by name."""
from . import bp, ddg, fr, pipelines  # noqa: F401  (registration)
from .base import ForwardResult, PartAlgorithm, frozen_bn_stats, seeded, step_seed

__all__ = ["ForwardResult", "PartAlgorithm", "frozen_bn_stats", "seeded", "step_seed"]
