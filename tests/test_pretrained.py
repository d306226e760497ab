"""Continued pre-training of Hugging Face LLaMA-family checkpoints (model.init_from): each layout a real model may
have trains, resumes exactly, evaluates and exports to a directory transformers loads; bad checkpoints are
refused before anything is written."""

import io
import json
from pathlib import Path

import pytest
import torch

from qrelora.cli import main
from qrelora.monitor import PlainLog
from qrelora.recipe import load_recipe
from qrelora.relora import unquantized
from qrelora.train import Trainer, TrainingInterrupted

from hf_checkpoints import VARIANTS, make_checkpoint
from test_checkpoint import interrupt_after, records

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.toml"
RUN = ["--data.tokenizer=init_from", "--training.steps=8", "--training.warmup_steps=1", "--relora.restart_every=4",
       "--data.seq_len=64", "--data.eval_tokens=2048", "--training.micro_batch_size=4", "--relora.rank=8",
       "--relora.alpha=16", "--training.eval_every=0", "--training.log_every=1", "--relora.dropout=0.1"]
WARM_START = {"tied", "bf16"}  # full-rank for 4 steps, then ReLoRA; the others ReLoRA from step 0


def recipe(run_dir, checkpoint_dir, variant, *extra):
    start = (["--relora.warm_start_steps=4", "--relora.restart_warmup=1"] if variant in WARM_START else
             ["--relora.warm_start_steps=0", "--relora.restart_warmup=0"])
    return load_recipe(TINY, [f"--run.output_dir={run_dir}", f"--model.init_from={checkpoint_dir}", *RUN, *start,
                              *extra])


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in records(run_dir) if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_a_pretrained_checkpoint_trains_resumes_evaluates_and_exports(tmp_path, variant, capsys):
    source = make_checkpoint(tmp_path / "hf", variant)
    whole = Trainer(recipe(tmp_path / "a", source, variant), PlainLog(io.StringIO()))
    result = whole.run()
    assert result["last_eval_loss"] < result["first_eval_loss"]

    first = Trainer(recipe(tmp_path / "b", source, variant), PlainLog(io.StringIO()))
    interrupt_after(first, 6)
    with pytest.raises(TrainingInterrupted):
        first.run()
    resumed = Trainer(recipe(tmp_path / "b", source, variant), PlainLog(io.StringIO()))
    assert resumed.state.step == 6
    resumed.run()
    assert losses(tmp_path / "a") == losses(tmp_path / "b") and len(losses(tmp_path / "a")) == 8

    model = whole.unwrapped
    if variant == "tied":  # one parameter, one optimizer state, through training and the checkpoint
        for trainer in (whole, resumed):
            m = trainer.unwrapped
            assert m.lm_head.weight is m.model.embed_tokens.weight
            assert sum(p is m.lm_head.weight for g in trainer.optimizer.param_groups for p in g["params"]) == 1

    checkpoint = tmp_path / "a" / "checkpoints" / "step_00000008"
    assert main(["eval", str(checkpoint), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["eval_loss"] == pytest.approx(result["last_eval_loss"], rel=1e-5)
    assert main(["export", str(checkpoint), str(tmp_path / "out")]) == 0
    from transformers import AutoConfig, AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    skip = ("dtype", "transformers_version", "_name_or_path")
    config = {k: v for k, v in AutoConfig.from_pretrained(source).to_dict().items() if k not in skip}
    assert {k: v for k, v in exported.config.to_dict().items() if k not in skip} == config
    assert exported.config.dtype == torch.bfloat16 and type(exported).__name__ == type(model).__name__
    if variant == "tied":
        assert exported.lm_head.weight is exported.model.embed_tokens.weight

    tokens = torch.randint(0, len(whole.tokenizer), (2, 64), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad(), unquantized(model):  # the trained weights in full precision: what export merges
        ours = model(input_ids=tokens).logits.float()
        theirs = exported(input_ids=tokens).logits.float()
    assert (theirs - ours).norm() / ours.norm() < 2e-2  # the export is in bf16


def test_a_tied_checkpoint_survives_its_first_save(tmp_path):
    """The tied LM head and embeddings are one tensor under two names; safetensors refuses to store that, and
    a run from such a model lost everything at its first checkpoint."""
    source = make_checkpoint(tmp_path / "hf", "tied")
    args = ("--training.steps=4", "--relora.restart_every=2", f"--data.tokenizer={source}")
    trainer = Trainer(recipe(tmp_path / "run", source, "gqa", *args), PlainLog(io.StringIO()))
    trainer.step()
    assert trainer.save_checkpoint().name == "step_00000001"
    trainer.close()
    resumed = Trainer(recipe(tmp_path / "run", source, "gqa", *args), PlainLog(io.StringIO()))
    m = resumed.unwrapped
    assert resumed.state.step == 1 and m.lm_head.weight is m.model.embed_tokens.weight
    resumed.close()


def test_the_checkpoint_is_read_one_tensor_at_a_time_and_quantized_as_read(tmp_path, monkeypatch):
    """No whole model in host memory: every tensor is read once, on its own, and each adapted linear is quantized
    before the next one is read."""
    from qrelora import pretrained, relora

    source = make_checkpoint(tmp_path / "hf", "sharded")
    events = []
    read = pretrained.WeightFiles.read
    monkeypatch.setattr(pretrained.WeightFiles, "read", lambda self, name: events.append(("read", name)) or
                        read(self, name))
    init = relora.ReLoRALinear.__init__
    monkeypatch.setattr(relora.ReLoRALinear, "__init__", lambda self, linear, *a, **kw: events.append(
        ("quantize", linear.weight.shape)) or init(self, linear, *a, **kw))
    trainer = Trainer(recipe(tmp_path / "run", source, "gqa"), PlainLog(io.StringIO()))
    names = [name for kind, name in events if kind == "read"]
    assert len(names) == len(set(names)) == len(json.loads((source / "model.safetensors.index.json").read_text())
                                                 ["weight_map"])
    kinds = [kind for kind, _ in events]
    assert kinds[:4] == ["read", "quantize", "read", "quantize"]  # q_proj read, quantized; then k_proj
    assert not any(t.is_meta for t in trainer.unwrapped.state_dict().values())
    trainer.close()


def _train(tmp_path, capsys, *overrides):
    code = main(["train", str(TINY), f"--run.output_dir={tmp_path / 'run'}", *overrides])
    return code, capsys.readouterr().err


def test_checkpoints_that_cannot_be_read_are_refused_before_anything_is_written(tmp_path, capsys):
    source = make_checkpoint(tmp_path / "hf", "sharded")
    shards = sorted(source.glob("model-*.safetensors"))
    shards[1].unlink()
    code, err = _train(tmp_path, capsys, f"--model.init_from={source}", "--data.tokenizer=init_from")
    assert code == 2 and f"is missing 1 of the {len(shards)} weight shards" in err and shards[1].name in err

    qwen = make_checkpoint(tmp_path / "qwen", "gqa")
    config = json.loads((qwen / "config.json").read_text())
    (qwen / "config.json").write_text(json.dumps(config | {"architectures": ["Qwen2ForCausalLM"],
                                                           "model_type": "qwen2"}))
    code, err = _train(tmp_path, capsys, f"--model.init_from={qwen}", "--data.tokenizer=init_from")
    assert code == 2 and "holds a Qwen2ForCausalLM model" in err and "LlamaForCausalLM and MistralForCausalLM" in err

    pickled = make_checkpoint(tmp_path / "pickled", "gqa")
    weights = pickled / "model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(weights), pickled / "pytorch_model.bin")
    weights.unlink()
    code, err = _train(tmp_path, capsys, f"--model.init_from={pickled}", "--data.tokenizer=init_from")
    assert code == 2 and "only as Python pickles (pytorch_model.bin)" in err and "save_pretrained" in err

    code, err = _train(tmp_path, capsys, f"--model.init_from={qwen}", "--data.tokenizer=init_from",
                       "--data.seq_len=512")
    assert code == 2 and "at most 256 positions" in err
    code, err = _train(tmp_path, capsys, "--data.tokenizer=init_from")
    assert code == 2 and '"init_from": means the tokenizer of the model.init_from checkpoint' in err
    assert not (tmp_path / "run").exists()


def test_pickled_weights_load_with_the_opt_in(tmp_path):
    source = make_checkpoint(tmp_path / "hf", "gqa")
    from safetensors.torch import load_file

    torch.save(load_file(source / "model.safetensors"), source / "pytorch_model.bin")
    (source / "model.safetensors").unlink()
    safe = make_checkpoint(tmp_path / "safe", "gqa")
    losses_of = {}
    for name, directory, extra in (("pickle", source, ["--checkpoint.allow_pickle=true"]), ("safe", safe, [])):
        trainer = Trainer(recipe(tmp_path / name, directory, "gqa", "--training.steps=4", "--relora.restart_every=2",
                                 *extra), PlainLog(io.StringIO()))
        losses_of[name] = trainer.run()["first_eval_loss"]
    assert losses_of["pickle"] == losses_of["safe"]


def test_a_tokenizer_that_does_not_fit_the_embeddings_is_refused(tmp_path, capsys):
    """The sample tokenizer (8,192 entries) with a model of 16,384 or 4,096 embeddings: not the model's own."""
    for vocab, why in ((16384, "not the tokenizer the model was trained with"), (4096, "would have none")):
        source = make_checkpoint(tmp_path / f"hf{vocab}", "gqa", vocab_size=vocab)
        code, err = _train(tmp_path, capsys, f"--model.init_from={source}", "--data.tokenizer=sample")
        assert code == 2 and "has 8,192 entries" in err and f"embeddings for {vocab:,}" in err and why in err
        assert "--data.tokenizer=init_from" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_adapters_that_start_from_the_residual_pay_back_the_cost_of_4bit_storage(tmp_path):
    """A small trained model (40 full-rank steps, exported) continued on NF4: the step-0 eval, as stored, is
    nearer the model's own loss when the adapters start from the quantization residual (LoftQ-style, three
    alternations) than from zero."""
    from test_checkpoint import recipe as small_recipe

    Trainer(small_recipe(tmp_path / "pre", "--relora.enabled=false", "--training.steps=40", "--training.lr=3e-3"),
            PlainLog(io.StringIO())).run()
    assert main(["export", str(tmp_path / "pre" / "checkpoints" / "step_00000040"), str(tmp_path / "hf"),
                 "--dtype=fp32"]) == 0
    cost = {}
    for init in ("zero", "residual"):
        run = tmp_path / init
        Trainer(small_recipe(run, f"--model.init_from={tmp_path / 'hf'}", f"--relora.init={init}",
                             "--relora.init_iterations=3", "--relora.warm_start_steps=0", "--relora.restart_every=2",
                             "--training.steps=2", "--training.warmup_steps=1", "--relora.restart_warmup=0"),
                PlainLog(io.StringIO())).run()
        q, = [r for r in records(run) if r.get("event") == "quantization_cost"]
        cost[init] = q["eval_loss"] - q["eval_loss_unquantized"]
    assert cost["zero"] > 0 and cost["residual"] < 0.5 * cost["zero"], cost
