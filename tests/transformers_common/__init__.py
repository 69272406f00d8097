"""transformers' common model tests (test_modeling_common.py and friends from the 5.25 sdist) plus the pieces the
sdist does not ship (generation/, exporters/, utils/, causal_lm_tester.py), for hf-arch's own model testers in
tests/hf_arch/test_transformers_contract.py. Test-only: nothing here is installed."""
