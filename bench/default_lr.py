"""The default learning rates (distzo/train/defaults.py) against larger and smaller ones: 40 steps per model and target.

    python bench/default_lr.py [--models tiny-opt,tiny-llama,...] [--targets full,lora,prefix]
                               [--scales 0.3,1,3,10] [--steps 40] [--batch-size 16] [--dev-examples 32]
                               [--max-seq-len 64] [--threads 1] [--data TASK]

For each model, target and scale s: the reference trainer (which ``zoctl up`` equals bit for bit) with
lr = s x the default for the target and the model's size, eps the target's default. One markdown row each:
the lr, whether the run stopped (a step the parameter server refuses, or non-finite losses), the training
loss (mean of the first and last 10 steps) and the dev loss at step 0 and at the end.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from distzo.common.config import JobConfig
    from distzo.data.catalog import resolve_model
    from distzo.infra.logs import quiet_transformers
    from distzo.train.defaults import EPS, default_lr, model_parameters
    from distzo.train.reference import ReferenceTrainer
    from distzo.train.step import TrainingStopped

    quiet_transformers()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny-opt,tiny-gpt2,tiny-llama,tiny-qwen3,tiny-qwen2,tiny-mistral,small-opt,"
                    "medium-opt,deep-opt")
    ap.add_argument("--targets", default="full,lora,prefix")
    ap.add_argument("--scales", default="1")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dev-examples", type=int, default=32)
    ap.add_argument("--max-seq-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", default=None)
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args()
    print("| model | parameters | target | scale | lr | eps | stopped | training loss first 10 -> last 10 "
          "| dev loss 0 -> end | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        params = model_parameters(resolve_model(model, args.cache_dir))
        for target in args.targets.split(","):
            for scale in (float(s) for s in args.scales.split(",")):
                lr = float(f"{scale * default_lr(target, params):.2g}")
                raw = {"model": {"source": model},
                       "data": {"train": args.data, "dev_examples": args.dev_examples, "max_seq_len": args.max_seq_len},
                       "train": {"steps": args.steps, "batch_size": args.batch_size, "target": target, "lr": lr,
                                 "eps": EPS[target], "eval_every": 0},
                       "runtime": {"threads": args.threads, "kernel_threads": args.threads, "cache_dir": args.cache_dir}}
                t0 = time.perf_counter()
                tr = ReferenceTrainer(JobConfig.from_dict(raw))
                stopped = "-"
                try:
                    tr.train(progress=False)
                except TrainingStopped as exc:
                    stopped = str(exc)[:60]
                    tr.evaluate(len(tr.log.losses))
                evals = tr.log.evals
                print(f"| {model} | {params} | {target} | {scale:g} | {lr:.2g} | {EPS[target]:g} | {stopped} | "
                      f"{tr.log.start_loss():.3f} -> {tr.log.final_loss():.3f} | "
                      f"{evals[0]['dev_loss']:.3f} -> {evals[-1]['dev_loss']:.3f} | {time.perf_counter() - t0:.0f} |",
                      flush=True)


if __name__ == "__main__":
    main()
