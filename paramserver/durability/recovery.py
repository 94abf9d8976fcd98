"""Where recovery starts: the newest usable snapshot at or before the base the next step reads, and the journal
records behind it.

With update windows (``server.update_window`` K > 1) the next steps read base ``base_version(J, K)`` of the
journal's end J, so a snapshot newer than that base is passed over (pruning keeps one at or before it). A
damaged snapshot falls back to an older one; with none at all, the journal replays onto the model's initial
weights, which it can only do from step 0. ``install`` then brings the store to the version the next step
reads; ``ServerState.recover`` queues the records after it and reopens the journal.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection

import numpy as np

from distzo.infra.logs import kv
from distzo.model.blocks import Manifest
from distzo.zo.generator import Distribution
from distzo.zo.mezo import apply_window, base_version
from distzo.zo.record import UpdateRecord
from paramserver.durability.datadir import RecoveryError
from paramserver.durability.journal import Journal, JournalCorrupt
from paramserver.durability.snapshot import SnapshotCorrupt, list_snapshots, load_snapshot_state
from paramserver.store import BlockStore

log = logging.getLogger("distzo.paramserver")


@dataclass
class RecoveryPoint:
    """What recovery starts from: ``blocks`` (fp32 [numel] per owned block) and ``states`` (optimizer state per
    stateful block) at version ``base``, a snapshot's or the model's initial weights (``base`` 0). ``records``:
    the whole journal, in step order; ``replay``: those from ``base`` on (contiguous); ``target``: the version
    the next step reads (``base_version`` of the journal's end)."""

    base: int
    target: int
    blocks: dict[int, np.ndarray]
    states: dict[int, np.ndarray] = field(default_factory=dict)
    records: list[UpdateRecord] = field(default_factory=list)
    replay: list[UpdateRecord] = field(default_factory=list)
    had_snapshots: bool = False  # the data directory held committed snapshots (usable or not)


def find_recovery_point(data_dir: Path, journal: Journal, window: int, digest: str, numels: dict[int, int],
                        state_width: int, stateful: Collection[int],
                        initial: Callable[[int], dict[int, np.ndarray]]) -> RecoveryPoint:
    """Read ``data_dir``'s journal (a torn final record repaired) and load its newest usable snapshot at or before
    the base the next step reads. ``digest``: the server's manifest digest; ``numels``: elements per owned block;
    ``state_width``/``stateful``: the optimizer's fp32 values per parameter and the blocks that keep state
    (``load_snapshot_state``); ``initial(records)``: the owned blocks' initial weights, called with the number
    of journal records only when there is no snapshot. Raises RecoveryError for a damaged journal, snapshots of which none is usable, a
    journal that does not start at step 0 without a snapshot, or records missing after the snapshot."""
    snaps = list_snapshots(data_dir)
    try:
        records = list(journal.read_all(repair=True))
    except JournalCorrupt as exc:
        raise RecoveryError(str(exc)) from None
    end = max([records[-1].step + 1 if records else 0, *(s.version for s in snaps)])
    target = base_version(end, window)  # = end with K = 1
    blocks = None
    states: dict = {}
    base = 0
    reasons = []
    for info in reversed(snaps):
        if info.version > target:
            reasons.append(f"snapshot at version {info.version} is newer than base {target} that the next step "
                           f"reads (server.update_window {window})")
            continue
        try:
            blocks, states = load_snapshot_state(info, digest, numels, state_width, stateful)
            base = info.version
            break
        except SnapshotCorrupt as exc:
            reasons.append(str(exc))
            log.error("snapshot unusable, trying an older one", extra=kv(error=str(exc)))
    if blocks is None:
        if snaps:
            raise RecoveryError(f"no usable snapshot in {data_dir}: all {len(snaps)} fail their checks"
                                f"{'' if window == 1 else ' or are newer than the base the next step reads'} "
                                f"({'; '.join(reasons)})")
        if records and records[0].step != 0:
            raise RecoveryError(f"{data_dir} holds a journal from step {records[0].step} but no snapshot to replay it onto")
        blocks = initial(len(records))
    replay = [r for r in records if r.step >= base]
    for i, r in enumerate(replay):
        if r.step != base + i:
            raise RecoveryError(f"the journal has step {r.step} where step {base + i} should follow the snapshot at "
                                f"version {base}: records are missing")
    return RecoveryPoint(base, target, blocks, states, records, replay, had_snapshots=bool(snaps))


def install(point: RecoveryPoint, store: BlockStore, manifest: Manifest, owned: range, window: int,
            dist: Distribution) -> tuple[int, list[UpdateRecord]]:
    """Put ``point``'s blocks into ``store`` and bring them forward; returns (the version the weights are at, the
    records the applier still takes). K = 1: every record of ``point.replay`` applied, none left. K > 1: the
    records up to ``point.target`` in one pass per block (materialized at the target), those after it left to
    the applier, exactly as if they had just arrived. Raises RecoveryError for a snapshot without an owned block."""
    blocks, states, base, target, replay = point.blocks, point.states, point.base, point.target, point.replay
    if window == 1:
        for b in owned:
            _check_block(blocks, b, base)
            store.set_block(b, blocks[b], base, states.get(b))
        for r in replay:
            store.apply(r, dist)
        return base + len(replay), []
    upto = replay[: target - base]  # in one pass per block; those after the base go through the applier
    for b in owned:
        data = np.array(_check_block(blocks, b, base), dtype=np.float32, copy=True)
        if upto:
            apply_window(manifest.blocks[b], data, data, upto, dist)
        store.set_block(b, data, target)
    return target, replay[target - base:]


def _check_block(blocks: dict, b: int, base: int) -> np.ndarray:
    if b not in blocks:
        raise RecoveryError(f"snapshot at version {base} lacks block {b}")
    return blocks[b]
