"""Every seed of a run, derived in one place: a pure function of the run seed and the thing's place.

A derived seed is numpy's `SeedSequence([seed, purpose, *place])`. The purposes are named here and
nowhere else, so two kinds of randomness never share a stream by accident:

| purpose | what it seeds | place |
| --- | --- | --- |
| `POLICY` 1 | a policy candidate's sampling noise | iteration, candidate |
| `EVAL` 2 | an eval sample's noise (from `eval.seed`, default the run seed) | sample |
| `EXPERT` 3 | a model expert's candidate | expert, iteration, candidate |
| `FOLDER` 4 | which rows of an expert's sample folder an iteration draws | expert, iteration, prompt group |
| `PROCESS_TRAINING` 3 | process `rank`'s training generator (rank 0: the run seed itself) | rank |
| `PROCESS_GLOBAL` 4 | process `rank`'s Python, numpy and torch RNGs (LoRA dropout) | rank |

The process purposes reuse 3 and 4 (they did before this table existed, and the shipped demos'
bytes depend on them); their key has one part after the purpose where the experts' have three, so
the sequences differ all the same (`test_seeds.py` checks that no two purposes' keys coincide).
The prompt stream's epochs are shuffled with `numpy.random.default_rng([seed, epoch])`: no purpose,
two entries, as it always was.
"""

from __future__ import annotations

import numpy as np

POLICY = 1
EVAL = 2
EXPERT = 3
FOLDER = 4
PROCESS_TRAINING = 3
PROCESS_GLOBAL = 4

# purpose -> the parts of its key after the purpose (what keeps equal purpose numbers apart)
PLACES = {"POLICY": (POLICY, 2), "EVAL": (EVAL, 1), "EXPERT": (EXPERT, 3), "FOLDER": (FOLDER, 3),
          "PROCESS_TRAINING": (PROCESS_TRAINING, 1), "PROCESS_GLOBAL": (PROCESS_GLOBAL, 1)}


def derive(seed: int, purpose: int, *place: int) -> int:
    """A 31-bit seed from the run seed, a purpose and a place."""
    return int(np.random.SeedSequence([seed, purpose, *place]).generate_state(1)[0] & 0x7FFFFFFF)


def policy_seed(seed: int, iteration: int, j: int) -> int:
    return derive(seed, POLICY, iteration, j)


def eval_seed(seed: int, j: int) -> int:
    return derive(seed, EVAL, j)


def expert_seed(seed: int, expert: int, iteration: int, j: int) -> int:
    return derive(seed, EXPERT, expert, iteration, j)


def folder_rng(seed: int, expert: int, iteration: int, group: int) -> np.random.Generator:
    return np.random.default_rng([seed, FOLDER, expert, iteration, group])


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the `n` training prompts in `epoch` of the endless prompt stream."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def rank_seed(seed: int, rank: int, purpose: int) -> int:
    """Process `rank`'s seed for `purpose` (`PROCESS_TRAINING` or `PROCESS_GLOBAL`); rank 0's is the run seed."""
    return seed if rank == 0 else derive(seed, purpose, rank)
