"""What each step does, as pure functions of the job's master seed and the step number.

Both the reference trainer and the coordinator call these, so the distributed run and
its oracle draw the same seeds, the same examples and the same layout arithmetic.

* seed of direction j at step t: the first 8 bytes of BLAKE2b("distzo-seed", master, t, j),
  top bit cleared (seeds are int64-safe);
* data order: epoch e is a permutation of the training set by NumPy's PCG64 seeded with
  (master, e); step t takes positions [t*B, (t+1)*B) of the concatenated epochs;
* layout: ``workers = pertp x ddp x q``; worker w runs direction j = w // (ddp*pertp),
  shard d = (w // pertp) % ddp and, with PertP, sign + for even w and - for odd w. The
  batch is cut into ddp contiguous shards of equal size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from distzo.common.config import JobConfig
from distzo.common.configsections import LayoutSection
from distzo.zo.mezo import learning_rate


@dataclass(frozen=True)
class Role:
    """One forward of a step: direction j, data shard d, perturbation sign (+1 or -1)."""

    direction: int
    shard: int
    sign: int


@dataclass(frozen=True)
class StepPlan:
    step: int
    seeds: tuple[int, ...]
    examples: tuple[int, ...]  # indices into the training set, in batch order
    lr: float


def direction_seed(master_seed: int, step: int, direction: int) -> int:
    h = hashlib.blake2b(f"distzo-seed:{master_seed}:{step}:{direction}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


@lru_cache(maxsize=8)
def _epoch_order(master_seed: int, epoch: int, n: int) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([master_seed, epoch])))
    return rng.permutation(n)


def batch_examples(master_seed: int, step: int, batch_size: int, n: int) -> tuple[int, ...]:
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n)
        out.append(int(_epoch_order(master_seed, epoch, n)[i]))
    return tuple(out)


def step_plan(cfg: JobConfig, step: int, n_train: int) -> StepPlan:
    t = cfg.train
    seeds = tuple(direction_seed(t.seed, step, j) for j in range(cfg.layout.q))
    lr = learning_rate(step, t.lr, t.lr_schedule, t.steps, t.warmup_steps, t.min_lr_ratio)
    return StepPlan(step, seeds, batch_examples(t.seed, step, t.batch_size, n_train), lr)


def shard_bounds(batch_size: int, shards: int) -> list[tuple[int, int]]:
    per = batch_size // shards
    return [(d * per, (d + 1) * per) for d in range(shards)]


def worker_roles(layout: LayoutSection) -> list[list[Role]]:
    """The forwards each of the layout's workers runs in one step."""
    out = []
    for w in range(layout.workers):
        j = w // (layout.ddp * layout.pertp)
        d = (w // layout.pertp) % layout.ddp
        if layout.pertp == 1:
            out.append([Role(j, d, 1), Role(j, d, -1)])
        else:
            out.append([Role(j, d, 1 if w % 2 == 0 else -1)])
    return out


def all_roles(layout: LayoutSection) -> list[Role]:
    return [r for rs in worker_roles(layout) for r in rs]
