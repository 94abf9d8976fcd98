"""train.target lora: frozen base, trainable adapter blocks, the peft export, the data plane (the data plane for
prefix too; the rest of prefix is tests/test_prefix.py). zoctl up == zoctl reference with LoRA: tests/test_matrix.py."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from distzo.model.export import export_model_dir
from distzo.model.forward import ForwardJob
from distzo.train.reference import ReferenceTrainer

from clusterhelpers import Harness
from conftest import small_config
from test_cluster import zoctl, zoctl_here
from test_worker import reference_losses

LORA = {"target": "lora", "lr": 1e-2, "eps": 1e-2}


def same_adapter(a, b) -> bool:  # noqa: ANN001
    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    return sorted(x) == sorted(y) and all(np.array_equal(x[k].view(np.uint32), y[k].view(np.uint32)) for k in x)


def test_lora_trains_only_the_adapters_and_exports_what_peft_loads(cache_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = small_config(cache_dir, train={**LORA, "steps": 3, "weight_decay": 0.01})
    tr = ReferenceTrainer(cfg)
    blocks = tr.model.manifest.blocks
    assert [b.name for b in blocks if b.trainable] == [f"lora.{i}" for i in range(tr.model.config.num_hidden_layers)]
    before = [b.clone() for b in tr.buffers]
    tr.train(out_dir=tmp_path / "out", progress=False)
    for spec, a, b in zip(blocks, before, tr.buffers):
        assert torch.equal(a, b) != spec.trainable, spec.name  # frozen blocks unchanged, every adapter block moved

    # the export is peft's adapter directory; loaded on the base, its logits are the run's model's, bit for bit
    batch = next(iter(tr.job.eval_chunks()))[1]
    ours = tr.engine.run([ForwardJob(batch, want_logits=True)], tr.feed())[0].logits
    base = AutoModelForCausalLM.from_pretrained(str(tr.job.model_dir), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "out")).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    real = batch.attention_mask.bool()
    assert torch.equal(ours[real], theirs[real])
    untrained = AutoModelForCausalLM.from_pretrained(str(tr.job.model_dir), dtype=torch.float32)
    with torch.no_grad():
        zero_shot = untrained(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert not torch.equal(zero_shot[real], theirs[real])  # the adapter changed the model

    # --merge: a plain model directory with the adapter folded into the weights
    export_model_dir(tr.model, tr.buffers, tmp_path / "merged", merge=True)
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    with torch.no_grad():
        m = merged(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.allclose(m[real], ours[real], rtol=0, atol=1e-5)  # W + s B A rounds differently from W x + s B A x


@pytest.mark.parametrize("target", ["lora", "prefix"])
def test_a_worker_fetches_the_frozen_blocks_once(cache_dir, tmp_path, target):
    cfg = small_config(cache_dir, train={**LORA, "target": target})
    h = Harness(cfg, tmp_path)
    try:
        h.add_worker("w0")
        h.wait_registered(["w0"])
        man = h.server.state.manifest
        trainable = sum(b.numel for b in man.blocks if b.trainable)
        want = reference_losses(cfg)
        received = []
        for _ in range(2):
            h.send("w0", h.train_assignment(0, [(0, 0, 1), (0, 0, -1)]))
            _, r = h.result()
            assert not r.error, r.error
            assert {(f.spec.direction, f.spec.shard, f.spec.sign): f.loss for f in r.results} == want  # bitwise
            received.append(r.timing.bytes_received)
        assert received == [man.numel * 4, trainable * 4]  # then only the adapters: the base is kept
        assert trainable * 20 < man.numel
    finally:
        h.close()


def test_frozen_blocks_stay_in_gpu_memory_while_the_budget_lasts():
    from gpuworker.feed import FrozenBlocks

    kept = FrozenBlocks(gpu_budget=100)
    assert [kept.fits_on(torch.device("cuda"), n) for n in (60, 50, 40, 1)] == [True, False, True, False]
    assert kept.gpu_budget == 0


@pytest.mark.parametrize("setting,needle", [(["--target", "lora", "--set", "train.lora_modules=[nope_proj]"],
                                             "train.lora_modules"),
                                            # one unknown next to a known one (peft accepts it), and a linear
                                            # module outside the decoder layers (no adapter block for it)
                                            (["--target", "lora", "--set", "train.lora_modules=[q_proj,nope_proj]"],
                                             "['nope_proj'] is not a linear module"),
                                            (["--target", "lora", "--set", "train.lora_modules=[lm_head]"],
                                             "['lm_head'] is not a linear module"),
                                            (["--target", "lora", "--set", "train.lora_rank=0"], "train.lora_rank"),
                                            (["--merge"], "--target lora"),
                                            (["--target", "lora", "--merge"], "add --out DIR")])
def test_bad_targets_are_one_line_and_exit_2(cache_dir, setting, needle):
    call = zoctl if needle == "train.lora_modules" else zoctl_here  # one through the process, the rest its main()
    r = call("reference", *setting, "--steps", "1", "--set", f"runtime.cache_dir={cache_dir}")
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().count("\n") == 0 and needle in r.stderr
    assert "Traceback" not in r.stderr


def test_zoctl_up_refuses_a_module_outside_the_layers_before_starting_anything(cache_dir, tmp_path):
    """The parameter server used to crash on lm_head (exit 1), and the supervisor restarted it again and again."""
    r = zoctl_here("up", "--target", "lora", "--set", "train.lora_modules=[lm_head]", "--steps", "1",
                   "--set", f"runtime.cache_dir={cache_dir}", "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "train.lora_modules" in r.stderr and "lm_head" in r.stderr
    assert "Traceback" not in r.stderr and "starting it again" not in r.stderr
