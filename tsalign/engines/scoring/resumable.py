"""Scoring groups of candidates chunk by chunk into PartialRows, so a crash inside a large scorer
(say, a 70B judge) loses one chunk at most."""

from __future__ import annotations

from collections.abc import Callable

from tsalign.artifacts.store import PartialRows
from tsalign.engines.scoring.base import Scorer
from tsalign.progress import progress

SCORE_CHUNK = 64  # prompts per scorer call
# the last ones are a served teacher's (tsalign/engines/scoring/served): HTTP requests, ledger hits, garbage answers, tokens, cost
STATS = ("calls", "seconds", "truncated", "first_position_picks", "requests", "cached", "garbage", "retries",
         "tokens_in", "tokens_out", "cost")


def score_resumably(open_scorer: Callable[[], Scorer], ids: list[str], prompts: list, groups: list[list[str]],
                    partial: PartialRows, desc: str = "scoring") -> tuple[list[list[float]], dict]:
    """Scores of every group; the scorer is opened only if some group is not in `partial` yet. Stats
    are summed over every chunk ever run, resumed ones included."""
    chunk = SCORE_CHUNK
    todo = [i for i, pid in enumerate(ids) if pid not in partial]
    if todo:
        scorer = open_scorer()
        try:
            with progress(len(ids), desc, "prompt", initial=len(ids) - len(todo)) as bar:
                for start in range(0, len(todo), chunk):
                    idx = todo[start : start + chunk]
                    before = {k: scorer.stats.get(k, 0) for k in STATS}
                    scores = scorer.score_groups([prompts[i] for i in idx], [groups[i] for i in idx])
                    share = {k: (scorer.stats.get(k, 0) - before[k]) / len(idx) for k in STATS}
                    partial.extend([{"prompt_id": ids[i], "scores": s, **share} for i, s in zip(idx, scores)])
                    bar.update(len(idx))
        finally:
            scorer.close()
    done = [partial.rows[pid] for pid in ids]
    stats = {k: sum(r.get(k, 0) for r in done) for k in STATS}
    stats["calls"] = round(stats["calls"])
    stats["truncated"] = round(stats["truncated"])
    return [r["scores"] for r in done], stats


class OpenOnce:
    """One scorer for several score_resumably calls (rank's shortlist, then its audit): opened by the first call that
    needs it and closed by close() alone, so a large teacher loads once. `scorer` stays readable after close()."""

    def __init__(self, open_scorer: Callable[[], Scorer]):
        self._open, self.scorer, self._closed = open_scorer, None, False

    def __call__(self) -> Scorer:
        if self.scorer is None:
            self.scorer = self._open()
        return _LeftOpen(self.scorer)

    def close(self) -> None:
        if self.scorer is not None and not self._closed:
            self._closed = True
            self.scorer.close()


class _LeftOpen:
    """A scorer whose close() is left to its OpenOnce."""

    def __init__(self, scorer: Scorer):
        self._scorer = scorer

    def __getattr__(self, name: str):
        return getattr(self._scorer, name)

    def close(self) -> None:
        pass
