#!/usr/bin/env bash
# The GPU checks as one short script, for a session lent a CUDA machine (docs/benchmarks.md, "GPU"):
#
#   bash scripts/gpu_check.sh [OUT_DIR]     # ~5 min on one H100; writes OUT_DIR (default runs/gpu)
#
# 1. tests/e2e/test_cuda.py: values against torch on the device, and no host sync in the hook
#    (torch.cuda.set_sync_debug_mode("error") around it);
# 2. the device-to-host bandwidth into pinned memory, the number the paper estimate rests on;
# 3. scripts/stress_test.py --device cuda on the wide preset at every 1, 10 and 200 steps.
# Exits non-zero if the tests or the stress run fail. Needs torch with CUDA, msgspec, pyyaml,
# cloudpickle and pytest importable (PYTHONPATH=src is set here, so no install is needed).
set -uo pipefail
out=${1:-${OUT:-runs/gpu}}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv | tee "$out/gpu.txt"

timeout 240 python -m pytest tests/e2e/test_cuda.py -q -p no:xdist -p no:cacheprovider 2>&1 | tee "$out/test_cuda.log"
tests=${PIPESTATUS[0]}

python - <<'PY' 2>&1 | tee "$out/d2h.txt"
import torch
for mib in (64, 1024):
    src = torch.empty(mib * 2**20 // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
    dst.copy_(src, non_blocking=True); torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        dst.copy_(src, non_blocking=True)
    end.record(); torch.cuda.synchronize()
    ms = start.elapsed_time(end) / 5
    print(f"device-to-host into pinned memory, {mib} MiB: {ms:.2f} ms, {mib / 1024 / (ms / 1e3):.1f} GiB/s")
PY

timeout 330 python scripts/stress_test.py --device cuda --presets wide --every 1 10 200 --repeats 1 \
    --output-dir "$out" 2>&1 | tee "$out/stress.log"
stress=${PIPESTATUS[0]}
echo "test_cuda exit $tests, stress_test exit $stress"
[ "$tests" -eq 0 ] && [ "$stress" -eq 0 ]
