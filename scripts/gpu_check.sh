#!/usr/bin/env bash
# The one prepared GPU check (device tool, H100/H200): build, correctness on the GPU, benchmarks.
# Budget: under 8 minutes. Results land in benchmarks/results/ and, when $OUT is set, are
# packed into $OUT/results.tar.gz together with the logs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/invnext_gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
QUICK=${QUICK:---quick}
log() { echo "[$(date +%H:%M:%S)] $*"; }
t0=$(date +%s)

log "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"

log "build the CUDA extension (compiled pybind11 module)"
( time bash scripts/build_csrc.sh --install ) > "$OUT/build.log" 2>&1; echo "build rc=$?" | tee -a "$OUT/build.log"
tail -3 "$OUT/build.log"
python3 -m invnext doctor 2>&1 | tee "$OUT/doctor.txt" | head -12

log "GPU correctness tests"
timeout 200 python3 -m pytest -q -x -m "requires_cuda or triton" -p no:cacheprovider tests/ > "$OUT/pytest_gpu.log" 2>&1
echo "pytest rc=$?"; tail -5 "$OUT/pytest_gpu.log"

for b in ${BENCHES:-bench_attention bench_gather bench_diffusion}; do
  log "benchmark $b"
  timeout ${BENCH_TIMEOUT:-150} python3 -m benchmarks.$b $QUICK > "$OUT/$b.log" 2>&1
  echo "$b rc=$?"; tail -25 "$OUT/$b.log"
done

tar czf "$OUT/results.tar.gz" benchmarks/results "$OUT"/*.log "$OUT"/*.txt 2>/dev/null
log "done in $(( $(date +%s) - t0 )) s"
