"""The plan stage: a trainer's config becomes sample requests. Pure: no torch, no model weights."""
