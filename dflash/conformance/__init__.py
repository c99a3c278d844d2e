"""Conformance of a serving engine's DFlash against this project's reference engine, on the same prompts: greedy
outputs identical, per-prompt acceptance equal (or within a paired test and margin), per-position acceptance
curves alike, and where they part, the first diverging position named (dflash.conformance.compare). Planted
drifts that the gate must catch are made by dflash.conformance.drift."""
