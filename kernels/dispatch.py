"""Backend choice and shared argument checks for the mae_kernels ops.

Every public op is a torch custom op (``torch.ops.mae_kernels.*``, registered in the op's file with
``torch.library.custom_op``) whose implementation runs either the Triton kernels or the plain-torch
reference. The choice, in order:

1. ``mae_kernels.backend("torch" | "triton")`` used as a context manager (thread-local), then
2. the environment variable ``MAE_KERNELS_BACKEND=torch|triton|auto`` (read at call time), then
   (names in either place are case-insensitive: "Torch" is "torch")
3. auto: Triton when the tensors live on CUDA, or when ``TRITON_INTERPRET=1`` (Triton's CPU
   interpreter, which is how the kernels are tested without a GPU); the reference otherwise.

The public function resolves 1-2 when it is called and hands the name to the op, so a forward and
its backward always run on the same backend, and ``torch.compile`` records the choice in the graph.

``TRITON_INTERPRET=1`` has to be set before ``mae_kernels`` is imported: Triton decides at
decoration time whether a ``@triton.jit`` function is compiled or interpreted. Switching it on later
raises a RuntimeError that says so (instead of Triton's "0 active drivers").

float64 always runs the reference (the kernels are written for fp32/fp16/bf16): auto picks it, and
an explicit ``backend("triton")`` with float64 tensors raises a TypeError. So a patched model can
still be gradchecked in double precision.

No check here reads a tensor's values: the ops make no host sync unless a caller asks for index
validation (``validate=True``), which reads the index range back to the host once.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import torch

from . import _requirements

BACKENDS = ("auto", "torch", "triton")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the Triton kernels compute in
FLOAT_DTYPES = (*KERNEL_DTYPES, torch.float64)  # float64: reference backend only
INDEX_DTYPES = (torch.int32, torch.int64)

_local = threading.local()


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


# Triton fixes compiled-vs-interpreted when the @triton.jit functions are decorated, i.e. at import
_INTERPRETED_AT_IMPORT = _interpreter_requested()


def _interpreter_blocker() -> str | None:
    """Why the interpreter cannot run here (read once, at import: the ops must not read metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        triton_version, numpy_version = version("triton"), version("numpy")
    except PackageNotFoundError:
        return None
    if not _requirements.interpreter_numpy_clash(triton_version, numpy_version):
        return None
    return (f"Triton {triton_version}'s interpreter cannot run with numpy {numpy_version} (it converts "
            "one-element arrays to ints, which numpy 2.4 refuses; triton-lang/triton#9171): install "
            "triton>=3.7 or numpy<2.4, or use mae_kernels.backend('torch') for the reference implementation.")


_INTERPRETER_BLOCKER = _interpreter_blocker() if _INTERPRETED_AT_IMPORT else None


def interpreter_enabled() -> bool:
    """True when Triton runs its CPU interpreter instead of compiling kernels.

    Raises RuntimeError when TRITON_INTERPRET was switched on after mae_kernels was imported: the
    kernels were decorated for the GPU compiler then, and Triton would fail with "0 active drivers".
    """
    requested = _interpreter_requested()
    if requested and not _INTERPRETED_AT_IMPORT:
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after mae_kernels was imported; Triton chooses interpreted vs "
            "compiled kernels at import time. Set it before the first `import mae_kernels` (e.g. "
            "`TRITON_INTERPRET=1 python ...` or os.environ at the top of conftest.py), or use "
            "mae_kernels.backend('torch') for the reference implementation."
        )
    if requested and _INTERPRETER_BLOCKER:
        raise RuntimeError(_INTERPRETER_BLOCKER)
    return requested


