"""What 16-bit forwards keep of the perturbation, per tensor kind, before and after issue 29 (distzo/train/precision.py).

For each model (its initial weights: a preset, a fetched model or a model directory) and the served dtype, the
figures of ``precision.measure`` (rms error of the seen perturbation / eps, and the share of elements whose +eps and
-eps copies are equal) for four definitions of a 16-bit forward's weights:

    before        every tensor rounded to the compute dtype, eps = train.eps          (distzo before issue 29)
    1-D float32   tensors of rank < 2 kept float32, eps = train.eps
    eps x 4       every tensor rounded, eps = 4 x train.eps
    after         tensors of rank < 2 float32, eps = train.eps_bf16 default (4 x)    (forwardweights.forward_weights now)

(float16: the scale is 1, so "eps x 4" and "after" use eps itself.) No forward runs: the figures are of the
weights the forwards would read, on the CPU.

    python bench/perturbation_kept.py --models smollm2-135m tiny-opt tiny-gpt2 tiny-llama tiny-qwen3 tiny-qwen2 tiny-mistral
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny-opt"])
    ap.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16", help="the forwards' compute dtype")
    ap.add_argument("--served", default=None, help="served dtype (default: the compute dtype, as on a GPU)")
    ap.add_argument("--eps", type=float, default=1e-3, help="train.eps")
    ap.add_argument("--sample", type=int, default=65536, help="elements sampled per kind")
    args = ap.parse_args()

    from distzo.data.catalog import resolve_model
    from distzo.infra.logs import quiet_transformers
    from distzo.model.blocks import DTYPES
    from distzo.model.modeling import BlockModel
    from distzo.train.plan import direction_seed
    from distzo.train.precision import KINDS, ModelDirSource, measure
    from distzo.zo.forwardweights import BF16_EPS_SCALE, ForwardPrecision

    quiet_transformers()
    dt = DTYPES[args.dtype]
    served = args.served or args.dtype
    scale = BF16_EPS_SCALE if dt == torch.bfloat16 else 1.0
    variants = (("before", args.eps, False), ("1-D float32", args.eps, True), (f"eps x {scale:g}", scale * args.eps, False),
                ("after", scale * args.eps, True))
    print(f"{args.dtype} forwards, served {served}, train.eps {args.eps:g}, Rademacher z of seed 0's first step; "
          f"rms error / eps (elements lost), +- one standard error where sampled ({args.sample} per kind)\n")
    print("| model | definition | eps | " + " | ".join(KINDS) + " |")
    print("|---|---|---|" + "---|" * len(KINDS))
    for name in args.models:
        path = resolve_model(name)
        manifest = BlockModel.from_dir(path).manifest
        source = ModelDirSource(path)
        for label, eps, vectors in variants:
            r = measure(manifest, source, ForwardPrecision(dt, eps), served, "rademacher", direction_seed(0, 0, 0),
                        per_kind=args.sample, suggest=False, vectors=vectors)
            cells = {k.kind: f"{k.rms:.3f}{f' +-{k.rms_se:.3f}' if k.rms_se else ''} ({100 * k.lost:.1f}%)" for k in r.kinds}
            print(f"| {name} | {label} | {eps:g} | " + " | ".join(cells.get(k, "-") for k in KINDS) + " |", flush=True)


if __name__ == "__main__":
    main()
