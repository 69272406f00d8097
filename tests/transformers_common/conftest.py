"""tests/transformers_common holds transformers' test mixins, not tests: tests/hf_arch/test_transformers_contract.py
imports them as the package ``transformers_common``. Collecting these files would import them a second time under
another name (their ``test_*.py`` names make pytest try). check_builtin_models.py (the harness self-check on
transformers' own models) is not a ``test_*.py`` name, so it runs only when named on the command line."""

collect_ignore_glob = ["test_*.py", "causal_lm_tester.py", "generation/*.py", "exporters/*.py", "utils/*.py"]
