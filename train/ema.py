"""An exponential moving average of the trained weights, kept beside the model.

Why: a run ends wherever its last noisy steps leave it, and averaging the last
few hundred steps' weights is the usual cheap damper. It is an option, off by
default: for the demo's short runs it helped no more often than it hurt
(benchmarks/RESULTS.md, "A weight average for the demo"). The average never
feeds back into training: the optimised weights, and so every resumed or
ablated run, are the same with it or without it.

torch's `AveragedModel` does the averaging (batch-norm statistics included).
With a frozen text encoder only the image side is averaged, since the text side
never changes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from afloc_cli.vlp.model import AflocModel


class WeightAverage:
    """EMA_1 = W_1, EMA_t = decay * EMA_(t-1) + (1 - decay) * W_t, over optimizer steps t."""

    def __init__(self, model: AflocModel, decay: float, *, text_frozen: bool) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), not {decay}")
        self.decay = decay
        self.model = model
        self.text_frozen = text_frozen
        self._target: nn.Module = model.image_encoder if text_frozen else model
        self.averaged = AveragedModel(self._target, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.averaged.eval()

    @torch.no_grad()
    def update(self) -> None:
        self.averaged.update_parameters(self._target)

    @property
    def steps(self) -> int:
        return int(self.averaged.n_averaged)

    def averaged_model(self) -> AflocModel:
        """The model with the averaged weights (the text encoder shared when frozen), ready to save."""
        if not self.text_frozen:
            return self.averaged.module  # type: ignore[return-value]
        return AflocModel(self.model.cfg, self.averaged.module, self.model.text_encoder)  # type: ignore[arg-type]

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "averaged": self.averaged.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["decay"] != self.decay:
            raise ValueError(f"the checkpoint's EMA decay is {state['decay']}, this run's is {self.decay}")
        self.averaged.load_state_dict(state["averaged"])
