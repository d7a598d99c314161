"""The intake stage: which files in the trainer's folder are checkpoints, and when each is ready."""
