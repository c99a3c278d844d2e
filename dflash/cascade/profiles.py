"""Cascade profiles: which ladder answers which queries. `tiny` is the embedded default (the package's ladder on
the graded arithmetic tasks' held-out queries)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import DFlashError
from .ladder import LADDER_DIR, RUNGS, SEED, Budget
from .tasks import FAMILIES, Query, build_task_set


@dataclass(frozen=True)
class CascadeProfile:
    name: str
    ladder_dir: Path
    rungs: tuple[str, ...]
    description: str
    queries_per_family: int

    def queries(self, per_family: int | None = None) -> list[Query]:
        count = self.queries_per_family if per_family is None else per_family
        if not 1 <= count <= self.queries_per_family:
            raise DFlashError(f"--queries must be between 1 and {self.queries_per_family} per family for profile "
                              f"{self.name}, got {count}.")
        heldout = build_task_set(SEED, n_train=0, n_heldout=self.queries_per_family).heldout
        return [q for family in FAMILIES for q in heldout[family][:count]]

    def unavailable(self) -> str | None:
        missing = [r for r in self.rungs if not (self.ladder_dir / r / "model.safetensors").exists()]
        if missing:
            return (f"the ladder in {self.ladder_dir} lacks rung(s) {', '.join(missing)}: build it with "
                    "`dflash train ladder`")
        return None


PROFILES = {
    "tiny": CascadeProfile("tiny", LADDER_DIR, tuple(r.name for r in RUNGS),
                           "the embedded ladder (four tiny Qwen3 models) on held-out graded arithmetic, two "
                           "families (story, expression)", Budget().n_heldout),
}


def get_profile(name: str) -> CascadeProfile:
    if name not in PROFILES:
        raise DFlashError(f"Unknown cascade profile {name!r}; choose one of {', '.join(PROFILES)}.")
    return PROFILES[name]
