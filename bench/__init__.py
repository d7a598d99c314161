"""sidecar's benchmarks on the tiny models, on the CPU: `python -m bench` (`make bench`).

Every figure is a ratio or a latency measured within one run, both sides of a ratio
in the same process and alternated (A B, then B A) so slow drift of a shared machine
cancels out; each is the median of its repeats, with the spread (min, max) beside it.

- `overhead`: checkpoint whole -> last sample on disk with the daemon watching, over
  the same renders as a bare script (`load_lora_weights`, calls, saves; `overhead.py`);
- `call_overhead`: the same, over the pipeline's own `__call__`s with the LoRA applied, on
  the deep and wide models, with where the rest goes, phase by phase (`call_overhead.py`,
  `phases.py`);
- `start`: `sidecar watch` start -> first sample of a checkpoint already there, over a
  bare script that imports diffusers, loads the base and renders it (`start.py`);
- `throughput`: images/s over a run of checkpoints x prompts, against the bare loop
  (`throughput.py`);
- `swap`: switching the loaded pipeline to the next LoRA, over `load_lora_weights` and over
  loading base + LoRA from scratch, also at real widths with rank-16 LoRAs (`swap.py`);
- `detection`: checkpoint whole -> its render starts (`detection.py`);
- `batching`: images/s batched over one by one (`batching.py`);
- `embed_cache`: time per checkpoint with and without the prompt-embedding cache
  (`embed_cache.py`);
- `memory`: peak RSS of the daemon, each architecture in its own process (`memory.py`);
- opt-in (`--only NAME`): `compile`, the compile time and per-image speed-up of `--compile`
  (`compile_speed.py`); `pool`, images/s of Ray workers (`pool.py`).
"""

from sidecar.render.notices import quiet_import_notices

# Before any benchmark module imports diffusers: torchao's notices at import say nothing here.
quiet_import_notices()
