"""Runs one assignment: streams the blocks at its version, runs its forwards, reports losses.

Failures become a result with an error kind, never a crash: the worker stays ready for
the next assignment and the coordinator decides (re-assign, retry, skip).
"""

from __future__ import annotations

import logging
import math
import time

import psutil
import torch

from distzo.common.config import JobConfig
from distzo.data.tasks import Batch, DataError
from distzo.infra.logs import kv
from distzo.model.adapters import adapter_from_train
from distzo.model.blocks import ITEMSIZE
from distzo.model.forward import ForwardEngine, ForwardJob
from distzo.model.modeling import BlockModel
from distzo.train.precision import forward_dtypes, job_precision
from distzo.zo import generator
from distzo.zo.record import UpdateRecord
from gpuworker import metrics
from gpuworker.feed import BufferPool, FrozenBlocks, PrefetchFeed
from gpuworker.hostreg import DirectFetch
from gpuworker.node import GatherError, NodeGroup
from paramserver.dataplane.client import FetchError, ParamServerClient, StaleVersionError, VersionTimeout
from paramserver.dataplane.wire import record_from_pb
from protos import coordinator_pb2 as cpb

log = logging.getLogger("distzo.worker")


class ModelRunner:
    """The worker's model, engine and server client for one job."""

    def __init__(self, cfg: JobConfig, client: ParamServerClient, device: torch.device, node: NodeGroup | None = None):
        self.cfg = cfg
        self.client = client
        self.device = device
        self.node = node
        manifest_json = client.manifest.to_json()
        self.model = BlockModel.from_config_json(client.shards[0].manifest.model_config_json,  # type: ignore[union-attr]
                                                 adapter_from_train(cfg.train))
        if self.model.manifest.to_json() != manifest_json:
            raise RuntimeError("this worker cuts the model into different blocks than the parameter server "
                               "(transformers versions differ?)")
        # the job's precision (train.forward_dtype; auto: from runtime.device), whatever this worker's device:
        # every forward of a step computes the same way, and the coordinator divides by the same eps
        self.engine = ForwardEngine(self.model, cfg.train.distribution, device=device,
                                    compute_dtype=job_precision(cfg).compute_dtype)
        itemsize = ITEMSIZE[client.served_dtype]
        k = node.size if node is not None else 1
        biggest = max(-(-b.numel // k) * k * itemsize for b in self.model.manifest.blocks)
        depth = cfg.runtime.prefetch_blocks
        self.pool = BufferPool(depth + len(self.model.pinned_blocks) + 1, biggest, pinned=device.type == "cuda")
        self.process = psutil.Process()
        self.kept = FrozenBlocks(gpu_budget=cfg.runtime.frozen_gpu_bytes)  # frozen blocks (lora/prefix base), fetched once
        self.copy_stream = None
        self.direct = None
        if device.type == "cuda":  # GPU-only: one copy stream; DMA from registered shared memory when next to the server
            self.copy_stream = torch.cuda.Stream(device)
            if node is None:
                self.direct = DirectFetch(client, device, self.copy_stream)
                if not self.direct.warm():  # registration (page pinning) happens here, before the clock
                    self.direct = None

    def warm_up(self) -> None:
        """Compile/load every kernel variant this worker will launch, before the first assignment."""
        generator.warm_up(self.device, self.cfg.train.distribution, forward_dtypes(self.engine.compute_dtype))

    def close(self) -> None:
        if self.direct is not None:
            self.direct.close()

    def run(self, a: cpb.Assignment) -> cpb.WorkResult:
        t0 = time.perf_counter()
        result = cpb.WorkResult(assignment_id=a.assignment_id, step=a.step)
        try:
            pending = self._pending(a)
        except DataError as exc:
            self._fail(result, "bad_input", exc)
            return result
        # update windows: a node group's members rebuild their slices before the gather, a single worker
        # rebuilds each block in its forward engine, fused into the perturbation
        feed = PrefetchFeed(self.client, self.model.manifest, a.version, self.device, self.pool,
                            self.cfg.runtime.prefetch_blocks, self.model.pinned_blocks, self.node,
                            timeout_s=min(self.cfg.server.fetch_timeout_s, a.deadline_s or math.inf),
                            digests=a.report_digests, copy_stream=self.copy_stream, direct=self.direct,
                            kept=self.kept, pending=pending, dist=self.cfg.train.distribution)
        compute = 0.0
        try:
            batches = {bd.shard: Batch.from_arrays((bd.rows, bd.cols), bd.input_ids, bd.attention_mask, bd.labels)
                       for bd in a.batches}
            jobs = []
            for f in a.forwards:
                if f.shard not in batches:
                    raise DataError(f"forward for shard {f.shard} but the assignment carries no such batch")
                jobs.append(ForwardJob(batches[f.shard], seed=f.seed, coef=f.coef, want_scores=f.want_scores,
                                       candidates=tuple(f.candidates)))
            if jobs:
                c0 = time.perf_counter()
                outs = self.engine.run(jobs, feed, pending if self.node is None else ())
                compute = time.perf_counter() - c0 - feed.timers.wait_s
                for f, o in zip(a.forwards, outs):
                    r = result.results.add(spec=f, loss=o.loss, loss_sum=o.loss_sum, label_tokens=o.label_tokens,
                                           tokens=o.tokens)
                    if o.scores is not None:
                        r.scores.extend(o.scores.flatten().tolist())
            else:
                feed.drain()  # gather-only: keep the node group's collectives paired
        except (StaleVersionError,) as exc:
            self._fail(result, "stale", exc)
        except (VersionTimeout, TimeoutError) as exc:
            self._fail(result, "version_timeout", exc)
        except FetchError as exc:
            self._fail(result, "fetch", exc)
        except GatherError as exc:
            self._fail(result, "gather", exc)
        except (DataError, ValueError, IndexError) as exc:  # deterministic: the same input fails the same way anywhere
            self._fail(result, "bad_input", exc)
        except Exception as exc:  # noqa: BLE001 - anything else is reported, the worker lives on
            log.exception("assignment failed")
            self._fail(result, "internal", exc)
        finally:
            feed.close()
        if feed.digests is not None and not result.error:
            result.block_digests.extend(feed.digests[b] for b in sorted(feed.digests))
        tm = feed.timers
        peak_mem = (torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda"  # GPU-only
                    else self.process.memory_info().rss)
        for phase, seconds in (("fetch", tm.fetch_s), ("h2d", tm.h2d_s), ("gather", tm.gather_s),
                               ("compute", max(0.0, compute)), ("wait", tm.wait_s), ("replay", tm.replay_s)):
            metrics.PHASE_SECONDS.labels(phase).inc(seconds)
        if tm.transport:
            metrics.RECEIVED_BYTES.labels(tm.transport).inc(tm.bytes_received)
        metrics.ASSIGNMENTS.labels(a.kind, result.error_kind or "ok").inc()
        metrics.ASSIGNMENT_SECONDS.observe(time.perf_counter() - t0)
        metrics.PEAK_MEMORY.set(peak_mem)
        metrics.PEAK_BLOCK_BYTES.set(tm.pool_bytes + self.engine.last_peak_copy_bytes)
        result.timing.CopyFrom(cpb.Timing(
            fetch_s=tm.fetch_s, gather_s=tm.gather_s, h2d_s=tm.h2d_s, compute_s=max(0.0, compute), wait_s=tm.wait_s,
            total_s=time.perf_counter() - t0, bytes_received=tm.bytes_received, peak_memory_bytes=peak_mem,
            peak_block_bytes=tm.pool_bytes + self.engine.last_peak_copy_bytes, transport=tm.transport))
        return result

    @staticmethod
    def _pending(a: cpb.Assignment) -> tuple[UpdateRecord, ...]:
        """The records to replay on the fetched base (update windows): steps a.version .. a.step - 1, valid.
        Raises DataError when they are not exactly those, or a record is not a valid update."""
        records = tuple(record_from_pb(m) for m in a.pending)
        if [r.step for r in records] != list(range(a.version, a.step)) and a.version <= a.step:
            raise DataError(f"step {a.step} reads base {a.version}: the assignment must carry the records of steps "
                            f"{a.version}..{a.step - 1}, it carries {[r.step for r in records][:8]}")
        if a.version > a.step:
            raise DataError(f"step {a.step} cannot read base version {a.version}: a base is never newer than its step")
        for r in records:
            r.validate()
        return records

    @staticmethod
    def _fail(result: cpb.WorkResult, kind: str, exc: BaseException) -> None:
        result.error = str(exc) or type(exc).__name__
        result.error_kind = kind
        log.warning("assignment failed", extra=kv(step=result.step, kind=kind, error=result.error))
