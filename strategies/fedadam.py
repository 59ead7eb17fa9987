"""FedAdam (Reddi et al., 2021) over LoRA arrays; math in :func:`strategies.aggregation.fedadam_step`."""

from __future__ import annotations

from strategies.aggregation import fedadam_step
from strategies.fedopt import AdaptiveMomentOptimizer


class FedAdam(AdaptiveMomentOptimizer):
    """Adam on the server over the clients' mean delta. Client contract: FedAvg's."""

    update = staticmethod(fedadam_step)
