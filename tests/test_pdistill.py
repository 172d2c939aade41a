"""stage=pdistill on the tiny models: the teacher is a policy tsalign's own DPO trained (pi_1 of the
experiment), the student pi_0; DCKD, ADPA and ADPA+DCKD end to end, the teacher cache written once and
reused, the student moving toward the teacher, a foreign tokenizer refused in one line, method= presets."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli, run_stage_inprocess, stage_config
from hydra.errors import ConfigCompositionException

from tsalign.artifacts.store import StageRun, atomic_write_jsonl, read_manifest, stage_dir
from tsalign.engines.models import load_causal_lm
from tsalign.errors import TsalignError
from tsalign.stages.lineage import base_model_dir

QA = [
    ("What is the capital of France?", "The capital of France is Paris.", "France is a country in Europe."),
    ("Name a primary colour.", "Red is a primary colour.", "I like turtles."),
    ("How many legs does a spider have?", "A spider has eight legs.", "Spiders are scary, avoid them."),
    ("What is 2 + 2?", "2 + 2 equals 4.", "It is a number."),
]
# pi_1: two DPO steps at a large learning rate, so the teacher really differs from pi_0
DPO = ["dpo.max_steps=2", "dpo.batch_size=2", "dpo.max_length=96", "dpo.save_steps=100", "optimizer.learning_rate=1e-3"]
FAST = ["pdistill.max_steps=3", "pdistill.batch_size=2", "pdistill.max_length=96", "pdistill.top_k=8",
        "optimizer.learning_rate=1e-3", "sampler.max_new_tokens=8"]


def pair(i: int, question: str, good: str, bad: str) -> dict:
    return {"prompt_id": f"p{i}", "prompt": [{"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": good}], "rejected": [{"role": "assistant", "content": bad}]}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    """An experiment `pd` with a finished rank (the hand-made pairs) and dpo (pi_1) at iteration 0, and
    `sharp`: pi_1 with its logits scaled up. Random tiny models are near-uniform over 49k tokens, so pi_1 and pi_0
    differ by ~1e-5 nats; the sharp teacher gives the KL and the advantage something to move."""
    out = tmp_path_factory.mktemp("pdistill") / "outputs"
    cfg = stage_config(out, ["stage=dpo", "experiment_name=pd", *DPO])
    rank = stage_dir(cfg.experiment_dir, 0, "rank")
    path = atomic_write_jsonl(rank / "pairs.jsonl", [pair(i, *qa) for i, qa in enumerate(QA)])
    StageRun(rank, "rank", 0, {"hand": "made"}).finish({"pairs": len(QA)}, {"pairs": path})
    run_stage_inprocess("dpo", out, ["experiment_name=pd", *DPO])
    pi_1 = out / "pd" / "iter_0" / "dpo" / "policy"
    sharp = load_causal_lm(pi_1)
    with torch.no_grad():
        sharp.model.norm.weight.mul_(40.0)  # the final norm feeds the (tied) head: logits x 40
    sharp.save_pretrained(out / "sharp")
    shutil.copy(pi_1 / "tokenizer.json", out / "sharp")
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        if (pi_1 / name).is_file():
            shutil.copy(pi_1 / name, out / "sharp")
    return out


def pdistill(outputs: Path, *overrides: str, name: str = "pd", teacher: str | None = None):
    """Every run reads pd's pairs; the teacher is the sharp pi_1 unless named; its own experiment (name) keeps
    the stage outputs apart; one teacher cache folder for all."""
    pd = outputs / "pd"
    common = [f"experiment_name={name}", f"pdistill.data={pd / 'iter_0/rank/pairs.jsonl'}",
              f"pdistill.teacher_policy={teacher or outputs / 'sharp'}",
              f"pdistill.cache_dir={outputs / '_teacher_cache'}", *FAST]
    return run_stage_inprocess("pdistill", outputs, [*common, *overrides])


def test_dckd_end_to_end_caches_the_teacher_once(outputs, capsys):
    cfg, m = pdistill(outputs, "method=dckd", name="dckd")
    c = m["counts"]
    assert m["config"]["teacher_policy_used"].endswith("sharp") and m["config"]["student_used"] == cfg.policy.name
    assert "reference" not in m["inputs"] and "teacher_policy" in m["inputs"]  # DCKD needs no reference
    assert c["pairs"] == c["pairs_used"] == 4 and c["dckd_steps"] == 3 and c["pairs_cache"] == "built"
    assert c["teacher_calls"] == 8  # the teacher ran over each pair's chosen and rejected answer
    # the student moved toward the teacher on the chosen answers (and fits them better)
    assert c["dckd_kl_chosen_after"] < c["dckd_kl_chosen_before"] - 0.1
    assert c["dckd_kl_rejected_after"] < c["dckd_kl_rejected_before"]
    policy = Path(cfg.experiment_dir) / "iter_0" / "pdistill" / "policy"
    new, old = load_causal_lm(policy).state_dict(), load_causal_lm(base_model_dir(cfg, cfg.policy)).state_dict()
    assert any(not torch.equal(new[k], old[k]) for k in new)

    cache = Path(m["teacher_caches"]["pairs"])
    meta = read_manifest(cache)
    assert meta["counts"]["sequences"] == 8 and meta["counts"]["top_k"] == 8
    assert meta["identity"]["teacher_policy"] == m["inputs"]["teacher_policy"]["sha256"]
    stamp = (cache / "teacher.safetensors").stat().st_mtime_ns

    capsys.readouterr()
    again = pdistill(outputs, "method=dckd", "pdistill.logging_steps=5", name="dckd")[1]  # bookkeeping: still done
    assert "skipped" in capsys.readouterr().out and again["started_at"] == m["started_at"]

    # another student run on the same teacher and pairs reuses the cache: the teacher is not run again
    other = pdistill(outputs, "method=dckd", "optimizer.learning_rate=5e-4", "redo=true", name="dckd")[1]
    assert other["counts"]["pairs_cache"] == "reused" and other["teacher_caches"] == m["teacher_caches"]
    assert (cache / "teacher.safetensors").stat().st_mtime_ns == stamp
    assert "teacher (chosen + rejected) cache reused" in capsys.readouterr().out


def test_evaluate_judges_the_pdistill_student_against_pi_0(outputs):
    """evaluate.policy_from=pdistill: the DCKD student answers the held-out prompts against pi_0 (no
    TS-Align student to score beside the judge)."""
    pdistill(outputs, "method=dckd", name="dckd_eval")
    _, m = run_stage_inprocess("evaluate", outputs, ["experiment_name=dckd_eval", "evaluate.policy_from=pdistill"])
    assert m["inputs"]["policy"]["path"].endswith("iter_0/pdistill/policy") and "student" not in m["inputs"]
    assert m["counts"]["n"] == 4 and m["counts"]["student_agreement"] is None
    with pytest.raises(ConfigCompositionException, match="evaluate.policy_from=sft"):  # an enum: refused at compose
        run_stage_inprocess("evaluate", outputs, ["experiment_name=dckd_eval", "evaluate.policy_from=sft"])


def test_adpa_and_adpa_dckd_run(outputs):
    _, a = pdistill(outputs, "method=adpa", name="adpa")
    c = a["counts"]
    assert a["config"]["teacher_reference_used"] and "dckd_steps" not in c and c["adpa_steps"] == 3
    assert c["greedy_cache"] == "built" and c["adpa_examples"] == 4
    assert c["adpa_expected_advantage_after"] > c["adpa_expected_advantage_before"]  # the student follows A
    greedy = read_manifest(Path(a["teacher_caches"]["greedy"]))
    assert greedy["counts"]["reference"] is True and greedy["counts"]["sequences"] == 4
    assert c["teacher_calls"] == 8  # teacher and reference over each of the 4 greedy answers

    _, both = pdistill(outputs, "method=adpa_dckd", name="adpa_dckd")
    c = both["counts"]
    assert c["dckd_steps"] == 3 and c["adpa_steps"] == 3
    assert c["greedy_cache"] == "reused"  # same student, teacher, reference and prompts as the ADPA run
    assert c["teacher_calls"] == 8 + 8  # both caches: what the method asks of its teachers, built or reused
    assert c["dckd_kl_chosen_after"] < c["dckd_kl_chosen_before"]


def test_teacher_pi_1_of_tsaligns_own_loop_and_the_positive_clip(outputs):
    """The teacher as the issue names it: the experiment's own DPO policy, with pi_0 as its reference."""
    _, m = pdistill(outputs, "method=adpa", "pdistill.advantage_clip=positive", "pdistill.max_steps=1", name="clip",
                    teacher="pd:pi_T")
    assert m["config"]["pdistill"]["advantage_clip"] == "positive"
    assert m["config"]["teacher_policy_used"] == "pd:pi_1" and m["config"]["teacher_reference_used"] == "tiny-llama"
    assert m["counts"]["adpa_expected_advantage_before"] >= 0  # max(A, 0): never negative


