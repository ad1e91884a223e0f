"""Early stopping on the validation score, and which epoch is the best."""

from __future__ import annotations

import math


class EarlyStopping:
    """The paper's rule: stop after `patience` epochs without a better validation Dice, where
    epochs in the first fifth of the run do not count (the model is still warming up)."""

    def __init__(self, patience: int, epochs: int):
        self.patience, self.grace = patience, epochs // 5
        self.best, self.best_epoch, self.bad_epochs = -math.inf, 0, 0

    def update(self, epoch: int, score: float) -> bool:
        """Record epoch `epoch` (1-based); True when it is the new best. A NaN score never is."""
        if score > self.best:  # -inf start: the first epoch is always a best, even at Dice 0
            self.best, self.best_epoch, self.bad_epochs = score, epoch, 0
            return True
        if epoch > self.grace:
            self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return dict(best=self.best, best_epoch=self.best_epoch, bad_epochs=self.bad_epochs)

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]
