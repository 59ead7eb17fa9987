"""FedYogi (Reddi et al., 2021) over LoRA arrays; math in :func:`strategies.aggregation.fedyogi_step`."""

from __future__ import annotations

from strategies.aggregation import fedyogi_step
from strategies.fedopt import AdaptiveMomentOptimizer


class FedYogi(AdaptiveMomentOptimizer):
    """Yogi on the server (sign-controlled, additive second moment). Client contract: FedAvg's."""

    update = staticmethod(fedyogi_step)
