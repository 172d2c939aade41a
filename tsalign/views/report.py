"""The experiment report: one self-contained HTML page, <experiment>/report.html.

    python -m tsalign.views.report outputs/default          # evaluate and stage=loop write it too

A summary table across iterations (win rate with its interval, the length-controlled win rate once
evaluate records one, student-teacher agreement, teacher calls and cost, DPO loss, stage times), the
plots across iterations (PNG, embedded as base64 data URIs), a sample of the mined pairs of every
iteration (prompt, chosen, rejected, student and teacher scores, margin) and of the evaluation pairs
(pi_t vs pi_0 with the judge's scores and verdict). No script, no stylesheet or image from anywhere
else: the file opens in any browser, without tsalign, copied anywhere. Every text from the run is
escaped (html.escape) and long ones are cut with a visible marker. Reads finished stages only.
"""

from __future__ import annotations

import base64
import html
import io
import sys
from pathlib import Path

from tsalign.algorithms.audit import verdict_line
from tsalign.artifacts.store import atomic_write_text, read_jsonl, read_manifest, stage_dir
from tsalign.errors import TsalignError
from tsalign.views.summary import (
    counts,
    figure,
    fmt,
    iteration_record,
    iterations,
    problems,
    read_json,
    summary_table,
    wall_times,
)

SAMPLE_PAIRS = 5  # per iteration: the first ones by prompt_id (deterministic, comparable across runs)
MAX_CHARS = 600  # longer texts are cut, with a marker saying how much was left out
REPORT = "report.html"


# ---------------------------------------------------------------- reading a finished experiment


def summary_row(record: dict) -> dict:
    """The figures the plots and the page's notes draw on."""
    ev, dpo, distill = record["metrics"]["evaluate"], counts(record, "dpo"), counts(record, "distill")
    return {
        "iteration": record["iteration"], "policy": ev.get("policy", f"pi_{record['iteration'] + 1}"),
        "pairs": figure(record, "rank", "pairs"),
        "win_rate": ev.get("win_rate"), "ci": (ev.get("ci_low"), ev.get("ci_high")), "n": ev.get("n"),
        "lc_win_rate": ev.get("lc_win_rate"), "lc_ci": (ev.get("lc_ci_low"), ev.get("lc_ci_high")),
        "control_win_rate": (ev.get("control") or {}).get("win_rate"),
        "control_passed": (ev.get("control") or {}).get("passed"),
        "agreement_rank": figure(record, "rank", "student_teacher_agreement"),
        "agreement_distill": (distill.get("agreement_before"), distill.get("agreement_after")),
        "agreement_eval": ev.get("student_agreement"),
        "student_human": (distill.get("human_accuracy_before"), distill.get("human_accuracy_after")),
        "longer_wins": distill.get("human_longer_wins"),
        "teacher_calls": figure(record, "rank", "teacher_calls"),
        "teacher_cost": figure(record, "rank", "teacher_cost"),
        "dpo_loss": (dpo.get("first_loss"), dpo.get("last_loss")), "dpo_loss_mean": dpo.get("train_loss"),
        "wall_s": wall_times(record),
    }


# ---------------------------------------------------------------- small HTML helpers


# C0 control characters (tokenizer noise in sampled text) are not allowed in HTML: show them as \xNN
_CONTROL = {c: f"\\x{c:02x}" for c in range(32) if chr(c) not in "\n\t"} | {127: "\\x7f"}


def esc(value) -> str:
    return html.escape(str(value).translate(_CONTROL), quote=True)


def cut(text: str, limit: int = MAX_CHARS) -> str:
    """Escaped text, cut at `limit` characters with a visible marker."""
    if len(text) <= limit:
        return esc(text)
    return esc(text[:limit]) + f'<span class="cut"> [... {len(text) - limit} more characters cut]</span>'


def num(v, digits: int = 3) -> str:
    """A figure as the loop's summary writes it (tsalign.views.summary.fmt), escaped; a dash where missing."""
    return "&ndash;" if v is None else esc(fmt(v, digits))


def score(v) -> str:
    """Scores of a reward model can span a tiny range (the CPU teacher: ~0.013-0.016): 4 significant digits."""
    return f"{v:.4g}" if isinstance(v, float) else num(v)


