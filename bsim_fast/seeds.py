"""The randomness of a run: one seed mixer for every stream, and the process RNG state a checkpoint keeps.

Every random stream of a run (the order of an epoch, a batch's photometric parameters and crops, a step's
partner and boxes) is seeded by `mix_seed` of the tuple it depends on, so nearby tuples (seed 0 step 1,
seed 1 step 0) give unrelated streams and a resumed run draws what the uninterrupted one draws.
"""

from __future__ import annotations

import json
import random

import numpy as np
import torch


def seed_sequence(*parts: int) -> np.random.SeedSequence:
    """The one seed mixer: nearby tuples give unrelated streams.
    `np.random.default_rng(seed_sequence(a, b))` equals `np.random.default_rng((a, b))`."""
    return np.random.SeedSequence([int(p) & 0xFFFF_FFFF_FFFF_FFFF for p in parts])


def mix_seed(*parts: int, bits: int = 63) -> int:
    """A `bits`-bit integer seed from `seed_sequence(*parts)` (DALI wants 31 bits, torch 63, FFCV's hash 64)."""
    return int(seed_sequence(*parts).generate_state(1, np.uint64)[0] >> np.uint64(64 - bits))


def seed_everything(seed: int) -> None:
    """The global generators (model initialisation, anything drawn outside the seeded streams)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """This process's global generators, as a checkpoint stores them (tensors and strings only: checkpoints load
    with weights_only=True, which refuses numpy arrays)."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": json.dumps(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
