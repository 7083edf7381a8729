"""Speed and memory on synthetic input: interleaved throughput, peak forward memory, profile breakdown."""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from .device import autocast, synchronize


class Phases:
    """Wall seconds spent in the named phases of a run: where a tool's time goes."""

    def __init__(self, start: Optional[float] = None, clock: Callable[[], float] = time.perf_counter) -> None:
        """``start``: a ``clock()`` reading of when the run began (default: now)."""
        self.clock = clock
        self.start = clock() if start is None else start
        self.seconds: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        """Count the time spent inside the ``with`` block as ``name``."""
        start = self.clock()
        try:
            yield
        finally:
            self.add(name, self.clock() - start)

    def iterate(self, name: str, items: Iterable[Any]) -> Iterator[Any]:
        """``items`` one by one, counting the time spent waiting for each as ``name``
        (e.g. a loader's batches: the time the models wait for images)."""
        iterator = iter(items)
        while True:
            start = self.clock()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                self.add(name, self.clock() - start)
            yield item

    def summary(self) -> str:
        """``"total 12.3 s: load 1.0 s, ..."``: the wall time since creation, then each phase."""
        total = self.clock() - self.start
        return f"total {total:.1f} s: " + ", ".join(f"{name} {s:.1f} s" for name, s in self.seconds.items())


