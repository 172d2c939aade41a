"""What dpo and pdistill do around a transformers / TRL Trainer, in one shape.

    args = DPOConfig(..., **trainer_arguments(cfg, cfg.dpo, device, report_to))  # CPU / GPU, optimizer.*, steps
    with setup_errors("DPO", "dpo"):                                             # a bad setting: one line
        trainer = DPOTrainer(...)
    report_steps(trainer, step_callback("DPO", line, cfg.optimizer.learning_rate))  # a line per step; divergence
    resume = fresh_checkpoints(ckpt_dir, stamp)                                    # resumable step checkpoints
    stats = log_stats(trainer.state.log_history, reward_margin_mean="rewards/margins")
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from tsalign.artifacts.store import atomic_write_text
from tsalign.errors import TsalignError
from tsalign.progress import say
from tsalign.training.divergence import diverged, divergence

LEARNING_RATE_KEY = "optimizer.learning_rate"  # the key a divergence error tells the user to lower


def trainer_arguments(cfg: DictConfig, steps: DictConfig, device: str, report_to: list[str], *,
                      gradient_checkpointing: bool = True) -> dict:
    """The TrainingArguments both stages share: the optimizer (cfg.optimizer), the schedule of the stage's own
    section (`steps`: epochs, max_steps, batch_size, gradient_accumulation_steps, logging_steps), and the device:
    on a GPU the weights stay fp32 with bf16 autocast (a small learning rate's updates round away in bf16 weights)
    and activations are recomputed (gradient_checkpointing) unless the stage turns it off."""
    import torch

    o = cfg.optimizer
    gpu = device.startswith("cuda")
    return dict(
        num_train_epochs=steps.epochs, max_steps=steps.max_steps, per_device_train_batch_size=steps.batch_size,
        gradient_accumulation_steps=steps.gradient_accumulation_steps, logging_steps=steps.logging_steps,
        learning_rate=o.learning_rate, lr_scheduler_type=o.lr_scheduler_type, weight_decay=o.weight_decay,
        max_grad_norm=o.max_grad_norm,
        warmup_steps=o.warmup_ratio,  # transformers 5 has no warmup_ratio: a float below 1 is a ratio
        optim=o.name, seed=cfg.seed, report_to=report_to,
        use_cpu=not gpu, bf16=gpu and torch.cuda.is_bf16_supported(),
        gradient_checkpointing=gpu and gradient_checkpointing,
        disable_tqdm=True,  # one short line per logged step instead (report_steps)
    )


@contextlib.contextmanager
def setup_errors(what: str, section: str):
    """TRL / transformers reject bad settings with ValueError deep inside; say it in one line."""
    try:
        yield
    except (ValueError, TypeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TsalignError(f"{what} setup rejected the config ({section}.* / optimizer.*): {first}") from None


def step_callback(what: str, line: Callable[[str, dict], str], learning_rate: float, *, eta: bool = False):
    """One short line per logged step, `line("step s/n loss x", logs)` (with the time left when `eta`); no
    checkpoint after the last step, where the model is saved next anyway (a full-model + optimizer checkpoint
    costs ~14 s and 1.6 GB for SmolLM2-135M); and a diverging run (tsalign.training.divergence) stops at the step
    that shows it, before any checkpoint of it is saved (Trainer logs before it saves), with an error naming
    optimizer.learning_rate."""
    from transformers import TrainerCallback

    class StepCallback(TrainerCallback):
        def __init__(self):
            self.started, self.first_step = time.monotonic(), 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.started, self.first_step = time.monotonic(), state.global_step  # a resumed run starts later

        def time_left(self, state) -> str:
            done = state.global_step - self.first_step
            if not eta or done <= 0:
                return ""
            per_step = (time.monotonic() - self.started) / done
            return f", {per_step:.1f} s/step, ETA {per_step * (state.max_steps - state.global_step):.0f} s"

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_save = False

        def on_log(self, args, state, control, logs=None, **kwargs):
            first = next((h["loss"] for h in state.log_history if "loss" in h), None)
            reason = divergence(logs or {}, first)
            if reason:
                raise diverged(what, f"at step {state.global_step}/{state.max_steps}", reason, LEARNING_RATE_KEY,
                               learning_rate)
            if logs and "loss" in logs:
                head = f"step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f}"
                say(f"{line(head, logs)}{self.time_left(state)}")

    return StepCallback()


def report_steps(trainer, callback) -> None:
    """The step lines of `callback` (step_callback) instead of Trainer's full dict per log."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(callback)


def fresh_checkpoints(directory: Path, stamp: str) -> Path | None:
    """The latest step checkpoint made under this exact config and input; stale ones are deleted."""
    from transformers.trainer_utils import get_last_checkpoint

    stamp_file = directory.parent / "checkpoints.config"
    if not stamp_file.is_file() or stamp_file.read_text() != stamp:
        shutil.rmtree(directory, ignore_errors=True)
        atomic_write_text(stamp_file, stamp)
    while directory.is_dir() and (last := get_last_checkpoint(str(directory))):
        try:  # Trainer writes trainer_state.json last: without a readable one the save was cut by a crash
            json.loads((Path(last) / "trainer_state.json").read_text())
            return last
        except (OSError, json.JSONDecodeError):
            shutil.rmtree(last, ignore_errors=True)
    return None


def checkpoint_step(checkpoint: str | Path) -> int:
    """The step a checkpoint of fresh_checkpoints was saved at."""
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]


def log_stats(history: list[dict], **means: str) -> dict:
    """The mean, first and last loss over the logged steps (a resumed run's history includes the steps before
    the crash), and the mean of each logged key in `means` (name=key, None when it was not logged)."""
    steps = [h for h in history if "loss" in h]

    def mean(key: str) -> float | None:
        return round(sum(h[key] for h in steps) / len(steps), 4) if steps and key in steps[0] else None

    return {"train_loss": mean("loss"), "first_loss": round(steps[0]["loss"], 4) if steps else None,
            "last_loss": round(steps[-1]["loss"], 4) if steps else None, **{name: mean(key) for name, key in means.items()}}
