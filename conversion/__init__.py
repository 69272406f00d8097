"""Conversions of pretrained checkpoints into hf-arch variants."""
