#!/usr/bin/env bash
# Everything nvfp4ckpt runs on the lent H200, in one command (see docs/benchmarks.md for the results).
# Usage on the device machine, from the repo root, with .whl carried:  [STAGE=a,b] bash scripts/gpu_suite.sh [OUT]
# Stages: tests families bench load reload outlier verifyspeed convert gsm8k sync verify (STAGE=all runs the first five).
set -uo pipefail
out=${1:-${OUT:-/tmp/out}}
mkdir -p "$out"
# .devsite stays on a warm machine between calls: later calls need not carry .whl again
[[ -d .devsite/flashinfer ]] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .devsite .whl/*.whl || exit 1
export PYTHONPATH=$PWD/.devsite:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton, flashinfer; print('torch', torch.__version__, 'triton', triton.__version__, 'flashinfer', flashinfer.__version__)" | tee -a "$out/gpu.txt"
stage=${STAGE:-all}
want() { [[ ,$stage, == *,$1,* ]] || { [[ $stage == all ]] && [[ " tests families bench load reload " == *" $1 "* ]]; }; }
if want tests; then
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_layout.py tests/test_triton_moe.py tests/test_convert.py tests/test_verify.py tests/test_gsm8k.py 2>&1 | tail -25 | tee "$out/gpu_tests.txt"
fi
if want families; then
  # every registered family, both formats: convert, then verify on the GPU with the default backend
  # (Triton, SwiGLU and Nemotron-H's relu2 alike) and the Triton backend in W4A16 too
  for arch in $(python3 -c "from nvfp4ckpt.source import architectures as a; print(' '.join(x.name for x in a.registered()))"); do
    for fmt in modelopt compressed-tensors; do
      python3 -m nvfp4ckpt example /tmp/f/$arch-$fmt --arch $arch --format $fmt -q --overwrite \
        && python3 -m nvfp4ckpt convert /tmp/f/$arch-$fmt /tmp/f/$arch-$fmt-c -q --overwrite \
        && python3 -m nvfp4ckpt verify /tmp/f/$arch-$fmt-c --source /tmp/f/$arch-$fmt --json-out "$out/v.json" >/dev/null 2>&1
      echo "$arch $fmt rc=$? $(python3 -c "import json;r=json.load(open('$out/v.json'));print([(n['backend'],round(n['rel_l2'],5),n['passed']) for n in r.get('numerics',[])])" 2>&1)"
    done
  done 2>&1 | tee "$out/gpu_families.txt"
fi
if want bench; then
  python3 scripts/bench_triton_moe.py --json "$out/bench_triton_moe.json" 2>&1 | tee "$out/bench_triton_moe.md"
fi
if want load; then
  python3 scripts/bench_load.py --workdir /tmp/bl --json "$out/bench_load.json" 2>&1 | tail -20 | tee "$out/bench_load.md"
  # verify of one DeepSeek-V3-sized layer with the Triton backend: total time and the share spent reading files
  python3 -m nvfp4ckpt verify /tmp/bl/dst --source /tmp/bl/src --backend triton --json-out "$out/verify_ds.json" 2>&1 | tail -25 | tee "$out/verify_ds.txt"
fi
if want reload; then
  # in-place RL weight updates (docs/reload.md): the CUDA test, then the issue-13 benchmark, device and host sources
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_live_update.py 2>&1 | tail -5 | tee "$out/gpu_live_tests.txt"
  python3 scripts/bench_reload.py --device cuda --json "$out/bench_reload_h200.json" 2>&1 | tee "$out/bench_reload_h200.md"
  python3 scripts/bench_reload.py --device cuda --source-device cpu --json "$out/bench_reload_h200_hostsrc.json" 2>&1 | tee "$out/bench_reload_h200_hostsrc.md"
fi
if want sync; then
  # issues 20/21 (RL weight sync at copy speed): the CUDA tests of the update paths (Triton table path byte-exact on
  # CUDA, pointers, CUDA-graph replay, host and cross-device sources, bf16 updates), then the benchmark: both layer
  # shapes with GPU sources (per-expert, stacked, pinned/pageable host, cold/warm, check_live, graph capture), the
  # 48-layer Qwen3-30B-A3B model through update_live_ and UpdateStream, and the bf16 update against fp4_quantize + loop
  # the table tests run on CUDA when it is there (the kernels compiled, not interpreted); the bf16 tests need the
  # producers (nvidia-modelopt, llmcompressor) only for their CPU cases: -m gpu selects the CUDA comparisons
  # figures first, each with its own time limit so that one device call (600 s) returns all it got (December 2026:
  # the per-layer runs took about 100 s on an H100, the 48-layer model did not finish inside 170 s with them)
  timeout 150 python3 scripts/bench_reload.py --device cuda --json "$out/bench_sync.json" 2>&1 | tee "$out/bench_sync.md"
  timeout 100 python3 scripts/bench_reload.py --device cuda --bf16 --shape qwen3-30b-a3b --json "$out/bench_sync_bf16.json" 2>&1 | tee "$out/bench_sync_bf16.md"
  timeout 120 python3 scripts/bench_reload.py --device cuda --shape qwen3-30b-a3b --model-layers 48 --only-model --json "$out/bench_sync_model.json" 2>&1 | tee "$out/bench_sync_model.md"
  timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_live_update_table.py 2>&1 | tail -8 | tee "$out/gpu_sync_tests.txt"
  timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_live_update.py tests/test_live_update_bf16.py tests/test_live_update_stacked.py tests/test_producer_quant.py 2>&1 | tail -8 | tee -a "$out/gpu_sync_tests.txt"
fi
if want convert; then
  # conversion throughput on the H200 host's 16 cores (CPU transform and --device cuda), against cp -r && sync
  python3 scripts/bench_convert.py --workdir /tmp/bc --layers 6 --repeats 2 --workers 1 4 --rss-layers --json "$out/bench_convert_h200.json" 2>&1 | tee "$out/bench_convert_h200.md"
  # a larger checkpoint (16 layers, about 9 GB): the fixed start-up weighs less
  python3 scripts/bench_convert.py --workdir /tmp/bc16 --layers 16 --repeats 1 --workers 4 --rss-layers --json "$out/bench_convert_h200_16.json" 2>&1 | tee "$out/bench_convert_h200_16.md"
  rm -rf /tmp/bc16
  python3 - <<'PY' 2>&1 | tee -a "$out/bench_convert_h200.md"
import subprocess, sys, time, shutil
for dev in ("cpu", "cuda"):
    shutil.rmtree("/tmp/bc/o", ignore_errors=True)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "nvfp4ckpt", "convert", "/tmp/bc/qwen3-30b-a3b-6L", "/tmp/bc/o", "-q", "--device", dev], check=True)
    print(f"convert --device {dev}: {time.perf_counter() - t:.2f} s")
PY
fi
if want gsm8k; then
  # tiny example end to end with the Triton backend; then runner timings (tiny and Qwen3-30B-A3B-shaped, 4 layers)
  python3 -m nvfp4ckpt example /tmp/g/src -q --overwrite && python3 -m nvfp4ckpt convert /tmp/g/src /tmp/g/dst -q --overwrite
  timeout 150 python3 -m nvfp4ckpt verify /tmp/g/dst --source /tmp/g/src --gsm8k --gsm8k-data .gsm8k --num-questions 16 --max-new-tokens 64 --backend triton --json-out "$out/verify_gsm8k_tiny.json" 2>&1 | tail -30 | tee "$out/verify_gsm8k_tiny.txt"
  timeout 330 python3 scripts/bench_gsm8k.py --data .gsm8k --models tiny,qwen3-30b-a3b --layers 4 --num-questions 16 --max-new-tokens 64 --batch-size 16 --json "$out/bench_gsm8k.json" 2>&1 | tail -30 | tee "$out/bench_gsm8k.md"
fi
if want outlier; then
  # issue 16's Triton outlier: per-pair kernel / GPU reference / CPU reference, tile variants; the GPU test on the
  # benchmark's exact data; the benchmark's decode rows with the CPU reference beside the GPU one
  timeout 200 python3 scripts/triton_outlier_gpu.py --tokens 16 64 --json "$out/outlier.json" 2>&1 | tee "$out/outlier.txt"
  timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_triton_moe.py -k bench_cases 2>&1 | tail -15 | tee "$out/outlier_test.txt"
fi
if want verifyspeed; then
  # issue 16 on the H200 host: verify of one DeepSeek-V3-sized layer against sha256sum + cat, warm and cold
  [[ -d /tmp/bl/dst ]] || python3 scripts/bench_load.py --workdir /tmp/bl --json "$out/bench_load.json" 2>&1 | tail -12 | tee "$out/bench_load.md"
  timeout 240 python3 scripts/bench_verify.py --src /tmp/bl/src --dst /tmp/bl/dst --rounds 3 --json "$out/bench_verify_h200_warm.json" 2>&1 | tee "$out/bench_verify_h200_warm.md"
  timeout 200 python3 scripts/bench_verify.py --src /tmp/bl/src --dst /tmp/bl/dst --rounds 2 --cold --json "$out/bench_verify_h200_cold.json" 2>&1 | tee "$out/bench_verify_h200_cold.md"
fi
if want verify; then
  # issue 22 (verify tells the truth): the GPU reference with every TF32 switch forced (NVIDIA_TF32_OVERRIDE=1,
  # allow_tf32, set_float32_matmul_precision("medium")) against the CPU one and the Triton kernel; the mutation tests
  # on the Triton backend on the GPU; then the threshold data of every family and of Qwen3-30B-A3B-sized layers
  # (whole output, worst token, worst (token, expert) pair, smallest lost pair, each mutation), see docs/verify.md
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_moe_reference.py tests/test_verify_mutations.py tests/test_verify.py 2>&1 | tail -15 | tee "$out/gpu_verify_tests.txt"
  python3 -m pytest -q -p no:cacheprovider tests/test_triton_moe.py -k relu2 2>&1 | tail -3 | tee -a "$out/gpu_verify_tests.txt"
  timeout 200 python3 scripts/verify_reference_gpu.py 2>&1 | tee "$out/verify_reference_gpu.txt"
  timeout 300 python3 scripts/verify_thresholds.py --acts nvfp4 bf16 --json "$out/verify_thresholds_gpu.json" 2>&1 | tee "$out/verify_thresholds_gpu.md"
  timeout 300 python3 scripts/verify_thresholds.py --shape qwen3-30b-a3b --layers 4 --formats modelopt --seeds 0 1 2 3 --acts nvfp4 bf16 --backends triton --json "$out/verify_thresholds_qwen3_gpu.json" 2>&1 | tee "$out/verify_thresholds_qwen3_gpu.md"
fi
