"""The learning-rate schedule: a pure function of the optimizer step (so resuming needs no scheduler state)."""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup to ``lr``, then cosine decay to ``min_lr``.

    Warmup starts at ``lr / warmup_steps`` rather than 0 so that step 0 already moves the weights. After
    ``total_steps`` the rate stays at ``min_lr``.
    """
    if step < 0 or total_steps <= 0:
        raise ValueError(f"lr_at: step={step} must be >= 0 and total_steps={total_steps} must be > 0")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


__all__ = ["lr_at"]
