"""Count what a training step asks of the device: aten ops (≈ eager kernel launches) and host syncs.

A host sync (``.item()``, ``bool(tensor)``, ``nonzero``, ...) makes the CPU wait until the GPU has
drained its queue, so a step with syncs cannot run ahead of the GPU nor be captured as one CUDA
graph. Syncs show up at the dispatcher as the ops below, or as an op whose arguments say its kernel
reads back (``x[bool_mask]``), whatever Python line caused them; a ``TorchDispatchMode`` sees every
op, on CPU as on CUDA, so the counts are testable without a GPU.

A mode is switched off while it handles an op, so the ops a custom op's Python body dispatches
(``mae_kernels``' references, the Triton launchers' allocations) would go unseen: the counter runs
the body of a ``torch.library.custom_op`` itself, with the mode on again.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode

# labels of syncs that no aten op of their own shows: the kernel reads data back itself (index with a
# bool mask runs nonzero inside; repeat_interleave without output_size sums the repeats to size its
# output), or a copy lands on the host
DEVICE_TO_HOST = "device_to_host"
BOOL_MASK_INDEX = "index(bool mask)"
BOOL_MASK_INDEX_PUT = "index_put(bool mask)"
UNSIZED_REPEAT_INTERLEAVE = "repeat_interleave(no output_size)"
SYNC_LABELS = frozenset({DEVICE_TO_HOST, BOOL_MASK_INDEX, BOOL_MASK_INDEX_PUT, UNSIZED_REPEAT_INTERLEAVE})
# aten ops that read device data back to the host (``item``/``tolist``/``bool``/``int`` on a tensor
# all end in _local_scalar_dense), or whose output shape depends on the data (bincount: on the max)
SYNC_OPS = frozenset({
    "_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "nonzero_static_fallback", "masked_select",
    "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive", "bincount", "allclose",
}) | SYNC_LABELS
_MASK_DTYPES = (torch.bool, torch.uint8)  # indexing treats a uint8 index as a (deprecated) bool mask
_INDEX_LABELS = {"index": BOOL_MASK_INDEX, "index_put": BOOL_MASK_INDEX_PUT, "index_put_": BOOL_MASK_INDEX_PUT,
                 "_index_put_impl_": BOOL_MASK_INDEX_PUT}


def _device_to_host(name: str, args: tuple, out: object) -> bool:
    src = args[1] if name == "copy_" else args[0]
    dst = args[0] if name == "copy_" else out
    return (isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.device.type != "cpu"
            and dst.device.type == "cpu")


def _hidden_sync(func, name: str, args: tuple, kwargs: dict) -> str | None:
    """The label of the sync this op's kernel does inside, where its output size depends on the data."""
    if name in _INDEX_LABELS and isinstance(args[1], (list, tuple)):  # (not index.str and the like)
        masked = any(isinstance(i, torch.Tensor) and i.dtype in _MASK_DTYPES for i in args[1])  # None: ``:``
        return _INDEX_LABELS[name] if masked else None
    # (with an int repeat the output size is known: only the tensor-repeats overloads size it from data)
    if name == "repeat_interleave" and func._overloadname != "self_int" and kwargs.get("output_size") is None:
        return UNSIZED_REPEAT_INTERLEAVE
    return None


@dataclass(frozen=True)
class OpCounts:
    """Aten ops of one call, and the host syncs among them (op name -> count)."""

    ops: int
    syncs: dict[str, int]
    by_op: dict[str, int]

    @property
    def num_syncs(self) -> int:
        return sum(self.syncs.values())


class OpCounter(TorchDispatchMode):
    """Counts every op dispatched inside the ``with`` block (forward and backward alike): aten ops, and
    each custom op once plus the ops its Python body dispatches."""

    def __init__(self) -> None:
        super().__init__()
        self.counter: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.counter[name] += 1
        custom = OPDEFS.get(func._schema.name)
        if custom is not None:
            with self:  # the body's own ops (a sync inside a custom op is still a sync of the step)
                return custom._init_fn(*args, **kwargs)
        hidden = _hidden_sync(func, name, args, kwargs)
        if hidden is not None:
            self.counter[hidden] += 1
        out = func(*args, **kwargs)
        if name in ("_to_copy", "copy_") and _device_to_host(name, args, out):
            self.counter[DEVICE_TO_HOST] += 1  # e.g. .cpu() or .tolist() of a CUDA tensor
        return out

    def counts(self) -> OpCounts:
        syncs = {name: n for name, n in self.counter.items() if name in SYNC_OPS}
        ops = sum(n for name, n in self.counter.items() if name not in SYNC_LABELS)  # a label is no op
        return OpCounts(ops, syncs, dict(self.counter))


