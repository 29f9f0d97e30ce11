"""Split a model into K parts that compute exactly what the whole model computes.

A split is given as module lists, split points or a number of parts (a registered preset, the
authors' rule, or `split.auto`), and resolved into the canonical :class:`Partition` (module names
per part) and parts (:class:`SplitPart`) by :func:`resolve`, the one place that chooses between
cutting the chain of children and cutting the traced forward. Modules:

* ``plan``: the partition, what every part offers, checks both ways of cutting share;
* ``chain``: cutting where the forward is a chain of children;
* ``trace``: the torch.fx trace of a forward (train and eval mode) and the rule for a valid cut;
* ``fx``: cutting the traced forward of any model that is not a chain: the partition;
* ``fx_parts``, ``inplace``: the parts of such a split, which never write into their input;
* ``profile``: the split candidates (parameters, FLOPs and activation per stretch of the trace);
* ``check``: the bit-for-bit comparison with the whole model;
* ``rule``: the Features Replay authors' ceil(n/K) rule (`split.k`, the zoo's presets);
* ``costs``: FLOPs (torch's FlopCounterMode), seconds and bytes of pieces of a model;
* ``balance``: `split.auto`, the exact balancing under an algorithm's cost model;
* ``resolve``: :func:`resolve`.
"""
from .balance import Balance, balance, balanced_points, flops_shares
from .chain import all_cut_points
from .check import EquivalenceReport, check_equivalence
from .profile import profile_blocks
from .plan import WHOLE_MODEL, Partition, SplitPart
from .resolve import Split, original_key, resolve
from .rule import fr_split_points, points_for_k

__all__ = ["WHOLE_MODEL", "Balance", "EquivalenceReport", "Partition", "Split", "SplitPart",
           "all_cut_points", "balance", "balanced_points", "check_equivalence", "flops_shares",
           "fr_split_points", "original_key", "points_for_k", "profile_blocks", "resolve"]