def _requested_backend() -> str:
    name = getattr(_local, "backend", None) or os.environ.get("MAE_KERNELS_BACKEND", "auto")
    name = name.strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"MAE_KERNELS_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force a backend ("torch", "triton" or "auto", in any case, as MAE_KERNELS_BACKEND) inside a
    ``with`` block, for this thread.

    Raises:
        TypeError: name not a str.
        ValueError: name not one of the three.
    """
    if not isinstance(name, str):
        raise TypeError(f"backend name must be a str, one of {BACKENDS}, got {type(name).__name__}")
    normalised = name.strip().lower()
    if normalised not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    previous = getattr(_local, "backend", None)
    _local.backend = normalised
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
    """Whether backend ``name`` ("auto", "torch" or "triton") runs the Triton kernels on ``tensors``.

    Decided from devices and dtypes only (never values), so torch.compile sees a static choice.
    """
    present = [t for t in tensors if t is not None]
    on_cuda = all(t.is_cuda for t in present)
    if name == "torch":
        return False
    if any(t.dtype == torch.float64 for t in present):
        if name == "triton":
            raise TypeError("float64 runs on the reference backend only (the Triton kernels compute in "
                            "fp32/fp16/bf16): use mae_kernels.backend('torch') or the default 'auto'")
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
    """One dtype for q/k/v-like inputs (the ops with a dtype rule cast with :func:`match_dtype` first)."""
    dtypes = {name: t.dtype for name, t in tensors.items() if t is not None}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{n}: {d}" for n, d in dtypes.items())
        raise TypeError(f"all floating-point inputs must share one dtype, got {listing}")


def match_dtype(name: str, t: torch.Tensor, like: torch.Tensor, like_name: str) -> torch.Tensor:
    """The dtype rule of the token ops: parameters (``pos``, ``mask_token``) take the activations' dtype.

    Under bf16/fp16 autocast the activations are half while the parameters stay fp32; casting the
    parameter (a differentiable ``.to``: its gradient comes back in fp32) is what autocast does for
    matmuls, and keeps the output in the activations' dtype. A float64 activation next to a lower
    precision parameter is an error rather than a silent upcast of the parameter.
    """
    check_castable(name, t, like, like_name)
    return t if t.dtype == like.dtype else t.to(like.dtype)


def check_castable(name: str, t: torch.Tensor, like: torch.Tensor, like_name: str) -> None:
    """The check half of :func:`match_dtype`, for ops that check everything before casting anything."""
    if like.dtype == torch.float64 and t.dtype != torch.float64:
        raise TypeError(f"{like_name} is float64 but {name} is {t.dtype}: cast {name} to float64 as well "
                        "(float64 is for gradchecks on the reference backend)")


def check_index(name: str, idx: object, batch: int, upper: int, validate: bool = False) -> torch.Tensor:
    """idx: [B, M] int32/int64, M >= 0; with ``validate``, also 0 <= idx < upper (one host sync).

    Without ``validate`` the values are trusted: mask samplers produce in-range indices by
    construction, and a check on every call would stall the GPU queue once per op.
    """
    if isinstance(idx, torch.Tensor) and idx.dtype == torch.bool:
        raise TypeError(f"{name} must hold token positions (int32/int64 [B, M]), got a bool mask of shape "
                        f"{tuple(idx.shape)}: convert it with mae_kernels.mask_to_indices(mask, count), "
                        "count = the number of True entries per row (no host sync)")
    check_tensor(name, idx, 2, INDEX_DTYPES)
    assert isinstance(idx, torch.Tensor)
    if idx.shape[0] != batch:
        raise ValueError(f"{name} must have batch size {batch} (first dim), got shape {tuple(idx.shape)}")
    if validate:
        check_index_range(name, idx, upper)
    return idx


def check_index_range(name: str, idx: torch.Tensor, upper: int) -> None:
    """0 <= idx < upper. Reads the range back to the host (one sync): ops call it after every cheap check,
    so a bad shape or dtype is reported without waiting for the GPU queue."""
    if idx.numel():
        lo, hi = torch.aminmax(idx)
        if int(lo) < 0 or int(hi) >= upper:
            raise ValueError(f"{name} values must lie in [0, {upper}), got range [{int(lo)}, {int(hi)}]")


def check_pos(name: str, pos: object, batch: int, length: int, channels: int) -> torch.Tensor:
    """pos: [N, C] or [1, N, C] shared by the batch, or [B, N, C] per sample.

    Returns the table to hand to the op: a [1, N, C] table (how MAE/VideoMAE/HiCMAE store theirs)
    becomes an [N, C] view, so its gradient is summed over the batch.
    """
    check_tensor(name, pos, (2, 3))
    assert isinstance(pos, torch.Tensor)
    want = [(length, channels), (1, length, channels), (batch, length, channels)]
    if tuple(pos.shape) not in want:
        raise ValueError(f"{name} must have shape [{length}, {channels}], [1, {length}, {channels}] or "
                         f"[{batch}, {length}, {channels}], got {tuple(pos.shape)}")
    return pos[0] if pos.dim() == 3 and pos.shape[0] == 1 else pos
