"""Does the projected gradient have the sign and scale it should? A check against autograd.

For a training batch of the job, the ZO step's projected gradient ``g = (L(θ+εz) − L(θ−εz)) / 2ε``
(distzo's forward engine and generator, as a worker computes it) is compared with the
directional derivative ``z·∇L`` from transformers' own forward and autograd, for several seeds.
For a smooth loss and small ε the two agree to a few digits; a wrong sign, scale or z would show.

    python bench/check_gradient.py --model smollm2-135m --data rotten-tomatoes --seeds 8

Prints one row per seed and the gradient norm (which, with g², sets the lr scale: the expected
loss change of a step is about −lr·g·(z·∇L)).
"""

from __future__ import annotations

import argparse
import json
import math

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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from distzo import generator
    from distzo.config import JobConfig
    from distzo.forward import ForwardEngine, ForwardJob, MemoryFeed
    from distzo.jobdata import JobData
    from distzo.logs import quiet_transformers
    from distzo.modeling import BlockModel
    from distzo.plan import step_plan

    quiet_transformers()
    cfg = JobConfig.from_dict({"model": {"source": args.model}, "data": {"train": args.data},
                               "train": {"batch_size": args.batch_size, "eps": args.eps}})
    job = JobData.load(cfg)
    batch = job.shard_batches(step_plan(cfg, args.step, len(job.train)))[0]

    hf = AutoModelForCausalLM.from_pretrained(str(job.model_dir), dtype=torch.float32).eval()
    logits = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    labels = batch.labels[:, 1:]
    picked = labels != -100
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


if __name__ == "__main__":
    main()
