#!/usr/bin/env bash
# The GPU measurements of the README in one time-capped run (about 9 minutes of commands):
#   1. speed, strict float32 (batch 1 / 32 / 64), TF32 (1 / 32) and bfloat16 products
#      (32), vmap + winograd (the engine's accelerator default), against the PyTorch
#      reference one image at a time and the tuned batched PyTorch (torch_batched.py;
#      once more with its update captured by torch.compile);
#   2. whole runs with early stopping on 32 real BSDS500 val images at half size (images
#      per second; the reference on the first 4);
#   3. the DynaSeg-SCF column of the BSDS500 val reproduction (predictions come back in
#      repro.tgz; the CPU baselines and the scoring run anywhere afterwards, because
#      reproduce_bsds500.py reuses finished predictions).
#   OUT=runs/gpu DATA=../shared/data/bsds500 benchmarks/run_gpu.sh
# Each part has its own time limit, so that one slow part cannot starve the others.
set -u
OUT=${OUT:-runs/gpu}
DATA=${DATA:-../shared/data/bsds500}
REPRO=${REPRO:-/tmp/repro}   # outside OUT: only the tarball comes back from the device
LIMIT=${LIMIT:-50}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 BSDS500_VAL="$DATA/images/val"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)"; } 2>&1 | tee "$OUT/log.txt"
bench="python benchmarks/bench_speed.py --device gpu --iters 20 --repeats 3 --warmup 2 --no-hugepages --strategy vmap --conv-impl winograd"
timeout 120 $bench --size 240x160 481x321 --batch 1 32 64 \
  --json "$OUT/speed_gpu.json" --plot "$OUT/speed_gpu.png" 2>&1 | tee -a "$OUT/log.txt"
# The tuned PyTorch opponent with its update captured by torch.compile (CUDA graphs).
timeout 60 $bench --torch-compile --size 240x160 --batch 32 \
  --json "$OUT/speed_gpu_torch_compiled.json" 2>&1 | tee -a "$OUT/log.txt"
timeout 80 $bench --tf32 --size 240x160 481x321 --batch 1 32 \
  --json "$OUT/speed_gpu_tf32.json" 2>&1 | tee -a "$OUT/log.txt"
# bfloat16 products in JAX against the reference in strict float32 (labels may differ more).
timeout 60 $bench --set model.matmul_precision=bfloat16 --size 240x160 481x321 --batch 32 \
  --json "$OUT/speed_gpu_bf16.json" 2>&1 | tee -a "$OUT/log.txt"
# Half size (240x160): at full size 1000 steps of 32 slots take about 160 s (4.9 ms per
# image-iteration measured on an H200), more than this part's share of the run.
timeout 120 $bench --size 240x160 --batch 32 --iters 1 --repeats 1 --warmup 1 \
  --full-run 32 --full-batch 32 --full-scale 0.5 --full-torch 4 --json "$OUT/full_run_gpu.json" 2>&1 | tee -a "$OUT/log.txt"
timeout 120 python benchmarks/reproduce_bsds500.py --root "$DATA" --split val --scale 0.5 \
  --limit "$LIMIT" --out "$REPRO" --methods dynaseg_scf --set engine.batch="$LIMIT" --no-plots 2>&1 | tail -4 | tee -a "$OUT/log.txt"
tar czf "$OUT/repro.tgz" -C "$(dirname "$REPRO")" "$(basename "$REPRO")"
