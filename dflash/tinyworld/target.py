"""The tiny world's target model: a small Qwen3 trained from scratch on the tiny corpus.

Also the helpers that turn the target into training data for the draft
(self-distillation): `distillation_prompts` picks prompts from the *training* corpus
and `greedy_continuations` runs the target's batched greedy decoding on them.
"""

import json
import math
import os
import random
import time

import torch
from tqdm.auto import tqdm
from transformers import Qwen3Config, Qwen3ForCausalLM

from ..engine import left_pad
from .corpus import END, Corpus

ASSISTANT_HEADER = "<|assistant|>\n"


def make_target_config(tokenizer, **overrides) -> Qwen3Config:
    """~3M parameters: big enough to learn the tiny world, small enough to train on 2 CPU cores."""
    kw = dict(
        vocab_size=(len(tokenizer) + 63) // 64 * 64,  # padded to a multiple of 64
        hidden_size=192, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        head_dim=48, intermediate_size=576, tie_word_embeddings=True,
        max_position_embeddings=1024, rope_theta=10000.0,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    kw.update(overrides)
    return Qwen3Config(**kw)


def pack(texts, tokenizer, seq_len: int) -> torch.Tensor:
    """Concatenate all documents into one token stream and cut it into [N, seq_len] rows.
    Documents that don't already end with <|end|>\\n (code chunks) get an <|end|> token
    appended, so the model learns where documents stop."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    stream = []
    for text, doc in zip(texts, ids):
        stream += doc if text.endswith(END + "\n") else doc + [eos]
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len)


@torch.no_grad()
def mean_loss(model, rows: torch.Tensor, batch_size: int = 16) -> float:
    """Token-weighted cross-entropy (nats/token) of next-token prediction over packed rows."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        x = rows[i : i + batch_size]
        n = x.numel() - len(x)  # each row predicts seq_len - 1 tokens
        total += model(input_ids=x, labels=x).loss.item() * n
        count += n
    return total / max(count, 1)


def bf16_autocast_ok() -> bool:
    """bf16 matmuls are ~1.6x faster than fp32 on CPUs with AVX512-BF16, slower elsewhere."""
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check and check())


