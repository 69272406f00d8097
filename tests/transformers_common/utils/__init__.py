"""config_common_kwargs (hf-arch's own; see test_configuration_utils.py)."""
