"""Who runs the parts and moves tensors between them. Each module answers one question:

- `local`: every part in this process, the reference every other layout must equal (local.py);
- `p2p`: the distributed executor, one part per process (p2p.py), built from:
  - `topology`: which rank holds what (ranks, replicas, process groups);
  - `schedule`: what crosses between rank k and k+1 at step t, and why it cannot deadlock;
  - `codec`: how a message is encoded (headers, several tensors packed in one buffer);
  - `wire`: posting messages on torch.distributed, and what a failed wait means;
  - `control`: the stop flag and the timings, on a control group of their own;
- across data-parallel replicas: `replicas` (one rank's duties), `gradient_sum` (gradient sums in
  buckets), `sync_bn` (BatchNorm over the global batch), `shards` (checkpoint shards);
- `launch`: starting, supervising and stopping those processes, or joining torchrun (launch.py),
  with `failures`: which process of a failed job to blame;
- `elastic`: under torchrun, the run folder's lock and resuming after a restart (elastic.py).
"""
from .local import LocalExecutor

__all__ = ["LocalExecutor"]
