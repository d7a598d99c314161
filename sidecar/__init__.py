"""sidecar: renders a LoRA trainer's sample images out of process."""

__version__ = "0.1.0"
