"""ExportTesterMixin (hf-arch's own; see test_export.py)."""
