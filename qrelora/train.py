"""The training loop: full-rank, or ReLoRA on a frozen quantized base (with an optional full-rank warm start).

Built on accelerate's Accelerator for device placement, mixed precision and multi-process data parallelism,
so `torchrun` / `accelerate launch` run the same code on several GPUs (only trainable tensors carry
gradients, so only they are all-reduced).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch import nn

from . import checkpoint
from . import config as cfgmod
from .config import Recipe
from .data import TokenData, build_data, load_tokenizer
from .device import build_device_for, check_device, device_type, free_memory
from .errors import EXIT_INTERRUPTED, QreloraError
from .models import (build_model, disable_activation_checkpointing, enable_activation_checkpointing,
                     fp32_model_bytes, held_out_loss, is_activation_checkpointing, materialize)
from .monitor import (MetricsFile, PlainLog, RunReport, Throughput, effective_rank, flops_per_token, parameter_summary,
                      run_info)
from .optim import build_optimizer, carry_state, prune_adapter_moments, release_state
from .pretrained import Fill, fill_from, meta_model
from .relora import (add_adapters, adapter_layers, codec_for, frozen_checksum, merge_and_reinit, rank_probe_layers,
                     release_host_pages, target_linears, unquantized)
from .rundir import check_disk_for_run, check_writable, lock_run_dir, plan_run
from .schedule import JaggedCosine
from .seeding import derive_seed


@dataclass
class TrainState:
    """Counters that define where a run is; everything else is derived from them."""

    step: int = 0
    tokens: int = 0
    merges: int = 0


@dataclass
class MergeEvent:
    """One merge of the whole model, as metrics.jsonl records it."""

    merge_s: float
    reset_s: float
    update_ratio: float
    """Mean ||s*B@A|| / ||W|| over layers."""
    codes_changed: float
    """Mean share of stored codes that changed."""
    moments_zeroed: float
    """Share of the adapters' moment entries that are zero after the reset."""
    effective_rank: dict[str, int]
    """Effective rank of the update accumulated since the switch, for a few sampled layers."""

    def record(self) -> dict:
        return {"event": "merge"} | dataclasses.asdict(self)

    def describe(self, merge: int, step: int) -> str:
        ranks = (", ".join(str(v) for v in self.effective_rank.values()) or
                 "unknown (resumed from a checkpoint without the weights at the switch)")
        return (f"merge {merge} after step {step}: {self.merge_s:.2f} s, |sBA|/|W| {self.update_ratio:.2e}, codes "
                f"changed {self.codes_changed:.2%}, moments zeroed {self.moments_zeroed:.2%}, effective rank of the "
                f"update so far {ranks} (sampled layers, 90% energy)")


