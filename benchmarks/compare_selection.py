"""Compare two rank outputs on the same candidates: TS-Align's shortlist vs the teacher-only baseline.

    tsalign stage=rank iteration=0                                   # experiment 'default'
    tsalign stage=rank iteration=0 rank.selection=all experiment_name=teacher_only rank.candidates_from=default
    python benchmarks/compare_selection.py outputs/default outputs/teacher_only [--iteration 0]

Prints teacher calls and rank wall time of each, and how far the pair sets agree: same chosen, same
pair, and how often the shortlist's chosen is the teacher's best of all K.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(exp: Path, t: int) -> tuple[dict, dict, dict]:
    d = exp / f"iter_{t}" / "rank"
    manifest = json.loads((d / "manifest.json").read_text())
    pairs = {r["prompt_id"]: r for r in map(json.loads, (d / "pairs.jsonl").read_text().splitlines())}
    scores = {r["prompt_id"]: r for r in map(json.loads, (d / "scores.jsonl").read_text().splitlines())}
    return manifest, pairs, scores


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("shortlist", type=Path)
    ap.add_argument("teacher_only", type=Path)
    ap.add_argument("--iteration", type=int, default=0)
    a = ap.parse_args()
    (m1, p1, _), (m2, p2, s2) = load(a.shortlist, a.iteration), load(a.teacher_only, a.iteration)
    for name, m in (("shortlist", m1), ("teacher-only", m2)):
        c = m["counts"]
        print(f"{name:13s} selection={m['config']['rank']['selection']:10s} pairs={c['pairs']:4d} "
              f"teacher_calls={c['teacher_calls']:5d} teacher_s={c['teacher_s']:7.2f} rank_wall_s={m['wall_time_s']:7.2f}")
    common = sorted(set(p1) & set(p2))
    if not common:
        print("no prompt has a pair in both")
        return
    same_chosen = sum(p1[k]["chosen_index"] == p2[k]["chosen_index"] for k in common)
    same_pair = sum((p1[k]["chosen_index"], p1[k]["rejected_index"]) == (p2[k]["chosen_index"], p2[k]["rejected_index"])
                    for k in common)
    # with a reward-model teacher, the teacher-only scores rank all K: is the shortlist's chosen above its rejected?
    ordered = sum(s2[k]["teacher_scores"][s2[k]["shortlist"].index(p1[k]["chosen_index"])]
                  > s2[k]["teacher_scores"][s2[k]["shortlist"].index(p1[k]["rejected_index"])]
                  for k in common if {p1[k]["chosen_index"], p1[k]["rejected_index"]} <= set(s2[k]["shortlist"]))
    n = len(common)
    print(f"prompts with a pair in both: {n}")
    print(f"same chosen (shortlist found the teacher's best of all K): {same_chosen}/{n} = {same_chosen / n:.2f}")
    print(f"same (chosen, rejected): {same_pair}/{n} = {same_pair / n:.2f}")
    print(f"shortlist pair ordered the same way by the teacher-only scores: {ordered}/{n} = {ordered / n:.2f}")
    print(f"teacher calls saved: {1 - m1['counts']['teacher_calls'] / max(m2['counts']['teacher_calls'], 1):.0%}")


if __name__ == "__main__":
    main()