def test_a_teacher_with_another_tokenizer_is_refused_in_one_line(outputs, tmp_path):
    from transformers import AutoTokenizer

    cfg = stage_config(outputs, ["experiment_name=pd"])
    teacher = tmp_path / "foreign"
    shutil.copytree(outputs / "sharp", teacher)
    tok = AutoTokenizer.from_pretrained(teacher)
    tok.add_tokens(["<not_in_the_student>"])
    tok.save_pretrained(teacher)
    with pytest.raises(TsalignError) as info:
        pdistill(outputs, f"pdistill.teacher_policy={teacher}", name="foreign")
    msg = str(info.value)
    assert "\n" not in msg and "pdistill.teacher_policy" in msg and "tokenizer" in msg
    assert not (Path(cfg.paths.outputs) / "foreign" / "iter_0" / "pdistill" / "manifest.json").exists()

    # through the CLI: one line on stderr, exit 2
    done = run_cli(["stage=pdistill", "model=tiny", f"paths.outputs={outputs}", "experiment_name=foreign",
                    f"pdistill.data={outputs / 'pd' / 'iter_0/rank/pairs.jsonl'}", f"pdistill.teacher_policy={teacher}",
                    *FAST])
    assert done.returncode == 2
    assert done.stderr.strip().startswith("tsalign: error: pdistill.teacher_policy") and "\n" not in done.stderr.strip()


