"""Model-free building blocks of the ablation/regression harness: statistical gates (`stats`), baseline
files (`baselines`), the append-only JSONL results file (`results`), markdown summaries (`render`) and
optional plots (`plots`). Nothing here loads a model; the pytest plugin and the ablation cases build on it."""
