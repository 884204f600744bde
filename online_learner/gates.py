"""Field gates: a learned per-example gate (FinalMLP) times the stream's published field prior.

Design (why a product):

``gate[b, f] = learned[b, f] * prior[f]``

* ``learned = 2 * sigmoid(W (x * prior) + c)`` -- FinalMLP's feature gating (Mao et al., 2023)
  reduced to one weight per *field*: a small linear gate network reads the concatenated field
  embeddings ``x [B, D]`` (already scaled by the prior) and rescales each field in ``(0, 2)``.
  ``W, c`` start at zero, so the gate starts at exactly 1 and a fresh model is the plain backbone.
* ``prior = normalise(w) ** strength`` -- ``w [F]`` are the field weights the stream publishes
  (``set_field_weights``; e.g. OutRank-style scores computed by the Faust agents). They are
  normalised to mean 1 over the fields (only *relative* importance matters, and the embedding
  scale stays put when the publisher rescales), clamped at 0, and tempered by ``strength``
  (0 ignores the stream, 1 trusts it fully).

A product (rather than adding ``log w`` inside the sigmoid) gives the stream a hard veto: a field
published with weight 0 is switched off for every example and the learned gate cannot bring it
back, and since the gate network reads prior-scaled inputs the field cannot leak in through the
other fields' gates either -- which is what "the stream dropped a feature" should mean. Fields the stream never mentions
keep weight 1 (neutral). The prior is a buffer, not a parameter: it travels in ``state_dict``
(serving applies the same prior) but is never trained.

>>> gate = FieldGate(input_dim=6, field_widths=[2, 4], field_names=["site", "ad"])
>>> x = torch.ones(3, 6)
>>> gated, g = gate(x)
>>> g.shape, bool(torch.allclose(gated, x))
(torch.Size([3, 2]), True)
>>> gate.set_field_weights({"site": 0.0, "not_a_field": 3.0})  # returns the unknown names
['not_a_field']
>>> gate(x)[0][:, :2].abs().sum().item(), gate.prior.tolist()
(0.0, [0.0, 2.0])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["FieldGate"]


class FieldGate(nn.Module):
    """Per-field gate ``[B, F]`` applied to field embeddings ``[B, D]`` (``D = sum(field_widths)``).

    Args:
        input_dim: ``D``, width of the concatenated field embeddings.
        field_widths: width of each field's slice of ``D``, in order.
        field_names: names for :meth:`set_field_weights`.
        learned: if False only the stream prior is applied (ablation).
        prior_strength: exponent applied to the normalised stream weights.
        stop_gradient: the gate network reads the embeddings without back-propagating into
            them (as PEPNet's gate NU does): the gate adapts to the representation but does not
            pull it; it also saves one ``[B, D]`` matmul and gradient pass per step.
    """

    # buffers (register_buffer): declared so they type as Tensor, not as nn.Module.__getattr__'s union
    field_weights: Tensor
    prior: Tensor
    learned_mean: Tensor

    def __init__(
        self,
        input_dim: int,
        field_widths: Sequence[int],
        field_names: Sequence[str],
        learned: bool = True,
        prior_strength: float = 1.0,
        stop_gradient: bool = True,
    ) -> None:
        super().__init__()
        if sum(field_widths) != input_dim or len(field_widths) != len(field_names):
            raise ValueError("field_widths must sum to input_dim, one per field name")
        self.field_names = list(field_names)
        self._index = {name: i for i, name in enumerate(self.field_names)}
        self.prior_strength = float(prior_strength)
        self.stop_gradient = bool(stop_gradient)
        num_fields = len(field_names)
        self.proj: nn.Linear | None = nn.Linear(input_dim, num_fields) if learned else None
        if self.proj is not None:
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        # Runs of consecutive fields with equal width: x[:, cols].view(B, n, w) * gate[:, fields, None]
        # broadcasts the gate without materialising a [B, D] gate (and its scatter-add backward).
        self._runs: list[tuple[int, int, int, int]] = []  # (first column, first field, n fields, width)
        col = 0
        for f, w in enumerate(field_widths):
            if self._runs and self._runs[-1][3] == w:
                c0, f0, n, _ = self._runs[-1]
                self._runs[-1] = (c0, f0, n + 1, w)
            else:
                self._runs.append((col, f, 1, int(w)))
            col += int(w)
        self.register_buffer("field_weights", torch.ones(num_fields))
        self.register_buffer("prior", torch.ones(num_fields))
        # Running mean of the learned gate per field (visibility: what the model learned).
        self.register_buffer("learned_mean", torch.ones(num_fields))
        self._neutral_prior = True  # prior == 1 everywhere: skip one [B, D] multiply

    @property
    def num_fields(self) -> int:
        return len(self.field_names)

    def set_field_weights(self, weights: Mapping[str, float], default: float | None = None) -> list[str]:
        """Set the stream's published weights by field name; returns names it did not know.

        Fields not in ``weights`` keep their current weight, or get ``default`` if given.
        """
        new = self.field_weights.clone()
        if default is not None:
            new.fill_(float(default))
        unknown = []
        for name, value in weights.items():
            i = self._index.get(name)
            if i is None:
                unknown.append(name)
            else:
                new[i] = float(value)
        self.field_weights.copy_(new)
        self._refresh_prior()
        return unknown

    def _refresh_prior(self) -> None:
        w = self.field_weights.clamp_min(0.0)
        mean = w.mean()
        w = w / mean if mean > 0 else torch.ones_like(w)
        self.prior.copy_(w.pow(self.prior_strength) if self.prior_strength != 1.0 else w)
        self.note_prior()

    def note_prior(self) -> None:
        """Re-derive the Python-side shortcut from the ``prior`` buffer, reading it only: for a
        gate whose buffers were attached from elsewhere (serving's read-only shared memory)."""
        self._neutral_prior = bool((self.prior == 1.0).all())

    # keep prior consistent with weights; torch leaves this hook's arguments untyped: passed through
    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._refresh_prior()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [B, D]`` -> (gated ``[B, D]``, gate ``[B, F]``)."""
        b = x.shape[0]
        prior = self.prior.expand(b, -1)
        if not self._neutral_prior:
            # the gate network sees the prior-scaled input, so a vetoed field has no path at all
            x = self.apply_gate(x, prior)
        if self.proj is None:
            return x, prior
        context = x.detach() if self.stop_gradient else x
        learned = 2.0 * torch.sigmoid(self.proj(context))  # [B, F]
        if self.training:
            with torch.no_grad():
                self.learned_mean.lerp_(learned.mean(0), 0.01)
        return self.apply_gate(x, learned), learned * prior

    def apply_gate(self, x: Tensor, gate: Tensor) -> Tensor:
        """Scale each field's columns of ``x [B, D]`` by ``gate [B, F]``."""
        b = x.shape[0]
        parts = [
            (x[:, c0 : c0 + n * w].reshape(b, n, w) * gate[:, f0 : f0 + n].unsqueeze(2)).reshape(b, n * w)
            for c0, f0, n, w in self._runs
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
