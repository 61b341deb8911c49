"""The oldest torch mae_kernels runs on, checked before any op registers (README, "Versions")."""

from __future__ import annotations

MIN_TORCH = (2, 5)  # 2.4's torch.library.custom_op cannot read the ops' (postponed) annotations


def check_torch(version: str) -> None:
    """Raise ImportError naming the requirement when torch ``version`` is older than MIN_TORCH."""
    major, minor = (int("".join(c for c in part if c.isdigit()) or 0) for part in version.split(".")[:2])
    if (major, minor) < MIN_TORCH:
        raise ImportError(f"mae_kernels needs torch>={MIN_TORCH[0]}.{MIN_TORCH[1]} (its ops are "
                          f"torch.library custom ops), found torch {version}")
