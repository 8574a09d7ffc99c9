"""Early stopping on a monitored validation value, remembering which evaluation was best."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class EarlyStopping:
    mode: str  # "min" (val_loss) or "max" (a metric such as f1_weighted)
    patience: int  # evaluations without improvement before stopping; 0 = never stop
    min_delta: float
    best_value: float = math.nan
    best_epoch: int = -1
    evaluations_without_improvement: int = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record one evaluation; True when it is the best so far."""
        if not math.isfinite(value):
            improved = False
        elif math.isnan(self.best_value):
            improved = True
        elif self.mode == "min":
            improved = value < self.best_value - self.min_delta
        else:
            improved = value > self.best_value + self.min_delta
        if improved:
            self.best_value, self.best_epoch, self.evaluations_without_improvement = value, epoch, 0
        else:
            self.evaluations_without_improvement += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.evaluations_without_improvement >= self.patience

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        """Also from strict JSON, where a checkpoint saved before any finite evaluation holds best_value null."""
        for key, value in state.items():
            setattr(self, key, math.nan if key == "best_value" and value is None else value)