def count_ops(step: Callable[[], object]) -> OpCounts:
    """Run ``step()`` (e.g. a forward and its backward) once and count its aten ops and host syncs."""
    with OpCounter() as counter:
        step()
    return counter.counts()


COMPILED_GRAPH_EVENT = "## Call CompiledFxGraph"  # the profiler scope of one inductor graph call
# ops that only make a new view or an uninitialised buffer: no kernel runs
NO_KERNEL_OPS = frozenset(f"aten::{name}" for name in (
    "detach", "view", "_unsafe_view", "alias", "as_strided", "t", "transpose", "permute", "expand", "unsqueeze",
    "squeeze", "slice", "select", "split", "split_with_sizes", "unbind", "chunk", "reshape", "resolve_conj",
    "resolve_neg", "empty", "empty_strided", "empty_like", "lift_fresh", "unflatten", "flatten", "narrow",
))


# what runs a matmul (GEMM) or a convolution: on CPU the aten op or inductor's extern call; on CUDA the
# BLAS/cuDNN kernel, or a GEMM template inductor generated (``triton_tem_*``) — one per matmul the math
# needs, whatever surrounds it
MATMUL_OPS = frozenset(f"aten::{name}" for name in (
    "mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "linear", "_scaled_mm", "convolution",
    "_convolution", "convolution_backward", "mkldnn_convolution",
))
# (not "conv": inductor names its casts "..._convert_element_type_..."; cuDNN's convolutions are
# implicit GEMMs and say so; "nvjet": cuBLAS's Hopper kernels)
CUDA_MATMUL_MARKERS = ("gemm", "gemv", "cutlass", "xmma", "cublas", "cudnn", "nvjet", "splitkreduce", "triton_tem_")
# fused attention kernels built on CUTLASS or cuDNN (SDPA's memory-efficient, flash and cuDNN backends):
# attention, not one of the matmuls above, however their names read
CUDA_ATTENTION_MARKERS = ("fmha", "flash", "sdpa", "attention", "attn")
# device activity the profiler lists beside kernels: copies and fills, no kernel launch of the step
CUDA_NON_KERNELS = ("Memcpy", "Memset")


@dataclass(frozen=True)
class LaunchCounts:
    """Kernels one call launches, and the matmuls/convolutions among them."""

    total: int
    matmuls: int


def count_launch_kinds(step: Callable[[], object]) -> LaunchCounts:
    """Kernels one call of ``step`` launches, and how many of them are matmuls, read from the profiler.

    On CUDA: every device kernel. On CPU: the outermost aten ops (what eager code dispatches) that run
    a kernel (views and empty buffers do not count), and inside a compiled graph each kernel inductor
    generated and each extern call it makes (matmuls, custom ops) — with
    ``torch._inductor.config.cpp.enable_kernel_profile`` set before compiling, so generated CPU kernels
    show up as profiler events. Matmuls are counted apart because fusion cannot remove them: inductor
    (or any compiler) merges elementwise work into its neighbours, but every weight matrix still costs
    one GEMM forward and up to two backward.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
    events = prof.events()
    if cuda:
        names = [e.name for e in events if e.device_type == DeviceType.CUDA and is_cuda_kernel(e.name)]
        matmuls = sum(1 for n in names if is_cuda_matmul_kernel(n))
    else:
        names = [e.name for e in events if e.device_type == DeviceType.CPU and _is_launch(e)]
        matmuls = sum(1 for n in names if n in MATMUL_OPS)
    return LaunchCounts(len(names), matmuls)


def is_cuda_kernel(name: str) -> bool:
    """Whether a CUDA profiler event is a kernel launch (not a copy or a fill the profiler lists too)."""
    return not name.startswith(CUDA_NON_KERNELS)


def is_cuda_matmul_kernel(name: str) -> bool:
    """Whether a CUDA kernel's name is a GEMM's (cuBLAS, cuDNN, CUTLASS, inductor's GEMM templates) and
    not a fused attention kernel's."""
    lowered = name.lower()
    return (any(marker in lowered for marker in CUDA_MATMUL_MARKERS)
            and not any(marker in lowered for marker in CUDA_ATTENTION_MARKERS))


def _is_launch(event) -> bool:
    if event.name in NO_KERNEL_OPS:
        return False
    parent = event.cpu_parent
    if parent is not None and parent.name.startswith(COMPILED_GRAPH_EVENT):
        return True
    if not event.name.startswith("aten::"):
        return False
    while parent is not None:  # an aten op inside another aten op, or inside a compiled graph, is no launch
        if parent.name.startswith(("aten::", COMPILED_GRAPH_EVENT)):
            return False
        parent = parent.cpu_parent
    return True
