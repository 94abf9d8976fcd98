"""No bubble between steps: step t+1's assignment reaches the workers before step t's update is applied."""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from coordinator.server import CoordinatorServer
from distzo.infra.rpc import Credentials
from distzo.train.reference import ReferenceTrainer
from gpuworker.worker import Worker
from paramserver.server import ParamServer

from clusterhelpers import wait_until
from conftest import small_config

JOURNAL_DELAY_S = 0.4  # the server takes this long to journal (acknowledge) each update


def test_the_next_assignment_arrives_while_the_update_is_being_journaled(cache_dir, tmp_path):
    cfg = small_config(cache_dir, train={"steps": 6, "batch_size": 4, "eval_every": 3, "eval_at_start": False},
                       server={"snapshot_every": 0})
    server = ParamServer(cfg, tmp_path / "ps").start()
    events: list[tuple[str, int, float]] = []
    submit = server.state.submit

    def slow_submit(record, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        events.append(("journal-start", record.step, time.monotonic()))
        time.sleep(JOURNAL_DELAY_S)
        try:
            return submit(record, *args, **kwargs)
        finally:
            events.append(("journal-done", record.step, time.monotonic()))

    server.state.submit = slow_submit
    coord = CoordinatorServer([server.address], Credentials()).start(cfg)
    worker = Worker(coord.address, Credentials(), worker_id="w0")
    execute = worker._execute

    def recording_execute(a):  # noqa: ANN001, ANN202
        if a.kind == "train":
            events.append(("assigned", a.step, time.monotonic()))
        return execute(a)

    worker._execute = recording_execute
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: coord.service.job.state in ("done", "failed"), timeout=240, what="the job to finish")
        assert coord.service.job.state == "done", coord.service.job.error
        at = {(kind, step): t for kind, step, t in events}
        for t in range(1, cfg.train.steps):
            if t % cfg.train.eval_every == 0:
                # an eval runs at version t first: step t is dispatched after the update, as before
                assert at[("assigned", t)] > at[("journal-done", t - 1)]
            else:
                assert at[("assigned", t)] < at[("journal-done", t - 1)], f"step {t} waited for update {t - 1}"
        trained = [torch.from_numpy(server.state.store.master[b].copy()) for b in server.state.owned]
    finally:
        worker.stop()
        thread.join(10)
        worker.close()
        coord.stop(grace=0.2)
        server.stop(grace=0.2)
    ref = ReferenceTrainer(cfg)
    ref.train(progress=False)
    for a, b in zip(trained, ref.buffers):
        assert np.array_equal(a.numpy().view(np.uint32), b.numpy().view(np.uint32))