def synthetic_input(input_size: Sequence[int], batch_size: int, device: torch.device,
                    channels_last: bool = False) -> Tensor:
    """Random images [batch_size, *input_size] on ``device`` (channels-last if asked)."""
    x = torch.randn(batch_size, *input_size, device=device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def interleaved_seconds(runs: dict[Any, Callable[[], object]], device: torch.device, warmup: int = 1,
                        repeats: int = 5) -> dict[Any, list[float]]:
    """Seconds of each run in every repeat, after ``warmup`` untimed calls of each.

    The runs are timed in turn within each repeat (a, b, c, a, b, c, ...), so
    clock boosts, thermal drift and background load hit all of them alike and
    their ratios stay fair."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    seconds: dict[Any, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return seconds


@torch.inference_mode()
def measure_throughput(models: Sequence[nn.Module], input_size: Sequence[int], batch_size: int,
                       device: torch.device, amp: str = "none", channels_last: bool = False,
                       warmup: int = 2, repeats: int = 5, batches: int = 5,
                       input_sizes: Optional[Sequence[Sequence[int]]] = None) -> list[float]:
    """Median images/s of each model on synthetic input of ``input_size``
    (``input_sizes``: one per model instead, e.g. models run at different resolutions).

    Timed by :func:`interleaved_seconds` (``batches`` forwards a run); the median
    discards outlier repeats.
    """
    if warmup < 0 or min(repeats, batches, batch_size) < 1:
        raise ValueError("throughput needs batch_size, repeats and batches >= 1 and warmup >= 0")
    if input_sizes is not None and len(input_sizes) != len(models):
        raise ValueError(f"input_sizes has {len(input_sizes)} entries for {len(models)} models")
    sizes = [tuple(s) for s in input_sizes] if input_sizes is not None else [tuple(input_size)] * len(models)
    inputs = {size: synthetic_input(size, batch_size, device, channels_last) for size in set(sizes)}
    with autocast(device, amp):
        for model, size in zip(models, sizes):
            for _ in range(warmup):
                model(inputs[size])
        def batches_of(model: nn.Module, x: Tensor) -> Callable[[], None]:
            def run() -> None:
                for _ in range(batches):
                    model(x)
            return run

        runs = {m: batches_of(model, inputs[size]) for m, (model, size) in enumerate(zip(models, sizes))}
        seconds = interleaved_seconds(runs, device, warmup=0, repeats=repeats)
    rates = [[batches * batch_size / s for s in seconds[m]] for m in range(len(models))]
    return [statistics.median(r) for r in rates]


@torch.inference_mode()
def peak_forward_memory(model: nn.Module, input_size: Sequence[int], batch_size: int, device: torch.device,
                        amp: str = "none", channels_last: bool = False) -> Optional[int]:
    """Bytes one inference forward holds at its peak on top of what existed before it.

    Weights and the input are excluded (they are allocated already); what is
    counted is every tensor the forward allocates through torch's allocator:
    activations, attention maps, autocast weight copies, the output. CUDA: the
    caching allocator's ``max_memory_allocated`` over the forward. CPU: the
    profiler's allocation events (``profile_memory=True``) replayed in time
    order, the peak of their running sum; scratch buffers that oneDNN / MKL take
    outside torch's allocator are not seen. None when the device offers neither.
    """
    x = synthetic_input(input_size, batch_size, device, channels_last)
    with autocast(device, amp):
        model(x)  # warm-up: lazy initialisation is not the forward's memory
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with autocast(device, amp):
            model(x)
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with autocast(device, amp):
            model(x)
    return _peak_of_allocations(prof, device.type)


def _peak_of_allocations(prof: Any, device_type: str) -> Optional[int]:
    """Peak of the running sum of allocation sizes (frees are negative) recorded by a profiler."""
    try:
        from torch._C._profiler import _EventType

        roots = prof.profiler.kineto_results.experimental_event_tree()
    except (AttributeError, ImportError):  # the event tree is not a stable API
        return None
    events, stack = [], list(reversed(roots))
    while stack:  # pre-order: chronological within each parent
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == device_type:
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
        stack.extend(reversed(event.children))
    running = peak = 0
    for _, size in sorted(events, key=lambda e: e[0]):  # stable: ties keep pre-order
        running += size
        peak = max(peak, running)
    return peak


FORWARD_RANGE, BLOCK_RANGE, MLP_RANGE = "benchmark.forward", "benchmark.block", "benchmark.mlp"
PROFILE_PARTS = ("reduction_scoring", "reduction_apply", "attention", "mlp", "other")


@torch.inference_mode()
def profile_breakdown(model: nn.Module, input_size: Sequence[int], batch_size: int, device: torch.device,
                      amp: str = "none", channels_last: bool = False, forwards: int = 1,
                      top_ops: int = 6) -> dict[str, Any]:
    """Where a forward's time goes, from ``torch.profiler`` ranges.

    ``reduction_scoring``: the method deciding what to merge or prune (matching,
    scores, top-k), the adapter's ``tokenreduce.reduce`` range;
    ``reduction_apply``: moving tokens and sizes (gather, index_add), its
    ``tokenreduce.apply`` range; ``mlp``: each block's MLP; ``attention``: the
    rest of each block (norm, qkv, attention and what the method reads from it,
    projection, residuals); ``other``: outside the blocks (patch embedding,
    final norm, pooling, head). CPU: wall time of the ranges; CUDA: kernel time
    launched inside them. Returns per-forward milliseconds, fractions of the
    forward (they sum to 1) and the slowest aten ops inside the reduction ranges.
    The profiler adds a few microseconds per op, which weighs more on the
    reduction's many small ops than on the big matmuls.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    from ..adapters.vit import APPLY_RANGE, REDUCE_RANGE

    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(hasattr(block, "mlp") for block in blocks):
        raise ValueError("the profile breakdown needs a ViT-like model with .blocks[i].mlp")
    if forwards < 1:
        raise ValueError(f"forwards={forwards} must be >= 1")
    x = synthetic_input(input_size, batch_size, device, channels_last)
    with autocast(device, amp):
        model(x)  # warm-up
    opened: list[Any] = []

    def opener(name: str) -> Callable:
        def hook(module: nn.Module, args: Any) -> None:
            opened.append(record_function(name))
            opened[-1].__enter__()
        return hook

    def closer(module: nn.Module, args: Any, output: Any) -> None:
        opened.pop().__exit__(None, None, None)

    handles = []
    for block in blocks:
        handles += [block.register_forward_pre_hook(opener(BLOCK_RANGE)), block.register_forward_hook(closer),
                    block.mlp.register_forward_pre_hook(opener(MLP_RANGE)), block.mlp.register_forward_hook(closer)]
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:
        synchronize(device)
        with profile(activities=activities) as prof:
            for _ in range(forwards):
                with record_function(FORWARD_RANGE), autocast(device, amp):
                    model(x)
            synchronize(device)
    finally:
        for handle in handles:
            handle.remove()
    # host-side events only: on CUDA the ranges also appear as GPU annotations
    events = [e for e in prof.events() if e.device_type == DeviceType.CPU]
    inclusive = (lambda e: e.device_time_total) if cuda else (lambda e: e.cpu_time_total)
    exclusive = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)

    def total(name: str) -> float:
        return sum(inclusive(e) for e in events if e.name == name) / 1000 / forwards

    forward, in_blocks, mlp = total(FORWARD_RANGE), total(BLOCK_RANGE), total(MLP_RANGE)
    scoring, applying = total(REDUCE_RANGE), total(APPLY_RANGE)
    ms = {"reduction_scoring": scoring, "reduction_apply": applying,
          "attention": max(in_blocks - mlp - scoring - applying, 0.0), "mlp": mlp,
          "other": max(forward - in_blocks, 0.0)}
    parts_total = sum(ms.values()) or 1.0
    ops: dict[str, float] = {}
    for event in events:
        parent = event.cpu_parent
        while parent is not None and parent.name not in (REDUCE_RANGE, APPLY_RANGE):
            parent = parent.cpu_parent
        if parent is not None and event.name.startswith("aten::"):
            ops[event.name] = ops.get(event.name, 0.0) + exclusive(event) / 1000 / forwards
    slowest = dict(sorted(ops.items(), key=lambda item: -item[1])[:top_ops])
    return {"forward_ms": forward, "ms": ms, "fraction": {k: v / parts_total for k, v in ms.items()},
            "reduction_ops_ms": slowest, "timer": "cuda kernels" if cuda else "cpu wall", "forwards": forwards}
