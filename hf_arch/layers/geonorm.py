"""GeoNorm: residual updates as geodesic steps on a sphere instead of ``h + f(norm(h))``.

The hidden state lives on the sphere of radius ``√hidden`` (RMS 1), so it needs no normalisation between blocks.
Each branch output ``u`` is read as an update direction: its component tangent to the sphere at ``h`` moves ``h``
along the great circle, by the angle ``θ = step · rms(tangent)``. ``step`` is learned per layer and branch and starts
at ``geonorm_step_init · geonorm_layer_decay^l``: later layers take smaller steps, the layer-wise update decay
(analogous to a learning-rate schedule over depth). The branches still read ``RMSNorm(h)`` with its learned gain.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["GeodesicUpdate", "project_to_sphere"]

_TINY = 1e-12


def project_to_sphere(hidden_states: torch.Tensor) -> torch.Tensor:
    """Rescale each vector to norm ``√hidden`` (fp32 math)."""
    x = hidden_states.float()
    radius = math.sqrt(x.shape[-1])
    return (radius * x / x.norm(dim=-1, keepdim=True).clamp_min(_TINY)).to(hidden_states.dtype)


class GeodesicUpdate(nn.Module):
    new_parameters = ("*",)  # read by peft_utils

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.step = nn.Parameter(torch.empty(()))
        self._step_init = config.geonorm_step_init * config.geonorm_layer_decay**layer_idx

    def init_parameters(self, init=nn.init) -> None:
        init.constant_(self.step, self._step_init)

    def forward(self, hidden_states: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """hidden_states (on the sphere), update ``[..., hidden]`` → the point reached along the geodesic."""
        radius = math.sqrt(hidden_states.shape[-1])
        point = hidden_states.float() / radius
        u = update.float()
        tangent = u - (u * point).sum(-1, keepdim=True) * point
        length = tangent.norm(dim=-1, keepdim=True).clamp_min(_TINY)
        angle = self.step.float() * length / radius
        moved = torch.cos(angle) * point + torch.sin(angle) * tangent / length
        # Re-project: cos/sin keep the norm in exact arithmetic; this stops fp32 drift over many layers.
        return project_to_sphere(radius * moved).to(hidden_states.dtype)
