"""The one training loop every stage runs; a stage supplies only what differs.

    Stage.run():
      join the process group ─▶ start ─▶ build_model ─▶ optimizer ─▶ prepare_model
      ─▶ deepspeed.initialize ─▶ on_engine ─▶ EMA
      ─▶ resume (engine + EMA + the stage's own state) from io.latest_checkpoint()
      for each micro-batch of io.batches(epoch):
          per-(step, micro-batch, rank) seed ─▶ lr ─▶ forward_backward ─▶ before_step ─▶ engine.step
          every micro-batch: its losses and samples go into the window
          at each accumulation boundary (one optimizer step):
              EMA update ─▶ every report_every: window means (over micro-batches, then ranks),
              samples/s over the window ─▶ every eval_every: evaluate ─▶ progress line
              ─▶ every checkpoint_every and at the end: checkpoint, else a plain report

A stage overrides `build_model` and `forward_backward` (and, as it needs, the other hooks). The io
object decides where batches come from and where reports and checkpoints go
(tessera.training.ray_io under Ray Train; a test's own class in tests), so the same loop runs in a
Ray Train worker, in one process, and in a test. With tracking.kind set, rank 0's io also sends its
reports and sample grids to TensorBoard, MLflow or W&B (tessera.training.tracking).

Seeds: every micro-batch reseeds torch from (seed, step, micro-batch, rank), so a resumed run draws
what the uninterrupted one would have (Gumbel noise, caption dropout) without checkpointing RNG state.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from typing import Protocol

import torch

from tessera.parallel import dist
from tessera.parallel.deepspeed_config import build_deepspeed_config
from tessera.training import schedules, tracking
from tessera.training.checkpoint import load_ema, load_engine_state, load_state, save_checkpoint
from tessera.training.ema import ParameterEMA


class StageIO(Protocol):
    def batches(self, epoch: int) -> Iterator[dict]: ...

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None: ...

    def latest_checkpoint(self) -> str | None: ...

    def save_artifact(self, name: str, data: bytes) -> None:
        """Write a file (e.g. a PNG grid) into the run's storage; called on rank 0 only."""


