"""Backends: decoders that are not engine plug-ins (they run their own loop or server), registered in
dflash.registry like the variants so an ablation names them the same way. `batched` decodes several prompts in
one forward per cycle with the engine's checks and commit rule; `sglang` measures the SGLang DFLASH server."""
