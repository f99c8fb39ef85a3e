"""Sedna's aggregation classes (`ClassType.FL_AGG`): an aggregation gets the round's clients,
each an `AggClient` with `num_samples` and `weights` (a list of arrays in the model's order),
and returns the new global weights as a list of arrays.

    from sedna.algorithms.aggregation import BaseAggregation
    from sedna.common.class_factory import ClassFactory, ClassType

    @ClassFactory.register(ClassType.FL_AGG, alias="TrimmedMean")
    class TrimmedMean(BaseAggregation):
        def aggregate(self, clients): ...

`sedna.service.server.AggregationServer(aggregation="TrimmedMean")` runs it inside the
platform's aggregation worker. The names of the built-in algorithms (FedAvg, FedAvgM,
FedAdam, FedYogi, FedMedian, FedTrimmedAvg, Krum) run in Rust unless you register your own
class under the name.
"""

from dataclasses import dataclass, field
from typing import List

import numpy as np

from ...common.class_factory import ClassFactory, ClassType

__all__ = ["AggClient", "BaseAggregation", "FedAvg"]


@dataclass
class AggClient:
    """One client's update of a round."""

    num_samples: int = 0
    weights: List = field(default_factory=list)


class BaseAggregation:
    """The contract of an aggregation class."""

    def __init__(self):
        self.total_size = 0
        self.weights = None

    def aggregate(self, clients):
        """New global weights (list of arrays) from the clients' updates."""
        raise NotImplementedError


@ClassFactory.register(ClassType.FL_AGG)
class FedAvg(BaseAggregation):
    """Federated averaging weighted by samples (what `AggregationServer` runs in Rust)."""

    def aggregate(self, clients):
        if not clients:
            return self.weights
        self.total_size = sum(c.num_samples for c in clients)
        self.weights = [
            sum(np.asarray(c.weights[i], dtype=np.float64) * c.num_samples for c in clients) / self.total_size
            for i in range(len(clients[0].weights))
        ]
        return self.weights
