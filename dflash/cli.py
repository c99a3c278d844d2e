"""Command line: `dflash generate`, `models`, `train`, `bench`, `gate-quality`, `baselines`, `report`, `cascade`,
`convert-draft`."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from .argtypes import bounded_int, finite_float, int_list
from .errors import DFlashError

SEED_MAX = (1 << 63) - 1


def _prompt_ids(args, tokenizer) -> list[int]:
    if args.prompt_ids is not None:
        return args.prompt_ids
    if args.prompt != args.prompt.encode("utf-8", "surrogateescape").decode("utf-8", "replace"):
        raise DFlashError("--prompt is not valid UTF-8 text (the shell passed bytes in another encoding); "
                          "re-encode it as UTF-8, or pass token ids with --prompt-ids.")
    if args.chat:
        from .loading import chat_prompt_ids
        return chat_prompt_ids(tokenizer, [{"role": "user", "content": args.prompt}])
    return tokenizer(args.prompt, add_special_tokens=False)["input_ids"]


def cmd_generate(args) -> None:
    from .engine import generate
    from .loading import check_device, load_draft, load_target, load_tokenizer
    check_device(args.device)
    tokenizer = load_tokenizer(args.target)
    prompt = _prompt_ids(args, tokenizer)
    target = load_target(args.target, device=args.device, dtype=args.dtype)
    draft = None if args.draft.lower() == "none" else load_draft(args.draft, device=args.device, dtype=args.dtype)
    block_size = args.block_size if draft is not None else 1  # target-only verifies one token per cycle
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None and not args.no_stop else []
    result = generate(target, draft, prompt, max_new_tokens=args.max_new_tokens, block_size=block_size,
                      temperature=args.temperature, seed=args.seed, stop_token_ids=stop, acceptance=args.acceptance)
    text = tokenizer.decode(result.output_ids, skip_special_tokens=False)
    if args.json:
        print(json.dumps({**result.to_dict(trace=args.trace), "text": text}), flush=True)
    else:
        print(text, flush=True)
        print(f"tau {result.tau:.2f} over {result.num_cycles} cycles | {result.tokens_per_s:.1f} tokens/s | "
              f"TTFT {result.ttft_s * 1e3:.1f} ms | TPOT {result.tpot_s * 1e3:.2f} ms", file=sys.stderr)


def cmd_models(args) -> None:
    from .loading import KNOWN_MODELS
    def location(model, which):
        return model.location(which, convert=False)  # listing never converts (smol: ~30 s on first use)
    rows = [{"name": m.name, "target": location(m, "target"), "draft": location(m, "draft"),
             "description": m.description} for m in KNOWN_MODELS.values()]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['name']:10s} target={row['target']}  draft={row['draft']}\n{'':10s} {row['description']}")


DRAFT_DEFAULTS = dict(block_size=16, steps=1000, batch_size=4, lr=1e-3)


def cmd_train_tiny(args) -> None:
    from .tinyworld.build import build_tiny_world
    build_tiny_world(args.out, quick=args.quick)


def cmd_train_ladder(args) -> None:
    from .cascade.ladder import build_ladder
    build_ladder(args.out, quick=args.quick)


def cmd_train_block_diffusion(args) -> None:
    from .blockdiffusion.convert import Recipe, convert
    chosen = dict(block_size=args.block_size, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                  seed=args.seed)
    convert(args.base, args.out, data=args.data, mask_token=args.mask_token, resume=args.resume,
            recipe=Recipe(**{k: v for k, v in chosen.items() if v is not None}),
            checkpoint_every=args.checkpoint_every, threads=args.threads, command="dflash " + " ".join(args.argv))


def cmd_train(args) -> None:
    """The draft recipe for any Hugging Face target (`dflash train --target ...`)."""
    for name, value in DRAFT_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not args.target or not args.prompts or not args.out:
        raise DFlashError("dflash train needs --target, --prompts and --out (or `dflash train tiny`).")
    from pathlib import Path
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise DFlashError(f"--out {args.out} is a file; pass a directory (it is created if missing).")
    import torch
    torch.set_num_threads(args.threads)
    from .loading import load_target, load_tokenizer
    from .training.prompt_sets import check_prompt_texts, load_prompt_texts
    from .training.recipe import RecipeData, RecipeOptions, run_recipe, tokenize_prompts
    from .training.train import DraftTrainingConfig
    tokenizer = load_tokenizer(args.target)
    train_texts = check_prompt_texts(load_prompt_texts(args.prompts, per_category=args.prompts_per_category),
                                     args.prompts)
    if args.heldout == "smol-heldout":
        from .profiles import get_profile
        from .prompts import benchmark_prompt_texts
        heldout = benchmark_prompt_texts(get_profile("smol"), args.heldout_per_category)
    else:
        heldout = load_prompt_texts(args.heldout, per_category=args.heldout_per_category)
    heldout_texts = check_prompt_texts(heldout, args.heldout)
    mask_token = args.mask_token or tokenizer.mask_token or (
        __import__("dflash.smol", fromlist=["MASK_TOKEN"]).MASK_TOKEN if args.target == "smol" else None)
    mask_id = tokenizer.convert_tokens_to_ids(mask_token) if mask_token else None
    if mask_id is None or mask_id == tokenizer.unk_token_id and mask_token != tokenizer.unk_token:
        raise DFlashError(f"No mask token: the tokenizer has none and --mask-token {mask_token!r} is not in its "
                          "vocabulary. Pass --mask-token with an existing, otherwise unused token.")
    chat = args.chat if args.chat is not None else args.target == "smol"
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    target = load_target(args.target, device=device, dtype="float32")
    layers = target.config.get_text_config().num_hidden_layers
    if args.target_layer_ids and max(args.target_layer_ids) >= layers:
        raise DFlashError(f"--target-layer-ids {args.target_layer_ids} include layers outside the target's {layers} "
                          f"decoder layers (valid: 0..{layers - 1}).")
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    data = RecipeData(tokenize_prompts(train_texts, tokenizer, chat=chat),
                      tokenize_prompts(heldout_texts, tokenizer, chat=chat), mask_token_id=mask_id,
                      stop_token_ids=stop, pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                      else stop[0] if stop else 0,
                      description={"target": args.target, "prompts": args.prompts, "heldout": args.heldout,
                                   "chat_template": chat, "mask_token": mask_token})
    layer_ids = args.target_layer_ids
    config = DraftTrainingConfig(num_layers=args.draft_layers, block_size=args.block_size,
                                 target_layer_ids=layer_ids, gamma=args.gamma, steps=args.steps,
                                 batch_size=args.batch_size, anchors_per_sequence=args.anchors,
                                 learning_rate=args.lr, seed=args.seed, bf16_autocast=args.bf16_autocast,
                                 loss_vocab=args.loss_vocab)
    options = RecipeOptions(distill_max_new_tokens=args.distill_max_new_tokens,
                            distill_batch_size=args.distill_batch_size, resume=args.resume,
                            distill_bf16_autocast=args.distill_bf16_autocast,
                            quality_max_new_tokens=args.quality_max_new_tokens,
                            quality_block_sizes=tuple(args.quality_block_sizes),
                            feature_batch_size=args.feature_batch_size, feature_dtype=args.feature_dtype,
                            checkpoint_every=args.checkpoint_every)
    run_recipe(target, data, args.out, config=config, options=options, command="dflash " + " ".join(args.argv))


def cmd_bench(args) -> None:
    """Peer benchmark (dflash.harness.peers) on a profile's datasets; prints the peer table, optionally writes JSON."""
    import torch
    torch.set_num_threads(args.threads)
    from .profiles import get_profile, unavailable_reason
    from .prompts import load_prompts
    from .harness.decode_tables import peers_table
    from .loading import enforce_offline, load_draft, load_target, load_tokenizer
    from .harness.peers import in_dtype, peer_metrics, peer_modes, run_peers
    enforce_offline()
    profile = get_profile(args.profile)
    if not (args.target and args.draft) and (reason := unavailable_reason(profile, datasets=args.dataset)):
        raise DFlashError(reason)
    target_name, draft_name = args.target or profile.target, args.draft or profile.draft
    loaded_target = load_target(target_name, device=profile.device, dtype=profile.dtype)
    loaded_draft = load_draft(draft_name, device=profile.device, dtype=profile.draft_dtype or profile.dtype)
    tokenizer = load_tokenizer(target_name)
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    count = args.prompts or profile.prompts
    args.dtype = args.dtype or ["float32", "bfloat16"]
    max_new = args.max_new_tokens or profile.max_new_tokens
    candidates = tuple(sorted({2, *profile.scheduler_candidates}))
    records = []
    for dtype in args.dtype:
        target, draft = in_dtype(loaded_target, loaded_draft, dtype)
        for name in args.dataset or [d.name for d in profile.datasets]:
            prompts = load_prompts(profile, profile.dataset(name), tokenizer, count)
            modes = peer_modes(target, draft, block_sizes=(4, 8, 16), scheduler_candidates=candidates)
            runs = run_peers(modes, prompts, max_new_tokens=max_new, stop_ids=stop)
            metrics = peer_metrics(runs, prompts, target)
            records.append({"id": f"peers/{profile.name}-{name}-{dtype}", "experiment": "peers", "dataset": name,
                            "params": {"prompts": len(prompts), "max_new_tokens": max_new, "target_dtype": dtype},
                            "metrics": metrics})
            print(f"\n{name} {dtype} (n={len(prompts)}, max_new_tokens={max_new}, threads={args.threads})")
            print(peers_table(records[-1:]), flush=True)
    if args.json:
        from pathlib import Path
        Path(args.json).write_text(json.dumps({"target": target_name, "draft": draft_name, "profile": profile.name,
                                               "threads": args.threads, "records": records}, indent=2) + "\n")


