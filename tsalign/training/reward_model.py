"""Training a reward model on preference pairs with the Bradley-Terry loss (tsalign.algorithms.losses).

Used by `distill` (student_t -> student_{t+1} on the teacher's pairs) and to fit a teacher once on
human pairs. A small loop of our own rather than TRL's RewardTrainer: RewardTrainer silently drops
pairs longer than max_length, while here prompts are cut from the left, responses kept, and every
cut is counted; the loss is the same -log sigmoid(r_c - r_r [- margin]).
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import torch

from tsalign import distributed
from tsalign.algorithms.losses import bradley_terry_loss, pairwise_accuracy
from tsalign.algorithms.pairs import pairs_longer_wins, response_text
from tsalign.artifacts.locks import cache_lock
from tsalign.artifacts.store import atomic_dir, atomic_write_json, config_hash, fingerprint
from tsalign.engines.models import load_reward_model, load_tokenizer
from tsalign.engines.scoring.reward_model import RewardModelScorer, collate, encode_pair_text
from tsalign.progress import progress, say
from tsalign.training.divergence import check_weights, diverged, divergence, largest_weight

log = logging.getLogger(__name__)


def train_reward_model(model_dir: Path, out_dir: Path, pairs: list[dict], *, epochs: int = 1, batch_size: int = 8,
                       learning_rate: float = 2e-5, max_length: int = 256, seed: int = 0, use_margin: bool = False,
                       device: str = "cpu", on_step=None, init_seed: int | None = None,
                       lr_key: str = "learning_rate", what: str = "reward model training",
                       data_parallel: bool = False) -> dict:
    """Fine-tune the reward model in `model_dir` on `pairs` and save it to `out_dir` (atomically).
    `init_seed` seeds a new reward head (default: `seed`); `seed` the shuffles and dropout. A diverging
    run (tsalign.training.divergence) stops with an error naming `lr_key`, the config key of `learning_rate`,
    and saves nothing. With `data_parallel` under `accelerate launch`, each process takes a slice of every
    batch and DDP averages the gradients: the same steps as one process with the same batch_size."""
    tokenizer = load_tokenizer(model_dir)
    model = load_reward_model(model_dir, device=device, seed=seed if init_seed is None else init_seed)
    model.config.pad_token_id = tokenizer.pad_token_id
    largest_before = largest_weight(model)
    encoded, truncated, identical = [], 0, 0
    for p in pairs:
        c, cut_c = encode_pair_text(tokenizer, p["prompt"], response_text(p["chosen"]), max_length)
        r, cut_r = encode_pair_text(tokenizer, p["prompt"], response_text(p["rejected"]), max_length)
        truncated += cut_c or cut_r
        if c["input_ids"] == r["input_ids"]:
            identical += 1  # no signal left to learn from
            continue
        encoded.append((c, r, float(p.get("margin", 0.0) or 0.0)))
    steps_per_epoch = (len(encoded) + batch_size - 1) // batch_size
    total = max(steps_per_epoch * epochs, 1)
    parallel = data_parallel and distributed.launched()
    net = data_parallel_model(model, device) if parallel else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / total))
    torch.manual_seed(seed)
    model.train()
    losses, t0, step = [], time.time(), 0
    with progress(total, what, "step") as bar:  # the one-time teacher fit takes minutes on CPU
        for epoch in range(epochs):
            order = list(range(len(encoded)))
            random.Random(seed + epoch).shuffle(order)
            for start in range(0, len(order), batch_size):
                batch = [encoded[i] for i in order[start : start + batch_size]]
                batch, weight = process_share(batch) if parallel else (batch, 1.0)
                inputs = collate(tokenizer, [b[0] for b in batch] + [b[1] for b in batch], device)
                rewards = net(**inputs).logits[:, 0]
                margin = torch.tensor([b[2] for b in batch], device=device) if use_margin else None
                loss = bradley_terry_loss(rewards[: len(batch)], rewards[len(batch) :], margin)
                (loss * weight * (distributed.world_size() if parallel else 1)).backward()  # DDP divides by it
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                batch_loss = distributed.mean_over_processes(loss.item(), weight) if parallel else loss.item()
                values = {"loss": batch_loss, "grad_norm": grad_norm.item()}  # the same on every process
                reason = divergence(values, losses[0] if losses else values["loss"])
                if reason:
                    raise diverged(what, f"at step {step + 1}/{total}", reason, lr_key, learning_rate)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad()
                losses.append(batch_loss)
                step += 1
                bar.update(1, loss=round(losses[-1], 4))
                if on_step:
                    on_step(step, {"loss": losses[-1], "lr": schedule.get_last_lr()[0], "epoch": epoch})
    model.eval()
    check_weights(model, what, lr_key, learning_rate, largest_before)
    if not parallel or distributed.is_main():  # replicas are identical: one process writes
        with atomic_dir(out_dir) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    last = losses[-steps_per_epoch:] if losses else []
    return {"train_pairs": len(encoded), "dropped_identical": identical, "truncated_pairs": truncated,
            "steps": step, "loss_first": losses[0] if losses else None, "loss_last_epoch": sum(last) / len(last)
            if last else None, "train_s": round(time.time() - t0, 1)}


def process_share(batch: list) -> tuple[list, float]:
    """This process's slice of a global batch, and its share of the batch's pairs (the loss weight).
    A process left without a pair (a last batch smaller than the world) runs one pair at weight 0, since
    DDP needs every process in every backward pass."""
    mine = batch[distributed.rank() :: distributed.world_size()]
    return (mine, len(mine) / len(batch)) if mine else (batch[:1], 0.0)


def data_parallel_model(model, device: str):
    """The model in torch DDP over accelerate's process group (gloo on CPU, NCCL on GPUs)."""
    from torch.nn.parallel import DistributedDataParallel

    distributed.state()
    return DistributedDataParallel(model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)


