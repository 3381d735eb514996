"""A running latency estimate: exponentially weighted mean and mean absolute deviation (as TCP
estimates its retransmission timeout). The gateway splits deadlines with it (gateway/budget.py);
admission judges whether a call can still finish in time with it (common/admission.py)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LatencyEstimate:
    """Seconds; `alpha` is the weight of each new sample."""
    alpha: float = 0.05
    mean: float = 0.0
    deviation: float = 0.0
    samples: int = 0

    def observe(self, seconds: float) -> None:
        if self.samples == 0:
            self.mean, self.deviation = seconds, seconds / 2
        else:
            self.deviation += self.alpha * (abs(seconds - self.mean) - self.deviation)
            self.mean += self.alpha * (seconds - self.mean)
        self.samples += 1

    @property
    def tail(self) -> float:
        return self.mean + 2.0 * self.deviation