def cmd_baselines(args) -> int:
    if args.check:
        return check_baselines(args.profile, args.baselines_dir)
    if not args.from_run:
        raise DFlashError("dflash baselines needs --check or --from-run RUN_DIR.")
    from . import plugin  # noqa: F401  (the families, whose records these are)
    from .harness.recording import baselines_from_run
    print(baselines_from_run(args.from_run, args.baselines_dir, ablations=args.ablation, write=args.write)
          or "no change")
    if not args.write:
        print("(preview: nothing written; add --write to write these baselines)")
    return 0


def cmd_report(args) -> int:
    from . import plugin  # noqa: F401  (the families, which render their records)
    from .harness.runs import merge_runs
    print(f"dflash report: {merge_runs(args.merge, args.out, args.reports_dir) / 'summary.md'}")
    return 0


def collected_family(selection: list[str], profile: str = "tiny") -> int:
    """The gate family (2 per gated case) that `pytest ablations <selection>` would correct for."""
    from pathlib import Path

    import pytest

    from .harness.plugin import STATE

    class Capture:
        family = 0

        @pytest.hookimpl(trylast=True)
        def pytest_collection_finish(self, session):
            Capture.family = session.config.stash[STATE].family
    if not Path("ablations").is_dir():
        raise DFlashError("the gate family is counted from ./ablations: run from the project root or pass --family.")
    pytest.main(["ablations", "--collect-only", "-qq", "--profile", profile, "-p", "no:xdist", "-p",
                 "no:cacheprovider", "-W", "ignore::pytest.PytestAssertRewriteWarning", *selection],
                plugins=[Capture()])
    return Capture.family


