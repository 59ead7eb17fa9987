"""Algorithm terms applied to the client's gradients, shared by every trainer (SFT, DPO).

FedProx's proximal term and SCAFFOLD's control-variate correction both act on the
gradients of the trainable (LoRA) parameters right before each optimizer step
(after gradient clipping, so neither is distorted by the clip):

- FedProx: the gradient of ``mu/2 ||theta - theta_global||^2`` is ``mu (theta - theta_global)``;
- SCAFFOLD: ``g <- g + (c - c_i)`` (applied to the gradient, not after the optimizer's update);
  the raw gradients are averaged over the round for the client's new ``c_i``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from strategies.aggregation import Arrays, scaffold_client_control
from strategies.records import from_record, to_record
from strategies.scaffold import C_CLIENT_KEY, C_SERVER_KEY


def proximal_grad(param: torch.Tensor, anchor: torch.Tensor, mu: float) -> torch.Tensor:
    """Gradient of ``mu/2 ||param - anchor||^2``."""
    return mu * (param.detach() - anchor)


def trainable(model: Any) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def adapter_key(param_name: str, adapter: str = "default") -> str:
    """PEFT's saved name of a LoRA parameter (the adapter name dropped), as the arrays that travel use."""
    return param_name.replace(f".{adapter}.", ".")


class GradientTerms:
    """Adds the round's FedProx and SCAFFOLD terms to the gradients before each optimizer step.

    :meth:`callback` wraps it as a ``TrainerCallback``. (transformers is imported only
    there: importing it when the app module loads raced with the ServerApp's own
    imports in Flower's simulation process.)
    """

    def __init__(self) -> None:
        self.params: dict[str, torch.nn.Parameter] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.mu = 0.0
        self.correction: dict[str, torch.Tensor] | None = None

    def start_round(self, model: Any, mu: float = 0.0, correction: dict[str, np.ndarray] | None = None) -> None:
        """Snapshot the global (round-start) parameters; set this round's terms.

        ``correction`` is keyed like the adapter arrays (:func:`adapter_key`).
        """
        self.params = trainable(model)
        self.mu = mu
        self.anchor = {n: p.detach().clone() for n, p in self.params.items()} if mu else {}
        self.correction = (
            None
            if correction is None
            else {n: torch.from_numpy(correction[adapter_key(n)]).to(p.device) for n, p in self.params.items()}
        )
        self.grad_sum = (
            {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}
            if correction is not None
            else {}
        )
        self.steps = 0

    def mean_gradient(self) -> Arrays:
        """Mean raw (clipped, uncorrected) gradient over this round's optimizer steps, adapter-keyed."""
        if not self.steps:
            raise ValueError("no optimizer step was taken this round; SCAFFOLD cannot update its control variate")
        return {adapter_key(n): (g / self.steps).cpu().numpy() for n, g in self.grad_sum.items()}

    def callback(self) -> Any:
        from transformers import TrainerCallback

        terms = self

        class _Terms(TrainerCallback):
            def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                terms.apply()

        return _Terms()

    @torch.no_grad()
    def apply(self) -> None:
        self.steps += 1
        for name, p in self.params.items():
            if p.grad is None:
                continue
            if self.correction is not None:
                self.grad_sum[name] += p.grad.float()
            if self.mu:
                p.grad += proximal_grad(p, self.anchor[name], self.mu)
            if self.correction is not None:
                p.grad += self.correction[name].to(p.grad.dtype)


class ScaffoldClient:
    """One client round of SCAFFOLD: the correction ``c - c_i`` in, ``delta c_i`` out.

    Both ``c`` and this partition's ``c_i`` come in the train message: the server keeps every
    ``c_i`` and commits ``delta c_i`` only when it accepts the reply, so the client holds no state.
    """

    def __init__(self, c: Arrays, c_i: Arrays) -> None:
        self.c, self.c_i = c, c_i

    @classmethod
    def from_message(cls, msg: Any) -> ScaffoldClient | None:
        if C_SERVER_KEY not in msg.content:
            return None
        if C_CLIENT_KEY not in msg.content:
            raise ValueError(
                f"the SCAFFOLD train message has '{C_SERVER_KEY}' but no '{C_CLIENT_KEY}' (this partition's c_i); "
                "run the same fedllm version on the server and the clients"
            )
        return cls(from_record(msg.content[C_SERVER_KEY]), from_record(msg.content[C_CLIENT_KEY]))

    def correction(self) -> Arrays:
        return {k: self.c[k] - self.c_i[k] for k in self.c}

    def finish(self, mean_grad: Arrays) -> Any:
        """``c_i+ - c_i`` (``c_i+`` is the round's mean raw gradient) as an ArrayRecord."""
        _, dc = scaffold_client_control(self.c_i, mean_grad)
        return to_record(dc)
