"""What a new user meets in the first minutes of eval, export and data: each bad input names what to fix,
nothing else leaks onto the terminal, and the written files are ordinary files."""

import io
import json
import os
import threading
import time
from pathlib import Path

import pytest

from qrelora import data as datamod
from qrelora.cli import main
from qrelora.recipe import load_recipe
from qrelora.data import DataError, build_data, hub, load_tokenizer
from qrelora.monitor import PlainLog
from qrelora.train import Trainer

from test_training import SMALL

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 4-step ReLoRA run on the sample (a few seconds); its final checkpoint."""
    run = tmp_path_factory.mktemp("run")
    recipe = load_recipe(ROOT / "recipes" / "tiny.toml", [
        f"--run.output_dir={run}", *SMALL, "--training.steps=4", "--training.warmup_steps=1",
        "--relora.warm_start_steps=2", "--relora.restart_every=2", "--relora.restart_warmup=1"])
    Trainer(recipe, PlainLog(io.StringIO())).run()
    return run / "checkpoints" / "step_00000004"


def test_eval_blames_a_missing_data_file_on_the_data_option(checkpoint, capfd, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(checkpoint), "--data", "missing.txt"]) == 2
    err = capfd.readouterr().err
    assert err.startswith("error: --data 'missing.txt': no such file or directory.") and "config.toml" not in err


def test_eval_on_a_small_file_says_it_cannot_hold_out_the_eval_tokens(checkpoint, capfd, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("A few words are not a corpus.\n")
    assert main(["eval", str(checkpoint), "--data", str(small)]) == 2
    err = capfd.readouterr().err
    assert f"--data {str(small)!r}" in err and "too few to hold out 2,048 eval tokens" in err
    assert "training" not in err and "at least 2,048 tokens" in err


def test_eval_needs_only_the_held_out_tokens_not_a_training_set_beside_them(checkpoint, capfd, tmp_path):
    """Between 1x and 3x data.eval_tokens: enough to evaluate on, though too little to train on."""
    tokenizer = load_tokenizer("sample")
    text = datamod.sample_corpus()[0][:13_000]
    n = len(tokenizer(text)["input_ids"])
    assert 2048 + 64 < n < 3 * 2048, n  # the case this test is about
    (tmp_path / "medium.txt").write_text(text)
    assert main(["eval", str(checkpoint), "--data", str(tmp_path / "medium.txt"), "--json"]) == 0
    assert json.loads(capfd.readouterr().out)["eval_tokens"] == 2048


def test_export_and_eval_print_only_their_result_and_write_ordinary_files(checkpoint, capfd, tmp_path):
    out = tmp_path / "hf"
    assert main(["export", str(checkpoint), str(out)]) == 0
    assert main(["eval", str(out), "--json"]) == 0
    printed = capfd.readouterr()
    assert printed.err == ""  # no progress bars ("Writing model shards", "Loading weights")
    assert json.loads(printed.out.splitlines()[-1])["eval_tokens"] == 2048
    umask = os.umask(0)
    os.umask(umask)
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes


def test_malformed_json_data_is_reported_once(checkpoint, capfd, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n')
    assert main(["eval", str(checkpoint), "--data", str(bad)]) == 2
    err = capfd.readouterr().err
    assert err.startswith(f"error: --data {str(bad)!r}: could not read the json files") and err.count("\n") == 1
    assert "Failed to load JSON" not in err


# --------------------------------------------------------------------------------------------------
# Hub names: a fast, specific answer instead of a minute of retries


def hub_recipe(tmp_path, *overrides):
    return load_recipe(ROOT / "recipes" / "tiny.toml", [f"--run.output_dir={tmp_path}", *SMALL, *overrides])


def test_an_unknown_hub_dataset_fails_in_seconds_without_retries(tmp_path, capfd):
    """The real hub client: on a machine without network the hub cannot be reached, on one with network
    it has no such dataset; either way the answer comes at once (23 s of retries before)."""
    recipe = hub_recipe(tmp_path, "--data.dataset=qrelora-tests/no-such-dataset")
    t0 = time.perf_counter()
    with pytest.raises(DataError) as e:
        build_data(recipe.data, load_tokenizer("sample"), 0)
    assert time.perf_counter() - t0 < hub.HUB_PROBE_TIMEOUT_S + 3
    assert "could not be reached" in str(e.value) or "has no dataset named" in str(e.value)
    assert "Retrying" not in capfd.readouterr().err


@pytest.fixture
def hub_online(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)


def test_a_hub_that_does_not_answer_is_given_up_on_after_the_probe_timeout(tmp_path, monkeypatch, hub_online):
    from huggingface_hub import HfApi

    release = threading.Event()
    monkeypatch.setattr(HfApi, "dataset_info", lambda self, name, timeout=None: release.wait(30))  # a hung resolver
    monkeypatch.setattr(hub, "HUB_PROBE_TIMEOUT_S", 0.2)
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("load_dataset would retry for 23 s"))
    recipe = hub_recipe(tmp_path, "--data.dataset=someone/corpus")
    t0 = time.perf_counter()
    try:
        with pytest.raises(DataError, match=r"did not answer within 0.2 s\. A hub dataset is streamed"):
            build_data(recipe.data, load_tokenizer("sample"), 0)
    finally:
        release.set()
    assert time.perf_counter() - t0 < 5


def test_an_unreachable_hub_leaves_a_hub_tokenizer_to_the_local_cache(monkeypatch, hub_online):
    from huggingface_hub import HfApi
    from transformers import AutoTokenizer

    def unreachable(self, name, timeout=None):
        raise ConnectionError("[Errno -2] Name or service not known")

    asked = []

    def from_pretrained(spec, **kwargs):
        asked.append(kwargs)
        raise OSError("not in the cache")

    monkeypatch.setattr(HfApi, "model_info", unreachable)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", from_pretrained)
    with pytest.raises(DataError) as e:
        load_tokenizer("someone/tokenizer")
    assert asked == [{"local_files_only": True}]  # the cache only: no retries against the network
    assert "could not be reached (ConnectionError: [Errno -2] Name or service not known)" in str(e.value)
    assert "not in the local cache" in str(e.value)


# --------------------------------------------------------------------------------------------------
# qrelora memory on an 80-column terminal


def test_memory_table_keeps_one_line_per_row_at_80_columns(tmp_path):
    from rich.console import Console

    from qrelora.memory import GiB, Estimator, render

    recipe = hub_recipe(tmp_path)
    estimator = Estimator(recipe, 8192, 24 * GiB, "sample", "recipes/tiny.toml")
    estimate = estimator.estimate()
    shown = {}
    for width in (80, 160):
        console = Console(width=width, record=True, file=io.StringIO())
        render(estimate, 64, None, console)
        shown[width] = console.export_text().splitlines()
    narrow = shown[80]
    assert max(len(line) for line in narrow) <= 80
    rows = [line for line in narrow if line.startswith("│ ")]
    continued = [line for line in rows if line.startswith("│  ") and "  at" not in line]
    assert len(continued) <= 1, "\n".join(narrow)  # only the long "activations + logits, checkpointing on"
    assert any("120 columns or more also show what each row holds" in line for line in narrow)
    assert any("codes and block scales of the frozen linears" in line for line in shown[160])  # wide: the notes
