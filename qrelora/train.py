"""The training loop: full-rank, or ReLoRA on a frozen quantized base (with an optional full-rank warm start).

Built on accelerate's Accelerator for device placement, mixed precision and multi-process data parallelism,
so `torchrun` / `accelerate launch` run the same code on several GPUs (only trainable tensors carry
gradients, so only they are all-reduced).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import config as cfgmod
from .config import Recipe
from .data import TokenData, build_data, load_tokenizer
from .models import build_model, count_parameters
from .monitor import MetricsFile, PlainLog, Timer, memory_gib
from .optim import build_optimizer, carry_state, prune_adapter_moments, resolve_optimizer_name
from .relora import add_adapters, adapter_layers, frozen_bytes, merge_and_reinit
from .schedule import JaggedCosine


@dataclass
class TrainState:
    """Counters that define where a run is; everything else is derived from them."""

    step: int = 0
    tokens: int = 0
    merges: int = 0


class ReLoRAPhase:
    """Owns the ReLoRA side of a run: switching from full-rank to adapters, merges and optimizer resets.

    With ReLoRA disabled every method is a no-op, so the training loop has no branches for it.
    """

    def __init__(self, recipe: Recipe, run_dir: Path):
        self.cfg, self.quant = recipe.relora, recipe.quant
        self.training_dtype = recipe.training.dtype
        self.run_dir = run_dir
        self.seed = recipe.training.seed
        self.enabled = self.cfg.enabled
        self.active = False

    def switch_due(self, step: int) -> bool:
        return self.enabled and not self.active and step >= self.cfg.warm_start_steps

    def convert(self, model: nn.Module, device: torch.device) -> None:
        """Freeze the attention / MLP linears into their storage format and attach fresh adapters."""
        add_adapters(model, self.cfg, self.quant, training_dtype=self.training_dtype,
                     mmap_dir=self.run_dir / "master", seed=self.seed, device=device)
        self.active = True

    def adapter_params(self, model: nn.Module) -> list[torch.Tensor]:
        return [p for layer in adapter_layers(model) for p in (layer.lora_A, layer.lora_B)]

    def merge(self, model: nn.Module, optimizer: torch.optim.Optimizer, merge_index: int) -> dict:
        report = merge_and_reinit(model)
        gen = torch.Generator().manual_seed(self.seed * 7919 + merge_index)
        t0 = time.perf_counter()
        zeroed = prune_adapter_moments(optimizer, self.adapter_params(model), self.cfg.reset, self.cfg.reset_ratio,
                                       gen)
        return {"event": "merge", "merge_s": report.seconds, "reset_s": time.perf_counter() - t0,
                "update_ratio": report.update_ratio, "codes_changed": report.codes_changed,
                "moments_zeroed": zeroed}


class Trainer:
    def __init__(self, recipe: Recipe, log: PlainLog | None = None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.recipe = recipe
        t = recipe.training
        self.log = log or PlainLog()
        cpu = t.device == "cpu" or (t.device == "auto" and not torch.cuda.is_available())
        self.accelerator = Accelerator(cpu=cpu, mixed_precision="bf16" if t.dtype == "bf16" else "no")
        self.device = self.accelerator.device
        self.log.enabled = self.accelerator.is_main_process
        set_seed(t.seed)

        # Everything that can fail on bad input happens before the run directory is touched.
        self.tokenizer = load_tokenizer(recipe.data.tokenizer)
        self.data: TokenData = build_data(recipe.data, self.tokenizer, t.seed)
        self.eval_batches = self.data.eval_batches(t.micro_batch_size)

        self.run_dir = recipe.run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.toml").write_text(cfgmod.to_toml(recipe), encoding="utf-8")
        self.metrics = MetricsFile(self.run_dir / "metrics.jsonl") if self.accelerator.is_main_process else None

        self.schedule = JaggedCosine(
            lr=t.lr, total_steps=t.steps, warmup_steps=t.warmup_steps, min_lr_ratio=t.min_lr_ratio,
            restart_every=recipe.relora.restart_every if recipe.relora.enabled else 0,
            restart_warmup=recipe.relora.restart_warmup, relora_start=recipe.relora.warm_start_steps)
        self.relora = ReLoRAPhase(recipe, self.run_dir)
        self.state = TrainState()

        model = build_model(recipe.model, vocab_size=len(self.tokenizer), seq_len=recipe.data.seq_len, seed=t.seed,
                            eos_id=self.tokenizer.eos_token_id, device=self._build_device())
        if t.activation_checkpointing:
            enable_activation_checkpointing(model)
        if self.relora.switch_due(0):
            self.relora.convert(model, self.device)
        self._prepare(model)

    # ----------------------------------------------------------------------------------------------
    # set-up

    def _build_device(self) -> torch.device:
        """Initialise the model on the accelerator when its fp32 weights take under half the free memory
        (minutes faster for billion-parameter models); otherwise in host memory, from where the ReLoRA
        conversion quantizes one layer at a time onto the accelerator."""
        cpu = torch.device("cpu")
        if self.device.type != "cuda" or self.recipe.model.init_from:
            return cpu
        meta = build_model(self.recipe.model, vocab_size=len(self.tokenizer), seq_len=self.recipe.data.seq_len,
                           device="meta")
        fp32_bytes = 4 * sum(p.numel() for p in meta.parameters())
        free_bytes, _ = torch.cuda.mem_get_info(self.device)
        return self.device if fp32_bytes < free_bytes / 2 else cpu

    def _prepare(self, model: nn.Module, old_optimizer: torch.optim.Optimizer | None = None) -> None:
        self.model = self.accelerator.prepare_model(model)
        self.optimizer = build_optimizer(self.recipe.optim, self.unwrapped, self.recipe.training.lr, self.device.type)
        if old_optimizer is not None:
            carry_state(old_optimizer, self.optimizer)

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def switch_to_relora(self) -> None:
        t0 = time.perf_counter()
        old_optimizer = self.optimizer
        model = self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
        self.accelerator.free_memory()  # drops the DDP wrapper, which holds the replaced weights' buffers
        self.relora.convert(model, self.device)
        self._prepare(model, old_optimizer)
        del old_optimizer
        self._event({"event": "relora_start", "switch_s": time.perf_counter() - t0},
                    f"switched to ReLoRA at step {self.state.step}: {self._param_summary()} "
                    f"({time.perf_counter() - t0:.1f} s)")

    def _param_summary(self) -> str:
        total, trainable = count_parameters(self.unwrapped)
        frozen, frozen_n = frozen_bytes(self.unwrapped)
        text = f"{total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable"
        if frozen_n:
            text += f", {frozen_n / 1e6:.2f}M frozen in {frozen / 2**20:.1f} MiB ({frozen / frozen_n:.3f} B/param)"
        return text

    # ----------------------------------------------------------------------------------------------
    # steps

    def _micro_batch(self) -> torch.Tensor:
        acc = self.accelerator
        mbs = self.recipe.training.micro_batch_size
        batch = self.data.next_batch(mbs * acc.num_processes)
        return batch[acc.process_index * mbs:(acc.process_index + 1) * mbs].to(self.device)

    def train_step(self, lr: float) -> tuple[float, float]:
        """One optimizer step over grad_accum micro-batches; returns (mean loss, gradient norm)."""
        t = self.recipe.training
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        for i in range(t.grad_accum):
            batch = self._micro_batch()
            # Gradients are all-reduced only on the last micro-batch of the step.
            sync = self.accelerator.no_sync(self.model) if i < t.grad_accum - 1 else contextlib.nullcontext()
            with sync:
                loss = self.model(input_ids=batch, labels=batch).loss
                self.accelerator.backward(loss / t.grad_accum)
            loss_sum += loss.detach()
        params = [p for p in self.unwrapped.parameters() if p.requires_grad]
        clip = t.grad_clip if t.grad_clip > 0 else float("inf")
        grad_norm = self.accelerator.clip_grad_norm_(params, clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_mean = self.accelerator.reduce(loss_sum, reduction="mean") / t.grad_accum
        return loss_mean.item(), float(grad_norm)  # .item(): one host-device sync per step

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        losses = [self.model(input_ids=b.to(self.device), labels=b.to(self.device)).loss.float()
                  for b in self.eval_batches]
        return torch.stack(losses).mean().item()

    # ----------------------------------------------------------------------------------------------
    # reporting

    def _record(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.write({"step": self.state.step, "tokens": self.state.tokens} | record)

    def _event(self, record: dict, text: str) -> None:
        self._record(record)
        self.log.event(text)

    def _eval_and_log(self) -> float:
        t0 = time.perf_counter()
        loss = self.evaluate()
        r = {"step": self.state.step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50)),
             "eval_s": time.perf_counter() - t0}
        self._record(r)
        self.log.eval(r)
        return loss

    # ----------------------------------------------------------------------------------------------
    # the loop

    def run(self) -> dict:
        t = self.recipe.training
        tokens_per_step = self.recipe.tokens_per_step * self.accelerator.num_processes
        self.log.line(f"qrelora: {self.recipe.run.name} on {self.device} ({t.dtype}), {self._param_summary()}, "
                      f"optimizer {resolve_optimizer_name(self.recipe.optim, self.device.type)}, "
                      f"{tokens_per_step:,} tokens/step, run dir {self.run_dir}")
        first_eval = self._eval_and_log()
        timer, started, window_tokens = Timer(), time.perf_counter(), 0
        eval_loss = first_eval
        while self.state.step < t.steps:
            step = self.state.step
            if self.relora.switch_due(step):
                self.switch_to_relora()
            lr = self.schedule(step)
            loss, grad_norm = self.train_step(lr)
            self.state.step += 1
            self.state.tokens += tokens_per_step
            window_tokens += tokens_per_step
            if self.schedule.merges_after(step):
                self.state.merges += 1
                r = self.relora.merge(self.unwrapped, self.optimizer, self.state.merges)
                self._event(r, f"merge {self.state.merges} after step {self.state.step}: {r['merge_s']:.2f} s, "
                               f"|sBA|/|W| {r['update_ratio']:.2e}, codes changed {r['codes_changed']:.2%}, "
                               f"moments zeroed {r['moments_zeroed']:.2%}")
            if self.state.step % t.log_every == 0 or self.state.step == t.steps:
                elapsed = timer.lap()
                r = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": window_tokens / elapsed,
                     "mem_gib": memory_gib(self.device)}
                window_tokens = 0
                self._record(r)
                rate = self.state.step / (time.perf_counter() - started)
                self.log.step({"step": self.state.step} | r, t.steps, (t.steps - self.state.step) / rate)
            if t.eval_every and self.state.step % t.eval_every == 0 and self.state.step < t.steps:
                eval_loss = self._eval_and_log()
        eval_loss = self._eval_and_log()
        wall = time.perf_counter() - started
        self.log.line(f"done: {self.state.step} steps, {self.state.tokens:,} tokens in {wall:.0f} s; "
                      f"eval loss {first_eval:.4f} -> {eval_loss:.4f}")
        if self.metrics is not None:
            self.metrics.close()
        return {"first_eval_loss": first_eval, "last_eval_loss": eval_loss, "steps": self.state.step,
                "wall_s": wall}


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant checkpointing of every decoder block: with frozen inputs the reentrant kind silently
    drops the adapters' gradients (platform.md)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def train(recipe: Recipe, log: PlainLog | None = None) -> dict:
    return Trainer(recipe, log).run()
