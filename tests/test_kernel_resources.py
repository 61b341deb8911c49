"""The autotune spaces of grouped_attention only launch configs that fit a GPU and never spill.

Registers and spills come from ptxas, so they are measured offline into kernels/_resource_table.py
(tests/helpers/kernel_resources.py compiles every config of the static lists for sm_80 and sm_90).
Here, without compiling:
- the table is current: its fingerprint (kernel sources, triton version) matches the code, and it
  covers every config of the static lists at every BLOCK_D the op uses, in 16-bit and fp32;
- the prune functions, run as on an sm_80 / sm_86 / sm_89 / sm_90 device, keep only configs the table
  says launch, never spill, stay under the register cap and keep the minimum occupancy, at every
  LGI-Former stage shape, every supported head dim and dtype (the table holds the worst over the
  layouts those stages launch with);
- the occupancy arithmetic and the ptxas log parser give the CUDA occupancy calculator's numbers.
tests/test_kernels_compile.py recompiles the launches the ops make and checks the same on the
measured cubins (fp16 included), so a table that lies fails there.
"""

import importlib

import pytest
import torch
import triton
from mae_kernels import resources
from mae_kernels._resource_table import FINGERPRINT, RESOURCES

from avfmae.config import get_config
from avfmae.lgi_former import attention_shapes
from tests.helpers.kernel_resources import TABLE_HEAD_DIMS, fingerprint, measured_here

ga = importlib.import_module("mae_kernels.grouped_attention")  # the package re-exports a function of that name
TUNERS = {  # autotuner -> (kernel, PACK argument or None)
    "fwd_packed": (ga.tuner("fwd_packed"), "_attn_fwd_kernel", True),
    "fwd_looped": (ga.tuner("fwd_looped"), "_attn_fwd_kernel", False),
    "bwd_packed": (ga.tuner("bwd_packed"), "_attn_bwd_packed_kernel", None),
    "bwd_dq": (ga.tuner("bwd_dq"), "_attn_bwd_dq_kernel", None),
    "bwd_dkdv": (ga.tuner("bwd_dkdv"), "_attn_bwd_dkdv_kernel", None),
}


def block_d(head_dim: int) -> int:
    return max(ga.MIN_DOT, triton.next_power_of_2(head_dim))


def test_table_matches_the_kernels_it_was_measured_on():
    assert fingerprint() == FINGERPRINT, (
        "a kernel (or triton) changed since kernels/_resource_table.py was measured: rerun "
        "tests/helpers/kernel_resources.py")
    assert {block_d(d) for d in ga.SUPPORTED_HEAD_DIMS} == set(TABLE_HEAD_DIMS)


@pytest.mark.parametrize("name", TUNERS)
def test_table_covers_the_measurement_plan(name):
    """Every config the plan measures (all at BLOCK_D 64, a few elsewhere) compiled for sm_80 and sm_90."""
    tuner, kernel, pack = TUNERS[name]
    measured = 0
    for bd in TABLE_HEAD_DIMS:
        for dtype_class, prec in (("16bit", "tf32"), ("fp32", "ieee")):
            named = {"BLOCK_D": bd, "DOT_PREC": prec, "PACK": pack if pack is not None else name == "bwd_packed"}
            for c in tuner.configs:
                key = (kernel, pack, dtype_class, bd, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                       c.num_stages)
                if not measured_here(c, named):
                    continue
                measured += 1
                assert key in RESOURCES, key
                for arch in resources.MEASURED_ARCHS:
                    assert RESOURCES[key].get(arch) is not None, f"{key} did not compile for {arch}"
    assert measured >= len(tuner.configs)  # at least the whole static list at BLOCK_D 64 (16-bit)


