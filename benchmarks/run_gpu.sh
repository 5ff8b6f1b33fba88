#!/usr/bin/env bash
# The GPU measurements of the README in one time-capped run (at most about 9.7 minutes):
#   1. the Pallas conv's tests with its Triton-compiled kernels (tests/test_conv3x3_pallas.py),
#      and single steps with native TF32 products (lax.conv, and Winograd's tile products)
#      against the precision's bound;
#   2. speed in strict float32 (240x160 and 481x321, batch 1 and 32), vmap + winograd (the
#      engine's accelerator default), against the PyTorch reference one image at a time
#      and the tuned batched PyTorch (torch_batched.py: unfold + bmm and a grouped cuDNN
#      conv, the faster reported);
#   3. the 3x3 conv alone in every formulation and Pallas tile size (bench_conv.py), strict
#      float32 and TF32, and the whole step with the Pallas conv at batch 32;
#   4. TF32 products in both frameworks at batch 32, with the memory of a step (per slot);
#   5. whole runs with early stopping on 32 real BSDS500 val images at half size (images
#      per second; the reference on the first 4, the tuned PyTorch on the first 8 at once);
#   6. the silhouette phase against the device at batch 32 (k* per second, and how long
#      the engine waited for k* while slots were running);
#   7. the README's tables and picture from all of it (OUT/tables.md, OUT/speed.png;
#      benchmarks/speed_tables.py).
# EXTRA=1 (about 3.3 minutes more) adds the tuned PyTorch captured by torch.compile, JAX's
# fastest precision, bfloat16 in the Pallas conv and TF32 with channels padded to
# multiples of 8. REPRO=1 (2 minutes more) adds the DynaSeg-SCF predictions of the
# BSDS500 val reproduction (repro.tgz; the CPU baselines and the scoring run anywhere
# afterwards, reproduce_bsds500.py reuses them).
#   OUT=runs/gpu DATA=../shared/data/bsds500 benchmarks/run_gpu.sh
# Each part has its own time limit, so that one slow part cannot starve the others; the
# benchmarks write their JSON after every row or phase, so a part cut short keeps what it
# measured.
set -u
OUT=${OUT:-runs/gpu}
DATA=${DATA:-../shared/data/bsds500}
REPRO=${REPRO:-0}
EXTRA=${EXTRA:-0}
LIMIT=${LIMIT:-50}
KSTAR_PROCESSES=${KSTAR_PROCESSES:-8}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 BSDS500_VAL="$DATA/images/val"
log() { tee -a "$OUT/log.txt"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nproc
  python -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__, 'cuda', torch.version.cuda)"; } 2>&1 | tee "$OUT/log.txt"
timeout 40 python -m pytest -q -p no:cacheprovider tests/test_conv3x3_pallas.py 2>&1 | tail -15 | log
# Native TF32 steps against the float64 step with TF32-rounded operands (the precision's
# bound: tests/test_torch_parity.py, test_teacher_forced_steps_reduced_precision).
timeout 50 python -m pytest -q -s -p no:cacheprovider tests/test_torch_parity.py -k "reduced_precision and gpu" 2>&1 \
  | grep -E "teacher-forced|passed|failed|Error" | log
bench="python benchmarks/bench_speed.py --device gpu --iters 20 --repeats 3 --warmup 2 --no-hugepages --strategy vmap --conv-impl winograd --torch-conv bmm grouped"
timeout 110 $bench --size 240x160 481x321 --batch 1 32 \
  --json "$OUT/speed_gpu.json" --plot "$OUT/speed_gpu.png" 2>&1 | log
# The conv alone (forward + both gradients, batch 32, per-image kernels): every formulation
# and Pallas tile size, strict float32 and TF32, each checked against lax.conv.
timeout 60 python benchmarks/bench_conv.py --size 240x160 --batch 32 --repeats 10 \
  --impl lax winograd pallas/64x64 pallas/128x64 pallas/128x128 pallas/256x64 \
  --precision float32 tensorfloat32 --json "$OUT/conv_gpu.json" 2>&1 | log
timeout 35 python benchmarks/bench_speed.py --device gpu --iters 20 --repeats 3 --warmup 2 --no-hugepages \
  --strategy vmap --conv-impl pallas --no-torch --size 240x160 --batch 32 --json "$OUT/speed_gpu_pallas.json" 2>&1 | log
timeout 70 $bench --tf32 --memory --size 240x160 481x321 --batch 32 \
  --json "$OUT/speed_gpu_tf32.json" 2>&1 | log
# Half size (240x160): at full size 1000 steps of 32 slots take about 160 s (4.9 ms per
# image-iteration measured on an H200), more than this part's share of the run.
timeout 120 $bench --size \
  --full-run 32 --full-batch 32 --full-scale 0.5 --full-torch 4 --full-tuned 8 --json "$OUT/full_run_gpu.json" 2>&1 | log
timeout 95 $bench --no-torch --size \
  --kstar-run 32 --full-batch 32 --full-scale 0.5 --kstar-processes "$KSTAR_PROCESSES" \
  --json "$OUT/kstar_run_gpu.json" 2>&1 | log
if [ "$EXTRA" = 1 ]; then
  # The tuned PyTorch opponent with its update captured by torch.compile (CUDA graphs).
  timeout 60 $bench --torch-compile --size 240x160 --batch 32 \
    --json "$OUT/speed_gpu_torch_compiled.json" 2>&1 | log
  # JAX's fastest precision (matmul_precision 'bfloat16': TF32 through XLA on NVIDIA GPUs)
  # against the reference in strict float32, and bfloat16 products in the Pallas conv.
  timeout 60 $bench --set model.matmul_precision=bfloat16 --size 240x160 481x321 --batch 32 \
    --json "$OUT/speed_gpu_fastest.json" 2>&1 | log
  timeout 40 $bench --no-torch --set model.matmul_precision=bfloat16 --conv-impl pallas \
    --size 240x160 --batch 32 --json "$OUT/speed_gpu_pallas_bf16.json" 2>&1 | log
  # TF32 with the channels padded to a multiple of 8 (100 -> 104) inside each conv.
  timeout 40 $bench --no-torch --tf32 --set model.channel_multiple=8 \
    --size 240x160 --batch 32 --json "$OUT/speed_gpu_tf32_channels8.json" 2>&1 | log
fi
if [ "$REPRO" = 1 ]; then
  repro=/tmp/repro   # outside OUT: only the tarball comes back from the device
  timeout 120 python benchmarks/reproduce_bsds500.py --root "$DATA" --split val --scale 0.5 \
    --limit "$LIMIT" --out "$repro" --methods dynaseg_scf --set engine.batch="$LIMIT" --no-plots 2>&1 | tail -4 | log
  tar czf "$OUT/repro.tgz" -C "$(dirname "$repro")" "$(basename "$repro")"
fi
# The README's tables from the JSON files above, each row with both sides' precision and
# versions (benchmarks/speed_tables.py; seconds, and it runs anywhere afterwards too).
python benchmarks/speed_tables.py "$OUT"/*.json --plot "$OUT/speed.png" > "$OUT/tables.md" 2>> "$OUT/log.txt"
