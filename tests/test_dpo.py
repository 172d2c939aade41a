"""The dpo stage on the tiny policy: TRL's token layout, end to end, reference, LoRA, resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf

import tsalign.cli
from tsalign.algorithms.pairs import chat_len, fit_pair, to_trl_row
from tsalign.artifacts.store import StageRun, atomic_write_jsonl, read_manifest, stage_dir
from tsalign.engines.models import load_causal_lm, load_tokenizer
from tsalign.errors import TsalignError
from tsalign.pipeline.runner import run_stage
from tsalign.stages import dpo
from tsalign.stages.lineage import base_model_dir
from tsalign.training.dpo_trainer import trained_dtype

FAST = ["dpo.max_steps=2", "dpo.batch_size=2", "dpo.max_length=96", "dpo.save_steps=100",
        "optimizer.learning_rate=1e-3"]

QA = [
    ("What is the capital of France?", "The capital of France is Paris.", "France is a country in Europe."),
    ("Name a primary colour.", "Red is a primary colour.", "I like turtles."),
    ("How many legs does a spider have?", "A spider has eight legs.", "Spiders are scary, avoid them."),
    ("What is 2 + 2?", "2 + 2 equals 4.", "It is a number."),
    ("Give one word for happy.", "Joyful.", "Sad."),
    ("Which planet is closest to the sun?", "Mercury is the closest planet to the sun.", "Mars, probably."),
]


def make_pair(i: int, question: str, good: str, bad: str) -> dict:
    return {"prompt_id": f"p{i}", "prompt": [{"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": good}],
            "rejected": [{"role": "assistant", "content": bad}],
            "margin": 1.5, "teacher": "hand-made", "chosen_score": 2.0, "rejected_score": 0.5}


def config(tmp_path: Path, *overrides: str):
    with hydra.initialize_config_dir(config_dir=tsalign.cli.CONF_DIR, version_base="1.3"):
        cfg = hydra.compose("config", ["model=tiny", f"paths.outputs={tmp_path / 'outputs'}", "stage=dpo",
                                       *FAST, *overrides])
    OmegaConf.set_readonly(cfg, False)
    return tsalign.cli.configure(cfg)


def write_pairs(cfg, iteration: int = 0, pairs: list[dict] | None = None) -> Path:
    """A finished rank stage of `iteration` holding `pairs` (default: the six hand-made ones)."""
    rank = stage_dir(cfg.experiment_dir, iteration, "rank")
    rows = [make_pair(i, *qa) for i, qa in enumerate(QA)] if pairs is None else pairs
    path = atomic_write_jsonl(rank / "pairs.jsonl", rows)
    StageRun(rank, "rank", iteration, {"hand": "made"}).finish({"pairs": len(rows)}, {"pairs": path})
    return path


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_causal_lm(model_dir).state_dict()


def test_full_dpo_keeps_fp32_master_weights(tmp_path):
    """bf16 policies train full DPO on fp32 weights (bf16 only as autocast); LoRA keeps the base as given."""
    assert trained_dtype(config(tmp_path, "policy.dtype=bfloat16")) == "float32"
    assert trained_dtype(config(tmp_path, "policy.dtype=bfloat16", "dpo.lora=true")) == "bfloat16"


@pytest.mark.parametrize("overrides, reference", [((), "pi_t"), (("dpo.reference=initial",), "pi_0"),
                                                 (("dpo.lora=true",), None)])
def test_reference_model_is_held_in_the_policy_dtype_under_every_setting(tmp_path, overrides, reference):
    """Full DPO loads its own reference in policy.dtype (TRL would copy the fp32 master weights: 32 GB
    instead of 16 for an 8B policy); LoRA has none (the adapter is disabled)."""
    cfg = config(tmp_path, "policy.dtype=bfloat16", *overrides)
    pi_t = tmp_path / "pi_t"
    folder, dtype = dpo.reference_model(cfg, pi_t)
    expected = {"pi_t": pi_t, "pi_0": base_model_dir(cfg, cfg.policy), None: None}[reference]
    assert folder == expected and dtype == "bfloat16"


def test_full_dpo_trains_fp32_against_a_bf16_reference(tmp_path, monkeypatch):
    """On a GPU policy.dtype=bfloat16 reaches the loader (on CPU tsalign loads float32: let it through
    here): the trained copy is fp32, the reference TRL uses is the bf16 one loaded by the stage."""
    import tsalign.engines.models

    monkeypatch.setattr(tsalign.engines.models, "torch_dtype", lambda name, device: getattr(torch, str(name)))
    seen = {}
    make = dpo.make_trainer

    def spy(cfg, model, ref_model, *args):
        trainer = make(cfg, model, ref_model, *args)
        seen.update(policy=trainer.model.dtype, reference=trainer.ref_model.dtype)
        return trainer

    monkeypatch.setattr(dpo, "make_trainer", spy)
    cfg = config(tmp_path, "policy.dtype=bfloat16", "dpo.max_steps=1")
    write_pairs(cfg)
    manifest = run_stage(cfg, "dpo")
    assert seen == {"policy": torch.float32, "reference": torch.bfloat16}
    assert manifest["reference_dtype"] == "bfloat16"


def test_token_layout_of_one_pair_under_the_chat_template(tmp_path):
    """Tokenized by DPOTrainer itself: the prompt ends on the assistant header, each response continues
    it and ends with exactly one <|im_end|>, and prompt+response is the templated conversation."""
    cfg = config(tmp_path)
    model_dir = base_model_dir(cfg, cfg.policy)
    tok = load_tokenizer(model_dir)
    row = to_trl_row(make_pair(0, *QA[0]))
    from datasets import Dataset

    args = dpo.training_args(cfg, tmp_path / "ckpt", "cpu", [])
    trainer = dpo.make_trainer(cfg, load_causal_lm(model_dir), None, tok, Dataset.from_list([row]), args)
    ex = trainer.train_dataset[0]
    assert {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(ex)
    dec = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
    prompt, chosen, rejected = dec(ex["prompt_ids"]), dec(ex["chosen_ids"]), dec(ex["rejected_ids"])
    assert prompt.endswith("<|im_start|>assistant\n")
    assert prompt.count("<|im_start|>") == 3  # default system + user + assistant header, no extra BOS
    for resp, text in ((chosen, QA[0][1]), (rejected, QA[0][2])):
        assert resp.startswith(text)
        assert resp.rstrip("\n").endswith("<|im_end|>") and resp.count("<|im_end|>") == 1
        assert "<|im_start|>" not in resp
    assert ex["chosen_ids"].count(tok.eos_token_id) == 1 and ex["prompt_ids"][0] == tok.bos_token_id
    assert ex["prompt_ids"][1] != tok.bos_token_id and ex["chosen_ids"][0] != tok.bos_token_id  # no 2nd BOS
    full = tok.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
    assert (prompt + chosen).rstrip("\n") == full.rstrip("\n")
    # the collator puts the whole response, and only it, under the completion mask
    batch = trainer.data_collator([ex])
    assert batch["completion_mask"][0].sum().item() == len(ex["chosen_ids"])


def test_long_prompt_is_cut_from_the_left_and_the_response_kept(tmp_path):
    cfg = config(tmp_path)
    tok = load_tokenizer(base_model_dir(cfg, cfg.policy))
    question = " ".join(f"word{i}" for i in range(300)) + " THE QUESTION: what is 2 + 2?"
    row = to_trl_row(make_pair(0, question, "2 + 2 equals 4.", "Five."))
    fitted, cut = fit_pair(tok, row, max_length=64)
    assert cut == {"prompt_cut": True, "response_cut": False}
    assert fitted["prompt"][-1]["content"].endswith("THE QUESTION: what is 2 + 2?")
    assert "word0 " not in fitted["prompt"][-1]["content"]
    assert fitted["chosen"] == row["chosen"]
    assert chat_len(tok, fitted["prompt"] + fitted["chosen"]) <= 64
    # multi-turn: the oldest turns go whole, the system message stays
    turns = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        turns += [{"role": "user", "content": f"old question {i} " * 20},
                  {"role": "assistant", "content": "ok " * 20}]
    turns.append({"role": "user", "content": "Last question?"})
    fitted, cut = fit_pair(tok, {**row, "prompt": turns}, max_length=96)
    assert cut["prompt_cut"] and fitted["prompt"][0] == turns[0] and fitted["prompt"][-1] == turns[-1]
    assert fitted["prompt"][1]["role"] == "user" and chat_len(tok, fitted["prompt"] + row["chosen"]) <= 96
    short = to_trl_row(make_pair(0, *QA[0]))
    assert fit_pair(tok, short, 96) == (short, {"prompt_cut": False, "response_cut": False})


def test_dpo_end_to_end_then_skipped(tmp_path, capsys):
    cfg = config(tmp_path)
    write_pairs(cfg)
    manifest = run_stage(cfg, "dpo")
    out = Path(cfg.experiment_dir) / "iter_0" / "dpo"
    c = manifest["counts"]
    assert c["pairs"] == c["trained_pairs"] == 6 and c["steps"] == 2 and c["resumed_from_step"] == 0
    assert c["prompts_cut"] == 0 and c["responses_cut"] == 0
    assert c["first_loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1
    assert c["train_loss"] > 0 and c["s_per_step"] > 0 and c["reward_accuracy_mean"] is not None
    assert manifest["reference"] == "previous" and manifest["reference_model"] == cfg.policy.name
    assert manifest["config"]["reference_used"] == cfg.policy.name and "pairs" in manifest["inputs"]
    assert not (out / "_work").exists()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy = out / "policy"
    assert (policy / "generation_config.json").is_file() and (policy / "config.json").is_file()
    AutoModelForCausalLM.from_pretrained(policy)
    assert AutoTokenizer.from_pretrained(policy).chat_template
    new, old = weights(policy), weights(base_model_dir(cfg, cfg.policy))
    assert new.keys() == old.keys()
    assert json.loads((policy / "config.json").read_text())["use_cache"] is True  # Trainer turned it off
    assert any(not torch.equal(new[k], old[k]) for k in new)

    capsys.readouterr()
    again = run_stage(config(tmp_path, "dpo.save_steps=7"), "dpo")  # bookkeeping only: still done
    assert "skipped" in capsys.readouterr().out and again["started_at"] == manifest["started_at"]


def test_reference_initial_and_next_iteration(tmp_path):
    """reference=initial loads pi_0 as ref_model; at t=1 the trained policy is pi_1 from iter_0."""
    cfg = config(tmp_path, "dpo.max_steps=1", "dpo.reference=initial")
    write_pairs(cfg, 0)
    m0 = run_stage(cfg, "dpo")
    base = str(base_model_dir(cfg, cfg.policy))
    assert m0["reference"] == "initial" and m0["reference_dir"] == base and m0["counts"]["steps"] == 1

    cfg1 = config(tmp_path, "dpo.max_steps=1", "dpo.reference=initial", "iteration=1")
    write_pairs(cfg1, 1)
    m1 = run_stage(cfg1, "dpo")
    assert m1["policy"] == "pi_1" and m1["policy_dir"].endswith("iter_0/dpo/policy")
    assert m1["reference_dir"] == base and m1["reference_model"] == cfg.policy.name
    assert "policy" in m1["inputs"]
    assert m1["counts"]["first_loss"] != pytest.approx(0.6931, abs=1e-4)  # pi_1 != pi_0: the ref is not pi_t


def test_lora_merges_into_a_plain_checkpoint(tmp_path):
    cfg = config(tmp_path, "dpo.max_steps=1", "dpo.lora=true", "dpo.lora_r=4")
    write_pairs(cfg)
    m = run_stage(cfg, "dpo")
    policy = Path(cfg.experiment_dir) / "iter_0" / "dpo" / "policy"
    assert not (policy / "adapter_config.json").exists() and (policy / "config.json").is_file()
    assert m["lora"] is True and "adapter disabled" in m["reference_model"]
    new, old = weights(policy), weights(base_model_dir(cfg, cfg.policy))
    assert new.keys() == old.keys() and not any("lora" in k for k in new)
    changed = {k for k in new if not torch.equal(new[k], old[k])}
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)


class Crash(Exception):
    pass


def test_interrupted_dpo_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    from transformers import TrainerCallback

    class CrashAfterStep2(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:  # checkpoint-2 is on disk by now
                raise Crash()

    class CountSteps(TrainerCallback):
        def __init__(self):
            self.steps, self.saved = [], []

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

        def on_save(self, args, state, control, **kwargs):
            self.saved.append(state.global_step)

    make = dpo.make_trainer

    def with_callback(callback):
        def wrapped(*a, **k):
            trainer = make(*a, **k)
            trainer.add_callback(callback)
            return trainer
        return wrapped

    cfg = config(tmp_path, "dpo.max_steps=4", "dpo.save_steps=2", "dpo.batch_size=1")
    write_pairs(cfg)
    out = Path(cfg.experiment_dir) / "iter_0" / "dpo"
    monkeypatch.setattr(dpo, "make_trainer", with_callback(CrashAfterStep2()))
    with pytest.raises(Crash):
        run_stage(cfg, "dpo")
    assert read_manifest(out) is None
    state = json.loads((out / "_work" / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2

    counter = CountSteps()
    monkeypatch.setattr(dpo, "make_trainer", with_callback(counter))
    m = run_stage(config(tmp_path, "dpo.max_steps=4", "dpo.save_steps=2", "dpo.batch_size=1"), "dpo")
    assert counter.steps == [3, 4] and counter.saved == []  # no checkpoint of the last step: policy/ is saved
    assert m["counts"]["steps"] == 4 and m["counts"]["resumed_from_step"] == 2
    assert not (out / "_work").exists() and (out / "policy" / "config.json").is_file()


def test_stale_checkpoints_of_another_config_are_not_resumed(tmp_path):
    cfg = config(tmp_path)
    write_pairs(cfg)
    ckpt = Path(cfg.experiment_dir) / "iter_0" / "dpo" / "_work" / "checkpoints"
    (ckpt / "checkpoint-7").mkdir(parents=True)
    (ckpt.parent / "checkpoints.config").write_text("another config")
    assert run_stage(cfg, "dpo")["counts"]["resumed_from_step"] == 0


def test_zero_pairs_is_a_clear_error(tmp_path):
    cfg = config(tmp_path)
    write_pairs(cfg, pairs=[])
    with pytest.raises(TsalignError, match="no preference pairs in .*pairs.jsonl; rank mined none"):
        run_stage(cfg, "dpo")


def first_batch(cfg, tmp_path):
    """DPOTrainer of this stage on the first hand-made pair, and its collated batch."""
    from datasets import Dataset

    model_dir = base_model_dir(cfg, cfg.policy)
    args = dpo.training_args(cfg, tmp_path / "ckpt", "cpu", [])
    trainer = dpo.make_trainer(cfg, load_causal_lm(model_dir), load_causal_lm(model_dir), load_tokenizer(model_dir),
                               Dataset.from_list([to_trl_row(make_pair(0, *QA[0]))]), args)
    return trainer, trainer.data_collator([trainer.train_dataset[0]])


@pytest.mark.parametrize("low, high", [(0.5, 1.0), (-1.0, 1.0)])
def test_dual_clip_is_trls_sigmoid_loss_with_a_clipped_margin(tmp_path, low, high):
    """At the start policy == reference, so the margin is 0: clipped to [0.5, 1] the loss is
    -log sigmoid(0.5) and no gradient flows; inside [-1, 1] it is plain DPO's log 2, with gradients."""
    cfg = config(tmp_path, "dpo.loss_type=dual_clip", f"dpo.dual_clip=[{low},{high}]")
    trainer, batch = first_batch(cfg, tmp_path)
    assert type(trainer).__name__ == "DualClipDPOTrainer"
    loss = trainer.compute_loss(trainer.model, batch)
    expected = -torch.nn.functional.logsigmoid(torch.tensor(0.0).clamp(low, high))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    loss.backward()
    grad = sum(p.grad.abs().sum().item() for p in trainer.model.parameters() if p.grad is not None)
    assert (grad == 0.0) == (low > 0)
    import trl.trainer.dpo_trainer as trl_dpo

    assert trl_dpo.F is torch.nn.functional  # restored after the loss