def test_model_references_and_their_errors(outputs, tmp_path):
    from tsalign.stages.pdistill.sources import model_ref

    cfg = stage_config(outputs, ["experiment_name=pd", "pdistill.teacher_policy=pi_T"])
    folder, label = model_ref(cfg, "teacher_policy")
    assert label == "pi_1" and folder == outputs.resolve() / "pd" / "iter_0" / "dpo" / "policy"
    assert model_ref(cfg, "student") == (None, cfg.policy.name)  # pi_0: the base policy
    for value, needle in (("pi_2", "iter_1/dpo is not finished"), ("nowhere:pi_T", "no finished dpo stage"),
                          (str(tmp_path), "not a model folder")):
        cfg = stage_config(outputs, ["experiment_name=pd", f"pdistill.teacher_policy={value}"])
        with pytest.raises(TsalignError, match=needle):
            model_ref(cfg, "teacher_policy")


def test_a_reward_model_is_not_a_teacher(outputs):
    """A sequence classifier cannot give token distributions: refused before any model loads."""
    cfg = stage_config(outputs, ["experiment_name=pd"])
    from tsalign.stages.factory import student_base_dir

    rm = student_base_dir(cfg)
    with pytest.raises(TsalignError, match="is not a causal LM"):
        pdistill(outputs, f"pdistill.teacher_policy={rm}", name="rm")


@pytest.mark.parametrize("method,loss", [("dckd", "dckd"), ("adpa", "adpa"), ("adpa_dckd", "adpa_dckd")])
def test_method_presets_set_the_loss(compose, method, loss):
    cfg = compose([f"method={method}", "stage=pdistill"])
    assert cfg.pdistill.loss == loss and cfg.pdistill.top_k == 50 and cfg.pdistill.ce_weight == 1.0
    assert compose(["method=ts_align"]).pdistill == compose([]).pdistill  # the default changes nothing


def test_collate_aligns_teacher_rows_with_the_predicting_positions():
    from tsalign.stages.pdistill.data import Example
    from tsalign.stages.pdistill.teacher_cache import Sequence
    from tsalign.stages.pdistill.trainer import collate

    k = 2
    rows = lambda n, v: {"ids": torch.full((n, k), v, dtype=torch.int32), "probs": torch.full((n, k), 0.25),  # noqa: E731
                         "rest": torch.full((n,), 0.5)}
    chosen, other = Sequence([1, 2, 3, 4], 2), Sequence([1, 2, 5], 1)
    batch = collate([Example(chosen, rows(2, 7), other, rows(2, 9))], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [1, 2, 5, 0]]
    # logits at t predict token t + 1: the response tokens 3, 4 are predicted at t = 1, 2
    assert batch["mask"].tolist() == [[False, True, True], [True, True, False]]
    assert batch["targets"][0, 1:].tolist() == [3, 4]
    assert batch["teacher_ids"][0, :, 0].tolist() == [0, 7, 7] and batch["teacher_ids"][1, :, 0].tolist() == [9, 9, 0]

