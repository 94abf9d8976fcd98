"""Zero-shot dev accuracy and label-word loss of several prompts (template + label words), one model load.

    python bench/prompt_screen.py --model smollm2-135m --data rotten-tomatoes --dev-examples 300 \
        [--max-seq-len 96] [--threads 2] [--prompts FILE.json]

FILE.json is a list of {"template": "...", "label_words": ["...", "..."]}; without it, PROMPTS below.
Prints one markdown row per prompt: zero-shot accuracy with its standard error, the dev loss (nats per
label token), the share of examples predicted as the last label word, the accuracy the same scores reach with
the best bias between two label words (how well the prompt separates the classes, whatever its calibration:
an upper bound measured on the dev examples themselves), and the seconds the evaluation took.
The evaluation is ``distzo.train.reference.evaluate`` (what ``zoctl up``'s step-0 evaluation computes).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHAT = "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
PROMPTS = [
    {"template": "{text} It was", "label_words": ["terrible", "great"]},
    {"template": "Review: {text}\nSentiment:", "label_words": ["negative", "positive"]},
    {"template": "{text} All in all, the movie was", "label_words": ["bad", "good"]},
    {"template": CHAT.format(q="Is this movie review positive or negative?\n{text}"), "label_words": ["negative", "positive"]},
    {"template": CHAT.format(q="Is this movie review positive or negative?\n{text}"), "label_words": ["Negative", "Positive"]},
    {"template": CHAT.format(q="Review: {text}\nIs this review positive or negative? Answer with one word."),
     "label_words": ["Negative", "Positive"]},
    {"template": CHAT.format(q="Did the critic like the movie? Answer yes or no.\n{text}"), "label_words": ["No", "Yes"]},
]


def main() -> None:
    from distzo.common.config import JobConfig
    from distzo.data.jobdata import JobData
    from distzo.train.reference import ReferenceTrainer, apply_runtime_threads
    from distzo.data.jobdata import EvalTally
    from distzo.model.forward import ForwardJob

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="rotten-tomatoes")
    ap.add_argument("--dev-examples", type=int, default=300)
    ap.add_argument("--max-seq-len", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", default=None)
    args = ap.parse_args()
    prompts = json.loads(Path(args.prompts).read_text()) if args.prompts else PROMPTS

    def cfg_for(p: dict) -> JobConfig:
        return JobConfig.from_dict({
            "model": {"source": args.model},
            "data": {"train": args.data, "dev_examples": args.dev_examples, "max_seq_len": args.max_seq_len, **p},
            "runtime": {"threads": args.threads, "kernel_threads": args.threads}})

    tr = ReferenceTrainer(cfg_for(prompts[0]))
    apply_runtime_threads(tr.cfg)
    print("| template | label words | zero-shot acc (SE) | dev loss | predicted last word | acc at the best bias | eval s |")
    print("|---|---|---|---|---|---|---|")
    for p in prompts:
        job = JobData.load(cfg_for(p))
        t0 = time.perf_counter()
        tally = EvalTally(len(p["label_words"]))
        predicted_last = 0
        margins: list[tuple[float, int]] = []  # (score of the last word - the first's, label) per example
        for i, (examples, batch, candidates) in enumerate(job.eval_chunks()):
            res = tr.engine.run([ForwardJob(batch, want_scores=True, candidates=candidates)], tr.feed(), [])[0]
            tally.add(i, examples, batch, res.scores, bool(candidates))
            s = res.scores.reshape(len(examples), len(p["label_words"]))
            predicted_last += int((s.argmax(dim=1) == len(p["label_words"]) - 1).sum())
            margins += [(float(s[k, -1] - s[k, 0]), e.label) for k, e in enumerate(examples)]
        r = tally.result()
        n, acc = r["dev_examples"], r["dev_accuracy"]
        se = math.sqrt(acc * (1 - acc) / n)
        best = best_bias_accuracy(margins, len(p["label_words"]) - 1)
        print(f"| `{json.dumps(p['template'])[1:-1]}` | {'/'.join(p['label_words'])} | {acc:.3f} ({se:.3f}) | "
              f"{r['dev_loss']:.2f} | {predicted_last / n:.2f} | {best:.3f} | {time.perf_counter() - t0:.1f} |", flush=True)


def best_bias_accuracy(margins: list[tuple[float, int]], last: int) -> float:
    """The accuracy of "the last word when its margin over the first exceeds b" at the best b (two label words)."""
    ordered = sorted(margins)
    n = len(ordered)
    best = correct = sum(1 for _, y in ordered if y == last)  # b below every margin: all predicted last
    for _, y in ordered:  # raise b past one example at a time: it is predicted first from then on
        correct += 1 if y != last else -1
        best = max(best, correct)
    return best / n


if __name__ == "__main__":
    main()