def check_baselines(profile: str, baselines_dir: str) -> int:
    """Collect the ablations (nothing runs) and list gated cases without a baseline entry and entries that no
    case produces; exit 1 when there is any."""
    from pathlib import Path

    import pytest
    if not Path("ablations").is_dir():
        raise DFlashError("dflash baselines --check collects ./ablations: run it from the project root.")
    code = pytest.main(["ablations", "--collect-only", "-qq", "--profile", profile, "--check-baselines",
                        "--baselines-dir", baselines_dir, "-p", "no:xdist", "-p", "no:cacheprovider",
                        "-W", "ignore::pytest.PytestAssertRewriteWarning"])
    return 0 if code == 0 else 1


def cmd_gate_quality(args) -> None:
    from .harness.gate_quality import main as gate_quality
    if args.family is None:
        args.family = collected_family(["-m", "not slow"])
        print(f"gate family of make test's ablations: {args.family} gates", file=sys.stderr)
    gate_quality(repeats=args.repeats, tau_trials=args.tau_trials, slow_repeats=args.slow_repeats,
                 family=args.family, hogs=args.hogs, block_sizes=tuple(args.block_sizes), out=args.out,
                 ab_ref=args.ab_ref)


def _cascade_table_path(args, profile):
    from pathlib import Path
    return Path(args.table or f"reports/cascade-{profile.name}/table.jsonl")