def table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    """Cells are HTML already (escaped by the caller); headers are escaped here."""
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def messages_text(messages) -> str:
    """Chat messages as plain text: 'role: content' per message, the bare content for a single
    assistant message (chosen / rejected); a string passes through."""
    if isinstance(messages, str):
        return messages
    if isinstance(messages, list) and len(messages) == 1 and isinstance(messages[0], dict) \
            and messages[0].get("role") == "assistant":
        return str(messages[0].get("content", ""))
    return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in messages or [] if isinstance(m, dict))


# ---------------------------------------------------------------- sections


def summary_html(records: list[dict]) -> str:
    """The loop's summary table (tsalign.views.summary: every stage's registry columns), as HTML."""
    head, rows = summary_table(records)
    audits = [f"iter_{r['iteration']}: {line}" for r in records if (line := verdict_line(r["metrics"].get("rank") or {}))]
    return table(head, [[esc(c) for c in row] for row in rows], "summary") + "".join(
        f"<p class='warn'>{esc(line)}</p>" for line in audits)


def wall_time_table(rows: list[dict]) -> str:
    stages = list(rows[0]["wall_s"])
    body = [[num(r["iteration"]), *(num(r["wall_s"][s], 1) for s in stages),
             num(sum(v for v in r["wall_s"].values() if v), 1)] for r in rows]
    return table(["iteration", *(f"{s} (s)" for s in stages), "total (s)"], body, "times")


