"""Does the projected gradient have the sign and scale it should? A check against autograd.

For a training batch of the job, the ZO step's projected gradient ``g = (L(θ+εz) − L(θ−εz)) / 2ε``
(distzo's forward engine and generator, as a worker computes it) is compared with the
directional derivative ``z·∇L`` from transformers' own forward and autograd, for several seeds.
For a smooth loss and small ε the two agree to a few digits; a wrong sign, scale or z would show.

    python bench/check_gradient.py --model smollm2-135m --data rotten-tomatoes --seeds 8

Prints one row per seed and the gradient norm (which, with g², sets the lr scale: the expected
loss change of a step is about −lr·g·(z·∇L)).

``--compare-bf16`` (issue 29): g of bfloat16 forwards against g of float32 forwards of the same seeds and batch,
both on the bfloat16 served copy, for the definitions of a 16-bit forward's weights (bench/NOTES.md section 10):
before (every tensor rounded to bfloat16, eps), 1-D float32 (eps), eps x 4 (every tensor rounded), after
(1-D float32 and eps_bf16 = 4 x eps: distzo now). The bfloat16 forwards run on the CPU (torch's bf16 matmuls),
forced with ``ForwardEngine(compute_dtype=torch.bfloat16)``: the weights they read are the GPU's bit for bit, the
matmul's accumulation order is the CPU's. Per definition: the Pearson correlation of g with the float32 forwards'
g at the same eps, the rms of the difference relative to the rms of the float32 g, the share of seeds with the
same sign, and the correlation with z·∇L (autograd on the same served copy, float32)::

    python bench/check_gradient.py --model smollm2-135m --data rotten-tomatoes --seeds 50 --compare-bf16
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-opt")
    ap.add_argument("--data", default=None, help="task name or JSONL (default: the shipped task)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--step", type=int, default=0, help="which step's batch (plan of the job's master seed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--compare-bf16", action="store_true", help="g of bfloat16 against float32 forwards (issue 29)")
    ap.add_argument("--save", metavar="FILE", help="with --compare-bf16: also write every g and z·∇L there (JSON)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.compare_bf16:
        compare_bf16(args)
        return

    from transformers import AutoModelForCausalLM

    from distzo.common.config import JobConfig
    from distzo.data.jobdata import JobData
    from distzo.data.tasks import IGNORE
    from distzo.infra.logs import quiet_transformers
    from distzo.model.blockfeed import MemoryFeed
    from distzo.model.forward import ForwardEngine, ForwardJob
    from distzo.model.modeling import BlockModel
    from distzo.train.plan import step_plan
    from distzo.zo import generator

    quiet_transformers()
    cfg = JobConfig.from_dict({"model": {"source": args.model}, "data": {"train": args.data},
                               "train": {"batch_size": args.batch_size, "eps": args.eps}})
    job = JobData.load(cfg)
    batch = job.shard_batches(step_plan(cfg, args.step, len(job.train)))[0]

    hf = AutoModelForCausalLM.from_pretrained(str(job.model_dir), dtype=torch.float32).eval()
    logits = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    labels = batch.labels[:, 1:]
    picked = labels != IGNORE
    loss = -torch.log_softmax(logits[picked], dim=-1).gather(1, labels[picked].unsqueeze(1)).mean()
    loss.backward()
    bm = BlockModel.from_dir(job.model_dir)
    named = dict(hf.named_parameters())
    grads = [torch.cat([named[bm.manifest.tied.get(t.name, t.name)].grad.reshape(-1) for t in b.tensors]).double()
             for b in bm.manifest.blocks]
    grad_norm = math.sqrt(sum(float(g.square().sum()) for g in grads))

    engine, feed = ForwardEngine(bm, cfg.train.distribution), MemoryFeed(bm.load_block_buffers())
    rows = []
    for seed in range(1, args.seeds + 1):
        plus, minus = engine.run([ForwardJob(batch, seed=seed, coef=args.eps), ForwardJob(batch, seed=seed, coef=-args.eps)], feed)
        g = (plus.loss - minus.loss) / (2 * args.eps)
        directional = sum(float(generator.z_torch(seed, b.global_offset, b.numel, cfg.train.distribution, "cpu").double() @ gb)
                          for b, gb in zip(bm.manifest.blocks, grads))
        rows.append({"seed": seed, "g": g, "z_dot_grad": directional, "ratio": g / directional if directional else math.nan})
    out = {"model": args.model, "loss": float(loss.detach()), "grad_norm": grad_norm, "params": bm.manifest.numel,
           "expected_abs_g": grad_norm * math.sqrt(2 / math.pi), "rows": rows}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{args.model}: loss {out['loss']:.4f}, |grad| {grad_norm:.3f} over {out['params']} parameters "
          f"(E|z·grad| = {out['expected_abs_g']:.3f} for Rademacher/Gaussian z)")
    print(f"{'seed':>5} {'g (ZO, eps=%g)' % args.eps:>18} {'z·grad (autograd)':>18} {'ratio':>8}")
    for r in rows:
        print(f"{r['seed']:>5} {r['g']:>18.5f} {r['z_dot_grad']:>18.5f} {r['ratio']:>8.4f}")



def compare_bf16(args: argparse.Namespace) -> None:
    import contextlib

    import numpy as np
    from transformers import AutoModelForCausalLM

    from distzo.common.config import JobConfig
    from distzo.data.jobdata import JobData
    from distzo.data.tasks import IGNORE
    from distzo.infra.logs import quiet_transformers
    from distzo.model.blockfeed import MemoryFeed
    from distzo.model.forward import ForwardEngine, ForwardJob
    from distzo.model.modeling import BlockModel
    from distzo.train.plan import step_plan
    from distzo.zo import generator
    from distzo.zo.forwardweights import BF16_EPS_SCALE, ForwardWeights
    from distzo.zo.served import to_served

    class Before(ForwardEngine):
        """distzo's 16-bit forward before issue 29: every tensor rounded to the compute dtype, no autocast."""

        def make_copies(self, *a, **k):  # noqa: ANN002, ANN003, ANN202
            return [ForwardWeights(w.main) for w in super().make_copies(*a, **k)]

        def _autocast(self):  # noqa: ANN202
            return contextlib.nullcontext()

    quiet_transformers()
    cfg = JobConfig.from_dict({"model": {"source": args.model}, "data": {"train": args.data},
                               "train": {"batch_size": args.batch_size, "eps": args.eps}})
    job = JobData.load(cfg)
    batch = job.shard_batches(step_plan(cfg, args.step, len(job.train)))[0]
    bm = BlockModel.from_dir(job.model_dir)
    buffers = bm.load_block_buffers()
    served = [to_served(b, "bfloat16").float() for b in buffers]  # what every forward below reads
    # z·∇L by autograd on the served copy, float32
    hf = AutoModelForCausalLM.from_pretrained(str(job.model_dir), dtype=torch.float32).eval()
    hf.load_state_dict(bm.state_dict_from_blocks(served), strict=False)
    hf.tie_weights()
    logits = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    labels = batch.labels[:, 1:]
    picked = labels != IGNORE
    loss = -torch.log_softmax(logits[picked], dim=-1).gather(1, labels[picked].unsqueeze(1)).mean()
    loss.backward()
    named = dict(hf.named_parameters())
    grads = [torch.cat([named[bm.manifest.tied.get(t.name, t.name)].grad.reshape(-1) for t in b.tensors]).double()
             for b in bm.manifest.blocks]
    seeds = range(1, args.seeds + 1)
    truth = np.array([sum(float(generator.z_torch(s, b.global_offset, b.numel, "rademacher", "cpu").double() @ gb)
                          for b, gb in zip(bm.manifest.blocks, grads)) for s in seeds])
    wide = BF16_EPS_SCALE * args.eps
    variants = (("float32", args.eps, ForwardEngine, torch.float32), ("float32", wide, ForwardEngine, torch.float32),
                ("bf16 before", args.eps, Before, torch.bfloat16), ("bf16 1-D float32", args.eps, ForwardEngine, torch.bfloat16),
                (f"bf16 eps x {BF16_EPS_SCALE:g}", wide, Before, torch.bfloat16), ("bf16 after", wide, ForwardEngine, torch.bfloat16))
    feed = MemoryFeed(buffers, served_dtype="bfloat16")
    gs: dict[tuple[str, float], np.ndarray] = {}
    for label, eps, kind, dt in variants:
        engine = kind(BlockModel.from_dir(job.model_dir), "rademacher", compute_dtype=dt)  # hooks: one engine per model
        t0 = time.perf_counter()
        out = []
        for s in seeds:
            plus, minus = engine.run([ForwardJob(batch, seed=s, coef=eps), ForwardJob(batch, seed=s, coef=-eps)], feed)
            out.append((plus.loss - minus.loss) / (2 * eps))
        gs[(label, eps)] = np.array(out)
        print(f"# {label} at eps {eps:g}: {len(out)} seeds in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    rows = []
    for (label, eps), g in gs.items():
        ref = gs[("float32", eps)]
        rows.append({"forwards": label, "eps": eps, "corr_vs_float32": float(np.corrcoef(g, ref)[0, 1]),
                     "rel_rms_diff": float(np.sqrt(np.mean((g - ref) ** 2)) / np.sqrt(np.mean(ref ** 2))),
                     "same_sign": float(np.mean(np.sign(g) == np.sign(ref))),
                     "corr_vs_autograd": float(np.corrcoef(g, truth)[0, 1]), "rms_g": float(np.sqrt(np.mean(g ** 2)))})
    raw = {"model": args.model, "seeds": args.seeds, "loss": float(loss.detach()), "rows": rows,
           "g": {f"{k[0]}@{k[1]:g}": v.tolist() for k, v in gs.items()}, "z_dot_grad": truth.tolist()}
    if args.save:
        Path(args.save).write_text(json.dumps(raw, indent=2))
    if args.json:
        print(json.dumps(raw, indent=2))
        return
    print(f"{args.model}: {args.seeds} seeds, batch {args.batch_size} of step {args.step}, served bfloat16, loss "
          f"{float(loss.detach()):.4f}, rms z·∇L {np.sqrt(np.mean(truth ** 2)):.2f}")
    print("| forwards | eps | corr(g, g float32) | rms(g - g float32) / rms(g float32) | same sign | corr(g, z·∇L) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['forwards']} | {r['eps']:g} | {r['corr_vs_float32']:.4f} | {r['rel_rms_diff']:.3f} | "
              f"{r['same_sign']:.2f} | {r['corr_vs_autograd']:.4f} |")


if __name__ == "__main__":
    main()