def cmd_cascade_collect(args) -> int:
    """Every rung on every query once, into a resumable table."""
    from .cascade.collect import collect
    from .profiles import get_ladder
    profile = get_ladder(args.profile)
    table_path = _cascade_table_path(args, profile)
    count = profile.query_count(args.queries)
    reason = profile.unavailable()
    if reason:
        raise DFlashError(f"cascade profile {profile.name}: {reason}.")
    collect(profile.queries(count), table_path, profile)
    print(f"table: {table_path}")
    return 0


def cmd_cascade_report(args) -> int:
    """Replay every policy on a collected table: the cascade report."""
    from pathlib import Path

    from .cascade.collect import read_table
    from .profiles import get_ladder
    from .cascade.replay import build_table
    from .cascade.report import write_report
    profile = get_ladder(args.profile)
    table_path = _cascade_table_path(args, profile)
    if not table_path.exists():
        raise DFlashError(f"No cascade table at {table_path}: run `dflash cascade collect --profile "
                          f"{profile.name}` first (or pass --table).")
    header, rows = read_table(table_path)
    table = build_table(rows, list(profile.rung_names)).token_normalised()
    out = Path(args.out or table_path.parent)
    print(write_report(table, out, provenance=header).read_text())
    return 0


def cmd_convert_draft(args) -> int:
    """A draft checkpoint in another format: `--to speculators` (vLLM's speculators layout, dflash.speculators)
    or `--to zlab`. DST must not exist yet (nothing is overwritten)."""
    from pathlib import Path

    from .loading import KNOWN_MODELS, load_draft
    out = Path(args.dst)
    if out.exists():
        raise DFlashError(f"{out} already exists; give a new directory for the converted draft.")
    draft = load_draft(args.src, dtype="float32" if args.dtype is None else args.dtype)
    if args.to == "zlab":
        draft.save_pretrained(out)
    else:
        from .speculators import save_speculators
        verifier = args.verifier or (KNOWN_MODELS[args.src].location("target") if args.src in KNOWN_MODELS else None)
        if verifier is None:
            raise DFlashError("The speculators format names the target it drafts for: pass --verifier <target "
                              "directory or hub id>.")
        save_speculators(draft, out, verifier=verifier)
    print(f"dflash convert-draft: {args.src} -> {out} ({args.to})")
    return 0