def warmup_cosine_lr(step: int, peak: float, warmup: int, steps: int) -> float:
    """Linear warmup to `peak`, then cosine down to 10% of it at `steps`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_target(corpus: Corpus, tokenizer, *, seed: int = 0, steps: int = 700, batch_size: int = 8,
                 seq_len: int = 256, lr: float = 3e-3, warmup: int = 50, weight_decay: float = 0.1,
                 out_dir: str | None = None, progress: bool = True, config_overrides: dict | None = None,
                 n_math_eval: int = 48, num_threads: int | None = None, bf16: bool | None = None,
                 exact_answer_category: str = "math"):
    """Train the target from scratch; returns (model, stats).

    Time per step (batch 8 x 256, bf16 autocast, idle 2-core machine): ~0.45 s with 1
    thread, ~0.28 s with 2 threads; the default 700 steps took 309 s with 1 thread
    (+ ~10 s evaluation).
    Small batches and many steps: in this heavily under-trained regime (~1.4M tokens for
    3M parameters) the number of updates matters more than tokens per update.
    bf16=None uses bf16 autocast for training where the CPU has AVX512-BF16 (weights,
    evaluation and the saved model stay fp32). Training runs with eager attention, which
    is ~10% faster than sdpa on CPU at this size; the returned model is set back to sdpa.
    num_threads=None keeps torch's setting (all cores), see the slow-step guard below."""
    t0 = time.time()
    bf16 = bf16_autocast_ok() if bf16 is None else bf16
    old_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    config = make_target_config(tokenizer, **(config_overrides or {}))
    model = Qwen3ForCausalLM(config)  # fp32 on CPU
    model.generation_config.update(do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    n_params = sum(p.numel() for p in model.parameters())

    data = pack(corpus.train_texts, tokenizer, seq_len)
    # AdamW, weight decay on matrices only (not norms), linear warmup then cosine to 10% of lr
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))

    gen = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(len(data), generator=gen), 0
    losses, window, best, thread_fallback_step = [], [], float("inf"), None
    model.set_attn_implementation("eager")
    model.train()
    bar = tqdm(range(steps), desc="target", disable=not progress)
    t_train = time.time()
    for step in bar:
        t_step = time.time()
        if pos + batch_size > len(order):  # new epoch: reshuffle the packed rows
            order, pos = torch.randperm(len(data), generator=gen), 0
        x = data[order[pos : pos + batch_size]]
        pos += batch_size
        for g in opt.param_groups:
            g["lr"] = warmup_cosine_lr(step, lr, warmup, steps)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")

        # Slow-step guard: multi-threaded torch gets ~10x slower when another multi-threaded
        # process shares the 2 cores (OpenMP threads spin at barriers); 1 thread is then far
        # faster, so drop to 1 thread if 20-step averages get 3x slower than the best seen.
        window.append(time.time() - t_step)
        if len(window) == 20:
            mean, window = sum(window) / 20, []
            best = min(best, mean)
            if torch.get_num_threads() > 1 and mean > 3 * best:
                torch.set_num_threads(1)
                thread_fallback_step = step
    train_seconds = time.time() - t_train
    model.set_attn_implementation("sdpa")
    model.eval()

    # held-out loss per category (nats/token, and nats/char which doesn't depend on the
    # tokenizer), plus the same measure on a slice of training rows
    heldout_loss, per_char, total, count = {}, {}, 0.0, 0
    for cat, texts in corpus.heldout_texts.items():
        rows = pack(texts, tokenizer, seq_len)
        heldout_loss[cat] = mean_loss(model, rows)
        n_pred = rows.numel() - len(rows)
        per_char[cat] = heldout_loss[cat] * n_pred / sum(len(tokenizer.decode(r[1:])) for r in rows)
        total += heldout_loss[cat] * n_pred
        count += n_pred
    heldout_loss["all"] = total / count
    train_slice_loss = mean_loss(model, data[torch.randperm(len(data), generator=gen)[:64]])

    # greedy samples for one held-out prompt per category, and held-out arithmetic accuracy
    samples = {}
    for cat, prompts in corpus.heldout.items():
        cont = greedy_continuations(model, tokenizer, prompts[:1], 64)[0]
        samples[cat] = {"prompt": prompts[0], "continuation": tokenizer.decode(cont)}
    math_docs = corpus.heldout_texts[exact_answer_category][:n_math_eval]
    math_prompts = [d[: d.index(ASSISTANT_HEADER) + len(ASSISTANT_HEADER)] for d in math_docs]
    outs = greedy_continuations(model, tokenizer, math_prompts, 32)
    math_acc = sum(d.endswith(tokenizer.decode(o) + "\n") for d, o in zip(math_docs, outs)) / len(math_docs)
    torch.set_num_threads(old_threads)

    k = -(-steps // 20)  # ~20 points on the loss curve
    stats = {
        "params": n_params,
        "steps": steps, "batch_size": batch_size, "seq_len": seq_len, "lr": lr, "seed": seed,
        "bf16_autocast": bf16, "thread_fallback_step": thread_fallback_step,
        "train_tokens": data.numel(), "tokens_seen": steps * batch_size * seq_len,
        "epochs": steps * batch_size / len(data),
        "train_loss": {"first": losses[0], "last20_mean": sum(losses[-20:]) / len(losses[-20:]),
                       "curve": [round(sum(losses[i : i + k]) / len(losses[i : i + k]), 4)
                                 for i in range(0, steps, k)]},
        "train_slice_loss": train_slice_loss,
        "heldout_loss": heldout_loss,
        "heldout_nats_per_char": per_char,
        f"heldout_{exact_answer_category}_exact_answer": math_acc,
        "samples": samples,
        "train_seconds": train_seconds,
        "wall_seconds": time.time() - t0,
    }
    if out_dir is not None:
        save_target(model, tokenizer, out_dir, stats)
    return model, stats


def save_target(model, tokenizer, out_dir: str, stats: dict | None = None):
    """model.safetensors + config.json + generation_config.json + tokenizer files (+ stats.json)."""
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if stats is not None:
        with open(os.path.join(out_dir, "stats.json"), "w") as f:
            json.dump(stats, f, indent=2)


@torch.no_grad()
def greedy_continuations(model, tokenizer, prompts, max_new_tokens: int, batch_size: int = 32) -> list[list[int]]:
    """The target's greedy continuation of each prompt, as token ids (up to and including
    <|end|> if it is produced, else exactly max_new_tokens ids). Prompts are tokenized
    without special tokens added; batches are left padded with an attention mask.

    Prompts are sorted by length before batching so padding is rare; results come back in
    the input order and match un-batched greedy decoding (checked in tests)."""
    model.eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    enc = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    out = [None] * len(enc)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        input_ids, valid, _ = left_pad([enc[i] for i in idx], pad)
        width, attention_mask = input_ids.shape[1], valid.long()
        gen = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
        for r, i in enumerate(idx):
            cont = gen[r, width:].tolist()
            out[i] = cont[: cont.index(eos) + 1] if eos in cont else cont
    return out


def distillation_prompts(corpus: Corpus, tokenizer, n: int, seed: int = 0,
                         min_code_tokens: int = 16, max_code_tokens: int = 128) -> list[str]:
    """n prompts drawn from the *training* texts, a third per category:
    chat/math: the user turn up to and including "<|assistant|>\\n" (distinct prompts);
    code: a window of whole lines of a training chunk, 16..128 tokens, starting at a line
    boundary (so the target continues mid-file, as in the packed training stream) and
    without its last newline (see corpus.code_prompt for why)."""
    rng = random.Random(seed)
    by_cat = {"code": [], "math": [], "chat": []}
    for text, cat in zip(corpus.train_texts, corpus.train_categories):
        by_cat[cat].append(text)
    quota = {"code": n // 3, "math": n // 3, "chat": n - 2 * (n // 3)}

    prompts = []
    for cat in ("math", "chat"):
        heads = sorted({t[: t.index(ASSISTANT_HEADER) + len(ASSISTANT_HEADER)] for t in by_cat[cat]})
        rng.shuffle(heads)
        prompts += [heads[i % len(heads)] for i in range(quota[cat])]  # repeats only if n is huge

    for _ in range(quota["code"]):
        lines = rng.choice(by_cat["code"]).splitlines(keepends=True)
        start = rng.choice([i for i, line in enumerate(lines) if line.strip()])  # no blank-only prompts
        budget = rng.randint(min_code_tokens, max_code_tokens)
        window, used = [], 0
        for line in lines[start:]:
            cost = len(tokenizer(line, add_special_tokens=False)["input_ids"])
            if window and used + cost > budget:
                break
            window.append(line)
            used += cost
        prompts.append("".join(window).rstrip("\n"))
    rng.shuffle(prompts)
    return prompts
