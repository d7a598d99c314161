"""sidecar's benchmarks on the tiny models, on the CPU: `python -m bench` (`make bench`).

Every figure is a ratio or a latency measured within one run, both sides of a ratio
in the same process and alternated (A B, then B A) so slow drift of a shared machine
cancels out; each is the median of its repeats, with the spread (min, max) beside it.

- `overhead`: checkpoint whole -> last sample on disk with the daemon watching, over
  the same renders as bare diffusers calls (`overhead.py`);
- `swap`: switching the loaded pipeline to the next LoRA, over loading base + LoRA from
  scratch (`swap.py`);
- `detection`: checkpoint whole -> its render starts (`detection.py`);
- `batching`: images/s batched over one by one (`batching.py`);
- `embed_cache`: time per checkpoint with and without the prompt-embedding cache
  (`embed_cache.py`);
- `memory`: peak RSS of the daemon, each architecture in its own process (`memory.py`).
"""
