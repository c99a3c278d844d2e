"""Draft training: the training loop (train), the `dflash train` recipe (recipe) and its prompt sets
(prompt_sets). Import the submodules; this package imports nothing, so importing one never loads the others."""
