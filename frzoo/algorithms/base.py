"""What every part does each iteration, whatever the algorithm.

An algorithm is a class whose instance drives ONE part: it owns the part's module and optimizer
and exposes two calls per iteration t, which any executor (one process, or one process per part)
calls in this order for each part:

    out = algo.forward(h_in, target, t)   # the play: h_in from part k-1, out goes to part k+1
    delta_out = algo.backward(delta_in, t) # update; delta_out goes to part k-1

Activations and deltas are tuples, one entry per tensor crossing the cut (frzoo.activation); a
part's forward also accepts a single tensor (the data, or a caller that cuts where one crosses).

``delta_in`` may be a function that returns the delta (see :data:`Delta`): the distributed
executor hands it over while the delta is still in flight, and the algorithm calls
:func:`arrived` only where it needs the tensor, so a replay runs during the transfer.

``expects_delta(t)`` / ``sends_delta(t)`` tell the executor whether a delta message flows at
iteration t, so that both ends of a link agree on the message count without talking. Deltas are
FIFO per link: the executor hands part k the oldest delta part k+1 sent it that it has not used.
That single rule gives Features Replay its one-iteration delay (part k+1's delta of iteration t is
used by part k at t+1) and plain backprop its zero delay (used in the same iteration), because
the executors run backward from the last part to the first.

Algorithms know nothing of configs, processes, devices of other parts or logging. What a recipe
may set for an algorithm (the `algorithm:` section besides `name`) the class declares itself, as
its ``Options`` dataclass (see frzoo.algorithms.options).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..activation import Activation, Deltas, as_activation, input_deltas, leaves
from ..loss_scale import LossScaler
from ..memory import MemoryMeter, static_bytes
from ..timeline import Spans
from .options import parse_options

LossFn = Callable[[Tensor, Tensor], Tensor]
#: What a part's forward takes: its input activation (a single tensor is a 1-tuple).
Input = Union[Tensor, Activation]
#: What backward() receives from the next part: the deltas (one per tensor of this part's
#: output, see frzoo.activation), none, or a function returning them (waiting for them if they
#: are still in flight). A single tensor is taken as a 1-tuple.
Delta = Union[Deltas, Tensor, Callable[[], Union[Deltas, Tensor]], None]


def arrived(delta: Delta) -> Optional[Deltas]:
    """The deltas themselves, as a tuple; where they are still in flight, wait for them now."""
    value = delta() if callable(delta) else delta
    return None if value is None else as_activation(value)  # type: ignore[arg-type]


@dataclass
class ForwardResult:
    """What a part's forward returns: the activation for the next part, or (last part) the loss
    value, the logits and the targets, detached, for metrics."""
    output: Optional[Activation] = None
    loss: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    target: Optional[Tensor] = None


class PhaseTimer:
    """Seconds spent in named phases, summed until read.

    On the CPU a phase's time is its block's wall time. On a GPU a block only queues work, so
    its time is the device's: CUDA events recorded around it on the device's current stream,
    read (waiting for the last one) only when the totals are, every `train.log_every` steps.
    Nothing waits for the device on the hot path.

    During a `train.trace` window the timeline sets :attr:`spans` (frzoo.timeline.Spans): every
    block timed, and every :meth:`span`, is then also recorded as a span of that name and a
    torch.profiler range. Outside it the only cost is the check that `spans` is None.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: Dict[str, float] = {}
        self._events: List[Tuple[str, Any, Any]] = []
        self.spans: Optional[Spans] = None

    def __call__(self, phase: str, **args: Any) -> ContextManager[None]:
        """Time the block as `phase`; while tracing, a span too, with `args` (e.g. a
        micro-batch index) beside the step."""
        timed = self._timed(phase)
        return timed if self.spans is None else self.spans.around(timed, phase, args)

    def span(self, name: str, **args: Any) -> ContextManager[Any]:
        """A span of the timeline only (no seconds summed): e.g. the transport's `send`."""
        if self.spans is None:
            return contextlib.nullcontext()
        return self.spans.around(contextlib.nullcontext(), name, args)

    @contextlib.contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        if self.device.type != "cuda":
            start = time.perf_counter()
            yield
            self.add(phase, time.perf_counter() - start)
            return
        stream = torch.cuda.current_stream(self.device)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record(stream)
        yield
        end.record(stream)
        self._events.append((phase, begin, end))

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def read(self) -> Dict[str, float]:
        """The seconds per phase since the last read; then start again from zero."""
        for phase, begin, end in self._events:
            end.synchronize()
            self.add(phase, begin.elapsed_time(end) / 1000)
        self._events = []
        out, self.seconds = self.seconds, {}
        return out


