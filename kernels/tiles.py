"""Launch-tile sizes shared by the row-wise kernels (gather_tokens, assemble_decoder_tokens, masked_mse_loss).

One owner for the row-tile heuristic: a program handles a power-of-two block of columns and as many rows
as fit a per-program value budget, at most 64 and no more than the (rounded-up) row count.
"""

from __future__ import annotations

import triton

MAX_TILE_ROWS = 64


def rows_per_tile(rows: int, block_cols: int, budget: int) -> int:
    """Rows per program: ``budget`` values per program over ``block_cols`` columns, 1..MAX_TILE_ROWS, and no
    more than ``rows`` rounded up to a power of two (a tile never spans more than one short problem)."""
    return max(1, min(MAX_TILE_ROWS, budget // block_cols, triton.next_power_of_2(rows)))


def row_tile(rows: int, channels: int, elem_bytes: int) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_C) for copying rows of ``channels`` values: up to 4096 values per program (16 KB
    of 4-byte, 8 KB of 2-byte data), columns a power of two (at most 256 4-byte or 512 2-byte values;
    wider rows loop over column blocks)."""
    block_c = min(triton.next_power_of_2(channels), 256 if elem_bytes >= 4 else 512)
    return rows_per_tile(rows, block_c, 4096), block_c


def group_tile(rows: int, group_size: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_P) for per-group reductions: whole normalisation groups, at most 2048 values per program
    (4096 spilled 8 B on sm_80 in the normalising backward at 2 x 2048: tests/test_kernels_compile.py checks
    every launch)."""
    block_p = triton.next_power_of_2(group_size)
    return rows_per_tile(rows, block_p, 2048), block_p
