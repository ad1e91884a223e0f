"""Early stopping on the validation score, and which epoch is the best.

Two rules (`TRAIN.early_stopping`); epochs are 1-based here, grace = epochs // 5:
- "best" (ours): the reference is the best score so far. An epoch that does not beat it adds
  one to the counter once the epoch is past the grace period (epoch > grace); a new best
  resets it. The best epoch starts from -inf, so the first epoch is always a best.
- "paper" (the paper's code exactly): the stopper is consulted only when the 0-based epoch
  index is > epochs // 5 (1-based epoch > grace + 1). Its reference is the FIRST score it is
  consulted with, whatever came before; then a score strictly below the reference adds one to
  the counter, a score >= the reference becomes the reference and resets the counter. The
  best epoch (the checkpoint kept) is one whose score is strictly above the best so far,
  starting at 0: a run whose score stays 0 keeps no best checkpoint.
Both stop when the counter reaches `patience`.
"""

from __future__ import annotations

import math

RULES = ("best", "paper")


class EarlyStopping:
    """Best-epoch tracking and the stopping counter of one of the two rules above."""

    def __init__(self, patience: int, epochs: int, rule: str = "best"):
        if rule not in RULES:
            raise ValueError(f"early stopping rule {rule!r}: expected one of {RULES}")
        self.patience, self.grace, self.rule = patience, epochs // 5, rule
        self.best = 0.0 if rule == "paper" else -math.inf
        self.best_epoch, self.bad_epochs = 0, 0
        self.reference: float | None = None  # the paper's rule only

    def update(self, epoch: int, score: float) -> bool:
        """Record epoch `epoch` (1-based); True when it is the new best. A NaN score never is."""
        improved = score > self.best
        if improved:
            self.best, self.best_epoch = score, epoch
        if self.rule == "best":
            if improved:
                self.bad_epochs = 0
            elif epoch > self.grace:
                self.bad_epochs += 1
        elif epoch - 1 > self.grace:
            if self.reference is None or score >= self.reference:
                self.reference, self.bad_epochs = score, 0
            else:
                self.bad_epochs += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return dict(best=self.best, best_epoch=self.best_epoch, bad_epochs=self.bad_epochs, rule=self.rule,
                    reference=self.reference)

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]
        self.reference = state.get("reference")  # absent in states saved before the paper's rule existed
