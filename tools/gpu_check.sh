#!/usr/bin/env bash
# Every GPU check in one call, for the lent GPU machine (no network; Python 3.12 with torch, transformers,
# accelerate, tokenizers). It needs .gpu/ (git-ignored, carried by the device tool), which
# `bash tools/gpu_prepare.sh [methods]` assembles beforehand on a machine with the package index:
#   .gpu/wheels/   bitsandbytes (manylinux x86-64, its CUDA kernels inside), pytest, pluggy, iniconfig
#                  (and peft, galore-torch, apollo-torch with `methods`)
#   .gpu/tok32k/   a 32000-entry LLaMA-style tokenizer directory (tokenizer.json)
#   .gpu/cache/    QRELORA_CACHE with the sample texts
# Results go to $OUT (logs and a RESULTS.md section per benchmark).
#   tools/gpu_check.sh                     every part (more than one 10-minute call: name parts instead)
#   tools/gpu_check.sh profile recipes     only these
set -u
if [[ ! -d .gpu/wheels || ! -f .gpu/tok32k/tokenizer.json || ! -d .gpu/cache/sample ]]; then
  echo "gpu_check.sh: .gpu/ is missing or incomplete; run 'bash tools/gpu_prepare.sh' first (where the package" \
       "index is reachable) and carry .gpu with the call." >&2
  exit 2
fi
PY=$(command -v python3 || command -v python)
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export QRELORA_CACHE=$PWD/.gpu/cache PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cp benchmarks/RESULTS.md "$OUT/RESULTS.md" 2>/dev/null || true
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
$PY -m pip install --quiet --no-deps .gpu/wheels/*.whl 2>&1 | tail -2
$PY -c "import torch, transformers, accelerate, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'bnb', bitsandbytes.__version__)" | tee -a "$OUT/gpu.txt"

# Parts, in the order of what they prove; name some to run only those (each has its own timeout, and the
# device tool allows 10 minutes a call): tests profile recipes fit methods merge measure.
#   tools/gpu_check.sh speed     the speed table in one call (under 10 minutes): profile, recipes, fit
PARTS=${*:-tests profile recipes fit methods merge measure}
PARTS=${PARTS/speed/profile recipes fit}
want() { [[ " $PARTS " == *" $1 "* ]]; }

if want tests; then
  echo "== layer tests on CUDA"
  timeout 80 $PY -m pytest -q -p no:cacheprovider --tb=short tests/test_gpu.py 2>&1 | tail -60 | tee "$OUT/tests.txt"
fi
if want profile; then
  echo "== step profile at the 1b3 recipe's shape: ReLoRA NF4 against full-rank, and one layer"
  timeout 140 $PY tools/profile_step.py --gpu --tokenizer .gpu/tok32k --results "$OUT/RESULTS.md" 2>&1 | tee "$OUT/profile.txt"
fi
if want recipes; then
  echo "== the 24 GB recipes as written, capped at 24 GiB (per phase)"
  timeout 270 $PY tools/recipe_on_card.py --tokenizer .gpu/tok32k --timeout 130 --results "$OUT/RESULTS.md" 2>&1 | tee "$OUT/recipes.txt"
fi
if want fit; then
  echo "== qrelora memory --fit --measure on the 1b3 recipe"
  timeout 150 $PY -m qrelora memory recipes/1b3_24gb.toml --data.dataset=sample --data.tokenizer=.gpu/tok32k \
      --run.output_dir="$OUT/fit_1b3" --fit --measure 4 2>&1 | tee "$OUT/fit_1b3.txt"
fi
if want methods; then
  echo "== methods benchmark, 60M preset on CUDA"
  timeout 500 $PY tools/bench_methods.py --gpu --results "$OUT/RESULTS.md" 2>&1 | tee "$OUT/methods.txt"
fi
if want merge; then
  echo "== merge benchmark on CUDA"
  timeout 80 $PY tools/bench_merge.py --device cuda --results "$OUT/RESULTS.md" 2>&1 | grep -v Warn | tee "$OUT/bench_merge.txt"
fi
if want measure; then
  echo "== 1.3B ReLoRA vs full-rank (one micro-batch per step), and qrelora memory --measure"
  timeout 150 $PY tools/measure_gpu.py --tokenizer .gpu/tok32k --steps 20 --results "$OUT/RESULTS.md" 2>&1 | tee "$OUT/measure.txt"
  timeout 150 $PY -m qrelora memory recipes/1b3_24gb.toml --data.dataset=sample --data.tokenizer=.gpu/tok32k \
      --run.output_dir="$OUT/memory_1b3" --measure 10 2>&1 | tee "$OUT/memory_1b3.txt"
fi
echo "== done"
