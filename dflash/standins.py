"""Stand-ins for the GPU profiles' checkpoints and datasets, written in the real Hugging Face cache layout.

`build_hub_standins(hf_home)` fills `hf_home/hub/` in a few seconds, without network, the way `hf download`
leaves it (`models--Qwen--Qwen3-4B/{blobs,refs/main,snapshots/<40-hex commit>/...}`, snapshot files are
relative symlinks into blobs/), so that with HF_HOME=hf_home `huggingface_hub.snapshot_download(id,
local_files_only=True)` resolves every id the gpu-qwen3-4b profile names:

* target `Qwen/Qwen3-4B`: a random Qwen3 with hidden size 32 and 6 layers but Qwen3's vocabulary size (151936,
  tied embeddings, bf16, about 10 MB), saved as sharded safetensors with model.safetensors.index.json, its
  generation_config.json (eos [151645, 151643]) and a Qwen3-style tokenizer: byte-level BPE without merges, so
  plain text encodes to its UTF-8 bytes (id = byte value, see `byte_ids`), plus Qwen3's added tokens at
  Qwen3's ids (`<|endoftext|>` 151643, `<|im_start|>` 151644, `<|im_end|>` 151645 = eos, `<think>` 151667,
  `</think>` 151668), and a Qwen3-like chat template that renders an empty think block when
  enable_thinking is false;
* draft `z-lab/Qwen3-4B-DFlash-b16`: a z-lab-format DFlash draft (block_size 16, num_target_layers,
  dflash_config.target_layer_ids and mask_token_id 151669) for that target;
* datasets `MathArena/aime_2025` (split train: problem_idx, problem, answer), `openai/gsm8k` (configs main and
  socratic, splits train and test: question, answer) and `HuggingFaceH4/mt_bench_prompts` (split train: prompt
  = 2 turns, prompt_id, category, reference), as parquet files (or JSON Lines: `data_format="jsonl"`) in the
  layouts of the real repositories, each with a README.md whose YAML `configs:` section names its data files, as
  on the Hub. Their text has literal braces (LaTeX, code) so a template filled with str.format would break on it.

The stand-ins let the A100 path (offline resolution, dataset loading, prompt templates, chat template, stop
ids) be exercised on a CPU before anyone has a GPU; their numbers mean nothing.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

TARGET_ID = "Qwen/Qwen3-4B"
DRAFT_ID = "z-lab/Qwen3-4B-DFlash-b16"
AIME_ID, GSM8K_ID, MT_BENCH_ID = "MathArena/aime_2025", "openai/gsm8k", "HuggingFaceH4/mt_bench_prompts"
QWEN3_VOCAB_SIZE = 151936  # rows of Qwen3's embedding table (the tokenizer itself has 151669 tokens)
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 151643, 151644, 151645
THINK_ID, END_THINK_ID = 151667, 151668
EOS_ID = IM_END_ID  # Qwen3 chat tokenizers: eos_token is <|im_end|>
MASK_TOKEN_ID = 151669  # z-lab DFlash drafts for Qwen3 (spec 1.2): the first row after the tokenizer's tokens
# Qwen3's added tokens, id -> (content, special); the non-special ones (tool calls, think) are plain text tokens
QWEN3_ADDED_TOKENS = {
    151643: ("<|endoftext|>", True), 151644: ("<|im_start|>", True), 151645: ("<|im_end|>", True),
    151646: ("<|object_ref_start|>", True), 151647: ("<|object_ref_end|>", True), 151648: ("<|box_start|>", True),
    151649: ("<|box_end|>", True), 151650: ("<|quad_start|>", True), 151651: ("<|quad_end|>", True),
    151652: ("<|vision_start|>", True), 151653: ("<|vision_end|>", True), 151654: ("<|vision_pad|>", True),
    151655: ("<|image_pad|>", True), 151656: ("<|video_pad|>", True), 151657: ("<tool_call>", False),
    151658: ("</tool_call>", False), 151659: ("<|fim_prefix|>", True), 151660: ("<|fim_middle|>", True),
    151661: ("<|fim_suffix|>", True), 151662: ("<|fim_pad|>", True), 151663: ("<|repo_name|>", True),
    151664: ("<|file_sep|>", True), 151665: ("<tool_response>", False), 151666: ("</tool_response>", False),
    151667: ("<think>", False), 151668: ("</think>", False),
}

# Written for these stand-ins in the shape of Qwen3's template: ChatML turns; earlier assistant turns lose
# their reasoning; with add_generation_prompt the assistant header, and when enable_thinking is false an
# empty think block (what the research relies on: the Qwen3 DFlash drafts were trained without thinking).
QWEN3_STYLE_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- set content = message['content'] if message['content'] is string else '' %}"
    "{%- if message['role'] == 'assistant' and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: printable Latin-1 bytes stand for themselves, the other bytes are shifted
    to code points from 256 on, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


def byte_ids(text: str) -> list[int]:
    """The stand-in tokenizer's ids for text without special tokens: its UTF-8 bytes (NFC-normalised)."""
    import unicodedata
    return list(unicodedata.normalize("NFC", text).encode("utf-8"))