class ReLoRAPhase:
    """Owns the ReLoRA side of a run: switching from full-rank to adapters, merges and optimizer resets.

    With ReLoRA disabled a switch is never due and the schedule never asks for a merge, so the training
    loop has no branches for it.
    """

    def __init__(self, recipe: Recipe, run_dir: Path):
        self.cfg, self.quant = recipe.relora, recipe.quant
        self.training_dtype = recipe.training.dtype
        self.run_dir = run_dir
        self.seed = recipe.training.seed
        self.enabled = self.cfg.enabled
        self.active = False

    def status(self, step: int, total_steps: int) -> str:
        """Where the run is in the ReLoRA schedule, for the terminal."""
        if not self.enabled:
            return "full-rank"
        start, every = self.cfg.warm_start_steps, self.cfg.restart_every
        if step < start:
            return f"warm start, ReLoRA in {start - step}"
        cycles = (total_steps - start) // every
        if step >= total_steps:
            return f"{cycles} cycles done"
        cycle = (step - start) // every + 1
        return f"cycle {cycle}/{cycles}, merge in {start + cycle * every - step}"

    def switch_due(self, step: int) -> bool:
        return self.enabled and not self.active and step >= self.cfg.warm_start_steps

    def convert(self, model: nn.Module, device: torch.device, fill: Fill | None = None) -> None:
        """Freeze the attention / MLP linears into their storage format and attach fresh adapters (`fill`: how a
        linear still on the meta device gets its weights, see add_adapters)."""
        if not self.cfg.activation_checkpointing and is_activation_checkpointing(model):
            disable_activation_checkpointing(model)  # before add_adapters, which reads it
        add_adapters(model, self.cfg, self.quant, training_dtype=self.training_dtype,
                     mmap_dir=self.run_dir / "master", seed=self.seed, device=device, fill=fill)
        if device.type == "cuda":
            # The replaced fp32 weights' blocks stay in the allocator's cache, fragmented; hand them back
            # so that activations get fresh segments instead of raising the reserved peak.
            torch.cuda.empty_cache()
        self.active = True
        # A few layers' weights at the start of the ReLoRA phase: the rank of what the merges add to them is
        # the paper's central claim, reported at every merge. A resumed run takes them from its checkpoint.
        self.rank_probes = {name: (layer, layer.effective_weight())
                            for name, layer in rank_probe_layers(model).items()}

    def state_dict(self) -> dict:
        """What a resume needs beyond the model and optimizer: the rank probes' weights at the switch."""
        return {"rank_probe_starts": {name: start for name, (_, start) in self.rank_probes.items()}}

    def load_state_dict(self, state: dict | None) -> None:
        """Restore the rank probes' starting weights; a checkpoint without them (written before they were
        saved) leaves no baseline to measure from, so the merges then report no effective rank."""
        starts = (state or {}).get("rank_probe_starts", {})
        self.rank_probes = {name: (layer, starts[name]) for name, (layer, _) in self.rank_probes.items()
                            if name in starts}

    def adapter_params(self, model: nn.Module) -> list[torch.Tensor]:
        return [p for layer in adapter_layers(model) for p in (layer.lora_A, layer.lora_B)]

    def merge(self, model: nn.Module, optimizer: torch.optim.Optimizer, merge_index: int) -> MergeEvent:
        report = merge_and_reinit(model)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, merge_index, "moment reset"))
        t0 = time.perf_counter()
        zeroed = prune_adapter_moments(optimizer, self.adapter_params(model), self.cfg.reset, self.cfg.reset_ratio,
                                       gen)
        ranks = {name: effective_rank(layer.effective_weight() - start)
                 for name, (layer, start) in self.rank_probes.items()}
        return MergeEvent(merge_s=report.seconds, reset_s=time.perf_counter() - t0, update_ratio=report.update_ratio,
                          codes_changed=report.codes_changed, moments_zeroed=zeroed, effective_rank=ranks)


    def check_ranks_agree(self, model: nn.Module, accelerator: Accelerator, merge: int, step: int,
                          last_checkpoint: Path | None) -> None:
        """Every data-parallel rank must end a merge with the same frozen weights: compare a checksum of each
        rank's stored codes (two numbers per rank cross the wire) and stop if any differs."""
        if accelerator.num_processes == 1:
            return
        sums = accelerator.gather(frozen_checksum(model)[None]).cpu()
        if (sums != sums[0]).any():
            per_rank = "; ".join(f"rank {i}: {int(a)}/{int(b)}" for i, (a, b) in enumerate(sums.tolist()))
            raise RanksDisagree(
                f"after merge {merge} (step {step}) the data-parallel ranks hold different frozen weights "
                f"(checksums {per_rank}), so they no longer train one model; training stopped without saving. The "
                f"last good checkpoint is {last_checkpoint or '(none yet)'}: resume from it. Ranks drift apart when "
                "they compute a merge differently, e.g. different library versions or GPU kinds on different nodes.")


@dataclass
class StepRecord:
    loss: float
    lr: float
    grad_norm: float
    seconds: float
    """Wall time of the forward, backward and optimizer passes (not the switch or the merge)."""


class TrainingInterrupted(QreloraError):
    """SIGINT / SIGTERM: the run stopped after saving a checkpoint."""

    exit_code = EXIT_INTERRUPTED


class TrainingDiverged(QreloraError):
    """Too many non-finite steps in a row; the last good checkpoint is intact."""


