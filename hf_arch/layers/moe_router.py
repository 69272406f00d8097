"""Old import path of the MoE routers (now ``hf_arch.layers.moe_routers``, one class per file, registered by name)."""

from .moe_routers import MoERouter, Routing, routing_probabilities, selected_mask

__all__ = ["MoERouter", "Routing", "routing_probabilities", "selected_mask"]