def chat_ids(turns: list[str], *, answers: list[str] = (), thinking: bool = False) -> list[int]:
    """Ids the stand-in chat template gives for user turns (and the assistant answers between them) with
    add_generation_prompt, built by hand from the token ids (not by the tokenizer): with enable_thinking=False
    (`thinking` False) the assistant header is followed by an empty think block, with it on by nothing (the
    model thinks first), as in Qwen3's template."""
    ids: list[int] = []
    for index, turn in enumerate(turns):
        ids += [IM_START_ID, *byte_ids("user\n" + turn), IM_END_ID, *byte_ids("\n")]
        if index < len(answers):
            ids += [IM_START_ID, *byte_ids("assistant\n" + answers[index]), IM_END_ID, *byte_ids("\n")]
    ids += [IM_START_ID, *byte_ids("assistant\n")]
    return ids if thinking else ids + [THINK_ID, *byte_ids("\n\n"), END_THINK_ID, *byte_ids("\n\n")]


def repo_folder(hub_cache: Path, repo_id: str, repo_type: str = "model") -> Path:
    """hub_cache/models--owner--name (or datasets--owner--name), as huggingface_hub names it."""
    return Path(hub_cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"


def write_hub_repo(hub_cache: Path, repo_id: str, files: dict[str, bytes], *, repo_type: str = "model") -> dict:
    """Write `files` (path in the repo -> content) as one snapshot of `repo_id` in the cache layout: content in
    blobs/<sha256>, snapshots/<commit>/<path> a relative symlink to it (a copy where symlinks fail, as
    huggingface_hub does on such file systems), refs/main holding the commit. The commit is a digest of the
    files, so the same content gives the same 40-hex commit."""
    digest = hashlib.sha1()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    commit = digest.hexdigest()
    folder = repo_folder(hub_cache, repo_id, repo_type)
    snapshot = folder / "snapshots" / commit
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        blob = folder / "blobs" / hashlib.sha256(content).hexdigest()
        if not blob.exists():
            blob.write_bytes(content)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        try:
            link.symlink_to(os.path.relpath(blob, link.parent))
        except OSError:
            shutil.copyfile(blob, link)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)  # no newline, like huggingface_hub
    return {"id": repo_id, "repo_type": repo_type, "commit": commit, "path": snapshot, "folder": folder,
            "files": sorted(files)}