class RanksDisagree(QreloraError):
    """Data-parallel ranks hold different frozen weights after a merge."""


class StopRequest:
    """Turns the first SIGINT / SIGTERM into a request to stop after the current step; a second SIGINT
    interrupts at once (Python's default KeyboardInterrupt)."""

    def __init__(self):
        self.signal_name: str | None = None

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self):
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class BadSteps:
    """Counts steps skipped in a row for a non-finite loss or gradient (the update dropped, the batch spent)
    and stops the run at training.max_bad_steps."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row = limit, 0

    def good(self) -> None:
        self.in_a_row = 0

    def skipped(self, step: int, loss: float, grad_norm: float, report: RunReport, last_checkpoint: Path | None):
        self.in_a_row += 1
        report.event({"event": "skipped_step", "loss": loss, "grad_norm": grad_norm, "in_a_row": self.in_a_row},
                     f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step}: update skipped "
                     f"({self.in_a_row} in a row, stopping at {self.limit})")
        if self.in_a_row >= self.limit:
            raise TrainingDiverged(
                f"{self.limit} steps in a row had a non-finite loss or gradient at step {step}; training stopped. "
                f"The last good checkpoint is {last_checkpoint or '(none yet)'}. Lower training.lr, raise "
                "training.warmup_steps or set training.grad_clip, then resume.")


def no_phases(name: str) -> contextlib.AbstractContextManager:
    """The trainer marks the parts of a step (forward, backward, optimizer step, merge) with
    `self.phases(name)`, a hook for instrumentation: the memory profiler sets its own to measure each
    part; this default does nothing."""
    return contextlib.nullcontext()


class Run:
    """What a run owns, built from its recipe: the device (accelerate), the run directory (locked, checked for
    disk), data, schedule, model and optimizer, the metrics; resumed from a checkpoint and saved into one.
    Trainer steps it."""

    def __init__(self, recipe: Recipe, log: PlainLog | None = None, extend_to: int | None = None):
        """extend_to: continue the run in recipe's run directory to this many steps in all (a longer or
        shorter plan than the one it was started with); its schedule's tail is recomputed from there."""
        check_device(recipe)
        self.log = log or PlainLog()
        self.accelerator = make_accelerator(recipe)
        self.device = self.accelerator.device
        self.log.enabled = self.accelerator.is_main_process
        set_seed(recipe.training.seed)
        # Everything that can fail on bad input happens before the run directory is touched.
        self.run_dir = recipe.run_dir
        self.checkpoints_dir = self.run_dir / "checkpoints"
        resume_from = checkpoint.resolve_resume(recipe.checkpoint.resume, self.checkpoints_dir)
        self.plan, self.extended = plan_run(recipe, resume_from, extend_to)
        t = recipe.training
        self.recipe = dataclasses.replace(recipe, training=dataclasses.replace(t, steps=self.plan[-1][1]))
        check_writable(self.run_dir)
        self.lock = lock_run_dir(self.run_dir, self.accelerator)
        try:
            self._build(self.recipe, resume_from)
        except BaseException:
            self.lock.release()
            raise

    def _build(self, recipe: Recipe, resume_from: Path | None) -> None:
        t = recipe.training
        self.tokens_per_step = recipe.tokens_per_step * self.accelerator.num_processes
        self.tokenizer = load_tokenizer(recipe.data.tokenizer)
        self.data: TokenData = build_data(recipe.data, self.tokenizer, t.seed)
        self.eval_batches = self.data.eval_batches(t.micro_batch_size)
        self.schedule = schedule_for(recipe, self.plan)
        self.relora = ReLoRAPhase(recipe, self.run_dir)
        self.state, self.bad_steps, self.phases = TrainState(), BadSteps(t.max_bad_steps), no_phases
        saved = checkpoint.load_files(resume_from, recipe.checkpoint.allow_pickle) if resume_from else None
        if saved and checkpoint.is_legacy(resume_from):
            self.log.event(f"warning: read the pickled optimizer and RNG states of {resume_from} "
                           "(checkpoint.allow_pickle = true); new checkpoints hold no pickles")
        relora_now = self.relora.switch_due(0) or bool(saved and saved.trainer["relora_active"])
        model = build_run_model(recipe, self.tokenizer, self.device, self.relora if relora_now else None,
                                resuming=saved is not None)
        check_disk_for_run(recipe, model, self.device.type, saved.trainer["step"] if saved else 0)
        self._prepare(model)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.toml").write_text(cfgmod.to_toml(recipe), encoding="utf-8")
        metrics_path = self.run_dir / "metrics.jsonl"
        self.resumed_from = resume_from
        if saved:
            self._load(saved, metrics_path)
        elif metrics_path.exists():
            metrics_path.unlink()  # a fresh run: the old run's records would read as this one's
        metrics = None
        if self.accelerator.is_main_process:
            metrics = MetricsFile(metrics_path, self.run_dir / "tensorboard" if recipe.run.tensorboard else None)
        self.report = RunReport(self.log, metrics, lambda: {"step": self.state.step, "tokens": self.state.tokens})

    def close(self) -> None:
        """Release the run directory, the data-parallel wrapper, then the process group. Left to interpreter
        exit, the wrapper would outlive the group and tear its threads down in an unsafe order: under
        torchrun a finished run could end in "terminate called without an active exception"."""
        self.lock.release()
        self.model = self.optimizer = None
        self.accelerator.free_memory()
        self.accelerator.end_training()

    def save_checkpoint(self) -> Path | None:
        self.accelerator.wait_for_everyone()
        path = None
        if self.accelerator.is_main_process:
            trainer_state = dataclasses.asdict(self.state) | {
                "relora_active": self.relora.active, "data": self.data.state_dict(),
                "metrics_offset": self.report.metrics_offset(), "plan": self.plan}
            path = checkpoint.save(self.checkpoints_dir, self.state.step, self.unwrapped.state_dict(),
                                   self.optimizer.state_dict(), trainer_state, self.recipe,
                                   self.recipe.checkpoint.keep_last,
                                   relora_state=self.relora.state_dict() if self.relora.active else None)
            release_host_pages(self.unwrapped)
        self.accelerator.wait_for_everyone()
        return path

    def _load(self, saved: checkpoint.SavedState, metrics_path: Path) -> None:
        checkpoint.restore(saved, self.resumed_from, self.unwrapped, self.optimizer)
        release_host_pages(self.unwrapped)
        if self.relora.active:
            self.relora.load_state_dict(saved.relora)
        self.data.load_state_dict(saved.trainer["data"])
        self.state = TrainState(**{k: saved.trainer[k] for k in ("step", "tokens", "merges")})
        if metrics_path.exists() and self.accelerator.is_main_process:
            with open(metrics_path, "r+b") as f:  # drop records written after the checkpoint
                f.truncate(saved.trainer["metrics_offset"])

    def _last_checkpoint(self) -> Path | None:
        found = checkpoint.complete_checkpoints(self.checkpoints_dir)
        return found[-1] if found else None

    def _prepare(self, model: nn.Module, old_optimizer: torch.optim.Optimizer | None = None) -> None:
        self.model = self.accelerator.prepare_model(model)
        self.trainable = [p for p in model.parameters() if p.requires_grad]  # fixed until the next prepare
        t = self.recipe.training
        self.optimizer = build_optimizer(self.recipe.optim, self.unwrapped, t.lr, self.device.type, t.embedding_lr_ratio)
        if old_optimizer is not None:
            carry_state(old_optimizer, self.optimizer)

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)



