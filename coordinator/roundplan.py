"""What a training round sends, made once per step: the forwards of the layout, each worker's piece of
them, and the update records the workers replay on their base.

    round_plan(cfg, t, data)  step t's plan and batches (distzo.train.step.plan_step) and one ForwardSpec per
                              (direction j, shard d, sign): seed s_j, coef sign * eps; pieces by worker_roles
    UpdateWindow              the base version step t's workers fetch (base_version(t, K)) and the records of
                              steps base .. t-1 they replay on it (server.update_window K)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from coordinator.rounds import Round
from distzo.common.config import JobConfig
from distzo.data.jobdata import JobData
from distzo.data.tasks import Batch
from distzo.train.plan import StepPlan, worker_roles
from distzo.train.precision import job_precision
from distzo.train.step import ForwardKey, PlannedStep, plan_step
from distzo.zo.mezo import base_version
from distzo.zo.record import UpdateRecord
from protos import coordinator_pb2 as cpb


@dataclass(frozen=True)
class RoundPlan(PlannedStep):
    """A training step's round: the plan and batches, the forwards by (direction, shard, sign), each worker's keys
    (``pieces[w]``), and ``started``: the round already sent with them (during the previous step's update), or None."""

    forwards: dict[ForwardKey, cpb.ForwardSpec]
    pieces: list[list[ForwardKey]]
    started: Round | None = None

    def shard_batches(self) -> dict[int, Batch]:
        """The batches by DDP shard, as a round sends them."""
        return dict(enumerate(self.batches))


def round_spec(cfg: JobConfig, plan: StepPlan,
               candidates: tuple[int, ...] = ()) -> tuple[dict[ForwardKey, cpb.ForwardSpec], list[list[ForwardKey]]]:
    """The layout's forwards of ``plan``, by (direction, shard, sign), and each worker's piece of them.

    ``candidates``: the token ids a training forward scores (train.objective accuracy; empty: the loss only)."""
    eps = job_precision(cfg).eps  # the forwards' (train.eps_bf16 for bfloat16 forwards)
    forwards: dict[ForwardKey, cpb.ForwardSpec] = {}
    pieces = []
    for roles in worker_roles(cfg.layout):
        piece = []
        for r in roles:
            key = (r.direction, r.shard, r.sign)
            forwards[key] = cpb.ForwardSpec(direction=r.direction, shard=r.shard, sign=r.sign,
                                            seed=plan.seeds[r.direction], coef=r.sign * eps,
                                            want_scores=bool(candidates), candidates=candidates)
            piece.append(key)
        pieces.append(piece)
    return forwards, pieces


def round_plan(cfg: JobConfig, t: int, data: JobData) -> RoundPlan:
    """Step ``t``'s round, not yet started: its plan, batches, forwards and pieces."""
    step = plan_step(cfg, t, data)
    forwards, pieces = round_spec(cfg, step.plan, data.train_candidates)
    return RoundPlan(step.plan, step.batches, forwards, pieces)


class UpdateWindow:
    """The update records the next steps' workers replay (server.update_window K; K = 1 keeps none): step t's
    workers fetch the materialized base ``base_version(t, K)`` and replay the records of steps base .. t-1."""

    def __init__(self, window: int, records: Iterable[UpdateRecord] = ()):
        self.window = window
        self.records = {r.step: r for r in records}

    def keep(self, record: UpdateRecord) -> None:
        """Keep step ``record.step``'s record; drop those that no later step's base comes before."""
        self.records[record.step] = record
        keep_from = base_version(record.step + 1, self.window)
        for s in [s for s in self.records if s < keep_from]:
            del self.records[s]

    def base(self, step: int) -> tuple[int, list[UpdateRecord]]:
        """The base version step ``step``'s workers fetch and the records they replay on it (KeyError: one not kept)."""
        version = base_version(step, self.window)
        return version, [self.records[s] for s in range(version, step)]
