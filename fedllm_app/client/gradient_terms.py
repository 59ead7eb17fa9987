"""Algorithm terms applied to the client's gradients, shared by every trainer (SFT, DPO).

FedProx's proximal term and SCAFFOLD's control-variate correction both act on the
gradients of the trainable (LoRA) parameters right before each optimizer step
(after gradient clipping, so neither is distorted by the clip):

- FedProx: the gradient of ``mu/2 ||theta - theta_global||^2`` is ``mu (theta - theta_global)``;
- SCAFFOLD: ``g <- g + (c - c_i)`` (applied to the gradient, not after the optimizer's update);
  the raw gradients are averaged over the round for the client's new ``c_i``;
- HetLoRA's rank self-pruning (:class:`RankTerms`): the gradient of ``lambda ||B_tail A_tail||_F`` per adapted
  layer (:func:`tail_norm_grads`), and zero gradients for the ranks a pruned client no longer trains (its model
  keeps its declared rank; those ranks stay exactly zero, as AdamW without weight decay never moves them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from strategies.aggregation import Arrays, scaffold_client_control
from strategies.records import from_record, to_record
from strategies.scaffold import C_CLIENT_KEY, C_SERVER_KEY


def proximal_grad(param: torch.Tensor, anchor: torch.Tensor, mu: float) -> torch.Tensor:
    """Gradient of ``mu/2 ||param - anchor||^2``."""
    return mu * (param.detach() - anchor)


def tail_norm_grads(a: torch.Tensor, b: torch.Tensor, keep: int, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``weight ||B[:, keep:] A[keep:]||_F`` with respect to ``A`` (``r x in``) and ``B`` (``out x r``).

    With ``P = B_t A_t`` the tail's product: ``dA_t = weight B_t^T P / ||P||``, ``dB_t = weight P A_t^T / ||P||``;
    zero on the first ``keep`` ranks, and zero everywhere when ``P = 0`` (the norm's subgradient there).
    """
    grad_a, grad_b = torch.zeros_like(a), torch.zeros_like(b)
    a_t, b_t = a.detach()[keep:].double(), b.detach()[:, keep:].double()
    product = b_t @ a_t
    norm = torch.linalg.matrix_norm(product)
    if norm > 0:
        grad_a[keep:] = (weight * b_t.T @ product / norm).to(a.dtype)
        grad_b[:, keep:] = (weight * product @ a_t.T / norm).to(b.dtype)
    return grad_a, grad_b


@dataclass(frozen=True)
class RankTerms:
    """A self-pruning client's round (:mod:`strategies.hetero_rank`): it trains ranks ``0..active-1`` of its
    model's adapter, and the regulariser of weight ``weight`` acts on ranks ``keep..active-1``.
    """

    active: int
    keep: int
    weight: float


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
        self.ranks: RankTerms | None = None

    def start_round(
        self,
        model: Any,
        mu: float = 0.0,
        correction: dict[str, np.ndarray] | None = None,
        ranks: RankTerms | None = None,
    ) -> None:
        """Snapshot the global (round-start) parameters; set this round's terms.

        ``correction`` is keyed like the adapter arrays (:func:`adapter_key`); ``ranks``: HetLoRA's self-pruning.
        """
        self.params = trainable(model)
        self.mu = mu
        self.ranks = ranks
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
        if self.ranks is not None:
            self.apply_rank_terms(self.ranks)

    @torch.no_grad()
    def apply_rank_terms(self, ranks: RankTerms) -> None:
        """Add the tail regulariser's gradient to each layer's ``A``/``B`` pair; zero the untrained ranks'."""
        for name, a in self.params.items():
            parts = name.split(".")
            b = self.params.get(".".join("lora_B" if p == "lora_A" else p for p in parts))
            if "lora_A" not in parts or b is None or a.grad is None or b.grad is None:
                continue
            if ranks.weight and ranks.keep < ranks.active:
                grad_a, grad_b = tail_norm_grads(a[: ranks.active], b[:, : ranks.active], ranks.keep, ranks.weight)
                a.grad[: ranks.active] += grad_a
                b.grad[:, : ranks.active] += grad_b
            a.grad[ranks.active :] = 0
            b.grad[:, ranks.active :] = 0


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
