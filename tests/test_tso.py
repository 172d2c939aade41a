"""method=tso end to end on the tiny models: two iterations of generate -> rank -> distill -> dpo, with
pi_0 in the model matrix from t = 1, the reference answers, preference correction, dual-clip DPO and
reference refresh all active (tsalign/stages/matrix.py, rank.correction, tsalign/training/dpo_trainer.py)."""

from __future__ import annotations

from pathlib import Path

from conftest import run_stage_inprocess

from tsalign.artifacts.store import read_jsonl, stage_dir

TSO = ["method=tso", "experiment_name=tso", "dpo.max_steps=2", "dpo.batch_size=2", "dpo.max_length=96",
       "dpo.reference_refresh_steps=1", "optimizer.learning_rate=1e-3", "distill.epochs=1"]


def test_tso_runs_two_iterations(tmp_path):
    out = tmp_path / "outputs"
    manifests = {}
    for t in (0, 1):
        for stage in ("generate", "rank", "distill", "dpo"):
            cfg, manifests[t, stage] = run_stage_inprocess(stage, out, [*TSO, f"iteration={t}"])
    exp = Path(cfg.experiment_dir)
    k = cfg.generate.num_candidates
    for t, matrix in ((0, 0), (1, cfg.generate.matrix_candidates)):  # pi_0 joins the matrix from t = 1
        rows = read_jsonl(stage_dir(exp, t, "generate") / "candidates.jsonl")
        sources = [c.get("source", "policy") for c in rows[0]["candidates"]]
        assert sources == ["policy"] * k + ["pi_0"] * matrix + ["reference"]
        assert manifests[t, "rank"]["config"]["rank"]["correction"] == "override"
        assert manifests[t, "dpo"]["config"]["dpo"]["loss_type"] == "dual_clip"
        assert manifests[t, "dpo"]["counts"]["steps"] == 2
    assert manifests[1, "dpo"]["policy"] == "pi_1"
