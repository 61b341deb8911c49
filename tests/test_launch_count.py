"""avfmae.op_count.count_launch_kinds: kernels a step launches, and the matmuls among them (the part
fusion cannot remove), eager and under inductor."""

import pytest
import torch
from torch import nn
from torch._inductor import config as inductor_config

from avfmae.op_count import count_launch_kinds, is_cuda_kernel, is_cuda_matmul_kernel

# forward: two addmm; backward: dX and dW of the second layer, dW only of the first (x needs no grad)
MLP_MATMULS = 2 + 3


def _mlp_step():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    x = torch.randn(5, 8)
    return mlp, x


def test_eager_launches_count_every_kernel_and_the_matmuls_apart():
    mlp, x = _mlp_step()
    counts = count_launch_kinds(lambda: mlp(x).square().sum().backward())
    assert counts.matmuls == MLP_MATMULS
    # gelu, square, sum forward; their backward, bias-gradient sums, the ones seeding backward
    assert counts.total - counts.matmuls >= 6


@pytest.mark.slow
def test_compiled_launches_fuse_the_elementwise_work_but_not_the_matmuls():
    mlp, x = _mlp_step()
    eager = count_launch_kinds(lambda: mlp(x).square().sum().backward())
    compiled = torch.compile(mlp, fullgraph=True)
    # config.patch, not monkeypatch.setattr: monkeypatch undoes by deleting the attribute, which torch's
    # config turns into a hidden entry, and every later cold compile in the process fails (issue 29)
    with inductor_config.patch({"cpp.enable_kernel_profile": True}):
        compiled(x).square().sum().backward()  # compile outside the count
    mlp.zero_grad(set_to_none=True)
    counts = count_launch_kinds(lambda: compiled(x).square().sum().backward())
    assert counts.matmuls == MLP_MATMULS
    assert 0 < counts.total - counts.matmuls < eager.total - eager.matmuls


@pytest.mark.parametrize("name,matmul", [
    ("ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_tn", True),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off", True),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", True),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_32x6_tn_align8>(Params)", True),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>(Params)", True),
    ("triton_tem_fused_addmm_gelu_0", True),
    ("triton_poi_fused__to_copy_convert_element_type_native_layer_norm_0", False),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>(int, Functor, Array)", False),
    ("_attn_fwd_kernel", False),
    # SDPA's fused attention on CUTLASS / cuDNN: attention, not a GEMM
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t>::Params)",
     False),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, cutlass::bfloat16_t>>",
     False),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0", False),
])
def test_cuda_kernel_names_are_told_apart(name, matmul):
    assert is_cuda_matmul_kernel(name) is matmul


@pytest.mark.parametrize("name,kernel", [
    ("Memcpy HtoD (Pageable -> Device)", False), ("Memset (Device)", False), ("Memcpy DtoD (Device -> Device)", False),
    ("triton_poi_fused_add_0", True), ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", True),
])
def test_cuda_copies_and_fills_are_no_launches(name, kernel):
    assert is_cuda_kernel(name) is kernel