def _named_args(tuner, G, Lq, Lk, D, dtype, pack):
    """What the autotuner passes early_config_prune at this shape (only the arguments the prune reads)."""
    args = {"q_ptr": torch.empty(0, dtype=dtype), "Lq": Lq, "Lk": Lk, "BLOCK_D": block_d(D),
            "DOT_PREC": "ieee" if dtype == torch.float32 else "tf32"}
    if pack is not None:
        args["PACK"] = pack
    return args


@pytest.mark.parametrize("arch", sorted(resources.ARCH_LIMITS))
def test_pruned_configs_at_stage_shapes_launch_without_spilling(arch, monkeypatch):
    monkeypatch.setattr(resources, "device_arch", lambda t: arch)
    checked = 0
    for G, Lq, Lk in sorted(set(attention_shapes(get_config("base")).values())):  # every LGI stage
        for D in ga.SUPPORTED_HEAD_DIMS:
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                dtype_class = "fp32" if dtype == torch.float32 else "16bit"
                packed = ga.packs(Lq, Lk, _named_args(None, G, Lq, Lk, D, dtype, None))
                names = ("fwd_packed", "bwd_packed") if packed else ("fwd_looped", "bwd_dq", "bwd_dkdv")
                for name in names:
                    tuner, kernel, pack = TUNERS[name]
                    pruned = tuner.early_config_prune(tuner.configs, _named_args(tuner, G, Lq, Lk, D, dtype, pack))
                    assert pruned
                    for c in pruned:
                        m = resources.measured(kernel, pack, dtype_class, block_d(D), c, arch)
                        where = f"{name} {c} at G={G} Lq={Lq} Lk={Lk} D={D} {dtype} on {arch}: {m}"
                        assert m is not None and m["launchable"], where
                        assert not m["spills"], where
                        assert m["occupancy"] >= resources.MIN_OCCUPANCY, where
                        assert m["regs"] < resources.ARCH_LIMITS[arch].regs_per_thread, where
                        if pack:
                            assert ga.groups_per_tile(Lq, Lk, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) >= 1
                        checked += 1
    assert checked > 100


@pytest.mark.parametrize("arch", [None, "sm_80", "sm_90"])
def test_fp32_groups_without_a_fitting_packed_tile_take_the_looped_kernels(arch, monkeypatch):
    """fp32 keeps its tiles in registers: at head dim 80 (BLOCK_D 128) only 16-wide tiles fit, so a
    24-token group has no correct packed tile (the prune fell back to an incorrect one); at head dim 64
    the 32x32 packed backward a 17-token group needs spills on a measured GPU. 16-bit packs both."""
    monkeypatch.setattr(resources, "device_arch", lambda t: arch)

    def packs(L, D, dtype):
        return ga.packs(L, L, _named_args(None, 1, L, L, D, dtype, None))

    assert not packs(24, 80, torch.float32) and packs(24, 80, torch.bfloat16)
    assert packs(11, 80, torch.float32)  # one group per 16x16 tile
    assert packs(17, 64, torch.float32) == (arch is None)  # spills on sm_80/sm_90; off CUDA shapes only
    assert packs(17, 64, torch.bfloat16) and packs(32, 16, torch.float32)


def test_prune_keeps_shape_rule_off_cuda():
    """Without a device (CPU tensors, or an architecture not measured) only the shape rules apply."""
    assert not ga.precision_fits(triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4),
                                 {"DOT_PREC": "ieee", "BLOCK_D": 64})
    tuner, _, pack = TUNERS["fwd_looped"]
    args = _named_args(tuner, 1, 101, 101, 64, torch.bfloat16, pack)
    pruned = tuner.early_config_prune(tuner.configs, args)
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in pruned} == {
        (m, n) for m in (64, 128) for n in (32, 64, 128)}
    assert resources.usable_configs(tuner.configs, "_attn_fwd_kernel", args, "sm_100") == tuner.configs