def test_dual_clip_bounds_are_checked(tmp_path):
    with pytest.raises(TsalignError, match="low < high"):
        dpo.training_args(config(tmp_path, "dpo.loss_type=dual_clip", "dpo.dual_clip=[1,1]"), tmp_path, "cpu", [])


def test_reference_refresh_makes_the_reference_the_current_policy(tmp_path, monkeypatch):
    """dpo.reference_refresh_steps=1 (TSO): after the last step the reference holds the trained weights;
    without it the reference stays pi_0."""
    trainers = []
    make = dpo.make_trainer
    monkeypatch.setattr(dpo, "make_trainer", lambda *a: trainers.append(make(*a)) or trainers[-1])
    for name, extra in (("refresh", ["dpo.reference_refresh_steps=1"]), ("fixed", [])):
        cfg = config(tmp_path, f"experiment_name={name}", "dpo.reference=initial", *extra)
        write_pairs(cfg, 0)
        run_stage(cfg, "dpo")
    for trainer, refreshed in zip(trainers, (True, False)):
        same = all(torch.equal(p, r) for p, r in zip(trainer.model.parameters(), trainer.ref_model.parameters()))
        assert same == refreshed
    with pytest.raises(TsalignError, match="reference_refresh_steps"):
        dpo.training_args(config(tmp_path, "dpo.reference_refresh_steps=2", "dpo.lora=true"), tmp_path, "cpu", [])