def plots_png(rows: list[dict], title: str) -> bytes:
    """Four panels across iterations: win rate (CI bars), agreement, teacher calls and DPO loss, stage times."""
    import matplotlib

    matplotlib.use("Agg")  # no display, no GUI toolkit
    import matplotlib.pyplot as plt

    x = [r["iteration"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    evaluated = [r for r in rows if r["win_rate"] is not None]
    if evaluated:
        wr = [r["win_rate"] for r in evaluated]
        err = [[w - (r["ci"][0] if r["ci"][0] is not None else w) for w, r in zip(wr, evaluated)],
               [(r["ci"][1] if r["ci"][1] is not None else w) - w for w, r in zip(wr, evaluated)]]
        axes[0].errorbar([r["iteration"] for r in evaluated], wr, yerr=err, marker="o", capsize=4, label="win rate")
        lc = [r for r in evaluated if r["lc_win_rate"] is not None]
        if lc:
            axes[0].plot([r["iteration"] for r in lc], [r["lc_win_rate"] for r in lc], marker="s", label="LC win rate")
        ctrl = [r for r in evaluated if r["control_win_rate"] is not None]
        if ctrl:
            axes[0].plot([r["iteration"] for r in ctrl], [r["control_win_rate"] for r in ctrl], marker="x", ls=":",
                         label="control")
        axes[0].legend(fontsize=8)
    axes[0].axhline(0.5, color="grey", ls="--", lw=1)
    axes[0].set(title="pi_{t+1} vs pi_0 win rate", ylim=(0, 1))
    for key, label, marker in (("agreement_rank", "at rank (student_t)", "o"),
                               ("agreement_eval", "after distill (student_t+1)", "s")):
        pts = [(r["iteration"], r[key]) for r in rows if r[key] is not None]
        if pts:
            axes[1].plot(*zip(*pts), marker=marker, label=label)
    axes[1].set(title="student-teacher agreement", ylim=(0, 1))
    if axes[1].get_legend_handles_labels()[0]:  # nothing to name when no agreement was measured
        axes[1].legend(fontsize=8)
    axes[2].bar(x, [r["teacher_calls"] or 0 for r in rows], color="tab:gray", alpha=0.6, label="teacher calls")
    axes[2].set(title="teacher calls (bars), DPO loss (line)")
    loss = [(r["iteration"], r["dpo_loss_mean"]) for r in rows if r["dpo_loss_mean"] is not None]
    if loss:
        axes[2].twinx().plot(*zip(*loss), marker="o", color="tab:red")
    bottom = [0.0] * len(rows)
    for s in rows[0]["wall_s"]:
        heights = [r["wall_s"].get(s) or 0 for r in rows]
        axes[3].bar(x, heights, bottom=bottom, label=s)
        bottom = [b + h for b, h in zip(bottom, heights)]
    axes[3].set(title="stage wall time (s)")
    axes[3].legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xlabel("iteration")
    fig.suptitle(title)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=90)
    plt.close(fig)
    return png.getvalue()


def img(png: bytes, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def score_at(values: list, index: int | None, positions: list | None = None) -> float | None:
    """The score of candidate `index`; teacher scores are in shortlist order (`positions`)."""
    if index is not None and positions is not None:
        index = positions.index(index) if index in positions else None
    return values[index] if index is not None and index < len(values) else None


def pair_rows(experiment: Path, t: int, limit: int = SAMPLE_PAIRS) -> list[dict]:
    """The first `limit` mined pairs by prompt_id, joined with their student and teacher scores."""
    rank = stage_dir(experiment, t, "rank")
    if read_manifest(rank) is None or not (rank / "pairs.jsonl").is_file():
        return []
    scores = {r["prompt_id"]: r for r in read_jsonl(rank / "scores.jsonl", "scores")} \
        if (rank / "scores.jsonl").is_file() else {}
    pairs = sorted(read_jsonl(rank / "pairs.jsonl", "pairs"), key=lambda p: str(p.get("prompt_id")))[:limit]
    out = []
    for p in pairs:
        s = scores.get(p.get("prompt_id"), {})
        student, teacher, short = s.get("student_scores") or [], s.get("teacher_scores") or [], s.get("shortlist") or []
        ci, ri = p.get("chosen_index"), p.get("rejected_index")
        out.append({"prompt_id": p.get("prompt_id"), "prompt": messages_text(p.get("prompt")),
                    "chosen": messages_text(p.get("chosen")), "rejected": messages_text(p.get("rejected")),
                    "student": (score_at(student, ci), score_at(student, ri)),
                    "teacher": (score_at(teacher, ci, short), score_at(teacher, ri, short)),
                    "margin": p.get("margin"), "judge": p.get("judge")})
    return out


def pairs_section(experiment: Path, t: int) -> str:
    rows = pair_rows(experiment, t)
    if not rows:
        return f"<p>iteration {t}: no finished rank stage, or no pairs mined.</p>"
    body = [[esc(r["prompt_id"]), cut(r["prompt"]), cut(r["chosen"]), cut(r["rejected"]),
             f"{score(r['student'][0])} / {score(r['student'][1])}",
             f"{score(r['teacher'][0])} / {score(r['teacher'][1])}", score(r["margin"])] for r in rows]
    head = ["prompt_id", "prompt", "chosen", "rejected", "student scores (chosen / rejected)",
            "teacher scores (chosen / rejected)", "margin"]
    return f"<h3>iteration {t}: mined pairs (first {len(rows)} by prompt_id)</h3>" + table(head, body, "samples")


def eval_prompts(experiment: Path) -> dict:
    """prompt_id -> prompt text from the shared answer caches (judgements.jsonl holds ids only)."""
    prompts = {}
    for cache in sorted((experiment / "_eval_answers").glob("*.jsonl")):
        try:
            rows = read_jsonl(cache, "answers")
        except Exception:  # a cache being written right now: the report goes on without its prompts
            continue
        prompts.update({r["prompt_id"]: messages_text(r.get("prompt")) for r in rows if "prompt_id" in r})
    return prompts


def verdict(scores: list, tie: float) -> str:
    if not isinstance(scores, list) or len(scores) != 2:
        return "?"
    delta = scores[0] - scores[1]
    return "win" if delta > tie else "loss" if delta < -tie else "tie"


def eval_section(experiment: Path, t: int, prompts: dict, limit: int = SAMPLE_PAIRS) -> str:
    ev = stage_dir(experiment, t, "evaluate")
    manifest = read_manifest(ev)
    if manifest is None or not (ev / "judgements.jsonl").is_file():
        return f"<p>iteration {t}: not evaluated yet.</p>"
    tie = float(((manifest.get("config") or {}).get("evaluate") or {}).get("tie_threshold") or 0.0)
    rows = sorted(read_jsonl(ev / "judgements.jsonl", "judgements"), key=lambda r: str(r.get("prompt_id")))[:limit]
    policy = read_json(ev / "metrics.json").get("policy", f"pi_{t + 1}")
    body = [[esc(r.get("prompt_id")), cut(prompts.get(r.get("prompt_id"), "(prompt not cached)")),
             cut(str(r.get("policy", ""))), cut(str(r.get("base", ""))),
             " / ".join(score(s) for s in r.get("judge") or []), f"<b>{esc(verdict(r.get('judge'), tie))}</b>"]
            for r in rows]
    head = ["prompt_id", "prompt", f"{policy} answer", "pi_0 answer", f"judge scores ({policy} / pi_0)",
            f"verdict for {policy}"]
    return f"<h3>iteration {t}: {esc(policy)} vs pi_0 (first {len(rows)} by prompt_id)</h3>" + table(head, body, "samples")


def models_line(records: list[dict]) -> str:
    """Which policy, teacher, student and judge the experiment used (from the first manifests found)."""
    seen = {}
    for rec in records:
        for stage, manifest in rec["manifests"].items():
            config = (manifest or {}).get("config", {})
            for role in ("policy", "teacher", "student"):
                if isinstance(config.get(role), dict) and role not in seen:
                    seen[role] = config[role].get("name")
            if stage == "evaluate" and isinstance(config.get("judge"), dict) and "judge" not in seen:
                seen["judge"] = config["judge"].get("name")
    return ", ".join(f"{k}: <b>{esc(v)}</b>" for k, v in seen.items() if v)


STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1600px}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}
th,td{border:1px solid #ccc;padding:4px 6px;vertical-align:top;text-align:left}
th{background:#f2f2f2} table.samples td{white-space:pre-wrap;max-width:28em}
.cut{color:#b00;font-style:italic} img{max-width:100%} .note{color:#555;font-size:13px}
.warn{border:2px solid #b00;padding:4px 12px;color:#700}
"""


def warnings_html(lines: list[str]) -> str:
    if not lines:
        return ""
    items = "".join(f"<li>{esc(line)}</li>" for line in lines)
    return f"<div class='warn'><h2>Left out or changed since</h2><ul>{items}</ul></div>"


def render(experiment: Path, warnings: list[str]) -> str:
    """The page; `warnings`: what it leaves out or cannot vouch for (summary.problems), shown at the top."""
    records = [iteration_record(experiment, t) for t in iterations(experiment)]
    rows = [summary_row(r) for r in records]
    title = f"TS-Align report: {experiment.name}"
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>",
             f"<p class='note'>{esc(experiment)}<br>{models_line(records)}</p>",
             warnings_html(warnings)]
    if not rows:
        return "".join(parts) + "<p>No iteration has started yet.</p></body></html>"
    parts += ["<h2>Summary across iterations</h2>", summary_html(records),
              "<p class='note'>Iteration t's evaluate judges pi_{t+1} (trained in iteration t) against pi_0; "
              "the control (pi_0 with another seed vs pi_0) should sit near 0.5. Distill agreement is on the "
              "teacher pairs held out of training, before -> after.</p>",
              "<h2>Stage wall times</h2>", wall_time_table(rows),
              "<h2>Across iterations</h2>", img(plots_png(rows, title), "plots across iterations"),
              "<h2>Mined pairs (rank)</h2>", *(pairs_section(experiment, r["iteration"]) for r in records)]
    prompts = eval_prompts(experiment)
    parts += ["<h2>Evaluation pairs</h2>", *(eval_section(experiment, r["iteration"], prompts) for r in records),
              "</body></html>"]
    return "\n".join(parts)


def write_report(experiment_dir: Path) -> Path:
    """Write <experiment>/report.html (atomically) and return its path. What it leaves out (a deleted
    iteration, outputs changed since their stage finished) is said at the top of the page and printed."""
    experiment = Path(experiment_dir)
    # checked once: a changed output is re-hashed to tell, which for a checkpoint takes seconds
    warnings = problems(experiment, [iteration_record(experiment, t) for t in iterations(experiment)])
    path = atomic_write_text(experiment / REPORT, render(experiment, warnings))
    for line in warnings:
        print(f"[report] warning: {line}")
    return path


def report_after_run(experiment_dir: Path) -> Path | None:
    """write_report for the end of evaluate / stage=loop: prints the path; a failure is one warning
    line, never an error (the report is a view: it must not cost a finished stage)."""
    try:
        path = write_report(experiment_dir)
    except Exception as e:  # noqa: BLE001 - any failure here is reported and left alone
        print(f"[report] warning: report not written ({type(e).__name__}: {e}); "
              f"retry with `python -m tsalign.views.report {experiment_dir}`")
        return None
    print(f"report: {path}")
    return path


def main(experiment_dir: Path) -> None:
    if not Path(experiment_dir).is_dir():  # not a report of nothing, in a folder made for it
        raise TsalignError(f"no experiment at {experiment_dir} (nothing has run under this experiment_name yet); "
                           "set experiment_name (and paths.outputs) to one that ran: `ls <paths.outputs>`")
    print(f"report: {write_report(Path(experiment_dir))}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/default"))
