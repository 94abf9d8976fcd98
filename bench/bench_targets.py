"""Targets x optimizers on one task, same seed: dev loss over the steps and the training seconds.

    python bench/bench_targets.py [--model tiny-opt] [--data sst2-synth] [--steps 300] [--eval-every 25]
                                  [--threshold 3.0] [--cache-dir DIR] [--runs TARGET:OPTIMIZER:LR[:EPS[:OBJECTIVE]],...]
                                  [--batch-size 16] [--dev-examples N] [--max-seq-len N] [--threads N]

Runs the reference trainer (the same math as ``zoctl up``, which equals it bit for bit) for
train.target full and lora with train.optimizer sgd, momentum and adam, each with the lr in
``RUNS`` (not tuned beyond a short probe), or the ``--runs`` given (any target: full, lora, prefix),
and prints one markdown table: the first eval with dev loss <= threshold (and the training seconds
to it), the dev loss and accuracy at the last step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (target, optimizer, lr); momentum's lr is sgd's x (1 - mu), the same step size at steady state
RUNS = [("full", "sgd", 5e-4), ("full", "momentum", 5e-5), ("full", "adam", 2e-3),
        ("lora", "sgd", 1e-2), ("lora", "momentum", 1e-3), ("lora", "adam", 2e-3)]


def main() -> None:
    from distzo.common.config import JobConfig
    from distzo.train.reference import ReferenceTrainer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny-opt")
    ap.add_argument("--data", default=None, help="a task name; default sst2-synth")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--threshold", type=float, default=3.0)
    ap.add_argument("--eps", type=float, default=1e-2)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--runs", default=None, help="comma-separated TARGET:OPTIMIZER:LR[:EPS[:OBJECTIVE]] (default: RUNS, eps --eps, objective loss)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dev-examples", type=int, default=None)
    ap.add_argument("--max-seq-len", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    runs = [(t, o, float(lr), float(e[0]) if e else args.eps, e[1] if len(e) > 1 else "loss")
            for t, o, lr, *e in (r.split(":") for r in args.runs.split(","))] if args.runs else \
        [(t, o, lr, args.eps, "loss") for t, o, lr in RUNS]
    print(f"| target | optimizer, lr, eps | trainable params | first eval with dev loss <= {args.threshold} "
          f"| training s to it | dev loss at {args.steps} | dev acc at {args.steps} | training s |")
    print("|---|---|---|---|---|---|---|---|")
    for target, opt, lr, eps, objective in runs:
        data = {"train": args.data, "dev_examples": args.dev_examples, "max_seq_len": args.max_seq_len}
        raw = {"model": {"source": args.model}, "data": {k: v for k, v in data.items() if v is not None},
               "train": {"steps": args.steps, "target": target, "optimizer": opt, "lr": lr, "eps": eps, "objective": objective,
                         "eval_every": args.eval_every, "batch_size": args.batch_size}, "runtime": {}}
        if args.cache_dir:
            raw["runtime"]["cache_dir"] = args.cache_dir
        if args.threads:
            raw["runtime"].update(threads=args.threads, kernel_threads=args.threads)
        tr = ReferenceTrainer(JobConfig.from_dict(raw))
        seconds: dict[int, float] = {}
        evaluate = tr.evaluate

        def timed_eval(step: int, evaluate=evaluate):  # noqa: ANN001, ANN202 - the training clock at each eval
            seconds[step] = tr.train_seconds
            return evaluate(step)

        tr.evaluate = timed_eval  # type: ignore[method-assign]
        summary = tr.train(progress=False)
        trainable = sum(b.numel for b in tr.model.manifest.blocks if b.trainable)
        hit = next((e for e in tr.log.evals if e["dev_loss"] <= args.threshold), None)
        first = f"step {hit['step']}" if hit else f"not in {args.steps} steps"
        to_it = f"{seconds[hit['step']]:.1f}" if hit else "-"
        shown = f"{opt}, {lr:g}, eps {eps:g}" + (f", objective {objective}" if objective != "loss" else "")
        print(f"| {target} | {shown} | {trainable} | {first} | {to_it} | {summary['dev_loss']:.3f} "
              f"| {summary['dev_accuracy']:.3f} | {tr.train_seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