class Trainer(Run):
    """Steps a Run: the training loop, the switch to ReLoRA, merges, evaluations, checkpoints and stops."""

    def switch_to_relora(self) -> None:
        t0 = time.perf_counter()
        old_optimizer, model = self.optimizer, self.unwrapped
        self.accelerator.free_memory()  # drops the DDP wrapper, which holds the replaced weights' buffers
        # The replaced linears' moments go before the conversion needs its workspace (paged ones explicitly:
        # bitsandbytes never frees them); embeddings, norms and head keep theirs (carry_state).
        freed = release_state(old_optimizer, [p for _, m in target_linears(model) for p in m.parameters()])
        self.relora.convert(model, self.device)
        self._prepare(model, old_optimizer)
        del old_optimizer
        seconds = time.perf_counter() - t0
        self.report.event({"event": "relora_start", "switch_s": seconds, "paged_freed": freed},
                          f"switched to ReLoRA at step {self.state.step}: {parameter_summary(self.unwrapped)} "
                          f"({seconds:.1f} s)")

    def _micro_batch(self) -> torch.Tensor:
        acc, mbs = self.accelerator, self.recipe.training.micro_batch_size
        batch = self.data.next_batch(mbs * acc.num_processes)
        return batch[acc.process_index * mbs:(acc.process_index + 1) * mbs].to(self.device)

    def train_step(self, lr: float, full_lr: float | None = None) -> tuple[float, float]:
        """One optimizer step over grad_accum micro-batches at learning rate `lr` for the adapters and
        `full_lr` (default: lr) for the parameters that train in full, each group at its own multiple of it
        (optim.param_groups); returns (mean loss, gradient norm)."""
        t = self.recipe.training
        for group in self.optimizer.param_groups:
            rate = lr if group.get("role") == "adapters" or full_lr is None else full_lr
            group["lr"] = rate * group.get("lr_scale", 1.0)
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        for i in range(t.grad_accum):
            batch = self._micro_batch()
            # Gradients are all-reduced only on the last micro-batch of the step.
            sync = self.accelerator.no_sync(self.model) if i < t.grad_accum - 1 else contextlib.nullcontext()
            # Explicit autocast: accelerate patches forward with it only on the first prepare_model, so a
            # model re-prepared after the warm-start switch would silently train in fp32.
            with sync, self.accelerator.autocast():
                with self.phases("forward"):
                    loss = self.model(input_ids=batch, labels=batch).loss
                with self.phases("backward"):
                    self.accelerator.backward(loss / t.grad_accum)
            loss_sum += loss.detach()
        clip = t.grad_clip if t.grad_clip > 0 else float("inf")
        grad_norm = float(self.accelerator.clip_grad_norm_(self.trainable, clip))  # one host-device sync per step
        loss_mean = (self.accelerator.reduce(loss_sum, reduction="mean") / t.grad_accum).item()
        if math.isfinite(loss_mean) and math.isfinite(grad_norm):
            with self.phases("optimizer step"):
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_mean, grad_norm

    @torch.no_grad()
    def evaluate(self) -> float:
        return held_out_loss(self.model, self.eval_batches, self.device, self.recipe.training.dtype == "bf16")

    def run(self) -> dict:
        t, ckpt = self.recipe.training, self.recipe.checkpoint
        self.log.banner(run_info(self))
        self.log.start(t.steps, self.state.step)
        if self.extended:
            at, total = self.plan[-1]
            self.report.event({"event": "extend", "from_steps": self.plan[-2][1], "to_steps": total,
                               "lr_at_step": self.schedule(at)}, f"extended: {self.schedule.describe_extension()}")
        if self.resumed_from is not None:
            self.log.event(f"resumed from {self.resumed_from} at step {self.state.step}")
            first_eval = eval_loss = float("nan")
        else:
            first_eval = eval_loss = self.report.eval(*timed(self.evaluate))
            if self.recipe.model.init_from and self.relora.active:
                self._report_quantization_cost(first_eval)
        started = time.perf_counter()
        self.throughput = Throughput(self.tokens_per_step, flops_per_token(self.unwrapped), self.device,
                                     self.accelerator.num_processes, t.steps, self.state.step)
        try:
            with StopRequest() as stop:
                while self.state.step < t.steps:
                    if (record := self.step()) is None:
                        continue
                    step = self.state.step
                    if step % t.log_every == 0 or step == t.steps:
                        self._log_step(record)
                    if t.eval_every and step % t.eval_every == 0 and step < t.steps:
                        eval_loss = self.report.eval(*timed(self.evaluate))
                    if stop.signal_name:
                        self._stop(stop.signal_name)
                    if ckpt.every and step % ckpt.every == 0 and step < t.steps:
                        self._save_and_log()
                eval_loss = self.report.eval(*timed(self.evaluate))
                self._save_and_log()
        finally:
            self.report.close()
            self.lock.release()
        wall = time.perf_counter() - started
        change = f"{eval_loss:.4f}" if math.isnan(first_eval) else f"{first_eval:.4f} -> {eval_loss:.4f}"
        self.log.line(f"done: {self.state.step} steps, {self.state.tokens:,} tokens in {wall:.0f} s; "
                      f"eval loss {change}")
        return {"first_eval_loss": first_eval, "last_eval_loss": eval_loss, "steps": self.state.step,
                "wall_s": wall}

    def _report_quantization_cost(self, quantized_loss: float) -> None:
        """What storing a pretrained model's linears quantized costs before any training: its eval loss with the
        weights as read (the exact merges' master) next to the loss as it now computes."""
        with unquantized(self.unwrapped) as knows:
            if not knows:
                return  # stochastic and naive merges keep no copy of the weights as read
            own, seconds = timed(self.evaluate)
        cost = quantized_loss - own
        label = codec_for(self.recipe.quant, self.recipe.training.dtype).label
        self.report.event({"event": "quantization_cost", "eval_loss_unquantized": own, "eval_loss": quantized_loss,
                           "eval_s": seconds},
                          f"eval at step 0 before {label} storage (the checkpoint's own): loss {own:.4f}; as stored "
                          f"{quantized_loss:.4f}, {cost:+.4f} nats ({math.exp(cost) - 1:+.1%} perplexity)")

    def step(self) -> StepRecord | None:
        """One optimizer step of the run: the switch to ReLoRA when it is due, the step at the schedule's
        learning rate, and the merge when the step ends a cycle. None when the step was skipped (a
        non-finite loss or gradient)."""
        step = self.state.step
        if self.relora.switch_due(step):
            self.switch_to_relora()
        lr = self.schedule(step)
        t0 = time.perf_counter()
        loss, grad_norm = self.train_step(lr, full_lr=self.schedule.full_rate(step))
        seconds = time.perf_counter() - t0
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.bad_steps.skipped(step + 1, loss, grad_norm, self.report, self._last_checkpoint())
            return None
        self.bad_steps.good()
        self.state.step += 1
        self.state.tokens += self.tokens_per_step
        self.log.advance(self.state.step)
        if self.schedule.merges_after(step):
            self.merge()
        return StepRecord(loss=loss, lr=lr, grad_norm=grad_norm, seconds=seconds)

    def merge(self) -> None:
        """Merge every adapter into its base, reset the adapters and their moments, check that the ranks
        agree; log the merge."""
        s = self.state
        s.merges += 1
        with self.phases("merge"):
            m = self.relora.merge(self.unwrapped, self.optimizer, s.merges)
        self.relora.check_ranks_agree(self.unwrapped, self.accelerator, s.merges, s.step, self._last_checkpoint())
        self.report.event(m.record(), m.describe(s.merges, s.step))

    def _log_step(self, step: StepRecord) -> None:
        r = {"loss": step.loss, "lr": step.lr, "grad_norm": step.grad_norm} | self.throughput.window(self.state.step)
        self.report.record(r)
        total = self.recipe.training.steps
        self.log.step({"step": self.state.step} | r, total, self.throughput.eta_s(self.state.step),
                      self.relora.status(self.state.step, total))

    def _stop(self, signal_name: str) -> None:
        path = self.save_checkpoint()
        self.log.event(f"{signal_name} received: stopped after step {self.state.step}, checkpoint saved to {path}. "
                       "Resume with the same command (checkpoint.resume = \"auto\").")
        raise TrainingInterrupted(str(path))

    def _save_and_log(self) -> None:
        t0 = time.perf_counter()
        path = self.save_checkpoint()
        seconds = time.perf_counter() - t0
        self.report.event({"event": "checkpoint", "path": str(path), "checkpoint_s": seconds},
                          f"checkpoint at step {self.state.step}: {path} ({seconds:.1f} s)")


