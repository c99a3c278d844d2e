"""Fast-dLLM v2 tasks and log-likelihood scoring: the multiple-choice arithmetic questions, B3's one-forward score
against a brute-force forward on a random stand-in model (token shift, block-causal padding), the HumanEval
subprocess runner, and one-line skip reasons for the GPU profile and its data."""
import dataclasses
import io
import json

import pytest
import torch
from helpers import random_target

from dflash import loading, standins
from dflash.blockdiffusion import tasks
from dflash.blockdiffusion.loglik import (batched_continuation_logprobs, choice_logits, continuation_logprobs,
                                          loglik_input)
from dflash.blockdiffusion.convert import DEFAULT_OUT as TINY_MODEL
from dflash.profiles import BLOCK_DIFFUSION_MODELS as PROFILES
from dflash.errors import DFlashError

BLOCK, MASK, EOS = 32, 4, 1  # the ladder tokenizer's <|MASK|> and <|end|>
SCORING = dict(block_size=BLOCK, mask_id=MASK, eos_id=EOS)


@pytest.fixture(scope="module")
def tokenizer():
    return loading.load_tokenizer(str(loading.PACKAGE_MODELS / "ladder" / "l4"))


@pytest.fixture(scope="module")
def model():
    """A random Qwen3 over the ladder tokenizer's 512 ids, float64 so that rounding stays far below the checks."""
    return random_target(3, vocab_size=512)


