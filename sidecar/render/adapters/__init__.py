"""LoRA files: what they hold (`lora_files`) and how they are swapped into a pipeline (`swap`)."""