def make_accelerator(recipe: Recipe) -> Accelerator:
    """accelerate's Accelerator for the recipe's device and precision."""
    # accelerate keeps the mixed-precision setting in a process-wide singleton; each run's precision is its
    # recipe's, so forget the previous run's (the distributed set-up itself is kept).
    AcceleratorState._reset_state(reset_partial_state=False)
    # DDP's default re-sends every module buffer from rank 0 before each forward; the frozen weights' codes are
    # buffers, which would cost their whole size per step (and hide ranks that drifted apart). They change only
    # at merges, which every rank computes identically; ReLoRAPhase.check_ranks_agree verifies it.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    return Accelerator(cpu=device_type(recipe) == "cpu", kwargs_handlers=[ddp],
                       mixed_precision="bf16" if recipe.training.dtype == "bf16" else "no")


def schedule_for(recipe: Recipe, plan: list[tuple[int, int]]) -> JaggedCosine:
    """The run's learning-rate schedule, for its plan of lengths (see rundir.plan_run)."""
    t, r = recipe.training, recipe.relora
    return JaggedCosine.for_plan(plan, lr=t.lr, warmup_steps=t.warmup_steps, min_lr_ratio=t.min_lr_ratio,
                                 restart_every=r.restart_every if r.enabled else 0, restart_warmup=r.restart_warmup,
                                 relora_start=r.warm_start_steps, relora_lr_ratio=r.lr_ratio,
                                 jagged_all=r.jagged == "all")