@pytest.mark.parametrize("regs, shared, warps, arch, blocks, limiter", [
    (128, 0, 4, "sm_80", 4, "registers"),      # 128*32 = 4096 regs/warp -> 16 warps
    (255, 0, 8, "sm_90", 1, "registers"),      # 255*32 rounds to 8192 -> 8 warps: one 8-warp block
    (24, 0, 4, "sm_90", 16, "warps"),          # 64 warps / 4 (registers would allow 85 warps)
    (32, 0, 1, "sm_80", 32, "blocks"),
    (64, 100 * 1024, 4, "sm_80", 1, "shared"),  # 164 KB / (100 KB + 1 KB reserved)
    (64, 100 * 1024, 4, "sm_90", 2, "shared"),  # 228 KB / 101 KB
    (64, 50 * 1024, 4, "sm_86", 1, "shared"),   # 100 KB / 51 KB
])
def test_occupancy_matches_the_cuda_occupancy_calculator(regs, shared, warps, arch, blocks, limiter):
    occ = resources.occupancy(regs, shared, warps, arch)
    assert (occ["blocks"], occ["limiter"]) == (blocks, limiter)
    assert occ["occupancy"] == blocks * warps / resources.ARCH_LIMITS[arch].max_warps


def test_too_much_shared_memory_cannot_launch():
    assert resources.occupancy(64, 164 * 1024, 4, "sm_80")["blocks"] == 0  # over the 163 KB per block
    assert resources.occupancy(64, 164 * 1024, 4, "sm_90")["blocks"] == 1
    res = {"regs": 90, "spill_stores": 0, "spill_loads": 0, "shared": 200 * 1024}
    assert not resources.assess(res, 4, "sm_80")["usable"]
    assert resources.assess(res, 4, "sm_90")["usable"]
    assert not resources.assess({**res, "shared": 0, "spill_loads": 4}, 4, "sm_90")["usable"]


def test_parse_ptxas_log():
    log = ("ptxas info    : 0 bytes gmem\n"
           "ptxas info    : Compiling entry function '_attn_fwd_kernel' for 'sm_90a'\n"
           "ptxas info    : Function properties for _attn_fwd_kernel\n"
           "    48 bytes stack frame, 40 bytes spill stores, 48 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 576 bytes cmem[0]\n")
    assert resources.parse_ptxas_log(log) == {"regs": 255, "stack": 48, "spill_stores": 40, "spill_loads": 48}
    with pytest.raises(ValueError, match="ptxas"):
        resources.parse_ptxas_log("ptxas fatal   : Unresolved extern function")


def test_a_config_at_the_register_cap_is_not_usable():
    res = {"regs": 255, "spill_stores": 0, "spill_loads": 0, "shared": 0}
    assert resources.assess(res, 8, "sm_90")["launchable"] and not resources.assess(res, 8, "sm_90")["usable"]
    assert resources.assess({**res, "regs": 254}, 8, "sm_90")["usable"]


def test_table_entry_is_the_worst_over_the_measured_layouts():
    def result(regs, spills, shared, target="sm_90", ok=True, attrs=()):
        job = {"kernel": "mae_kernels.grouped_attention._attn_bwd_dq_kernel", "attrs": list(attrs),
               "signature": {"q_ptr": "*bf16", "BLOCK_D": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"},
               "constexprs": [[[1], 64], [[2], 64], [[3], 32]], "options": {"num_warps": 4, "num_stages": 2}}
        return {"job": job, "target": target, "ok": ok, "regs": regs, "spill_stores": spills, "spill_loads": spills,
                "shared": shared}

    from tests.helpers.kernel_resources import table_rows
    key = ("_attn_bwd_dq_kernel", None, "16bit", 64, 64, 32, 4, 2)
    rows = table_rows([result(200, 0, 4096), result(180, 8, 8192, attrs=[[[5], [["tt.divisibility", 16]]]]),
                       result(100, 0, 1024, target="sm_80"), result(0, 0, 0, target="sm_80", ok=False)])
    assert rows == {key: {"sm_90": (200, 8, 8, 8192), "sm_80": None}}
