"""Which model families train with ``train.target prefix``: the block engine against peft on each family.

    python bench/prefix_families.py [MODEL_TYPE ...]

For every family in ``distzo.model.families.TESTED_FAMILIES`` (or those named), a random tiny model with a
random 3-token prefix: the largest logit difference between distzo's streamed forward and peft's
prefix-tuning model (``distzo.model.families.compare_prefix_with_peft``; 0 = bit for bit), or distzo's
refusal. Prints one line per family and the counts.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from distzo.model import families
    from distzo.model.modeldir import ModelError

    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    names = sys.argv[1:] or families.TESTED_FAMILIES
    unknown = [name for name in names if name not in CONFIG_MAPPING]
    if unknown:
        sys.exit(f"prefix_families.py: {', '.join(unknown)}: not a transformers model_type (e.g. opt, llama, gpt2)")
    exact = refused = other = 0
    for name in names:
        try:
            diff = families.compare_prefix_with_peft(families.tiny_config(CONFIG_MAPPING[name]()))
        except ModelError as exc:
            refused += 1
            print(f"{name:24s} refused: {exc}", flush=True)
            continue
        exact += diff == 0.0
        other += diff != 0.0
        print(f"{name:24s} max logit difference {diff:.3g}", flush=True)
    print(f"{len(names)} families: {exact} bit for bit, {other} differ, {refused} refused")


if __name__ == "__main__":
    main()
