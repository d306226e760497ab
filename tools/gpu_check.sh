#!/usr/bin/env bash
# Every GPU check in one call, for the lent GPU machine (no network; Python 3.12 with torch, transformers,
# accelerate, tokenizers). Bring, under .gpu/ (git-ignored, carried by the device tool):
#   .gpu/wheels/   bitsandbytes (manylinux x86-64, its CUDA kernels inside), pytest, pluggy, iniconfig
#   .gpu/tok32k/   a 32000-entry LLaMA-style tokenizer directory (tokenizer.json)
#   .gpu/cache/    QRELORA_CACHE with the sample texts (and their token stream)
# Results go to $OUT (logs and a RESULTS.md section per benchmark).
set -u
PY=$(command -v python3 || command -v python)
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export QRELORA_CACHE=$PWD/.gpu/cache PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cp benchmarks/RESULTS.md "$OUT/RESULTS.md" 2>/dev/null || true
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
$PY -m pip install --quiet --no-deps .gpu/wheels/*.whl 2>&1 | tail -2
$PY -c "import torch, transformers, accelerate, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'bnb', bitsandbytes.__version__)" | tee -a "$OUT/gpu.txt"

echo "== layer tests on CUDA"
timeout 80 $PY -m pytest -q -p no:cacheprovider --tb=short tests/test_gpu.py 2>&1 | tail -60 | tee "$OUT/tests.txt"

echo "== merge benchmark on CUDA"
[ -n "${SKIP_BENCH:-}" ] || timeout 80 $PY tools/bench_merge.py --device cuda --results "$OUT/RESULTS.md" 2>&1 | grep -v Warn | tee "$OUT/bench_merge.txt"

echo "== 1.3B ReLoRA vs full-rank"
timeout 150 $PY tools/measure_gpu.py --tokenizer .gpu/tok32k --steps 20 --results "$OUT/RESULTS.md" 2>&1 | tee "$OUT/measure.txt"
echo "== qrelora memory --measure on the 1.3B recipe (estimate next to measured peaks, snapshot)"
timeout 150 $PY -m qrelora memory recipes/1b3_24gb.toml --data.dataset=sample --data.tokenizer=.gpu/tok32k \
    --run.output_dir="$OUT/memory_1b3" --measure 10 2>&1 | tee "$OUT/memory_1b3.txt"
echo "== 7B ReLoRA"
timeout 180 $PY tools/measure_gpu.py --tokenizer .gpu/tok32k --steps 20 --with-7b --only 7B --results "$OUT/RESULTS.md" 2>&1 | tee "$OUT/measure7b.txt"
echo "== done"
