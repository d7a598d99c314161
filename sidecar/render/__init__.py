"""The render stage: the only place that imports diffusers.

A renderer (one file per architecture, `registry.RENDERER_PATHS`) holds one base
pipeline, swaps LoRA files into it (`adapters/`), and yields images for sample requests;
where the images go is the caller's business. `memory` and `devices` place it on its
card; `slots` says when a card shared with the trainer is free.
"""
