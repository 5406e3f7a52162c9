"""``debug.sample_log``: which global sample indices each rank trained, for the resume tests.

One JSON line per micro-batch in ``RUN/debug/samples-rank00000.jsonl`` (appended across launches):
step, rank, world size and the range of global sample indices (the indices that key t and ε).
A test joins the files of all launches and checks that every index was trained exactly once.
"""
from __future__ import annotations

import json
from pathlib import Path


class SampleLog:
    def __init__(self, run_dir: Path, rank: int, world: int):
        path = Path(run_dir) / "debug" / f"samples-rank{rank:05d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.rank, self.world = rank, world
        self._f = open(path, "a")

    def add(self, step: int, first: int, count: int) -> None:
        self._f.write(json.dumps({"step": step, "rank": self.rank, "world": self.world,
                                  "first": first, "count": count}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_indices(run_dir: Path) -> list[int]:
    """Every logged global sample index, over all ranks and launches (with repeats, if any)."""
    out = []
    for path in sorted((Path(run_dir) / "debug").glob("samples-rank*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            out.extend(range(rec["first"], rec["first"] + rec["count"]))
    return out
