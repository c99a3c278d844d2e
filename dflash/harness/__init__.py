"""The ablation/regression harness. Model-free: statistical gates (`stats`), baseline files (`baselines`), the
append-only JSONL results file (`results`), runs and their records (`runs`), records to baselines (`recording`),
markdown summaries (`render`) and optional plots (`plots`). Measurement: `measure` (interleaved, token-normalized
runs), `evaluation` (greedy quality, float-tie proofs), `peers` (against transformers), `case` (one ablation
case), `gate_quality`. The pytest plugin (`plugin`) wires them into `pytest ablations`."""