def _directory_files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def qwen3_style_tokenizer():
    """A `tokenizers.Tokenizer`: byte-level BPE without merges (id = byte value) plus Qwen3's added tokens at
    Qwen3's ids. Small (a few KB) and exact: the ids of any text are known without running it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    vocab.update({content: token_id for token_id, (content, _) in QWEN3_ADDED_TOKENS.items()})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    # tokens already in the model's vocabulary keep their ids there (151643...), not the next free ones
    tokenizer.add_special_tokens([AddedToken(c, special=True, normalized=False)
                                  for c, special in QWEN3_ADDED_TOKENS.values() if special])
    tokenizer.add_tokens([AddedToken(c, special=False, normalized=False)
                          for c, special in QWEN3_ADDED_TOKENS.values() if not special])
    return tokenizer


def _target_files(vocab_size: int, seed: int) -> tuple[dict[str, bytes], object]:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=40960,
                         rope_theta=1_000_000.0, tie_word_embeddings=True, bos_token_id=ENDOFTEXT_ID,
                         eos_token_id=EOS_ID, rms_norm_eps=1e-6)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16).eval()
    from .loading import quiet
    with tempfile.TemporaryDirectory(prefix="dflash-standin-") as staging, quiet():
        # the embedding table alone (151936 x 32 bf16, ~9.7 MB) exceeds the shard size: at least two shards
        model.save_pretrained(staging, max_shard_size="2MB", safe_serialization=True)
        files = _directory_files(Path(staging))
    files["generation_config.json"] = _json({"bos_token_id": ENDOFTEXT_ID, "do_sample": True,
                                             "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
                                             "pad_token_id": ENDOFTEXT_ID, "temperature": 0.6, "top_k": 20,
                                             "top_p": 0.95})
    files["tokenizer.json"] = qwen3_style_tokenizer().to_str().encode()
    files["tokenizer_config.json"] = _json({
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "add_bos_token": False, "add_prefix_space": False,
        "clean_up_tokenization_spaces": False, "errors": "replace", "model_max_length": 131072,
        "split_special_tokens": False, "chat_template": QWEN3_STYLE_CHAT_TEMPLATE})
    files["README.md"] = b"Stand-in for Qwen/Qwen3-4B written by dflash.standins (random weights).\n"
    return files, model


def _draft_files(target, seed: int) -> tuple[dict[str, bytes], dict]:
    import torch

    from .model import DFlashDraftModel, make_draft_config
    torch.manual_seed(seed + 1)
    config = make_draft_config(target.config, num_layers=2, block_size=16, mask_token_id=MASK_TOKEN_ID)
    draft = DFlashDraftModel(config).to(torch.bfloat16).eval()
    with tempfile.TemporaryDirectory(prefix="dflash-standin-") as staging:
        draft.save_pretrained(staging)
        files = _directory_files(Path(staging))
    config_json = json.loads(files["config.json"])
    config_json["torch_dtype"] = "bfloat16"
    files["config.json"] = _json(config_json)
    return files, {"block_size": draft.block_size, "num_target_layers": draft.num_target_layers,
                   "target_layer_ids": draft.target_layer_ids, "mask_token_id": draft.mask_token_id}


def _json(value) -> bytes:
    return (json.dumps(value, indent=2) + "\n").encode()


def _parquet(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


DATA_WRITERS = {"parquet": _parquet, "jsonl": _jsonl}  # data file suffix -> writer


def _readme(configs: list[tuple[str, dict[str, str]]]) -> bytes:
    lines = ["---", "configs:"]
    for name, splits in configs:
        lines += [f"- config_name: {name}", "  data_files:"]
        for split, path in splits.items():
            lines += [f"  - split: {split}", f"    path: {path}"]
    return ("\n".join(lines + ["---", "", "Stand-in written by dflash.standins.", ""])).encode()


def aime_rows(count: int = 30) -> list[dict]:
    return [{"problem_idx": i + 1,
             "problem": f"Let $x_{{{i + 1}}}$ satisfy $\\frac{{x}}{{{i + 2}}} = {i + 3}$. Find the remainder when "
                        f"$x^{{{i % 4 + 2}}}$ is divided by $1000$.",
             "answer": ((i + 3) * (i + 2)) ** (i % 4 + 2) % 1000} for i in range(count)]


def gsm8k_rows(split: str, config: str, count: int) -> list[dict]:
    tag = "" if config == "main" else " (socratic)"
    return [{"question": f"{split} question {i}{tag}: Ann has {i + 3} apples and buys {2 * i} more. How many "
                         f"apples does she have? Use {{braces}} freely.",
             "answer": f"She has {i + 3} + {2 * i} = <<{i + 3}+{2 * i}={3 * i + 3}>>{3 * i + 3} apples.\n"
                       f"#### {3 * i + 3}"} for i in range(count)]


MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")


def mt_bench_rows(count: int = 80) -> list[dict]:
    rows = []
    for i in range(count):
        category = MT_BENCH_CATEGORIES[i // 10 % len(MT_BENCH_CATEGORIES)]
        first = (f"Turn one of prompt {i} ({category}): write a Python dict {{'k': {i}}} and explain "
                 "`{placeholder}` syntax.")
        second = f"Turn two of prompt {i}: now rewrite your previous answer in {i % 5 + 2} sentences."
        rows.append({"category": category, "prompt": [first, second],
                     "reference": [f"reference {i}"] if category in ("math", "reasoning", "coding") else [],
                     "prompt_id": int(hashlib.sha256("".join([first, second]).encode()).hexdigest(), 16) % 10**8})
    return rows


def _dataset_repos(hub_cache: Path, data_format: str = "parquet") -> dict:
    repos, write = {}, DATA_WRITERS[data_format]
    aime = aime_rows()
    repos[AIME_ID] = write_hub_repo(hub_cache, AIME_ID, {
        "README.md": _readme([("default", {"train": "data/train-*"})]),
        f"data/train-00000-of-00001.{data_format}": write(aime)}, repo_type="dataset")
    repos[AIME_ID].update(config=None, split="train", rows=aime)
    gsm8k_files = {"README.md": _readme([(c, {"train": f"{c}/train-*", "test": f"{c}/test-*"})
                                         for c in ("main", "socratic")])}
    for config in ("main", "socratic"):
        for split, count in (("train", 12), ("test", 50)):
            gsm8k_files[f"{config}/{split}-00000-of-00001.{data_format}"] = write(gsm8k_rows(split, config, count))
    repos[GSM8K_ID] = write_hub_repo(hub_cache, GSM8K_ID, gsm8k_files, repo_type="dataset")
    repos[GSM8K_ID].update(config="main", split="test", rows=gsm8k_rows("test", "main", 50))
    mt = mt_bench_rows()
    raw = "".join(json.dumps({"question_id": 81 + i, "category": r["category"], "turns": r["prompt"]}) + "\n"
                  for i, r in enumerate(mt))  # the repo also keeps the original LMSYS file (field `turns`)
    repos[MT_BENCH_ID] = write_hub_repo(hub_cache, MT_BENCH_ID, {
        "README.md": _readme([("default", {"train": "data/train-*"})]),
        f"data/train-00000-of-00001-7c1b0b9a4ee2fcd1.{data_format}": write(mt), "raw/question.jsonl": raw.encode()},
        repo_type="dataset")
    repos[MT_BENCH_ID].update(config=None, split="train", rows=mt)
    return repos


def build_hub_standins(hf_home: Path, *, vocab_size: int = QWEN3_VOCAB_SIZE, target_id: str = TARGET_ID,
                       draft_id: str = DRAFT_ID, seed: int = 0, data_format: str = "parquet") -> dict:
    """Fill `hf_home/hub/` with the stand-ins (see the module docstring); returns what was written:
    {"hf_home", "hub_cache", "target": repo, "draft": repo, "datasets": {hub id: repo}}, a repo being a dict
    with id, repo_type, commit, path (the snapshot directory), folder, files, and for datasets config, split
    and rows (the rows of that split, in file order), and for the draft its dflash settings. Pass the ids of
    another profile (e.g. Qwen/Qwen3-8B, z-lab/Qwen3-8B-DFlash-b16) to stand in for it instead.
    `data_format` "jsonl" writes the datasets' data files as JSON Lines, the same rows and layout, for a machine
    without pyarrow (the harness reads JSON with the standard library; scripts/gpu_smoke.sh)."""
    if data_format not in DATA_WRITERS:
        raise ValueError(f"data_format must be one of {', '.join(DATA_WRITERS)}, got {data_format!r}")
    if vocab_size <= MASK_TOKEN_ID:
        raise ValueError(f"vocab_size {vocab_size} must exceed the mask id {MASK_TOKEN_ID} (Qwen3's table: 151936)")
    hf_home = Path(hf_home)
    hub_cache = hf_home / "hub"
    hub_cache.mkdir(parents=True, exist_ok=True)
    target_files, target = _target_files(vocab_size, seed)
    draft_files, draft_settings = _draft_files(target, seed)
    draft = write_hub_repo(hub_cache, draft_id, draft_files)
    draft.update(draft_settings)
    return {"hf_home": hf_home, "hub_cache": hub_cache, "target": write_hub_repo(hub_cache, target_id, target_files),
            "draft": draft, "datasets": _dataset_repos(hub_cache, data_format)}


def hf_env(hf_home: Path, **extra: str) -> dict[str, str]:
    """Environment for a subprocess that should see `hf_home` as its Hugging Face home, offline: a copy of
    os.environ with HF_HOME set, HF_HUB_CACHE / HF_DATASETS_CACHE unset (they would override it) and
    HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1, then `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
                                                            "HF_DATASETS_CACHE")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.update(extra)
    return env


def point_hf_home(monkeypatch, hf_home: Path, *, datasets_cache: Path | None = None) -> None:
    """In this process, make huggingface_hub and datasets use `hf_home` (and be offline), undone by
    `monkeypatch` after the test. Setting HF_HOME alone is not enough once they are imported: both read it at
    import into module constants (`huggingface_hub.constants.HF_HUB_CACHE`, `datasets.config.HF_DATASETS_CACHE`),
    which are patched here; snapshot_download and load_dataset read those constants at call time."""
    import datasets.config as datasets_config
    import huggingface_hub.constants as hub_constants
    hf_home = Path(hf_home)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    if hasattr(hub_constants, "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.setattr(hub_constants, "HUGGINGFACE_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(datasets_config, "HF_DATASETS_CACHE", Path(datasets_cache or hf_home / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets_config, "HF_DATASETS_OFFLINE", True)
