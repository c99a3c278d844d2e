"""The cascade world's graded tasks: answers are verifiable, problems stay in range, held-out problems never
occur in training, and the build is a pure function of its seed."""
import ast
import operator

import pytest

from dflash.cascade.tasks import FAMILIES, MAX_STEPS, MAX_VALUE, build_task_set, parse_answer

OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def evaluate(expression: str) -> int:
    """The value of a bracketed integer expression, by walking its syntax tree (nothing is executed)."""
    def walk(node):
        if isinstance(node, ast.BinOp):
            return OPS[type(node.op)](walk(node.left), walk(node.right))
        assert isinstance(node, ast.Constant) and isinstance(node.value, int)
        return node.value
    return walk(ast.parse(expression, mode="eval").body)


@pytest.fixture(scope="module")
def tasks():
    return build_task_set(seed=3, n_train=4000, n_heldout=80)


def test_worked_answers_are_correct_and_checked_by_exact_match(tasks):
    for query in tasks.train[:200] + [q for qs in tasks.heldout.values() for q in qs]:
        worked = query.worked_answer()
        assert query.grade(worked) == (query.answer, True)
        assert query.grade(worked.replace(f"The answer is {query.answer}.",
                                          f"The answer is {query.answer + 1}.")) == (query.answer + 1, False)
        values = [query.start] + [s.result for s in query.steps]
        assert all(0 <= v <= MAX_VALUE for v in values) and 1 <= query.difficulty <= MAX_STEPS
        if query.family == "expression":
            assert evaluate(query.question.removeprefix("Compute ").removesuffix(".")) == query.answer
    assert parse_answer("no number here") is None
    assert parse_answer("The answer is 3. Wait. The answer is 12.") == 12  # the last one counts


def test_heldout_problems_never_occur_in_training_and_difficulty_is_balanced(tasks):
    train_keys = {q.key() for q in tasks.train}
    for family in FAMILIES:
        queries = tasks.heldout[family]
        assert not {q.key() for q in queries} & train_keys
        assert len({q.qid for q in queries}) == len(queries)
        counts = [sum(q.difficulty == k for q in queries) for k in range(1, MAX_STEPS + 1)]
        assert max(counts) - min(counts) <= 1
    assert {q.family for q in tasks.train} == set(FAMILIES)


def test_the_task_set_is_a_function_of_its_seed(tasks):
    again = build_task_set(seed=3, n_train=4000, n_heldout=80)
    assert again.train_texts == tasks.train_texts and again.heldout == tasks.heldout
    assert build_task_set(seed=4, n_train=4000, n_heldout=80).train_texts != tasks.train_texts
