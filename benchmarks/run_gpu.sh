#!/usr/bin/env bash
# One GPU session, as run for the README's GPU numbers: speed (strict float32, then TF32)
# and the DynaSeg methods of the BSDS500 val reproduction (the CPU baselines and the
# scoring can run anywhere afterwards: reproduce_bsds500.py reuses these predictions).
#   OUT=runs/gpu DATA=../shared/data/bsds500 benchmarks/run_gpu.sh
# Each part has its own time limit so that one slow part cannot starve the others.
set -u
OUT=${OUT:-runs/gpu}
DATA=${DATA:-../shared/data/bsds500}
REPRO=${REPRO:-/tmp/repro}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)"; } 2>&1 | tee "$OUT/log.txt"
bench="python benchmarks/bench_speed.py --device gpu --iters 20 --repeats 3 --warmup 2 --no-hugepages"
timeout 170 $bench --size 240x160 481x321 --batch 1 32 --strategy vmap --conv-impl lax winograd \
  --full-run 12 --full-batch 12 --json "$OUT/speed_gpu.json" --plot "$OUT/speed_gpu.png" 2>&1 | tee -a "$OUT/log.txt"
timeout 40 $bench --size 240x160 --batch 1 8 --strategy per_image --conv-impl lax --no-torch \
  --json "$OUT/speed_gpu_per_image.json" 2>&1 | tee -a "$OUT/log.txt"
timeout 70 $bench --tf32 --size 481x321 --batch 1 32 --strategy vmap --conv-impl lax winograd \
  --json "$OUT/speed_gpu_tf32.json" 2>&1 | tee -a "$OUT/log.txt"
for m in dynaseg_scf dynaseg_fsf kim_mu5 dynaseg_scf_silhouette dynaseg_fsf_silhouette; do
  case $m in *silhouette) t=60 ;; *) t=45 ;; esac
  timeout $t python benchmarks/reproduce_bsds500.py --root "$DATA" --split val --scale 0.5 \
    --limit ${LIMIT:-50} --out "$REPRO" --methods $m --set batch=50 --no-plots 2>&1 | tail -4 | tee -a "$OUT/log.txt"
done
tar czf "$OUT/repro.tgz" -C "$(dirname "$REPRO")" "$(basename "$REPRO")"