def pair_accuracy(model_dir: Path, pairs: list[dict], max_length: int = 256, device: str = "cpu",
                  seed: int = 0, cache: Path | None = None) -> dict:
    """Accuracy of a reward model on pairs (chosen above rejected), beside the 'longer answer wins' rule."""
    prompts = [p["prompt"] for p in pairs]
    texts = [response_text(p["chosen"]) for p in pairs] + [response_text(p["rejected"]) for p in pairs]
    scores = known_scores(model_dir, prompts + prompts, texts, max_length, device, seed, cache)
    chosen, rejected = scores[: len(pairs)], scores[len(pairs) :]
    return {"pairs": len(pairs), "accuracy": pairwise_accuracy(chosen, rejected), "longer_wins": pairs_longer_wins(pairs)}


def label_scores(model_dir: Path, rows: list[dict], max_length: int = 256, device: str = "cpu",
                 seed: int = 0, cache: Path | None = None) -> list[float]:
    """A reward model's score of each labelled response (rows of tsalign.data.load_human_labels)."""
    return known_scores(model_dir, [r["prompt"] for r in rows], [r["response"] for r in rows], max_length, device,
                        seed, cache)


def known_scores(model_dir: Path, prompts: list, responses: list[str], max_length: int, device: str, seed: int,
                 cache: Path | None = None) -> list[float]:
    """A reward model's scores of (prompt, response) texts. With `cache` they are kept under <cache>/reward_scores,
    keyed by the model's content and the texts: a model scored on a fixed set before (distill's student before
    training is the configured student of every run, or the previous iteration's student after) is not scored
    again."""
    if cache is not None:
        key = config_hash([fingerprint(model_dir, cache), prompts, responses, max_length, seed, device])
        path = Path(cache) / "reward_scores" / f"{key}.json"
        try:
            kept = json.loads(path.read_text())["scores"]
            if len(kept) == len(responses):
                return kept
        except (OSError, ValueError, KeyError, TypeError):
            pass
    scorer = RewardModelScorer(model_dir, device=device, max_length=max_length, seed=seed)
    try:
        scores = scorer.score_texts(prompts, responses)
    finally:
        scorer.close()
    if cache is not None:
        atomic_write_json(path, {"model": str(model_dir), "texts": len(responses), "scores": scores})
    return scores


def fit_pairs(fit: dict, cache_dir: Path) -> tuple[list[dict], list[dict]]:
    """A fit recipe's (train, held_out) human pairs: its train_range share of what the hold-out leaves."""
    from tsalign.data import load_human_pairs, split_pairs, train_slice

    train, held_out = split_pairs(load_human_pairs(fit["data"], cache_dir), fit["holdout"], fit["seed"])
    return train_slice(train, fit.get("train_range", (0.0, 1.0))), held_out


def fitted_reward_model(base_dir: Path, fit: dict, cache_dir: Path, name: str, device: str = "cpu",
                        head_seed: int = 0, role: str = "teacher") -> Path:
    """A reward model fitted once on human pairs (the CPU teacher, and student_0); cached by its recipe."""
    data = Path(str(fit["data"])).expanduser()
    key = [str(base_dir), fit, head_seed] + ([fingerprint(data)] if data.is_file() else [])  # a local file: its content
    out = Path(cache_dir) / "fitted" / f"{name}-{config_hash(key)}"
    if (out / "fit_report.json").is_file():
        return out
    with cache_lock(out, f"the fit of {role} '{name}'"):  # sweep jobs on an empty cache: one fits, the others wait
        if (out / "fit_report.json").is_file():  # fitted by another process meanwhile
            return out
        train, held_out = fit_pairs(fit, cache_dir)
        log.info("fitting %s on %d human pairs (once; cached in %s)", name, len(train), out)
        say(f"[tsalign] fitting reward model '{name}' on {len(train)} human pairs (once, cached in {out})")
        report = {"recipe": fit, "base": str(base_dir)}
        report["before"] = pair_accuracy(base_dir, held_out, fit["max_length"], device, head_seed)
        report["train"] = train_reward_model(base_dir, out, train, epochs=fit["epochs"], batch_size=fit["batch_size"],
                                             learning_rate=fit["learning_rate"], max_length=fit["max_length"],
                                             seed=head_seed, device=device, lr_key=f"{role}.fit.learning_rate",
                                             what=f"the fit of {role} '{name}'")
        report["held_out"] = pair_accuracy(out, held_out, fit["max_length"], device)
        atomic_write_json(out / "fit_report.json", report)  # last: marks the fit complete
        say(f"[tsalign] {name}: held-out accuracy {report['before']['accuracy']:.2f} -> "
              f"{report['held_out']['accuracy']:.2f} on {len(held_out)} human pairs "
              f"(longer-answer-wins: {report['held_out']['longer_wins']:.2f})")
    return out