def cmd_sessions(args) -> int:
    """The pytest sessions of `make test`'s ablations (FamilySpec.session), one per line, each with its share of
    the error rate when --alpha is split evenly over them."""
    from . import plugin  # noqa: F401  (registers the families)
    from .harness.family import alpha_shares, sessions
    shares = alpha_shares(args.alpha) if args.alpha is not None else {}
    for name in sessions():
        print(f"{name} {shares[name]:.6g}" if args.alpha is not None else name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .engine.acceptance import SAMPLING_RULES
    parser = argparse.ArgumentParser(prog="dflash", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="decode a prompt with DFlash (or target-only with --draft none)")
    g.add_argument("--target", default="tiny", help="known name (see `dflash models`), local directory or hub id")
    g.add_argument("--draft", default="tiny", help="known name, local directory, hub id, or 'none'")
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text (tokenized with the target's tokenizer)")
    source.add_argument("--prompt-ids", type=int_list(0), help="comma-separated token ids")
    g.add_argument("--chat", action="store_true", help="wrap --prompt in the target's chat template")
    g.add_argument("--max-new-tokens", type=bounded_int(1, 1 << 31), default=128)
    g.add_argument("--block-size", type=bounded_int(1, 1024), default=16)
    g.add_argument("--temperature", type=finite_float(0.0), default=0.0)
    g.add_argument("--seed", type=bounded_int(0, SEED_MAX), default=0)
    g.add_argument("--acceptance", default="speculative", choices=sorted(SAMPLING_RULES),
                   help="sampling rule: speculative (default) or match")
    g.add_argument("--no-stop", action="store_true", help="do not stop at the tokenizer's EOS token")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                   help="float32 (CPU default), bfloat16 (CUDA default), float16")
    g.add_argument("--json", action="store_true", help="print one JSON object with the result")
    g.add_argument("--trace", action="store_true", help="include the per-cycle trace in --json output")
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("models", help="list the known models")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)

    t = sub.add_parser("train", help="train a DFlash draft for any HF target (dflash train --target ...), or one of "
                                     "the package's models: `train tiny` (the embedded pair), `train ladder` (the "
                                     "cascade world's four graded models), `train block-diffusion` (a causal LM "
                                     "converted into a block-diffusion LM)")
    t.add_argument("--out", default=None, help="output directory of the draft")
    t.add_argument("--target", help="target: known name (e.g. smol), local directory or cached hub id")
    t.add_argument("--prompts", help="training prompts: smol-train, or a .txt/.json/.jsonl file")
    t.add_argument("--heldout", default="smol-heldout", help="held-out prompts for the tau table (same formats)")
    t.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap prompts in the target's chat template (default: on for --target smol)")
    t.add_argument("--prompts-per-category", type=bounded_int(1), default=180, help="size of a generated prompt set")
    t.add_argument("--heldout-per-category", type=bounded_int(1), default=6)
    t.add_argument("--mask-token", default=None, help="token used as the draft's (or block-diffusion model's) mask "
                   "(default: tokenizer's)")
    t.add_argument("--block-size", type=bounded_int(2, 1024), default=None, help="default 16 (block-diffusion: 32)")
    t.add_argument("--draft-layers", type=bounded_int(1, 64), default=1)
    t.add_argument("--target-layer-ids", type=int_list(0), default=None, help="comma-separated target layers to tap")
    t.add_argument("--steps", type=bounded_int(1), default=None, help="default 1000 (block-diffusion: 1300)")
    t.add_argument("--batch-size", type=bounded_int(1), default=None, help="sequences per step (default 4; "
                   "block-diffusion: 8 samples, each twice)")
    t.add_argument("--anchors", type=bounded_int(1), default=8, help="anchors (blocks) per sequence per step")
    t.add_argument("--lr", type=finite_float(0.0, low_open=True), default=None, help="default 1e-3 (block-diffusion: "
                   "1e-4)")
    t.add_argument("--gamma", type=finite_float(0.0, low_open=True), default=None, help="loss decay (default: 7 for B=16, 4 for B=8)")
    t.add_argument("--seed", type=bounded_int(0, SEED_MAX), default=0)
    t.add_argument("--bf16-autocast", action="store_true", help="draft training under bf16 autocast")
    t.add_argument("--loss-vocab", default="full", choices=["full", "observed"],
                   help="cross-entropy over the whole vocabulary, or over the tokens of the training data (faster)")
    t.add_argument("--distill-bf16-autocast", action="store_true",
                   help="self-distillation generates under bf16 autocast (faster on AVX512-BF16 CPUs)")
    t.add_argument("--distill-max-new-tokens", type=bounded_int(1), default=128)
    t.add_argument("--distill-batch-size", type=bounded_int(1), default=16)
    t.add_argument("--quality-max-new-tokens", type=bounded_int(1), default=96)
    t.add_argument("--quality-block-sizes", type=int_list(1), default=[4, 8, 16], help="block sizes of the held-out tau table")
    t.add_argument("--feature-batch-size", type=bounded_int(1), default=8, help="1: no padding (exact tiny numerics)")
    t.add_argument("--feature-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="storage of the cached context features")
    t.add_argument("--checkpoint-every", type=bounded_int(1), default=50)
    t.add_argument("--threads", type=bounded_int(1, 1024), default=1, help="torch threads (default 1: shared machines)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/.work (finished stages, checkpoint)")
    t.add_argument("--device", default=None, help="draft recipe: where the target and the draft run, cpu, cuda "
                   "or cuda:N (default: cuda when available, else cpu)")
    t.set_defaults(func=cmd_train)
    models = t.add_subparsers(dest="what", metavar="{tiny,ladder,block-diffusion}",
                              help="one of the package's models instead of a draft for --target")
    for name, func, what in (("tiny", cmd_train_tiny, "rebuild the embedded tiny target + draft"),
                             ("ladder", cmd_train_ladder, "train (or keep, when their manifests match the "
                              "recipe) the cascade ladder's rungs")):
        k = models.add_parser(name, help=what)
        k.add_argument("--out", default=None, help=f"output directory (default: the package's models/{name})")
        k.add_argument("--quick", action="store_true", help="a few steps only, to check the pipeline")
        k.set_defaults(func=func)
    d = models.add_parser("block-diffusion", help="Fast-dLLM v2 conversion of --base (or keep OUT when its "
                          "manifest matches the recipe)")
    d.add_argument("--out", default=None, help="output directory (default: the package's models/block-diffusion)")
    d.add_argument("--base", default="ladder-l4", help="the causal LM to convert (qwen2, qwen3 or llama): "
                   "ladder-l4 (default; trained on the graded tasks), a known name or a local directory")
    d.add_argument("--data", default=None, help="training samples, a .jsonl file of "
                   '{"prompt": ..., "response": ...} rows (default for ladder-l4: the graded tasks)')
    d.add_argument("--mask-token", default=None, help="the model's mask token (default: the tokenizer's)")
    d.add_argument("--block-size", type=bounded_int(2, 1024), default=None, help="default 32")
    d.add_argument("--steps", type=bounded_int(1), default=None, help="default 1300")
    d.add_argument("--batch-size", type=bounded_int(1), default=None, help="samples per step, each twice (default 8)")
    d.add_argument("--lr", type=finite_float(0.0, low_open=True), default=None, help="default 1e-4")
    d.add_argument("--seed", type=bounded_int(0, SEED_MAX), default=0)
    d.add_argument("--checkpoint-every", type=bounded_int(1), default=50)
    d.add_argument("--threads", type=bounded_int(1, 1024), default=1, help="torch threads (default 1)")
    d.add_argument("--resume", action="store_true", help="continue from OUT/.work (the checkpoint)")
    d.set_defaults(func=cmd_train_block_diffusion)

    b = sub.add_parser("bench", help="peer benchmark: transformers greedy / prompt lookup / target-only / DFlash")
    b.add_argument("--profile", default="smol", help="profile whose models and datasets to use (default smol)")
    b.add_argument("--dataset", action="append", help="dataset of the profile (repeatable; default: all)")
    b.add_argument("--prompts", type=bounded_int(1), default=None, help="prompts per dataset (default: the profile's)")
    b.add_argument("--max-new-tokens", type=bounded_int(1, 1 << 31), default=None)
    b.add_argument("--target", default=None, help="override the profile's target")
    b.add_argument("--draft", default=None, help="override the profile's draft")
    b.add_argument("--threads", type=bounded_int(1, 1024), default=1)
    b.add_argument("--dtype", action="append", choices=["float32", "bfloat16"], default=None,
                   help="the target's dtype for every mode of a row (repeatable; default: float32 and bfloat16)")
    b.add_argument("--json", default=None, help="also write the records to this JSON file")
    b.set_defaults(func=cmd_bench)

    q = sub.add_parser("gate-quality", help="measure the gates' false-alarm and detection rates on the tiny pair")
    q.add_argument("--repeats", type=bounded_int(1), default=25, help="independent runs of every case on unchanged code, "
                   "quiet and again with --hogs busy processes")
    q.add_argument("--tau-trials", type=bounded_int(1), default=15, help="perturbed drafts (planted tau drop)")
    q.add_argument("--slow-repeats", type=bounded_int(1), default=10, help="runs of every case with a drafter that burns 20%% "
                   "more CPU per cycle (planted slowdown)")
    q.add_argument("--family", type=bounded_int(1), default=None, help="gates the flow is corrected for (default: those of "
                   "make test's ablations, counted by collecting them)")
    q.add_argument("--hogs", type=bounded_int(0, 64), default=2, help="busy processes during the loaded false-alarm runs")
    q.add_argument("--block-sizes", type=int_list(1), default=[4, 8, 16], help="block sizes of the gated cases (comma-separated)")
    q.add_argument("--out", default=None, help="also write the JSON result to this file")
    q.add_argument("--ab-ref", default=None, metavar="REF", help="measure the A/B path instead: each case gated "
                   "against commit REF (HEAD: unchanged code against itself) run by the reference worker on this "
                   "machine, --repeats times, and --slow-repeats times with the planted slowdown")
    q.set_defaults(func=cmd_gate_quality)

    b = sub.add_parser("baselines", help="check baseline coverage, or recover baselines from a killed "
                       "--update-baselines run")
    b.add_argument("--check", action="store_true", help="list gated cases without a baseline and orphaned entries")
    b.add_argument("--profile", default="tiny", help="profile whose baselines --check reads (default tiny)")
    b.add_argument("--from-run", help="a recording run's directory, e.g. reports/tiny-20261125-145546")
    b.add_argument("--write", action="store_true", help="with --from-run: write (default: print the diff only)")
    b.add_argument("--ablation", action="append", help="only this ablation (repeatable)")
    b.add_argument("--baselines-dir", default="baselines")
    b.set_defaults(func=cmd_baselines)

    r = sub.add_parser("report", help="one report from the runs of a CI matrix (pytest ablations --shard I/N)")
    r.add_argument("--merge", nargs="+", required=True, metavar="RUN_DIR", help="run directories to join")
    r.add_argument("--out", default=None, help="output directory (default: reports/<profile>-merged-<time>)")
    r.add_argument("--reports-dir", default="reports")
    r.set_defaults(func=cmd_report)

    v = sub.add_parser("convert-draft", help="write a draft checkpoint in another format (speculators: vLLM's "
                       "DFlashSpeculatorConfig layout; zlab: the z-lab layout)")
    v.add_argument("--to", required=True, choices=["speculators", "zlab"])
    v.add_argument("src", help="draft: known name (e.g. tiny), local directory or cached hub id (either format)")
    v.add_argument("dst", help="new output directory")
    v.add_argument("--verifier", default=None, help="speculators: the target it drafts for (default: a known "
                   "name's target)")
    v.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights' dtype (default float32)")
    v.set_defaults(func=cmd_convert_draft)

    s = sub.add_parser("sessions", help="the pytest sessions make test runs the ablations in (one per line)")
    s.add_argument("--alpha", type=finite_float(0.0, low_open=True), default=None,
                   help="also print each session's share of this error rate (split evenly)")
    s.set_defaults(func=cmd_sessions)

    c = sub.add_parser("cascade", help="adaptive cascades over the model ladder: collect every rung's answers "
                                       "once, then replay every policy exactly")
    steps = c.add_subparsers(dest="action", required=True)
    collect = steps.add_parser("collect", help="every rung on every query once, into a resumable table")
    report = steps.add_parser("report", help="replay every policy on the table: the cascade report")
    for step, func in ((collect, cmd_cascade_collect), (report, cmd_cascade_report)):
        step.add_argument("--profile", default="tiny", help="cascade profile (default tiny: the embedded ladder)")
        step.add_argument("--table", default=None, help="the table file (default "
                          "reports/cascade-<profile>/table.jsonl)")
        step.set_defaults(func=func)
    collect.add_argument("--queries", type=bounded_int(1, 100000), default=None,
                         help="held-out queries per family (default: the profile's all)")
    report.add_argument("--out", default=None, help="output directory (default: the table's)")
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv
        if sys.stdout is None or sys.stdout.closed:
            raise DFlashError("standard output is closed, so the result would be lost; run with stdout open "
                              "(redirect it to a file to keep it).")
        return args.func(args) or 0
    except DFlashError as error:
        print(f"dflash: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): say so once, and keep Python from failing again at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print("dflash: error: standard output was closed before the result was written (broken pipe).",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dflash: interrupted" + (" (dflash train --resume continues from the last finished stage or "
                                       "checkpoint)" if argv[:1] == ["train"] else "") + ".", file=sys.stderr)
        return 128 + signal.SIGINT
    except OSError as error:  # the environment refused: a path that cannot be read or written, a full disk
        where = f" ({error.filename})" if error.filename else ""
        resume = "; the stages that finished are kept (dflash train --resume continues)" if argv[:1] == ["train"] \
            else ""
        print(f"dflash: error: {error.strerror or error}{where}. Check the path, its permissions and free space"
              f"{resume}.", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
