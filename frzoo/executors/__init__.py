"""Who runs the parts and moves tensors between them.

- `local`: every part in this process, the reference every other layout must equal (local.py);
- `p2p`: one part per process, activations and deltas over torch.distributed (p2p.py);
- `launch`: starting, supervising and stopping those processes, or joining torchrun (launch.py);
- `elastic`: under torchrun, the run folder's lock and resuming after a restart (elastic.py).
"""
from .local import LocalExecutor

__all__ = ["LocalExecutor"]
