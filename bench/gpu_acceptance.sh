#!/usr/bin/env bash
# GPU acceptance, one command, at most 8 minutes on one H100/H200 (each step's bound: 2 x 120 + 60 + 75 + 30 + 75 s) (run it the first session a GPU is lent):
#   1. the shipped ViT-B FedMSA and FedSAM jobs through `fedfms simulate`: 3 sites x 24 samples at 1024 px, 2 rounds,
#      random init, the jobs' own defaults otherwise (batch 6, bf16 on CUDA), no timeout set by hand;
#   2. the MFU bench (bench_site_epoch.py: a real local epoch, images/s, model FLOP utilisation);
#   3. training-step time and peak GPU memory (gpu_bench.py, vit_b, bf16 and fp32, fused attention, checkpointing);
#   4. prediction speed (bench_predict.py, vit_b at 1024 px, batched);
#   5. the per-site memory table's CUDA rows (bench_memory.py --device cuda; merged into
#      custom/fedfms/assets/site_memory.json, which `fedfms simulate` plans with).
# Every step has its own time bound; a step that fails or runs out of time is named in the summary and the others
# still run. Writes bench/results/gpu_*.txt (+ the run records as gpu_acceptance_*.json).
#
#   bench/gpu_acceptance.sh            # on the GPU machine, from the repository root
#   bench/gpu_acceptance.sh --smoke    # a dry run of every step at tiny sizes (CPU, a few minutes): checks the script
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/custom${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1

OUT=bench/results
TAG=$($PY - <<'EOF'
import torch
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
print("".join(c for c in name.lower().split()[-1] if c.isalnum()) or "gpu")
EOF
)
WORK=$(mktemp -d /tmp/fedfms_gpu_acceptance.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
if [[ $SMOKE == 1 ]]; then
  TAG="smoke_$TAG"; OUT="$WORK/results"; VARIANTS="fedmsa_tiny fedsam_tiny"; SAMPLES=(2 2); IMAGE=128; MASK=32
  MODEL_B=tiny
else
  VARIANTS="fedmsa fedsam"; SAMPLES=(4 6); IMAGE=1024; MASK=256; MODEL_B=vit_b   # 4 volumes x 6 slices = 24 samples
fi
mkdir -p "$OUT"
SUMMARY="$OUT/gpu_acceptance_${TAG}.txt"
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }
SCALE=1
[[ $SMOKE == 1 ]] && SCALE=${SMOKE_TIME_SCALE:-6}  # a shared 2-core CPU is far slower than the GPU the bounds are for
step() {  # step NAME SECONDS OUTFILE COMMAND...
  local name=$1 limit=$(($2 * SCALE)) out=$3; shift 3
  local start=$SECONDS
  timeout --kill-after=20 "$limit" "$@" > "$out" 2>&1
  local rc=$?
  local took=$((SECONDS - start))
  if [[ $rc == 0 ]]; then say "ok      $name (${took} s) -> $out"
  elif [[ $rc == 124 || $rc == 137 ]]; then say "TIMEOUT $name after ${limit} s -> $out"
  else say "FAILED  $name (exit $rc, ${took} s) -> $out"; fi
  return 0
}

say "# bench/gpu_acceptance.sh $* ($(date -u +%Y-%m-%dT%H:%M:%SZ), $($PY -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'))"
$PY - "$WORK/data" "${SAMPLES[0]}" "${SAMPLES[1]}" "$IMAGE" "$MASK" <<'EOF'
import sys
from fedfms.data.synthetic import make_disc_site
root, volumes, slices, image, mask = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
for i in range(3):
    make_disc_site(f"{root}/site-{i + 1}", site=f"site-{i + 1}", num_volumes=volumes, slices_per_volume=slices,
                   size=128, image_size=image, mask_size=mask, seed=i)
EOF

# 1. the shipped jobs through the simulator (timeouts from the sites' progress only)
for variant in $VARIANTS; do
  $PY -m fedfms.cli job new "$variant" "$WORK/job_$variant" --rounds 2 --model '{"pretrained": false}' > /dev/null
  step "simulate $variant, 3 sites x $((SAMPLES[0] * SAMPLES[1])) samples, 2 rounds" 120 "$OUT/gpu_simulate_${variant}_${TAG}.txt" \
    $PY -m fedfms.cli simulate "$WORK/job_$variant" --workspace "$WORK/ws_$variant" --clients site-1,site-2,site-3 \
      --data-root "$WORK/data"
  cp "$WORK/ws_$variant/server/simulate_job/fedfms_run.json" "$OUT/gpu_acceptance_${variant}_${TAG}.json" 2>/dev/null
  $PY - "$OUT/gpu_acceptance_${variant}_${TAG}.json" <<'EOF' | tee -a "$SUMMARY"
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except OSError:
    sys.exit(0)
print(f"        status {r['status']}; rounds {[x['seconds'] for x in r['rounds']]} s; site peak RSS {r.get('peak_rss_gb')} GB; "
      f"server {r.get('server_peak_rss_gb')} GB")
EOF
done

if [[ $SMOKE == 1 ]]; then
  step "MFU bench (bench_site_epoch.py)" 120 "$OUT/gpu_mfu_${TAG}.txt" $PY bench/bench_site_epoch.py --variant tiny --samples 12 --steps 2 --workers 0
  say "skipped step time and memory (gpu_bench.py needs CUDA)"
  step "predict bench (bench_predict.py)" 120 "$OUT/gpu_predict_${TAG}.txt" $PY bench/bench_predict.py --skip-vit-b --tiny-images 8
  step "memory table rows (bench_memory.py)" 120 "$OUT/gpu_memory_${TAG}.txt" $PY bench/bench_memory.py --smoke
else
  step "MFU bench (bench_site_epoch.py, vit_b fedmsa)" 60 "$OUT/gpu_mfu_${TAG}.txt" \
    $PY bench/bench_site_epoch.py --variant vit_b --mode fedmsa --samples 48 --steps 5 --workers auto
  step "step time and memory (gpu_bench.py, vit_b)" 75 "$OUT/gpu_bench_${TAG}.txt" \
    $PY bench/gpu_bench.py --variants vit_b --steps 3 --json "$OUT/gpu_bench_${TAG}.json"
  step "predict bench (bench_predict.py, vit_b)" 30 "$OUT/gpu_predict_${TAG}.txt" \
    $PY bench/bench_predict.py --device cuda --vit-b-images 16 --vit-b-batch 8
  step "memory table rows (bench_memory.py --device cuda)" 75 "$OUT/gpu_memory_${TAG}.txt" \
    $PY bench/bench_memory.py --device cuda --variants vit_b --batches 1,6 --checkpointing 0,1 --timeout 60
fi
say "# done in ${SECONDS} s; summary: $SUMMARY"
[[ $SMOKE == 1 ]] && cat "$OUT"/*.txt | tail -n 40
exit 0
