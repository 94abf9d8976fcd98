"""On a CUDA device: the GPU paths give the CPU's bits, and a GPU run reproduces the reference on that GPU.

Skipped where no GPU is visible (CI); run on the lent GPU machine (bench/RESULTS.md says how).
The worker tests in test_worker.py also run with ``device: cuda`` there (the ``device`` fixture).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distzo.model.blocks import BlockSpec
from distzo.model.modeling import BlockModel
from distzo.zo.forwardweights import perturb_block
from distzo.zo.generator import Distribution
from distzo.zo.mezo import apply_update
from distzo.zo.record import Direction, UpdateRecord

from test_cluster import our_processes, same_weights, write_config, zoctl

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def model_blocks(preset) -> tuple[list[BlockSpec], list[torch.Tensor]]:  # noqa: ANN001
    bm = BlockModel.from_dir(preset("tiny-opt"))
    return list(bm.manifest.blocks), bm.load_block_buffers()


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_perturbed_copies_on_cuda_equal_the_cpu_bits(preset, dist, dtype):
    specs, buffers = model_blocks(preset)
    for spec, buf in zip(specs, buffers):
        cpu = perturb_block(buf, spec.global_offset, 1234, Distribution(dist), [1e-3, -1e-3], dtype)
        gpu = perturb_block(buf.cuda(), spec.global_offset, 1234, Distribution(dist), [1e-3, -1e-3], dtype)
        for a, b in zip(cpu, gpu):
            assert b.device.type == "cuda" and b.dtype == dtype
            assert torch.equal(a.view(torch.uint8), b.cpu().view(torch.uint8)), spec.name


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_updates_on_cuda_equal_the_cpu_bits(preset, dist):
    specs, buffers = model_blocks(preset)
    rec = UpdateRecord(3, (Direction(11, 0.7), Direction(12, -1.3)), 1e-3, 0.01)
    for spec, buf in zip(specs, buffers):
        gpu = buf.cuda()
        apply_update(spec, buf, rec, Distribution(dist))
        apply_update(spec, gpu, rec, Distribution(dist))
        assert np.array_equal(buf.numpy().view(np.uint32), gpu.cpu().numpy().view(np.uint32)), spec.name


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
@pytest.mark.parametrize("served", ["float32", "bfloat16", "float16"])
def test_the_replay_on_cuda_equals_the_cpu_bits(preset, dist, served):
    """Update windows: the fused Triton replay + perturbation against the numba one, every block of tiny-opt."""
    from distzo.zo.forwardweights import replay_block
    from distzo.zo.served import to_served

    specs, buffers = model_blocks(preset)
    pending = [UpdateRecord(t, (Direction(11 + t, 0.7), Direction(40 + t, -1.3))[: 1 + t % 2], 1e-3, 0.01 * (t % 2))
               for t in range(5)]
    for spec, buf in zip(specs, buffers):
        base = to_served(buf, served)
        for coefs, dtype in (([1e-3, -1e-3], torch.float32), ([1e-3, -1e-3], torch.bfloat16), ([], None)):
            cpu = replay_block(spec, base, pending, Distribution(dist), 1234, coefs, dtype or torch.float32)
            gpu = replay_block(spec, base.cuda(), pending, Distribution(dist), 1234, coefs, dtype or torch.float32)
            for a, b in zip(cpu, gpu):
                a = a.to(dtype) if dtype is not None else a
                assert b.device.type == "cuda" and torch.equal(a.view(torch.uint8), b.cpu().view(torch.uint8)), spec.name


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_weights_on_cuda_equal_the_cpu_bits(preset, dist, dtype):
    """Issue 29's definition (forwardweights.forward_weights): the 16-bit copy and the float32 1-D tensors, with and
    without pending records, every block of tiny-opt (norms and biases between its matrices)."""
    from distzo.zo.forwardweights import forward_weights
    from distzo.zo.served import to_served

    specs, buffers = model_blocks(preset)
    pending = [UpdateRecord(t, (Direction(11 + t, 0.7),), 1e-3, 0.01) for t in range(3)]
    for spec, buf in zip(specs, buffers):
        base = to_served(buf, "bfloat16")
        for recs in ((), pending):
            cpu = forward_weights(spec, base, Distribution(dist), 1234, [4e-3, -4e-3], dtype, recs)
            gpu = forward_weights(spec, base.cuda(), Distribution(dist), 1234, [4e-3, -4e-3], dtype, recs)
            for a, b in zip(cpu, gpu):
                assert b.main.device.type == "cuda" and torch.equal(a.main.view(torch.uint8), b.main.cpu().view(torch.uint8))
                assert torch.equal(a.vectors.view(torch.uint8), b.vectors.cpu().view(torch.uint8)), spec.name


@pytest.mark.parametrize("layout,workers,served,window", [("dual", 1, "float32", 1), ("ddp", 2, "float32", 1),
                                                          ("pertp", 2, "float32", 1), ("dual", 1, "bfloat16", 1),
                                                          ("dual", 1, "bfloat16", 4)])
@pytest.mark.cluster
def test_zoctl_up_on_cuda_equals_the_reference_on_cuda_bitwise(cache_dir, tmp_path, layout, workers, served, window):
    cfg = write_config(tmp_path, cache_dir, train={"steps": 6 if window == 1 else 12, "batch_size": 8, "weight_decay": 0.01},
                       runtime={"device": "cuda"}, server={"served_dtype": served, "update_window": window})
    flags = ["--config", str(cfg), "--layout", layout, "--workers", str(workers), "--json"]
    up = zoctl("up", *flags, "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "dist"))
    assert up.returncode == 0, up.stderr[-3000:]
    ref = zoctl("reference", *flags, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    a, b = json.loads(up.stdout), json.loads(ref.stdout)
    assert same_weights(tmp_path / "dist", tmp_path / "ref")
    for key in ("final_loss", "dev_loss", "dev_accuracy", "train_tokens"):
        assert a[key] == b[key], key
    assert not our_processes(tmp_path / "run")


@pytest.mark.parametrize("target,served,gpu_bytes", [("lora", "float32", None), ("prefix", "bfloat16", None),
                                                     ("lora", "bfloat16", 0), ("prefix", "float32", 300_000)])
@pytest.mark.cluster
def test_adapter_targets_on_cuda_keep_the_frozen_blocks_and_equal_the_reference(cache_dir, tmp_path, target, served,
                                                                                 gpu_bytes):
    """The worker's cache of frozen blocks (train.target lora/prefix) in GPU memory, in pinned host memory
    (budget 0), and split between them: up == reference on CUDA."""
    from test_cluster import assert_up_equals_reference
    from test_lora import same_adapter

    cfg = write_config(tmp_path, cache_dir, train={"steps": 4, "batch_size": 8, "target": target, "lr": 1e-2, "eps": 1e-2},
                       runtime={"device": "cuda", "frozen_gpu_bytes": gpu_bytes}, server={"served_dtype": served})
    assert_up_equals_reference(tmp_path, ["--config", str(cfg), "--json"], same_adapter)


@pytest.mark.parametrize("served", ["float32", "bfloat16"])
def test_direct_fetch_on_cuda_dmas_the_served_bytes_from_registered_shared_memory(cache_dir, tmp_path, served):
    """No host copy: the worker registers the server's read-only segment with the driver and DMAs from it."""
    from conftest import small_config
    from gpuworker.hostreg import DirectFetch
    from paramserver.dataplane.client import ParamServerClient
    from paramserver.server import ParamServer

    server = ParamServer(small_config(cache_dir, server={"served_dtype": served}), tmp_path / "ps").start()
    try:
        client = ParamServerClient(server.address).connect()
        direct = DirectFetch(client, torch.device("cuda"), torch.cuda.Stream())
        assert direct.warm(), "cudaHostRegister of the read-only segment was refused"
        for b in range(len(client.manifest.blocks)):
            want = server.state.store.bytes_of(b, master=False)
            dest = torch.empty(want.nbytes, dtype=torch.uint8, device="cuda")
            res, dma_s = direct.fetch(b, 0, dest, timeout_s=30)
            assert res.version == 0 and res.copies == 1 and dma_s > 0
            assert np.array_equal(dest.cpu().numpy(), want), b
        direct.close()
        client.close()
    finally:
        server.stop(grace=0.2)


@pytest.mark.parametrize("served", ["bfloat16", "float16"])
@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_update_with_the_served_copy_on_cuda_equals_the_cpu_bits(preset, dist, served):
    specs, buffers = model_blocks(preset)
    rec = UpdateRecord(3, (Direction(11, 0.7), Direction(12, -1.3)), 1e-3, 0.01)
    for spec, buf in zip(specs, buffers):
        gpu = buf.cuda()
        cpu_served = np.empty(buf.numel(), np.uint16)
        gpu_served = torch.empty(buf.numel(), dtype=torch.int16, device="cuda")
        apply_update(spec, buf, rec, Distribution(dist), cpu_served, served)
        apply_update(spec, gpu, rec, Distribution(dist), gpu_served, served)
        assert np.array_equal(buf.numpy().view(np.uint32), gpu.cpu().numpy().view(np.uint32)), spec.name
        assert np.array_equal(cpu_served, gpu_served.cpu().numpy().view(np.uint16)), spec.name