def step_seed(seed: int, step: int, part_index: int) -> int:
    """The RNG seed of part k's forward of sample `step`.

    Seeding every forward from (run seed, sample, part) makes dropout/drop-path masks identical
    in the play and the replay of a sample, identical whether the parts share a process or not,
    and identical after a resume, without storing any RNG state.
    """
    return (seed * 1_000_003 + step * 131 + part_index) % (2**63 - 1)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block with the CPU (and this CUDA device's) generator seeded, then restore them."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.random.default_generator.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.default_generators[devices[0]].manual_seed(seed)
        yield


@contextlib.contextmanager
def frozen_bn_stats(module: nn.Module) -> Iterator[None]:
    """BatchNorm in train mode (batch statistics) without updating running statistics.

    Turning ``track_running_stats`` off makes BatchNorm pass no running buffers to the kernel, so
    the output is the same batch-statistics normalisation and nothing is accumulated.
    """
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


class PartAlgorithm:
    """Shared mechanics of one part: its module, optimizer, loss and RNG seeding."""

    #: True when part k needs part k+1's delta of the SAME iteration (plain backprop).
    synchronous: bool = False
    #: True for a schedule of micro-batch actions (frzoo.algorithms.pipelines): the executors
    #: run its `schedule` instead of forward()/backward().
    runs_actions: bool = False
    #: Keys of state_dict() that hold lists of per-sample tensors, batch first (a history of
    #: inputs): with data-parallel replicas each copy of the part holds its rows of them, and a
    #: checkpoint stores them concatenated (frzoo.executors.replicas).
    batch_state_keys: Tuple[str, ...] = ()

    @dataclass(frozen=True)
    class Options:
        """The recipe options this algorithm takes besides `name`: none. A subclass that takes
        some declares its own frozen dataclass named Options (frzoo.algorithms.options)."""

    def __init__(self, part: nn.Module, optimizer: torch.optim.Optimizer, *, index: int,
                 num_parts: int, device: torch.device, loss_fn: LossFn, seed: int = 0,
                 options: Optional[Any] = None, **given: Any) -> None:
        self.part = part
        self.optimizer = optimizer
        self.index = index  # 0-based: part k of the paper is index k-1
        self.num_parts = num_parts
        self.device = device
        self.loss_fn = loss_fn
        self.seed = seed
        self.is_first = index == 0
        self.is_last = index == num_parts - 1
        # The step this pipeline started at: 0, or the step a resume with another layout (split,
        # K, algorithm) continues from, where no history or delta in flight carried over and the
        # warm-up starts afresh (frzoo.executors.part_state, docs/checkpoints.md).
        self.origin = 0
        # The builder parses the recipe's options once for all parts and passes them here; a
        # test or tool that builds the class directly gives them as keywords, checked the same way.
        if options is not None and given:
            raise TypeError(f"{type(self).__name__}: give options= or keyword options, not both")
        self.options = options if options is not None else parse_options(type(self), given)
        # Seconds spent in each phase since the executor last read them (frzoo.metrics.PHASES).
        self.timer = PhaseTimer(device)
        self.memory: Optional[MemoryMeter] = None  # see measure_memory()
        self.before_update: Optional[Callable[["PartAlgorithm"], None]] = None
        # Data-parallel replicas (frzoo.executors.replicas.GradientSum): sums the gradients over
        # the copies of this part (fp16: unscaled first) and says whether the copies step.
        self.sum_gradients: Optional[Callable[["PartAlgorithm"], bool]] = None
        # fp16 only (frzoo.loss_scale): scales the last part's loss, unscales this part's
        # gradients with the scale of the delta that made them and skips the step on overflow.
        self.scaler: Optional[LossScaler] = None

    def measure_memory(self) -> None:
        """Count, from now on, the bytes this part keeps alive for backward (frzoo.memory)."""
        self.memory = MemoryMeter(self.part, self.held_tensors)

    def held_tensors(self) -> List[Tensor]:
        """Tensors this part holds from one iteration to the next (its history)."""
        return []

    def memory_report(self) -> Dict[str, int]:
        """Peak activation bytes since the last report, and parameter/optimizer bytes. (The
        device's peak is read per device, for all its parts: frzoo.executors.base.read_windows.)"""
        out = static_bytes(self.part, self.optimizer)
        if self.memory is not None:
            out["peak_activation_bytes"] = self.memory.read_peak()
        return out

    def _recording(self) -> Any:
        return self.memory.recording() if self.memory is not None else contextlib.nullcontext()

    def timed(self, phase: str, **args: Any) -> Any:
        """Count the block's time as this part's `phase` (on a GPU the device's time, read
        later: see PhaseTimer). Any phase name is a span of the `train.trace` timeline;
        keywords (e.g. ``microbatch=i``) are the span's args, beside the step."""
        return self.timer(phase, **args)

    # -- the iteration API (see module docstring)
    def forward(self, h_in: Input, target: Optional[Tensor], step: int) -> ForwardResult:
        raise NotImplementedError

    def backward(self, delta: Delta, step: int) -> Optional[Deltas]:
        raise NotImplementedError

    def expects_delta(self, step: int) -> bool:
        raise NotImplementedError

    def sends_delta(self, step: int) -> bool:
        raise NotImplementedError

    @classmethod
    def staleness_of(cls, index: int, num_parts: int) -> int:
        """How many iterations old the sample is that part `index`'s gradient is computed on."""
        return 0

    @classmethod
    def history_of(cls, index: int, num_parts: int) -> int:
        """How many inputs part `index` keeps at most (its history length)."""
        return 0

    @classmethod
    def part_cost(cls, index: int, num_parts: int, forward: float, backward: float) -> float:
        """Work of part `index` per iteration, given the cost of one forward and of one backward
        (with the update) of its modules: what `split.auto` balances. Here one of each."""
        return forward + backward

    @classmethod
    def memory_cost(cls, index: int, num_parts: int, *, weights: float, saved: float,
                    input_bytes: float) -> float:
        """Bytes part `index` keeps alive, given its parameter and optimizer bytes (`weights`),
        what autograd saves for one backward (`saved`) and the bytes of one input (the sum over
        the tensors crossing its cut): here one graph at a time."""
        return weights + saved

    @property
    def staleness(self) -> int:
        return self.staleness_of(self.index, self.num_parts)

    @property
    def history_length(self) -> int:
        return self.history_of(self.index, self.num_parts)

    # -- helpers for subclasses
    def _run(self, h_in: Activation, sample_step: int) -> Any:
        """The part's forward on `h_in` with the RNG of sample `sample_step`: an activation, or
        (last part) the logits."""
        with seeded(step_seed(self.seed, sample_step, self.index), self.device), self._recording():
            out = self.part(*h_in)
        return out if self.is_last else as_activation(out)

    def _last_part_forward(self, h_in: Input, target: Tensor, step: int) -> ForwardResult:
        """The last part computes the loss with a graph and keeps it for backward()."""
        self._input = leaves(as_activation(h_in), not self.is_first)
        with self.timed("forward"):
            logits = self._run(self._input, step)
            self._loss = self.loss_fn(logits, target)
        return ForwardResult(loss=self._loss.detach(), logits=logits.detach(), target=target)

    def _last_part_backward(self) -> Optional[Deltas]:
        """Staleness 0: plain backprop of the loss computed in forward(), then the update."""
        with self.timed("backward"):
            self._scaled_loss().backward()
        grad_in = None if self.is_first else input_deltas(self._input)
        self._apply_update()
        del self._input, self._loss
        return grad_in

    def _scaled_loss(self) -> Tensor:
        """The loss forward() computed, times the loss scale in fp16."""
        return self._loss if self.scaler is None else self.scaler.scale_loss(self._loss)

    def _warmup_update(self, warmup: str) -> None:
        """An iteration with no stale sample yet: 'skip' makes no update (authors' code);
        'zeros' steps on a zero gradient (the paper's zero input and zero delta give exactly
        that), so only weight decay and momentum act."""
        if warmup == "zeros":
            for p in self.part.parameters():
                p.grad = torch.zeros_like(p)
            self._apply_update()

    def _apply_update(self) -> None:
        finite = True
        if self.sum_gradients is not None:  # every copy of the part steps, or every one skips
            finite = self.sum_gradients(self)
        elif self.scaler is not None:
            with self.timed("optimizer"):
                finite = self.scaler.unscale(self.part.parameters())
        if not finite:  # fp16 overflow: no step at all, as GradScaler skips it
            self.optimizer.zero_grad(set_to_none=True)
            return
        if self.before_update is not None:  # e.g. the sigma probe reads the gradient used here
            self.before_update(self)
        with self.timed("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    # -- checkpointing of what the algorithm carries between iterations
    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} carries no state, got {sorted(state)}")


class DelayedPart(PartAlgorithm):
    """A part k of K that trains on the sample of K-k iterations ago (Features Replay, DDG).

    Every link then carries its delta one iteration late, so part k expects (and part k+1 sends)
    a delta only once that sample exists: from iteration K-k on. The last part is plain backprop.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delay = self.staleness  # K - k: how stale this part's gradient is

    @classmethod
    def staleness_of(cls, index: int, num_parts: int) -> int:
        return num_parts - 1 - index  # K - k

    @classmethod
    def history_of(cls, index: int, num_parts: int) -> int:
        return num_parts - index if index < num_parts - 1 else 0  # K - k + 1; the last part none

    def expects_delta(self, step: int) -> bool:
        return not self.is_last and step - self.delay >= self.origin

    def sends_delta(self, step: int) -> bool:
        return not self.is_first and step - self.delay >= self.origin
