"""`make compare`: TS-Align, TSO, DCKD, ADPA and ADPA+DCKD on the same prompts, judged alike, in one table.

    python benchmarks/compare_methods.py                      # the embedded default (~35 min on 2 cores)
    python benchmarks/compare_methods.py --quick              # every method at toy sizes: a smoke run
    python benchmarks/compare_methods.py --methods ts_align,dckd --set policy=tiny teacher=tiny student=tiny
    python benchmarks/compare_methods.py --render             # the table again, from the JSON

Every method starts from pi_0, trains on the same prompts (data.prompts_per_iteration, one iteration) and is
judged on the same held-out prompts (data.eval_prompts) by the same judge (the training teacher, unless
--set evaluate.judge=... names another) against the same pi_0 answers, with the same control:
- ts_align   `tsalign stage=loop iterations=1`: generate -> rank -> distill -> dpo -> evaluate
- tso        the same with method=tso (model matrix, reference answers, preference correction, dual-clip DPO)
- dckd, adpa, adpa_dckd   `tsalign stage=pdistill method=<m>` with ts_align's pi_1 as the aligned teacher pi_T
             (pi_0 its reference) on ts_align's pairs, then `tsalign stage=evaluate evaluate.policy_from=pdistill`
Columns: the judge's win rate vs pi_0 with its paired-bootstrap interval, the length-controlled win rate, the
paired difference of mean teacher reward with its interval, the control (pi_0 vs pi_0), the wall time of the
training stages (evaluate apart; a policy-distillation row needs ts_align's run first for its teacher, whose
time is not in the row), and what each method asked of a teacher: reward-teacher verdicts for ts_align / tso
(rank's teacher_calls), sequences a teacher LM ran over for the policy distillations (pdistill's teacher_calls:
the aligned teacher on each chosen + rejected answer, and for ADPA teacher + reference on each greedy answer).
Outputs under outputs/_compare (kept: a rerun skips finished stages, as tsalign does); JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench import PY, QUICK, measure  # noqa: E402

METHODS = ("ts_align", "tso", "dckd", "adpa", "adpa_dckd")
LOOP_METHODS = ("ts_align", "tso")
TRAINING_STAGES = ("generate", "rank", "distill", "dpo", "pdistill")
QUICK_OVERRIDES = (*QUICK.e2e_overrides, "pdistill.max_steps=2", "pdistill.max_length=192")


def read_manifest(experiment: Path, stage: str) -> dict | None:
    path = experiment / "iter_0" / stage / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


class Compare:
    def __init__(self, a: argparse.Namespace):
        self.root = (REPO / a.outputs).resolve()
        self.logs = self.root / "logs"
        self.common = [*(QUICK_OVERRIDES if a.quick else ()), *a.set]
        self.sampler = a.sampler

    def tsalign(self, label: str, overrides: list[str]) -> dict:
        return measure(label, [PY, "-m", "tsalign.cli", f"paths.outputs={self.root}", f"sampler={self.sampler}",
                               *self.common, *overrides], self.logs)

    def experiment(self, method: str) -> Path:
        return self.root / f"cmp_{method}"

    def commands(self, method: str) -> list[tuple[str, list[str]]]:
        """(label, tsalign overrides) of each command a method runs, in order."""
        loop = lambda m: (m, ["stage=loop", "iterations=1", f"method={m}", f"experiment_name=cmp_{m}"])  # noqa: E731
        if method in LOOP_METHODS:
            return [loop(method)]
        teacher = self.experiment("ts_align")
        first = [] if read_manifest(teacher, "dpo") else [loop("ts_align")]  # the aligned teacher pi_T
        name = [f"experiment_name=cmp_{method}", "iteration=0"]
        return [*first,
                (method, ["stage=pdistill", f"method={method}", *name, "pdistill.teacher_policy=cmp_ts_align:pi_1",
                          f"pdistill.data={teacher / 'iter_0' / 'rank' / 'pairs.jsonl'}"]),
                (f"{method}_evaluate", ["stage=evaluate", "evaluate.policy_from=pdistill", *name])]

    def run(self, method: str) -> dict:
        return self.row(method, [self.tsalign(label, overrides) for label, overrides in self.commands(method)])

    def row(self, method: str, runs: list[dict]) -> dict:
        exp = self.experiment(method)
        manifests = {s: read_manifest(exp, s) for s in (*TRAINING_STAGES, "evaluate")}
        ev = (manifests["evaluate"] or {}).get("counts", {})
        train = {s: m["wall_time_s"] for s in TRAINING_STAGES if (m := manifests[s])}
        if method in LOOP_METHODS:
            calls, unit = manifests["rank"]["counts"].get("teacher_calls"), "reward verdicts"
            pairs = manifests["rank"]["counts"].get("pairs")
        else:
            calls, unit = manifests["pdistill"]["counts"].get("teacher_calls"), "teacher-LM sequences"
            pairs = manifests["pdistill"]["counts"].get("pairs_used")
        metrics = exp / "iter_0" / "evaluate" / "metrics.json"
        control = json.loads(metrics.read_text()).get("control") or {} if metrics.is_file() else {}
        failed = [name for name, check in (control.get("checks") or {}).items() if not check.get("passed")]
        return {"method": method, "n": ev.get("n"), "win_rate": ev.get("win_rate"),
                "ci": [ev.get("ci_low"), ev.get("ci_high")], "lc_win_rate": ev.get("lc_win_rate"),
                "reward_delta": ev.get("reward_delta"), "reward_delta_ci": ev.get("reward_delta_ci"),
                "control_win_rate": ev.get("control_win_rate"), "control_passed": ev.get("control_passed"),
                "control_failed_checks": failed,
                "judge_is_teacher": ev.get("judge_is_teacher"), "pairs": pairs, "teacher_calls": calls,
                "teacher_calls_unit": unit, "train_wall_s": round(sum(train.values()), 1), "stage_wall_s": train,
                "evaluate_wall_s": (manifests["evaluate"] or {}).get("wall_time_s"),
                "peak_tree_gb": max((r["peak_tree_gb"] for r in runs), default=None),  # None: collected, not run
                "commands": [r["cmd"] for r in runs] or [" ".join(o) for _, o in self.commands(method)]}


def _f(v, digits: int = 3, sign: str = "") -> str:
    return "-" if v is None else f"{v:{sign}.{digits}f}"


def control_note(row: dict) -> str:
    failed = row.get("control_failed_checks") or []
    return f" ({', '.join(failed)} check failed)" if failed else " (failed)" if row["control_passed"] is False else ""


def render(result: dict) -> str:
    lines = ["| method | n | win rate vs pi_0 [95%] | LC win rate | reward diff [95%] | control | pairs | "
             "teacher calls | train wall (s) | evaluate (s) |", "|" + " --- |" * 10]
    for r in result["rows"]:
        rd = r["reward_delta_ci"] or [None, None]
        win = f"{_f(r['win_rate'])} [{_f(r['ci'][0], 2)}, {_f(r['ci'][1], 2)}]"
        reward = f"{_f(r['reward_delta'], 4, '+')} [{_f(rd[0], 4, '+')}, {_f(rd[1], 4, '+')}]"
        lines.append(f"| {r['method']} | {r['n']} | {win} | {_f(r['lc_win_rate'])} | {reward} | "
                     f"{_f(r['control_win_rate'])}{control_note(r)} | {r['pairs']} | "
                     f"{r['teacher_calls']} {r['teacher_calls_unit']} | {_f(r['train_wall_s'], 1)} | "
                     f"{_f(r['evaluate_wall_s'], 1)} |")
    judge = "the training teacher" if all(r["judge_is_teacher"] for r in result["rows"]) else "see judge_is_teacher"
    lines.append(f"\nJudge: {judge}. Overrides for every command: {' '.join(result['overrides']) or '(none)'}. "
                 "Policy-distillation rows use ts_align's pi_1 as their teacher; its training time is not in "
                 "their row.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--quick", action="store_true", help="toy sizes (figures mean nothing)")
    ap.add_argument("--set", nargs="*", default=[], help="tsalign overrides for every command")
    ap.add_argument("--sampler", default="vllm" if _has_vllm() else "hf")
    ap.add_argument("--outputs", default="outputs/_compare")
    ap.add_argument("--fresh", action="store_true", help="delete --outputs first (else finished stages are kept)")
    ap.add_argument("--out", default="benchmarks/compare.json")
    ap.add_argument("--render", action="store_true", help="print the table of --out and stop")
    ap.add_argument("--collect", action="store_true",
                    help="build the table from the finished outputs without running anything (no peak memory)")
    a = ap.parse_args()
    out = REPO / a.out
    if a.render:
        print(render(json.loads(out.read_text())))
        return
    methods = [m for m in a.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        sys.exit(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    if a.collect and a.fresh:
        sys.exit("--collect reads the finished outputs that --fresh would delete: pass one of them")
    compare = Compare(a)
    if a.fresh:
        shutil.rmtree(compare.root, ignore_errors=True)
    result = {"command": " ".join(["python benchmarks/compare_methods.py", *sys.argv[1:]]),
              "overrides": [f"sampler={a.sampler}", *compare.common], "rows": []}
    for method in methods:
        result["rows"].append(compare.row(method, []) if a.collect else compare.run(method))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))  # after each method: an interrupted run keeps what it measured
    print(render(result))
    print(f"\nJSON: {out}")


def _has_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


if __name__ == "__main__":
    main()