def build_run_model(recipe: Recipe, tokenizer, device: torch.device, relora: ReLoRAPhase | None,
                    resuming: bool = False) -> nn.Module:
    """The model a run starts from, with activation checkpointing, in ReLoRA form when `relora` is given.

    A fresh model is built where build_device_for says: on the accelerator when its fp32 weights take under half
    the free memory; a bigger one that goes straight to ReLoRA on the meta device, initialised one layer at a
    time as the conversion quantizes it, so it never exists whole in fp32. A model.init_from checkpoint is laid
    out on the meta device and read one tensor at a time into that form (pretrained.py); a resumed run only
    lays it out, as the checkpoint it resumes from fills every tensor."""
    init_from = recipe.model.init_from
    if init_from:
        model = meta_model(init_from)
        fill = None if resuming else fill_from(init_from, model, recipe.checkpoint.allow_pickle)
        fp32 = 4 * sum(p.numel() for p in model.parameters())
        home = device if relora is not None else build_device_for(fp32, free_memory(device), False, device)
    else:
        model = build_model(recipe.model, vocab_size=len(tokenizer), seq_len=recipe.data.seq_len,
                            seed=recipe.training.seed, eos_id=tokenizer.eos_token_id,
                            device=initial_device(recipe, len(tokenizer), device, relora is not None))
        fill, home = None, device
    if recipe.training.activation_checkpointing:
        enable_activation_checkpointing(model)  # the switch turns it off if relora.activation_checkpointing is false
    if relora is not None:
        relora.convert(model, device, fill)
    materialize(model, home, fill)  # what a meta-device build has left: embeddings, norms, head
    return model


def initial_device(recipe: Recipe, vocab_size: int, device: torch.device, relora_from_start: bool) -> torch.device:
    """Where a fresh model is initialised (see build_device_for). On the CPU too a model whose fp32 weights would
    not fit (a 7B model needs 25 GiB) is built on the meta device when ReLoRA starts at step 0."""
    return build_device_for(fp32_model_bytes(recipe.model, vocab_size, recipe.data.seq_len), free_memory(device),
                            relora_from_start, device)


def timed(fn):
    """(fn(), the seconds it took)."""
    t0 = time.perf_counter()
    return fn(), time.perf_counter() - t0


def train(recipe: Recipe, log: PlainLog | None = None, extend_to: int | None = None) -> dict:
    trainer = Trainer(recipe, log, extend_to)
    try:
        return trainer.run()
    finally:
        trainer.close()
