"""Backend choice and shared argument checks for the mae_kernels ops.

Every public op is a torch custom op (``torch.ops.mae_kernels.*``, registered in the op's file with
``torch.library.custom_op``) whose implementation runs either the Triton kernels or the plain-torch
reference. The choice, in order:

1. ``mae_kernels.backend("torch" | "triton")`` used as a context manager (thread-local), then
2. the environment variable ``MAE_KERNELS_BACKEND=torch|triton|auto`` (read at call time), then
3. auto: Triton when the tensors live on CUDA, or when ``TRITON_INTERPRET=1`` (Triton's CPU
   interpreter, which is how the kernels are tested without a GPU); the reference otherwise.

The public function resolves 1-2 when it is called and hands the name to the op, so a forward and
its backward always run on the same backend, and ``torch.compile`` records the choice in the graph.

``TRITON_INTERPRET=1`` has to be set before ``mae_kernels`` is imported: Triton decides at
decoration time whether a ``@triton.jit`` function is compiled or interpreted.

No check here reads a tensor's values: the ops make no host sync unless a caller asks for index
validation (``validate=True``), which reads the index range back to the host once.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "torch", "triton")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)

_local = threading.local()


def interpreter_enabled() -> bool:
    """True when Triton runs its CPU interpreter instead of compiling kernels."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _requested_backend() -> str:
    name = getattr(_local, "backend", None) or os.environ.get("MAE_KERNELS_BACKEND", "auto")
    name = name.strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"MAE_KERNELS_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force a backend ("torch", "triton" or "auto") inside a ``with`` block, for this thread."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    previous = getattr(_local, "backend", None)
    _local.backend = name
    try:
        yield
    finally:
        _local.backend = previous


def requested_backend() -> str:
    """The backend asked for by the context manager or the environment: "auto", "torch" or "triton"."""
    return _requested_backend()


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Decide whether an op called on ``tensors`` runs its Triton kernels."""
    return runs_triton(_requested_backend(), *tensors)


def runs_triton(name: str, *tensors: torch.Tensor | None) -> bool:
    """Whether backend ``name`` ("auto", "torch" or "triton") runs the Triton kernels on ``tensors``."""
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if name == "torch":
        return False
    if name == "triton":
        if not (on_cuda or interpreter_enabled()):
            raise ValueError(
                "the triton backend needs CUDA tensors, or TRITON_INTERPRET=1 set before importing "
                "mae_kernels to run the kernels on the CPU interpreter"
            )
        return True
    return on_cuda or interpreter_enabled()


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on ``t``'s GPU, not the current one (multi-GPU processes); a no-op off CUDA."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# --- argument checks shared by the ops -------------------------------------------------------------


def check_tensor(name: str, t: object, ndim: int | tuple[int, ...], dtypes=FLOAT_DTYPES) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if t.dim() not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    return t


def check_same_device(**tensors: object) -> None:
    """One device for every tensor given (non-tensors are left to the type checks)."""
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_same_dtype(**tensors: torch.Tensor | None) -> None:
    dtypes = {name: t.dtype for name, t in tensors.items() if t is not None}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{n}: {d}" for n, d in dtypes.items())
        raise TypeError(f"all floating-point inputs must share one dtype, got {listing}")


def check_index(name: str, idx: object, batch: int, upper: int, validate: bool = False) -> torch.Tensor:
    """idx: [B, M] int32/int64 with M > 0; with ``validate``, also 0 <= idx < upper (one host sync).

    Without ``validate`` the values are trusted: mask samplers produce in-range indices by
    construction, and a check on every call would stall the GPU queue once per op.
    """
    check_tensor(name, idx, 2, INDEX_DTYPES)
    assert isinstance(idx, torch.Tensor)
    if idx.shape[0] != batch:
        raise ValueError(f"{name} must have batch size {batch} (first dim), got shape {tuple(idx.shape)}")
    if idx.shape[1] == 0:
        raise ValueError(f"{name} must select at least one token, got shape {tuple(idx.shape)}")
    if validate:
        lo, hi = torch.aminmax(idx)
        if int(lo) < 0 or int(hi) >= upper:
            raise ValueError(f"{name} values must lie in [0, {upper}), got range [{int(lo)}, {int(hi)}]")
    return idx


def check_pos(name: str, pos: object, batch: int, length: int, channels: int) -> torch.Tensor:
    """pos: [N, C] shared by the batch, or [B, N, C] per sample."""
    check_tensor(name, pos, (2, 3))
    assert isinstance(pos, torch.Tensor)
    want = [(length, channels), (batch, length, channels)]
    if tuple(pos.shape) not in want:
        raise ValueError(f"{name} must have shape [{length}, {channels}] or [{batch}, {length}, {channels}], "
                         f"got {tuple(pos.shape)}")
    return pos
