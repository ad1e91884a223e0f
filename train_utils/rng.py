"""Every random number generator a run draws from, captured and restored: a resumed run draws
what an uninterrupted one would have."""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_state(generator: torch.Generator) -> dict:
    """Python's, numpy's, torch's (CPU and CUDA) and the training loader's `generator`, in types
    that `torch.load(weights_only=True)` accepts."""
    state = np.random.get_state(legacy=False)
    return dict(python=random.getstate(), torch=torch.get_rng_state(), loader=generator.get_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                numpy_key=torch.from_numpy(state["state"]["key"].astype(np.int64)),
                numpy_pos=state["state"]["pos"], numpy_gauss=(state["has_gauss"], state["gauss"]))


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["loader"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(dict(bit_generator="MT19937", state=dict(key=state["numpy_key"].numpy().astype(np.uint32),
                             pos=state["numpy_pos"]), has_gauss=state["numpy_gauss"][0], gauss=state["numpy_gauss"][1]))
