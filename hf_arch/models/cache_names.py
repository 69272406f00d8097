"""The cache argument's two names.

transformers 5.25 renamed ``past_key_values`` to ``cache`` (the old name is deprecated, removal announced for
5.40 / 6.0), and ``generate()`` passes whichever name its release uses. A forward that swallowed the unknown one in
``**kwargs`` would decode every step without its past and raise nothing, so our models take both names explicitly on
every supported release, and return the cache in the output field the installed release declares.
"""

from __future__ import annotations

import inspect
import warnings

from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

# The output field ``generate()`` reads the cache back from: "cache" from 5.25 on, "past_key_values" before.
CACHE_OUTPUT_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
# The keyword transformers' mask builders take the cache under.
MASK_CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def resolve_cache(cache, past_key_values, public: bool = False):
    """The cache passed under either name; both at once is refused (they could disagree). ``public``: a model's own
    forward, where the old name earns transformers' deprecation warning on releases that renamed it."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("Pass the cache once: as `cache` (transformers >= 5.25) or as `past_key_values`, not both")
    if public and past_key_values is not None and CACHE_OUTPUT_FIELD == "cache":
        warnings.warn("`past_key_values` is deprecated and will be removed in transformers 5.40.0: pass the cache as "
                      "`cache`", FutureWarning, stacklevel=3)
    return cache if cache is not None else past_key_values


def cache_output(cache) -> dict:
    """``{field: cache}`` for a ModelOutput constructor of the installed transformers."""
    return {CACHE_OUTPUT_FIELD: cache}
