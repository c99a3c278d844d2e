"""Command line: `dflash generate`, `dflash models`, `dflash train tiny`, `dflash gate-quality`."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import DFlashError


def _prompt_ids(args, tokenizer) -> list[int]:
    if args.prompt_ids is not None:
        try:
            return [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise DFlashError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}.") from None
    if args.chat:
        return tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
    return tokenizer(args.prompt, add_special_tokens=False)["input_ids"]


def cmd_generate(args) -> None:
    from .engine import generate
    from .loading import load_draft, load_target, load_tokenizer
    target = load_target(args.target, device=args.device, dtype=args.dtype)
    tokenizer = load_tokenizer(args.target)
    draft = None if args.draft.lower() == "none" else load_draft(args.draft, device=args.device, dtype=args.dtype)
    prompt = _prompt_ids(args, tokenizer)
    block_size = args.block_size if draft is not None else 1  # target-only verifies one token per cycle
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None and not args.no_stop else []
    result = generate(target, draft, prompt, max_new_tokens=args.max_new_tokens, block_size=block_size,
                      temperature=args.temperature, seed=args.seed, stop_token_ids=stop, acceptance=args.acceptance)
    text = tokenizer.decode(result.output_ids, skip_special_tokens=False)
    if args.json:
        print(json.dumps({**result.to_dict(trace=args.trace), "text": text}))
    else:
        print(text)
        print(f"tau {result.tau:.2f} over {result.num_cycles} cycles | {result.tokens_per_s:.1f} tokens/s | "
              f"TTFT {result.ttft_s * 1e3:.1f} ms | TPOT {result.tpot_s * 1e3:.2f} ms", file=sys.stderr)


def cmd_models(args) -> None:
    from .loading import KNOWN_MODELS
    rows = [{"name": m.name, "target": m.location("target"), "draft": m.location("draft"),
             "description": m.description} for m in KNOWN_MODELS.values()]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['name']:10s} target={row['target']}  draft={row['draft']}\n{'':10s} {row['description']}")


def cmd_train_tiny(args) -> None:
    from .tinyworld.build import build_tiny_world
    build_tiny_world(args.out, quick=args.quick)


def cmd_gate_quality(args) -> None:
    from .harness.gate_quality import main as gate_quality
    gate_quality(repeats=args.repeats, trials=args.trials, resamples=args.resamples, family=args.family)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dflash", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="decode a prompt with DFlash (or target-only with --draft none)")
    g.add_argument("--target", default="tiny", help="known name (see `dflash models`), local directory or hub id")
    g.add_argument("--draft", default="tiny", help="known name, local directory, hub id, or 'none'")
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text (tokenized with the target's tokenizer)")
    source.add_argument("--prompt-ids", help="comma-separated token ids")
    g.add_argument("--chat", action="store_true", help="wrap --prompt in the target's chat template")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--acceptance", default="speculative", help="sampling rule: speculative (default) or match")
    g.add_argument("--no-stop", action="store_true", help="do not stop at the tokenizer's EOS token")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16 (CUDA default), float16")
    g.add_argument("--json", action="store_true", help="print one JSON object with the result")
    g.add_argument("--trace", action="store_true", help="include the per-cycle trace in --json output")
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("models", help="list the known models")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)

    t = sub.add_parser("train", help="build models")
    tsub = t.add_subparsers(dest="what", required=True)
    tiny = tsub.add_parser("tiny", help="build the embedded tiny target + draft from scratch (deterministic)")
    tiny.add_argument("--out", default=None, help="output directory (default: the package's models/tiny)")
    tiny.add_argument("--quick", action="store_true", help="a few steps only, to check the pipeline")
    tiny.set_defaults(func=cmd_train_tiny)

    q = sub.add_parser("gate-quality", help="measure the gates' false-alarm and detection rates on the tiny pair")
    q.add_argument("--repeats", type=int, default=4, help="repeated measurements of unchanged code")
    q.add_argument("--trials", type=int, default=20, help="perturbed drafts for the detection rate")
    q.add_argument("--resamples", type=int, default=500, help="pseudo-runs resampled from the repeats (throughput)")
    q.add_argument("--family", type=int, default=100, help="gates in a full run (Holm/Bonferroni family size)")
    q.set_defaults(func=cmd_gate_quality)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except DFlashError as error:
        print(f"dflash: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
