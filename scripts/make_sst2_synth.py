"""Regenerate the shipped SST-2-style task (distzo/data/datasets/sst2_synth/*.jsonl).

Short movie-review sentences in SST-2's lowercase style with a binary sentiment label
(0 = negative -> "terrible", 1 = positive -> "great"). Negation ("not", "never") and
contrast ("..., but ...") make the label depend on more than one keyword. Deterministic:
`python scripts/make_sst2_synth.py` rewrites the same files.
"""

import json
import random
from pathlib import Path

NOUNS = ["film", "movie", "story", "acting", "plot", "soundtrack", "direction", "cast", "script", "ending",
         "dialogue", "pacing", "cinematography", "performance", "premise", "humor", "characters", "finale"]
POS = ["wonderful", "moving", "brilliant", "charming", "delightful", "gripping", "funny", "beautiful", "clever",
       "heartfelt", "touching", "smart", "fresh", "stunning", "engaging", "warm", "inventive", "powerful"]
NEG = ["dull", "boring", "clumsy", "tedious", "awful", "bland", "messy", "lifeless", "predictable", "painful",
       "shallow", "lazy", "forgettable", "tiresome", "flat", "silly", "confused", "sluggish"]
INTENS = ["", "", "truly ", "really ", "quite ", "remarkably ", "utterly ", "genuinely ", "surprisingly "]
OPENERS = ["", "", "", "honestly , ", "in the end , ", "overall , ", "for what it is , "]


def clause(rng, positive):
    n = rng.choice(NOUNS)
    if rng.random() < 0.25:  # negated adjective of the opposite polarity
        adj = rng.choice(NEG if positive else POS)
        return rng.choice([f"the {n} is never {adj}", f"the {n} is not {adj} at all", f"nothing about the {n} feels {adj}"])
    adj = rng.choice(POS if positive else NEG)
    i = rng.choice(INTENS)
    return rng.choice([
        f"the {n} is {i}{adj}",
        f"a {i}{adj} {n}",
        f"i found the {n} {i}{adj}",
        f"the {n} feels {i}{adj} from start to finish",
        f"what a {adj} {n}",
    ])


def sentence(rng):
    positive = rng.random() < 0.5
    if rng.random() < 0.3:  # contrast: the clause after "but" decides
        text = f"{clause(rng, not positive)} , but {clause(rng, positive)}"
    elif rng.random() < 0.3:
        text = f"{clause(rng, positive)} and {clause(rng, positive)}"
    else:
        text = clause(rng, positive)
    return {"text": rng.choice(OPENERS) + text + " .", "label": int(positive)}


def main():
    rng = random.Random(20261122)
    out = Path(__file__).resolve().parent.parent / "distzo" / "data" / "datasets" / "sst2_synth"
    out.mkdir(parents=True, exist_ok=True)
    seen = set()
    rows = []
    while len(rows) < 2600:
        r = sentence(rng)
        if r["text"] not in seen:
            seen.add(r["text"])
            rows.append(r)
    for name, part in (("train", rows[:2000]), ("dev", rows[2000:2600])):
        with (out / f"{name}.jsonl").open("w") as f:
            for r in part:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
