"""A cascade profile (a ladder): which models, cheapest first, answer which queries. The profiles themselves are in
dflash.profiles: `tiny`'s ladder is the package's (the graded arithmetic tasks' held-out queries);
`gpu-cascade-qwen3` is Qwen3-0.6B / 1.7B / 4B / 8B on GSM8K in bf16, through the same collect -> replay path,
skipping with one line where weights, data or CUDA are missing."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..datasets import DatasetSpec
from ..errors import DFlashError
from .ladder import LADDER_DIR, SEED
from .tasks import FAMILIES, build_task_set

BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def number_in(text: str) -> int | None:
    """The last number of `text` as an integer (commas dropped; a non-integer: None)."""
    found = NUMBER.findall(text)
    if not found:
        return None
    value = float(found[-1].replace(",", ""))
    return int(value) if value.is_integer() else None


@dataclass(frozen=True)
class MathQuery:
    """A benchmark math question with an integer answer, asked through the model's chat template."""
    qid: str
    family: str
    question: str
    answer: int
    difficulty: int  # what the question shows of it: the count of numbers in the question (a router may read it)

    def prompt_ids(self, tokenizer) -> list[int]:
        from ..datasets import MATH_SUFFIX
        from ..loading import chat_prompt_ids
        return chat_prompt_ids(tokenizer, [{"role": "user", "content": self.question + MATH_SUFFIX}])

    def grade(self, reply: str) -> tuple[int | None, bool]:
        """The final answer (the last \\boxed{...}, else the reply's last number) and whether it is right."""
        boxed = BOXED.findall(reply)
        answer = number_in(boxed[-1]) if boxed else number_in(reply)
        return answer, answer == self.answer


@dataclass(frozen=True)
class CascadeProfile:
    name: str
    description: str
    rungs: tuple[tuple[str, str], ...]  # (rung name, model directory or hub id), cheapest first
    queries_per_family: int
    max_new_tokens: int
    device: str = "cpu"
    dtype: str | None = None
    dataset: DatasetSpec | None = None  # a GPU profile's dataset; None: the graded tasks

    @property
    def rung_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.rungs)

    def query_count(self, per_family: int | None = None) -> int:
        """Queries per family to use: all the profile has by default; more than that is an error."""
        count = self.queries_per_family if per_family is None else per_family
        if not 1 <= count <= self.queries_per_family:
            raise DFlashError(f"--queries must be between 1 and {self.queries_per_family} per family for profile "
                              f"{self.name}, got {count}.")
        return count

    def queries(self, per_family: int | None = None) -> list:
        count = self.query_count(per_family)
        if self.dataset is None:
            return arithmetic_queries(count, self.queries_per_family)
        return math_queries(self.dataset, count)

    def unavailable(self) -> str | None:
        if self.dataset is None:
            missing = [name for name, path in self.rungs if not (Path(path) / "model.safetensors").exists()]
            if missing:
                return (f"the ladder in {LADDER_DIR} lacks rung(s) {', '.join(missing)}: build it with "
                        "`dflash train ladder`")
            return None
        import torch

        from ..datasets import dataset_unavailable_reason
        from ..loading import resolve
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            return f"profile {self.name} needs CUDA, which this machine does not have"
        for _, model in self.rungs:
            try:
                resolve(model, "target")
            except DFlashError:
                return (f"profile {self.name}: weights {model} are not in the local Hugging Face cache (run "
                        f"`hf download {model}` where there is network)")
        reason = dataset_unavailable_reason(self.dataset)
        return f"profile {self.name}: {reason}" if reason else None


def arithmetic_queries(per_family: int, pool: int) -> list:
    """The first `per_family` held-out graded arithmetic queries of each family, from a held-out pool of `pool`
    per family (the tiny ladder's queries, and the tiny block-diffusion model's)."""
    heldout = build_task_set(SEED, n_train=0, n_heldout=pool).heldout
    return [q for family in FAMILIES for q in heldout[family][:per_family]]


def math_queries(spec: DatasetSpec, count: int | None) -> list[MathQuery]:
    """The first `count` questions of a GSM8K-style dataset (file order) with an integer answer after "####"."""
    from ..datasets import dataset_rows
    queries = []
    for index, row in enumerate(dataset_rows(spec)):
        if len(queries) == count:
            break
        answer = number_in(row["answer"].rpartition("####")[2])
        if answer is not None:
            queries.append(MathQuery(f"{spec.name}-{index}", spec.name, row["question"], answer,
                                     len(NUMBER.findall(row["question"]))))
    return queries
