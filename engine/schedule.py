"""Learning-rate schedules as pure functions of (epoch, step within the epoch).

The rate for any step is computed from the arguments alone, so there is no
scheduler state to save or to get out of step on resume.
"""
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    base_lr: float
    kind: str  # step | cosine | exponential
    epochs: int
    steps_per_epoch: int
    step_size: int = 30
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    min_lr: float = 0.0

    def factor(self, epoch: int, step: int = 0) -> float:
        """Multiplier of ``base_lr`` at ``step`` of ``epoch``."""
        progress = epoch + step / max(self.steps_per_epoch, 1)
        if progress < self.warmup_epochs:
            # Linear from 1% of the rate, per iteration, as torchvision's references warm up.
            return 0.01 + 0.99 * progress / self.warmup_epochs
        if self.kind == "step":
            # Drops at epoch boundaries, exactly as the original's adjust_learning_rate.
            return self.gamma ** (epoch // max(self.step_size, 1))
        if self.kind == "exponential":
            return self.gamma ** epoch
        span = max(self.epochs - self.warmup_epochs, 1e-8)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min((progress - self.warmup_epochs) / span, 1.0)))
        floor = self.min_lr / self.base_lr
        return floor + (1.0 - floor) * cosine

    def lr(self, epoch: int, step: int = 0) -> float:
        return self.base_lr * self.factor(epoch, step)

    def describe(self) -> dict:
        return {
            "kind": self.kind, "base_lr": self.base_lr, "epochs": self.epochs, "step_size": self.step_size,
            "gamma": self.gamma, "warmup_epochs": self.warmup_epochs, "min_lr": self.min_lr,
        }