def random_ids(count: int, seed: int) -> list[int]:
    return torch.randint(5, 512, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def brute_force(model, context, continuation, eos=EOS):
    """B3 spelled out: the input and the block-causal mask built by hand, one forward, the log-softmax at n-1."""
    n, length = len(context), len(context) + len(continuation)
    padded = (length // BLOCK + 1) * BLOCK
    ids = context + [MASK] + continuation[1:] + [eos] + [MASK] * (padded - length - 1)
    mask = torch.tensor([[0.0 if k // BLOCK <= q // BLOCK else torch.finfo(torch.float64).min for k in range(padded)]
                         for q in range(padded)], dtype=torch.float64)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), attention_mask=mask[None, None],
                       position_ids=torch.arange(padded)[None]).logits[0]
    return ids, logits, float(torch.log_softmax(logits[n - 1], -1)[continuation[0]])


# --- multiple-choice arithmetic -----------------------------------------------------------------------------------

def test_choice_questions_have_four_distinct_options_and_are_deterministic(tokenizer):
    questions = tasks.arithmetic_choices(tokenizer, per_family=6)
    assert questions == tasks.arithmetic_choices(tokenizer, per_family=6)
    assert questions != tasks.arithmetic_choices(tokenizer, per_family=6, seed=1)
    queries = tasks.arithmetic_queries(6)
    assert len(questions) == len(queries) == 12 and {q.family for q in queries} == {"story", "expression"}
    for question, query in zip(questions, queries):
        assert len(set(question.options)) == 4 and 0 <= question.gold < 4
        assert question.options[question.gold] == str(query.answer)
        assert all(int(option) >= 0 for option in question.options)
        assert len({ids[0] for ids in question.option_ids}) == 4  # B3 scores the first token: they must differ
        lead = query.worked_answer().rsplit(" = ", 1)[0] + " = "
        assert tokenizer.decode(question.context_ids) == query.prompt + lead
        # the same tokens as the worked answer the model was trained on, up to the right option
        trained = query.prompt_ids(tokenizer) + tokenizer(query.worked_answer(), add_special_tokens=False)["input_ids"]
        right = list(question.context_ids + question.option_ids[question.gold])
        assert trained[:len(right)] == right
    assert len({q.gold for q in questions}) > 1  # the right option is not always in the same place


def test_wrong_results_are_plausible_mistakes():
    for query in tasks.arithmetic_queries(12):
        wrong, answer = tasks.wrong_results(query), query.answer
        before = query.steps[-2].result if len(query.steps) > 1 else query.start
        assert len(set(wrong)) == len(wrong) and answer not in wrong and min(wrong) >= 0
        assert {answer + 1, answer - 1, before} - {-1, answer} <= set(wrong[:8])


# --- B3 log-likelihood ----------------------------------------------------------------------------------------------

def test_input_layout_masks_the_first_continuation_token_and_pads_to_the_block():
    assert loglik_input([9, 9, 9], [7, 8], block_size=4, mask_id=MASK, eos_id=EOS) == [9, 9, 9, MASK, 8, EOS, MASK,
                                                                                         MASK]
    # already a multiple of the block: upstream still pads, a whole block of EOS + masks
    assert loglik_input([9, 9], [7, 8], block_size=4, mask_id=MASK, eos_id=EOS) == [9, 9, MASK, 8, EOS, MASK, MASK,
                                                                                     MASK]
    with pytest.raises(DFlashError, match="non-empty"):
        loglik_input([], [7], block_size=4, mask_id=MASK, eos_id=EOS)
    with pytest.raises(DFlashError, match="mask id"):
        loglik_input([MASK], [7], block_size=4, mask_id=MASK, eos_id=EOS)


@pytest.mark.parametrize("context_length, continuation_length", [(20, 3), (29, 3), (40, 1)])
def test_score_is_the_log_softmax_of_one_explicit_forward(model, context_length, continuation_length):
    context, continuation = random_ids(context_length, 1), random_ids(continuation_length, 2)
    ids, logits, expected = brute_force(model, context, continuation)
    assert loglik_input(context, continuation, **SCORING) == ids
    torch.testing.assert_close(choice_logits(model, context, continuation, **SCORING), logits, rtol=0, atol=1e-12)
    assert continuation_logprobs(model, context, continuation, **SCORING) == pytest.approx(expected, abs=1e-12)


def test_token_shift_reads_the_logits_before_the_masked_position(model):
    context, continuation = random_ids(20, 3), random_ids(2, 4)
    logits = choice_logits(model, context, continuation, **SCORING)
    score = continuation_logprobs(model, context, continuation, **SCORING)
    assert score == pytest.approx(float(torch.log_softmax(logits[19], -1)[continuation[0]]), abs=1e-12)
    assert score != pytest.approx(float(torch.log_softmax(logits[20], -1)[continuation[0]]), abs=1e-3)


def test_the_scored_block_matters_and_later_blocks_do_not(model):
    # n-1 = 19 and EOS at 22 share block 0: attention there is bidirectional, so EOS and x_1 change the score
    context, continuation = random_ids(20, 5), random_ids(2, 6)
    score = continuation_logprobs(model, context, continuation, **SCORING)
    assert score != pytest.approx(continuation_logprobs(model, context, continuation, **{**SCORING, "eos_id": 2}))
    assert score != pytest.approx(continuation_logprobs(model, context, [continuation[0], 99], **SCORING))
    # n = 32: the masked position starts block 1, so nothing from it on reaches the logits at 31 (exactly)
    context = random_ids(32, 7)
    score = continuation_logprobs(model, context, continuation, **SCORING)
    assert continuation_logprobs(model, context, [continuation[0], 99, 98], **{**SCORING, "eos_id": 2}) == score
    # batching pads short rows with whole mask blocks: the same score up to float rounding
    pairs = [(random_ids(20, 8), continuation), (random_ids(90, 9), random_ids(3, 10)), (context, continuation)]
    batched = batched_continuation_logprobs(model, pairs, **SCORING)
    single = [continuation_logprobs(model, c, x, **SCORING) for c, x in pairs]
    assert batched == pytest.approx(single, rel=0, abs=1e-10)
    assert batched_continuation_logprobs(model, [], **SCORING) == []


def test_choice_scores_and_accuracy(model, tokenizer):
    questions = tasks.arithmetic_choices(tokenizer, per_family=2)
    scores = tasks.choice_scores(model, questions, **SCORING)
    assert [len(s) for s in scores] == [4] * 4
    assert scores[0][1] == pytest.approx(continuation_logprobs(model, questions[0].context_ids,
                                                               questions[0].option_ids[1], **SCORING), abs=1e-10)
    perfect = [[0.0 if i == q.gold else -1.0 for i in range(4)] for q in questions]
    assert tasks.choice_accuracy(questions, perfect) == 1.0
    assert tasks.choice_accuracy(questions, [[0.0] * 4 for _ in questions]) == sum(q.gold == 0 for q in questions) / 4


# --- HumanEval --------------------------------------------------------------------------------------------------------

ADD = tasks.CodeProblem("Toy/0", 'def add(a, b):\n    """Sum of a and b."""\n',
                        "def check(candidate):\n    assert candidate(2, 3) == 5\n", "add")


def test_humaneval_runs_completions_in_a_subprocess():
    assert ADD.grade("    return a + b\n", timeout=5) == ("passed", True)
    assert ADD.grade("Here:\n```python\ndef add(a, b):\n    return b + a\n```\nDone.", timeout=5) == ("passed", True)
    assert ADD.grade("    return a - b\n", timeout=5) == ("failed", False)
    assert ADD.grade("    while True:\n        pass\n", timeout=1) == ("timed out", False)


def test_humaneval_problems_come_from_the_wheel():
    assert tasks.task_unavailable("humaneval") is None
    problems = tasks.humaneval_problems()
    assert len(problems) == 164 and problems[0].qid == "HumanEval/0"
    row = tasks.dataset_rows(tasks.HUMANEVAL)[0]
    assert problems[0].grade(row["canonical_solution"], timeout=10) == ("passed", True)
    assert len(tasks.humaneval_problems(5)) == 5


# --- profiles and data ------------------------------------------------------------------------------------------------

@pytest.fixture
def empty_hub(monkeypatch, tmp_path):
    standins.point_hf_home(monkeypatch, tmp_path / "hf_home", datasets_cache=tmp_path / "datasets")
    monkeypatch.setattr(loading, "_downloads_allowed", False, raising=False)
    return tmp_path / "hf_home"


def test_gpu_profile_gives_one_line_reasons(empty_hub, monkeypatch):
    profile = PROFILES["gpu-fastdllm-v2-7b"]
    reason = profile.unavailable()
    assert "CUDA" in reason and "\n" not in reason
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    reason = profile.unavailable()
    assert "hf download Efficient-Large-Model/Fast_dLLM_v2_7B" in reason and "\n" not in reason
    missing = dataclasses.replace(PROFILES["tiny"], model="/nonexistent/block-diffusion")
    assert "/nonexistent/block-diffusion is missing" in missing.unavailable()
    if not (TINY_MODEL / "config.json").exists():
        assert "dflash train block-diffusion" in PROFILES["tiny"].unavailable()


def test_gsm8k_and_mmlu_give_a_reason_when_the_data_is_absent(empty_hub, tokenizer):
    for name, hub_id in (("gsm8k", "openai/gsm8k"), ("mmlu", "cais/mmlu")):
        reason = tasks.task_unavailable(name)
        assert hub_id in reason and "hf download" in reason and "\n" not in reason
        with pytest.raises(DFlashError, match=hub_id):
            tasks.load_task(name, tokenizer, 2)


def _parquet(rows) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def test_mmlu_and_gsm8k_from_the_local_cache(empty_hub, tokenizer):
    def row(subject, i):
        return {"question": f" {subject} question {i}? ", "subject": subject, "choices": [f"c{i}{k}" for k in range(4)],
                "answer": i % 4}
    subjects = ("abstract_algebra", "anatomy")
    readme = ("---\nconfigs:\n- config_name: all\n  data_files:\n  - split: test\n    path: all/test-*\n"
              "  - split: dev\n    path: all/dev-*\n---\n")
    standins.write_hub_repo(empty_hub / "hub", "cais/mmlu", {
        "README.md": readme.encode(),
        "all/test-00000-of-00001.parquet": _parquet([row(s, i) for s in subjects for i in range(3)]),
        "all/dev-00000-of-00001.parquet": _parquet([row(s, 10 + i) for s in subjects for i in range(5)])},
        repo_type="dataset")
    assert tasks.task_unavailable("mmlu") is None
    questions = tasks.load_task("mmlu", tokenizer)
    assert len(questions) == 6 and [q.gold for q in questions] == [0, 1, 2] * 2
    assert all(q.options == (" A", " B", " C", " D") for q in questions)
    text = tokenizer.decode(questions[4].context_ids)
    assert text.startswith("<|system|>\nThe following are multiple choice questions (with answers) about anatomy.")
    assert text.count("<|assistant|>\n") == 6 and text.endswith("<|assistant|>\n")  # 5 shots + the prompt's header
    assert ("anatomy question 1?\nA. c10\nB. c11\nC. c12\nD. c13\nAnswer:<|end|>") in text
    assert "<|user|>\nanatomy question 10?" in text and "<|assistant|>\nA<|end|>" in text
    assert len(tasks.mmlu_questions(tokenizer, count=4)) == 4

    standins.write_hub_repo(empty_hub / "hub", "openai/gsm8k", {
        "README.md": b"---\nconfigs:\n- config_name: main\n  data_files:\n  - split: test\n"
                     b"    path: main/test-*\n---\n",
        "main/test-00000-of-00001.parquet": _parquet(standins.gsm8k_rows("test", "main", 4))}, repo_type="dataset")
    queries = tasks.load_task("gsm8k", tokenizer, 3)
    assert [q.answer for q in queries] == [3, 6, 9]
    assert "\\boxed{}" in tokenizer.decode(queries[0].prompt_ids(tokenizer))
    assert queries[1].grade("so \\boxed{6}") == (6, True)


def test_load_reads_the_ids_from_the_model_directory(tmp_path, tokenizer):
    directory = tmp_path / "block-diffusion"
    random_target(0, vocab_size=512, dtype=torch.float32).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "manifest.json").write_text('{"block_size": 32, "mask_token_id": 4, "stop_token_ids": [1]}')
    loaded = dataclasses.replace(PROFILES["tiny"], model=str(directory)).load()
    assert (loaded.mask_id, loaded.stop_ids, loaded.eos_id, loaded.block_size) == (4, (1,), 1, 32)
    with pytest.raises(DFlashError, match="block size 32"):
        dataclasses.replace(PROFILES["tiny"], model=str(directory), block_size=16).load()


def test_a_fast_dllm_config_loads_as_qwen2_without_remote_code(tmp_path, tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    original = Qwen2ForCausalLM(Qwen2Config(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=64)).eval()
    directory = tmp_path / "fast-dllm"
    original.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type="Fast_dLLM_Qwen", architectures=["Fast_dLLM_QwenForCausalLM"], bd_size=32,
                  auto_map={"AutoConfig": "configuration.Fast_dLLM_QwenConfig",
                            "AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM"})
    (directory / "config.json").write_text(json.dumps(config))
    profile = dataclasses.replace(PROFILES["gpu-fastdllm-v2-7b"], model=str(directory), device="cpu", dtype="float32")
    loaded = profile.load()
    assert type(loaded.model).__name__ == "Qwen2ForCausalLM"
    assert (loaded.mask_id, loaded.stop_ids) == (151665, (151645,))
    ids = torch.tensor([random_ids(40, 11)])
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, original(input_ids=ids).logits)
