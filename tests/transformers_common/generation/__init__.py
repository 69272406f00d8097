"""GenerationTesterMixin (hf-arch's own; see test_utils.py)."""
