"""Write a random checkpoint of a model shape, laid out as save_pretrained lays out a real one: weights in
safetensors shards of at most --shard-gib with model.safetensors.index.json, config.json and, with
--tokenizer, a LLaMA-style SentencePiece tokenizer (Mistral 7B v0.1's, 32,000 entries, Apache-2.0, from the
PyPI wheel mistral-common). It tests how a checkpoint of real size loads (tools/load_check.py); the weights are
N(0, 0.02) with unit norms, not a trained model.

    python tools/make_checkpoint.py /tmp/llama-7b-random --shape recipes/shapes/llama-7b --tokenizer

A 7B shape in bf16 is 13.5 GB on disk and takes a few minutes on a 2-core CPU; host memory holds one shard.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def write_tokenizer(out: Path) -> None:
    """Mistral 7B v0.1's tokenizer.model from the mistral-common wheel (fetched from PyPI), saved the LLaMA way."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "-d", tmp, "mistral-common==1.13.1"], check=True)
        wheel = next(Path(tmp).glob("mistral_common-*.whl"))
        (out / "tokenizer.model").write_bytes(zipfile.ZipFile(wheel).read("mistral_common/data/tokenizer.model.v1"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False}, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("out", type=Path, help="a new directory")
    p.add_argument("--shape", type=Path, default=ROOT / "recipes" / "shapes" / "llama-7b",
                   help="a directory with the config.json to follow (default: recipes/shapes/llama-7b)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--shard-gib", type=float, default=5.0, help="largest shard (default 5, save_pretrained's)")
    p.add_argument("--tokenizer", action="store_true", help="also write the 32,000-entry SentencePiece tokenizer")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch
    from safetensors.torch import save_file

    from qrelora.pretrained import meta_model, read_config, tied_aliases

    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"{args.out} exists and is not empty; choose a new directory")
    args.out.mkdir(parents=True, exist_ok=True)
    config = read_config(args.shape) | {"dtype": DTYPES[args.dtype]}
    (args.out / "config.json").write_text(json.dumps(config, indent=2))
    model = meta_model(args.out)
    aliases = tied_aliases(model)
    tensors = [(n, p) for n, p in model.named_parameters(remove_duplicate=False) if n not in aliases]
    dtype = getattr(torch, DTYPES[args.dtype])
    gen = torch.Generator().manual_seed(args.seed)
    limit = int(args.shard_gib * 2**30)
    shards: list[dict] = [{}]
    sizes = [0]
    for name, p in tensors:  # plan the shards first: their count goes into every file name
        size = p.numel() * dtype.itemsize
        if sizes[-1] and sizes[-1] + size > limit:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = p.shape
        sizes[-1] += size
    weight_map, t0 = {}, time.perf_counter()
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        values = {}
        for name, shape in shard.items():
            if name.endswith("norm.weight"):
                values[name] = torch.ones(shape, dtype=dtype)
            else:
                values[name] = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
            weight_map[name] = file
        save_file(values, args.out / file, metadata={"format": "pt"})
        del values
        print(f"{file}: {len(shard)} tensors, {sizes[i] / 2**30:.2f} GiB ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (args.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if args.tokenizer:
        write_tokenizer(args.out)
    print(f"wrote {args.out}: {sum(sizes) / 2**30:.2f} GiB in {len(shards)} shards, {len(tensors)} tensors "
          f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
