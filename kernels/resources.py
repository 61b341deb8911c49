"""What a GPU would do with a compiled kernel, known without one: registers, spills, shared memory, occupancy.

One owner for the per-architecture limits (``ARCH_LIMITS``) and the occupancy arithmetic of the CUDA
occupancy calculator. Fed by ``ptxas -v`` (registers, spill stores/loads; the ptxas bundled in the
triton wheel) and Triton's compiled-kernel metadata (``shared``: Triton's kernels use dynamic shared
memory only). The autotuned attention kernels prune their configs with ``usable`` and the table that
``tests/helpers/kernel_resources.py`` generates into ``_resource_table.py``; the resource test and the
benchmark report use the same functions.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

WARP_SIZE = 32


@dataclass(frozen=True)
class ArchLimits:
    """Per-SM limits (CUDA C Programming Guide, "Technical Specifications per Compute Capability")."""

    regs_per_sm: int = 65536
    regs_per_thread: int = 255
    reg_alloc_unit: int = 256       # registers are allocated per warp in units of this many
    max_warps: int = 64             # resident warps per SM
    max_blocks: int = 32            # resident blocks per SM
    smem_per_sm: int = 167936       # bytes of shared memory per SM usable by blocks
    smem_per_block: int = 166912    # the most one block may opt in to
    smem_reserved: int = 1024       # the runtime reserves this much per resident block
    smem_alloc_unit: int = 128


ARCH_LIMITS = {
    "sm_80": ArchLimits(smem_per_sm=164 * 1024, smem_per_block=163 * 1024),  # A100
    "sm_86": ArchLimits(max_warps=48, max_blocks=16, smem_per_sm=100 * 1024, smem_per_block=99 * 1024),
    "sm_89": ArchLimits(max_warps=48, max_blocks=24, smem_per_sm=100 * 1024, smem_per_block=99 * 1024),
    "sm_90": ArchLimits(smem_per_sm=228 * 1024, smem_per_block=227 * 1024),  # H100 / H200
}
# Architectures whose cubins the resource table was measured on, and the table used for each device arch
MEASURED_ARCHS = ("sm_80", "sm_90")
TABLE_ARCH = {"sm_80": "sm_80", "sm_86": "sm_80", "sm_89": "sm_80", "sm_90": "sm_90"}
# Autotune configs below this fraction of the SM's warps resident are not worth benchmarking
MIN_OCCUPANCY = 1 / 16


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def occupancy(regs: int, shared: int, num_warps: int, arch: str) -> dict:
    """Resident blocks and warps per SM and the fraction of the SM's warp slots they fill (0: cannot launch).

    ``limiter`` names what bounds it: registers, shared memory, warps or blocks.
    """
    lim = ARCH_LIMITS[arch]
    if shared > lim.smem_per_block or regs > lim.regs_per_thread:
        return {"blocks": 0, "warps": 0, "occupancy": 0.0,
                "limiter": "shared" if shared > lim.smem_per_block else "registers"}
    warp_regs = _round_up(max(regs, 1) * WARP_SIZE, lim.reg_alloc_unit)
    by = {
        "registers": (lim.regs_per_sm // warp_regs) // num_warps,
        "shared": lim.smem_per_sm // (_round_up(shared, lim.smem_alloc_unit) + lim.smem_reserved),
        "warps": lim.max_warps // num_warps,
        "blocks": lim.max_blocks,
    }
    limiter = min(by, key=by.get)
    blocks = by[limiter]
    return {"blocks": blocks, "warps": blocks * num_warps, "occupancy": blocks * num_warps / lim.max_warps,
            "limiter": limiter}


_FUNC = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas_log(log: str) -> dict:
    """Registers, stack frame and spill bytes of the (single) entry function in a ``ptxas -v`` log."""
    frame, regs = _FRAME.search(log), _REGS.search(log)
    if not (frame and regs):
        raise ValueError(f"not a ptxas -v log of one kernel:\n{log[-2000:]}")
    return {"regs": int(regs.group(1)), "stack": int(frame.group(1)), "spill_stores": int(frame.group(2)),
            "spill_loads": int(frame.group(3))}


def assess(res: dict, num_warps: int, arch: str) -> dict:
    """res (regs, spills, shared) + occupancy on arch, and whether it is usable: it launches, never spills,
    keeps MIN_OCCUPANCY and stays under the register cap (at the cap a config is one specialisation away
    from spilling: dK/dV 64 x 32 at BLOCK_D 128 on sm_80 used 255 registers and no spill at head dim 128,
    and spilled at head dim 80)."""
    occ = occupancy(res["regs"], res["shared"], num_warps, arch)
    spills = res["spill_stores"] + res["spill_loads"]
    return {**res, **occ, "spills": spills > 0, "launchable": occ["blocks"] > 0,
            "usable": occ["blocks"] > 0 and spills == 0 and occ["occupancy"] >= MIN_OCCUPANCY
            and res["regs"] < ARCH_LIMITS[arch].regs_per_thread}


# --- autotune pruning with the measured table -------------------------------------------------------


def device_arch(t) -> str | None:
    """'sm_XY' of the CUDA device holding tensor t; None off CUDA (nothing to prune by resources)."""
    if getattr(t, "device", None) is None or t.device.type != "cuda":
        return None
    return _cuda_arch(t.device.index)


@functools.cache
def _cuda_arch(index: int | None) -> str:
    import torch

    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


def measured(kernel: str, pack, dtype_class: str, block_d: int, config, arch: str) -> dict | None:
    """Table entry of one config, assessed on arch's limits (registers/spills measured on TABLE_ARCH[arch]);
    None when the config or the architecture was not measured."""
    from ._resource_table import RESOURCES

    if arch not in TABLE_ARCH:
        return None
    row = RESOURCES.get((kernel, pack, dtype_class, block_d, config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"],
                         config.num_warps, config.num_stages), {}).get(TABLE_ARCH[arch])
    if row is None:
        return None
    return assess(dict(zip(("regs", "spill_stores", "spill_loads", "shared"), row)), config.num_warps, arch)


def usable_configs(configs: list, kernel: str, named_args: dict, arch: str | None) -> list:
    """The configs the table says launch on arch, never spill and keep MIN_OCCUPANCY (all of them when
    arch is None or unmeasured: the autotuner's own launch check is then all there is)."""
    if arch is None or arch not in TABLE_ARCH:
        return list(configs)
    q = named_args["q_ptr"]
    dtype_class = "fp32" if str(q.dtype) == "torch.float32" else "16bit"
    pack = named_args.get("PACK")
    return [c for c in configs
            if (m := measured(kernel, pack, dtype_class, named_args["BLOCK_D"], c, arch)) is not None and m["usable"]]
