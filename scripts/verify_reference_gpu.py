#!/usr/bin/env python3
"""Issue 22 on a GPU: the Triton kernel (fp32 output) against the reference computed on the GPU with the old
arithmetic (fp32 GEMMs, `amax / 6.0` by a Python number) and the new (float64 GEMMs, a tensor divisor), TF32 switches off
and on, on scripts/bench_triton_moe.py's data (Qwen3 and DeepSeek-V3 sizes); and the new GPU reference against the CPU one.

    python3 scripts/verify_reference_gpu.py        # needs CUDA; raw output of an H100 run: docs/results/verify_h100.md
"""
import sys, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from tests.test_moe_reference import _fast_matmuls, rel_l2
from tests.test_triton_moe import random_nvfp4_experts, tm
from nvfp4ckpt import quant
from nvfp4ckpt.layouts.trtllm_gen import transform as layout
import nvfp4ckpt.runtime.reference as R
from nvfp4ckpt.runtime.routing import route

def old_quant(x, global_scale):  # before the fix: amax / 6 with a Python divisor
    gs = torch.as_tensor(global_scale, dtype=torch.float32, device=x.device)
    xf = x.float(); *lead, k = xf.shape
    blocks = xf.reshape(*lead, k // 16, 16)
    sf = (blocks.abs().amax(dim=-1) / 6.0 * gs).clamp(max=448.0).to(torch.float8_e4m3fn).float()
    denom = (sf / gs).unsqueeze(-1)
    scaled = torch.where(denom > 0, blocks / denom.clamp(min=1e-30), torch.zeros_like(blocks))
    return quant.unpack_e2m1(quant.encode_e2m1(scaled.reshape(*lead, k))).reshape(*lead, k // 16, 16).mul(denom).reshape(*lead, k)

new_gemm, new_quant = R._gemm, R.quantize_activations
variants = {"old (fp32 GEMMs, scalar /6)": (lambda a, b: a @ b.T, old_quant), "fp32 GEMMs, tensor /6": (lambda a, b: a @ b.T, new_quant),
            "float64 GEMMs, scalar /6": (new_gemm, old_quant), "new (float64 GEMMs, tensor /6)": (new_gemm, new_quant)}
for E, H, I, T in ((128, 2048, 768, 64), (128, 2048, 768, 16), (128, 2048, 768, 256), (256, 7168, 2048, 64)):
    m = random_nvfp4_experts(E, H, I, "cuda", seed=T)
    gen = torch.Generator(device="cpu").manual_seed(1 + T)
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16).cuda()
    ids, w = route(torch.randn(T, E, generator=gen).cuda(), "renormalize", 8)
    a1, a2 = float(x.float().abs().max()) / (6 * 448), 4.0 / (6 * 448)
    w13, s13 = layout.w13_to_kernel(m["gate"], m["up"], m["gate_scale"], m["up_scale"])
    w2, s2 = layout.w2_to_kernel(m["down"], m["down_scale"])
    out = tm.moe_forward_triton(x, ids, w, w13, s13, w2, s2, a1 * m["ws2_gate"], a1 * m["ws2_up"] / a2, a2 * m["ws2_down"],
        torch.tensor(1.0 / a1, device="cuda"), act="nvfp4", out_dtype=torch.float32)
    cpu = {k: v.cpu() for k, v in m.items()}
    ref_cpu = R.moe_forward_torch(x.cpu(), ids.cpu(), w.cpu(), **cpu, a1=a1, a2=a2)
    res = {}
    for label, (gemm, q) in variants.items():
        R._gemm, R.quantize_activations = gemm, q
        for tf32 in (False, True):
            if tf32:
                with _fast_matmuls():
                    ref = R.moe_forward_torch(x, ids, w, **m, a1=a1, a2=a2)
            else:
                ref = R.moe_forward_torch(x, ids, w, **m, a1=a1, a2=a2)
            res[f"{label}, tf32 {'on' if tf32 else 'off'}"] = rel_l2(out, ref)
    R._gemm, R.quantize_activations = new_gemm, new_quant
    print(f"\nE{E} H{H} I{I} T{T}: triton vs CPU reference (new) {rel_l2(out.cpu(), ref_cpu):.3g}; GPU reference (new) vs CPU (new) "
          f"{rel_l2(R.moe_forward_torch(x, ids, w, **m, a1=a1, a2=a2).cpu(), ref_cpu):.3g}; triton vs GPU reference:")
    for k, v in res.items():
        print(f"   {k}: {v:.3g}", flush=True)