class Window:
    """What happened since the last report: every micro-batch's values and samples."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.micro_batches = self.samples = 0
        self.started = time.time()

    def add(self, values: dict[str, float], samples: int) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.micro_batches += 1
        self.samples += samples

    def summary(self) -> dict:
        """Means over micro-batches, then over ranks; samples summed over ranks."""
        keys = sorted(self.sums)
        n = max(1, self.micro_batches)
        means = dist.all_reduce_mean([self.sums[k] / n for k in keys])
        elapsed = max(time.time() - self.started, 1e-9)
        samples = self.samples * dist.world_size()
        return {**dict(zip(keys, means, strict=True)), "micro_batches": self.micro_batches,
                "samples": samples, "window_s": elapsed, "samples_per_s": samples / elapsed}


def step_seed(seed: int, step: int, micro: int, grad_accum: int) -> int:
    """The seed of micro-batch `micro` (0-based within its optimizer step) of `step` on this rank."""
    return seed * 1_000_003 + (step * grad_accum + micro) * 1_009 + dist.rank()


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices and embeddings; not biases, norm gains or scalars."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


class Stage:
    """A training stage: `section` names its config section (cfg.dvae, cfg.prior, ...)."""

    section: str

    def __init__(self, cfg, io):
        self.cfg, self.io = cfg, io
        self.t = getattr(cfg, self.section)
        self.log = logging.getLogger(f"tessera.train_{self.section}")
        self.ema: ParameterEMA | None = None

    # ── hooks ────────────────────────────────────────────────────────────────────────────────
    def start(self) -> None:
        """First, once the process group exists (collective set-up goes here)."""

    def build_model(self) -> torch.nn.Module:
        """The model, and `self.shape` (saved with checkpoints)."""
        raise NotImplementedError

    def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        t = self.t
        return torch.optim.AdamW(decay_groups(model, t.weight_decay), lr=t.lr, betas=t.betas,
                                 eps=getattr(t, "eps", 1e-8))

    def deepspeed_config(self, **overrides) -> dict:
        t = self.t
        keys = dict(micro_batch=t.micro_batch, grad_accum=t.grad_accum, world_size=dist.world_size(),
                    zero_stage=t.zero_stage, precision=t.precision, grad_clip=t.grad_clip)
        return build_deepspeed_config(**keys | overrides)

    def prepare_model(self, model: torch.nn.Module, ds_config: dict) -> torch.nn.Module:
        """Before DeepSpeed wraps it (the prior partitions it for grad_comm here)."""
        return model

    def on_engine(self) -> None:
        """Right after deepspeed.initialize (self.engine and self.device exist), before any resume."""

    def setup(self) -> None:
        """After any resume: validation data."""

    def data_manifest(self) -> dict | None:
        """The manifest of the data trained on, stored with each checkpoint (rank 0)."""
        return None

    def forward_backward(self, batch: dict, *, step: int, seed: int) -> tuple[dict[str, float], int]:
        """One micro-batch: forward and engine.backward; (its scalar values, its samples)."""
        raise NotImplementedError

    def before_step(self, *, step: int, boundary: bool) -> bool:
        """Between backward and engine.step; True skips this update (a non-finite gradient)."""
        return False

    def after_step(self, step: int) -> None:
        """After an optimizer step (and the EMA update)."""

    def step_metrics(self, m: dict) -> dict:
        """Stage figures added to a report (m holds the window's means)."""
        return {}

    def evaluate(self, step: int) -> dict:
        return {}

    def progress(self, m: dict) -> str:
        """The stage's figures in the console line (after the loss)."""
        return ""

    def progress_eval(self, m: dict) -> str:
        """The evaluation's figures at the end of the line, when the report has them."""
        return ""

    def state(self) -> dict:
        """Saved in the checkpoint beside step and shape; "export" entries go into the export's JSON."""
        return {}

    def restore(self, state: dict, checkpoint_dir: str) -> None:
        """From a checkpoint's state (after the engine and EMA are loaded)."""

    def close(self) -> None: ...

    @classmethod
    def summary(cls, m: dict) -> str:
        """What a job prints of the last metrics besides step and loss."""
        return ""

    # ── the loop ─────────────────────────────────────────────────────────────────────────────
    def eval_model(self):
        """`with self.eval_model() as model:` the model to evaluate: the engine's own, holding the
        parameter EMA while inside when the stage keeps one (a collective: evaluate() runs on every
        rank)."""
        if self.ema is None:
            return contextlib.nullcontext(self.engine.module)
        return self.ema.swapped_into(self.engine.module)

    def run(self) -> dict:
        """Train to the section's `steps` (resuming from the latest checkpoint); the last metrics."""
        t = self.t
        if t.threads_per_worker:
            torch.set_num_threads(t.threads_per_worker)
        join_process_group(t.use_gpu)
        import deepspeed

        self.io = tracking.track(self.io, self.cfg, self.section)  # rank 0: reports and grids to cfg.tracking
        self.start()
        torch.manual_seed(t.seed)
        model = self.build_model()
        optimizer = self.optimizer(model)
        ds_config = self.deepspeed_config()
        model = self.prepare_model(model, ds_config)
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.engine, self.device = engine, engine.device
        self.on_engine()
        self.ema = ParameterEMA(engine.module, t.ema_decay, zero_stage=t.zero_stage) if t.ema_decay else None
        step = 0
        resume = self.io.latest_checkpoint()
        if resume:
            load_engine_state(engine, resume)
            state = load_state(resume)
            step = state["step"]
            load_ema(self.ema, resume)
            self.restore(state, resume)
            self.log.info("resumed from step %d", step)
        self.setup()
        data_manifest = self.data_manifest() if dist.is_main() else None
        window, last = Window(), {}
        started, first_step = time.time(), step
        epoch, micro = step, 0  # a fresh file order after a resume, not a replay of epoch 0
        while step < t.steps:
            for batch in self.io.batches(epoch):
                if step >= t.steps:
                    break
                seed = step_seed(t.seed, step, micro % t.grad_accum, t.grad_accum)
                torch.manual_seed(seed)
                lr = t.lr * schedules.lr_factor(step, warmup=t.warmup_steps, total=t.steps,
                                                min_ratio=t.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                boundary = engine.is_gradient_accumulation_boundary()
                values, samples = self.forward_backward(batch, step=step, seed=seed)
                skip = self.before_step(step=step, boundary=boundary)
                engine.step()
                micro += 1
                window.add(values, samples)
                if not boundary:
                    continue
                step += 1
                if self.ema is not None and not skip:
                    self.ema.update(engine.module)
                self.after_step(step)
                save = step % t.checkpoint_every == 0 or step == t.steps
                if step % t.report_every == 0 or save:
                    last = {"step": step, "lr": lr, **window.summary()}
                    last |= self.step_metrics(last)
                    if step % t.eval_every == 0 or step == t.steps:
                        last |= self.evaluate(step)
                    if dist.is_main():
                        announce(progress_line(last, self.progress(last), self.progress_eval(last), t.steps,
                                               started, first_step))
                    window = Window()
                    if save:
                        state = {"step": step, "shape": self.shape.to_dict(), **self.state()}
                        save_checkpoint(engine, self.io.report, last, state=state, ema=self.ema,
                                        config=self.cfg.model_dump(mode="json"), data_manifest=data_manifest,
                                        rank_files=self.rank_files())
                    else:
                        self.io.report(last, None)
            epoch += 1
        self.close()
        tracking.finish(self.io)
        return last

    def rank_files(self) -> dict[str, bytes]:
        """Files this rank adds to a checkpoint (the prior's gradient-compression state)."""
        return {}


def progress_line(m: dict, figures: str, evaluation: str, total: int, started: float, first_step: int) -> str:
    """One console line per report: where the run is, how it is doing, when it will end."""
    eta = (time.time() - started) / max(m["step"] - first_step, 1) * (total - m["step"]) / 60
    rate = (f"{m['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in m
            else f"{m['samples_per_s']:.0f} samples/s")
    parts = [f"step {m['step']}/{total} loss {m['loss']:.4f}", figures, rate, f"eta {eta:.1f} min"]
    line = " ".join(p for p in parts if p)
    return f"{line} | {evaluation}" if evaluation else line


def announce(line: str) -> None:
    """A progress line on the console. Written to stdout, not logged or print()ed: Ray Train sends
    its workers' logging to per-worker files and re-logs print() (which shows it twice), while the
    worker's stdout itself reaches the driver's console once."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def join_process_group(use_gpu: bool) -> None:
    """Join the workers' process group: NCCL on GPUs, else gloo with DeepSpeed's CPU accelerator.
    One process without a launcher joins a group of one on loopback."""
    use_cuda = use_gpu and torch.cuda.is_available()
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is first imported
    import deepspeed

    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)
        # torch's rendezvous store would listen on every interface; on loopback, 127.0.0.1 only.
        from tessera.cluster import bind_rendezvous_to_loopback

        bind_rendezvous_to_loopback()
    deepspeed.init_distributed("nccl" if use_cuda else "gloo", verbose=False)  # reuses Ray Train's group


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
