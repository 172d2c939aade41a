"""The experiment report: on a real tiny run (generate -> evaluate in-process) its table holds the
run's numbers, the plots are embedded PNGs, the pair texts are escaped and nothing is fetched from
elsewhere; on hand-made artifacts, hostile and long texts, optional columns, an empty experiment."""

from __future__ import annotations

import base64
import html
import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import REPO, run_stage_inprocess

from tsalign.artifacts.store import stage_dir
from tsalign.views.report import MAX_CHARS, esc, report_after_run, write_report

FAST = ["dpo.max_steps=2", "dpo.save_steps=100", "sampler.max_new_tokens=8"]
IMG = re.compile(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


class Tags(HTMLParser):
    """The real tags of a page (escaped text that looks like a tag is text, not a tag)."""

    def __init__(self, page: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def external_references(page: str) -> list[str]:
    """Scripts, stylesheet links, and src/href attributes whose content is not inline (data:)."""
    found = [tag for tag, _ in Tags(page).tags if tag in ("script", "link", "iframe", "object", "embed")]
    found += [v for _, attrs in Tags(page).tags for k, v in attrs.items()
              if k in ("src", "href") and not (v or "").startswith("data:")]
    return found + re.findall(r"@import|url\(", page)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """One iteration on the tiny models, every stage in this process (about 30 s on 2 cores)."""
    out = tmp_path_factory.mktemp("report")
    cfg = None
    for stage in ("generate", "rank", "distill", "dpo", "evaluate"):
        cfg, _ = run_stage_inprocess(stage, out, FAST)
    return Path(cfg.experiment_dir)


def test_report_of_a_tiny_run(tiny_run):
    path = write_report(tiny_run)
    assert path == tiny_run / "report.html"
    page = path.read_text()
    metrics = json.loads((tiny_run / "iter_0" / "evaluate" / "metrics.json").read_text())
    win = f"{metrics['win_rate']:.3f} [{metrics['ci_low']:.2f}, {metrics['ci_high']:.2f}]"
    assert f"<td>{win}</td>" in page and f"<td>{metrics['n']}</td>" in page
    rank = json.loads((tiny_run / "iter_0" / "rank" / "manifest.json").read_text())["counts"]
    assert f"<td>{rank['teacher_calls']}</td>" in page
    if metrics.get("lc_win_rate") is not None:  # evaluate records it when it can fit its model
        assert f"<td>{metrics['lc_win_rate']:.3f}</td>" in page
    png = base64.b64decode(IMG.search(page).group(1))
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    pair = json.loads((tiny_run / "iter_0" / "rank" / "pairs.jsonl").read_text().splitlines()[0])
    chosen = pair["chosen"][0]["content"]
    assert esc(chosen[:40]) in page  # escaped, control bytes shown as \xNN
    answers = [json.loads(line) for line in (tiny_run / "iter_0" / "evaluate" / "judgements.jsonl").open()]
    assert "verdict for pi_1" in page and any(esc(a["base"][:20]) in page for a in answers)
    assert not external_references(page)
    assert not re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f]", page)  # no control characters in the HTML


def write_manifest(exp: Path, t: int, stage: str, counts: dict, config: dict | None = None) -> Path:
    d = stage_dir(exp, t, stage)
    d.mkdir(parents=True, exist_ok=True)
    (d / "manifest.json").write_text(json.dumps({"stage": stage, "iteration": t, "counts": counts,
                                                 "config": config or {}, "wall_time_s": 2.5}))
    return d


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


HOSTILE = '<script>alert("x")</script> & <img src="http://evil.example/a.png">'


def hand_made(tmp_path: Path) -> Path:
    exp = tmp_path / "exp"
    write_manifest(exp, 0, "generate", {"prompts": 2}, {"policy": {"name": "pol"}})
    rank = write_manifest(exp, 0, "rank", {"pairs": 2, "teacher_calls": 4, "student_teacher_agreement": 0.5,
                                           "teacher_cost": 0.0123}, {"teacher": {"name": "teach"}})
    (rank / "metrics.json").write_text(json.dumps({"pairs": 2, "teacher_calls": 4}))
    prompt = [{"role": "user", "content": HOSTILE}]
    write_jsonl(rank / "pairs.jsonl", [
        {"prompt_id": "b", "prompt": prompt, "chosen": [{"role": "assistant", "content": "x" * (MAX_CHARS + 77)}],
         "rejected": [{"role": "assistant", "content": "short"}], "margin": 0.25, "chosen_index": 2, "rejected_index": 0},
        {"prompt_id": "a", "prompt": prompt, "chosen": [{"role": "assistant", "content": HOSTILE}],
         "rejected": [{"role": "assistant", "content": "no"}], "margin": 0.5, "chosen_index": 1, "rejected_index": 0}])
    write_jsonl(rank / "scores.jsonl", [
        {"prompt_id": "a", "student_scores": [0.1, 0.9, 0.3], "shortlist": [1, 0], "teacher_scores": [0.75, 0.25]},
        {"prompt_id": "b", "student_scores": [0.2, 0.4, 0.6], "shortlist": [2, 0], "teacher_scores": [0.625, 0.375]}])
    write_manifest(exp, 0, "distill", {"agreement_before": 0.5, "agreement_after": 1.0})
    write_manifest(exp, 0, "dpo", {"first_loss": 0.6931, "last_loss": 0.6431, "train_loss": 0.67})
    ev = write_manifest(exp, 0, "evaluate", {"n": 2, "control_win_rate": 0.5, "control_passed": True},
                        {"evaluate": {"tie_threshold": 0.0}})
    (ev / "metrics.json").write_text(json.dumps({"n": 2, "win_rate": 0.75, "ci_low": 0.25, "ci_high": 1.0,
                                                 "policy": "pi_1", "student_agreement": 0.5,
                                                 "control": {"win_rate": 0.5, "passed": True}}))
    write_jsonl(ev / "judgements.jsonl", [{"prompt_id": "e1", "policy": "mine <b>", "base": "theirs", "judge": [0.3, 0.1]}])
    (exp / "_eval_answers").mkdir()
    write_jsonl(exp / "_eval_answers" / "base-k.jsonl", [{"prompt_id": "e1", "prompt": [{"role": "user", "content": "Q?"}]}])
    return exp


def test_report_of_hand_made_artifacts(tmp_path):
    page = write_report(hand_made(tmp_path)).read_text()
    assert HOSTILE not in page and html.escape(HOSTILE) in page and not external_references(page)
    assert [tag for tag, _ in Tags(page).tags].count("img") == 1  # the plots; the hostile <img> is text
    assert "[... 77 more characters cut]" in page and "x" * (MAX_CHARS + 1) not in page
    # pairs in prompt_id order, each with the scores of its own chosen / rejected candidates
    assert page.index("0.9 / 0.1") < page.index("0.6 / 0.2")
    assert "0.75 / 0.25" in page and "0.625 / 0.375" in page
    assert "<th>teacher_cost</th>" in page and "0.012" in page
    assert "<td>0.750 [0.25, 1.00]</td><td>2</td>" in page and "<td>0.500</td><td>True</td>" in page
    assert "<td>0.500 -&gt; 1.000</td>" in page and "<td>0.693 -&gt; 0.643</td><td>0.670</td>" in page
    assert "mine &lt;b&gt;" in page and "<b>win</b>" in page and "user: Q?" in page
    assert "policy: <b>pol</b>, teacher: <b>teach</b>" in page and IMG.search(page)


def test_report_of_an_empty_experiment_and_a_failing_one(tmp_path, capsys):
    page = write_report(tmp_path / "new").read_text()
    assert "No iteration has started yet" in page
    (tmp_path / "file").write_text("")
    assert report_after_run(tmp_path / "file") is None  # cannot write file/report.html: a warning, no error
    assert "[report] warning: report not written" in capsys.readouterr().out


def test_stage_report_of_an_experiment_that_never_ran_is_an_error_that_writes_nothing(tmp_path):
    from tsalign.errors import TsalignError
    from tsalign.views.report import main

    with pytest.raises(TsalignError, match=r"no experiment at .*nothere .*set experiment_name"):
        main(tmp_path / "nothere")  # a typo in experiment_name: not an empty report in a new folder
    assert not (tmp_path / "nothere").exists()


def test_report_imports_no_model_library(tmp_path):
    exp = hand_made(tmp_path)
    code = ("import sys; from pathlib import Path; from tsalign.views.report import write_report; write_report(Path(sys.argv[1])); "
            "print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'trl')))")
    done = subprocess.run([sys.executable, "-c", code, str(exp)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout and (exp / "report.html").is_file()


def test_report_says_what_it_leaves_out(tiny_run, tmp_path, capsys):
    """A deleted iteration between finished ones and an output deleted after its stage finished are named on
    the page and printed, not silently left out."""
    import shutil

    exp = tmp_path / "exp"
    for t in (0, 1, 2):
        shutil.copytree(tiny_run / "iter_0", exp / f"iter_{t}")
    assert "Left out or changed since" not in write_report(exp).read_text()
    shutil.rmtree(exp / "iter_1")  # deleted by the user
    (exp / "iter_2" / "rank" / "pairs.jsonl").unlink()
    capsys.readouterr()
    page = write_report(exp).read_text()
    printed = capsys.readouterr().out
    for line in ("iter_1 is missing (deleted?)", "iter_2/rank: pairs.jsonl (missing) since it finished"):
        assert esc(line) in page and f"[report] warning: {line}" in printed, printed
