"""What mae_kernels needs of its environment (README, "Versions"): the oldest torch, checked before any
op registers, and the Triton/numpy pair whose interpreter cannot run."""

from __future__ import annotations

MIN_TORCH = (2, 5)  # 2.4's torch.library.custom_op cannot read the ops' (postponed) annotations
# Triton's interpreter turned loop bounds into ints with int(one-element array), which numpy 2.4
# refuses (triton-lang/triton#9171, fixed in triton 3.7.0)
INTERPRETER_FIXED_TRITON, INTERPRETER_BREAKING_NUMPY = (3, 7), (2, 4)


def major_minor(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "2.13.0+cpu", "2.10.0.dev20260101" or "2.4.0rc1"."""
    major, minor = (version.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def check_torch(version: str) -> None:
    """Raise ImportError naming the requirement when torch ``version`` is older than MIN_TORCH."""
    if major_minor(version) < MIN_TORCH:
        raise ImportError(f"mae_kernels needs torch>={MIN_TORCH[0]}.{MIN_TORCH[1]} (its ops are "
                          f"torch.library custom ops), found torch {version}")


def interpreter_numpy_clash(triton_version: str, numpy_version: str) -> bool:
    """Whether this Triton's interpreter fails on this numpy: every kernel with a ``range`` over a
    runtime value would fail inside Triton."""
    return (major_minor(triton_version) < INTERPRETER_FIXED_TRITON
            and major_minor(numpy_version) >= INTERPRETER_BREAKING_NUMPY)
