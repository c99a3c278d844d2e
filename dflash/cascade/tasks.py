"""Graded tasks for the cascade world: multi-step arithmetic with verifiable answers and controllable difficulty.

A query is a chain of 1..4 operations on small numbers. Two surface forms share the arithmetic, so a cascade
tuned on one can be tested on the other (the transfer test):

* "story": a word problem ("Tom has 12 apples. Tom gets 5 more. Then Tom gives away 3. How many apples does Tom
  have now?");
* "expression": the same chain as a bracketed expression ("Compute ((12 + 5) - 3).").

The worked answer spells every step ("12 + 5 = 17. 17 - 3 = 14. The answer is 14."), and a reply is correct when
its final "The answer is N" names the chain's value (exact match). Difficulty is the number of steps. Numbers stay
small (values 0..60, operands up to 10), so the arithmetic facts are few enough for the larger rungs to learn
and many enough that the smaller ones do not. Held-out problems (start value and operations) never occur in
training. Everything is a pure function of the seed.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from ..tinyworld.corpus import ITEMS, TRAIN_NAMES, chat_prompt, chat_sample

FAMILIES = ("story", "expression")
MAX_STEPS = 4
MAX_VALUE = 60
MAX_OPERAND = 10
MAX_MULTIPLICAND = 20  # multiplications (by 2 or 3) only up to this value
ANSWER = re.compile(r"The answer is (-?\d+)")


@dataclass(frozen=True)
class Step:
    op: str  # "+", "-" or "*"
    operand: int
    result: int


@dataclass(frozen=True)
class Query:
    qid: str  # stable id: family, split and index
    family: str
    question: str
    start: int
    steps: tuple[Step, ...]

    @property
    def answer(self) -> int:
        return self.steps[-1].result

    @property
    def difficulty(self) -> int:
        return len(self.steps)

    @property
    def prompt(self) -> str:
        """The chat prompt the models answer (the tiny world's chat format)."""
        return chat_prompt(self.question)

    def prompt_ids(self, tokenizer) -> list[int]:
        return tokenizer(self.prompt, add_special_tokens=False)["input_ids"]

    def grade(self, reply: str) -> tuple[int | None, bool]:
        """The reply's final answer and whether it is this query's (exact match)."""
        answer = parse_answer(reply)
        return answer, answer == self.answer

    def worked_answer(self) -> str:
        value, parts = self.start, []
        for step in self.steps:
            parts.append(f"{value} {step.op} {step.operand} = {step.result}.")
            value = step.result
        return " ".join(parts) + f" The answer is {self.answer}."

    def key(self) -> tuple:
        """What makes two queries the same problem (the surface form aside)."""
        return (self.start, tuple((s.op, s.operand) for s in self.steps))


def parse_answer(text: str) -> int | None:
    """The number after the last "The answer is" in a reply, or None when the reply never says it."""
    found = ANSWER.findall(text)
    return int(found[-1]) if found else None


def random_chain(rng: random.Random, steps: int) -> tuple[int, tuple[Step, ...]]:
    """A start value and `steps` operations whose every intermediate value stays in 0..MAX_VALUE. Additions and
    subtractions take operands up to MAX_OPERAND; multiplications by 2 or 3 only up to MAX_MULTIPLICAND."""
    value = start = rng.randint(2, 20)
    chain = []
    for _ in range(steps):
        ops = ["+", "-"] + (["*"] if value <= MAX_MULTIPLICAND else [])
        op = rng.choice(ops)
        if op == "+" and value >= MAX_VALUE:
            op = "-"
        if op == "-" and value == 0:
            op = "+"
        if op == "+":
            operand = rng.randint(1, min(MAX_OPERAND, MAX_VALUE - value))
        elif op == "-":
            operand = rng.randint(1, min(MAX_OPERAND, value))
        else:
            operand = rng.randint(2, 3)
        value = {"+": value + operand, "-": value - operand, "*": value * operand}[op]
        chain.append(Step(op, operand, value))
    return start, tuple(chain)


STORY_STEPS = {"+": ["{n} gets {x} more.", "{n} finds {x} more.", "{n} buys {x} more."],
               "-": ["{n} gives away {x}.", "{n} loses {x}.", "{n} eats {x}."],
               "*": ["The number of {i} becomes {x} times as large.", "{n} ends up with {x} times as many."]}


def story_question(start: int, chain: tuple[Step, ...], name: str, item: str, rng: random.Random) -> str:
    sentences = [f"{name} has {start} {item}."]
    for index, step in enumerate(chain):
        sentence = rng.choice(STORY_STEPS[step.op]).format(n=name, x=step.operand, i=item)
        if index:
            sentence = "Then " + (sentence[0].lower() + sentence[1:] if sentence.startswith("The ") else sentence)
        sentences.append(sentence)
    sentences.append(f"How many {item} does {name} have now?")
    return " ".join(sentences)


def expression_question(start: int, chain: tuple[Step, ...]) -> str:
    text = str(start)
    for step in chain:
        text = f"({text} {step.op} {step.operand})"
    return f"Compute {text}."


def make_query(family: str, qid: str, rng: random.Random, steps: int, names: list[str]) -> Query:
    start, chain = random_chain(rng, steps)
    if family == "story":
        question = story_question(start, chain, rng.choice(names), rng.choice(ITEMS), rng)
    else:
        question = expression_question(start, chain)
    return Query(qid, family, question, start, chain)


@dataclass
class TaskSet:
    train: list[Query]  # both families, shuffled
    heldout: dict[str, list[Query]]  # per family: held-out queries (never trained on, by problem)

    @property
    def train_texts(self) -> list[str]:
        """The training documents: each query with its worked answer, in the chat format."""
        return [chat_sample(q.question, q.worked_answer()) for q in self.train]


def build_task_set(seed: int = 0, n_train: int = 24000, n_heldout: int = 600) -> TaskSet:
    """Training samples (both families, steps uniform in 1..MAX_STEPS) and held-out queries per family whose
    problems (start and operations) never occur in training."""
    rng = random.Random(seed)
    heldout, seen = {}, set()
    for family in FAMILIES:
        queries = []
        while len(queries) < n_heldout:
            query = make_query(family, f"{family}-heldout-{len(queries)}", rng, 1 + len(queries) % MAX_STEPS,
                               TRAIN_NAMES)
            if query.key() not in seen:
                seen.add(query.key())
                queries.append(query)
        heldout[family] = queries
    train = []
    while len(train) < n_train:
        family = FAMILIES[len(train) % len(FAMILIES)]
        query = make_query(family, f"{family}-train-{len(train)}", rng, rng.randint(1, MAX_STEPS), TRAIN_NAMES)
        if query.key() not in seen:
            train.append(query)
    rng.shuffle(train)
    return TaskSet(train, heldout)
