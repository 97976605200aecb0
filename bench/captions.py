"""A deterministic, realistic mix of image captions: 5 to 40 words, most of them short.

Word counts follow a log-normal around 12 words (about COCO's length) with a long tail of alt-text
style descriptions, clipped to 5..40; sentences are built from a fixed vocabulary with a seeded RNG,
so every run and every implementation sees the same captions.
"""
from __future__ import annotations

import math
import random

SUBJECTS = ["a man", "a woman", "two children", "a dog", "a black cat", "an old car", "a red bus", "a group of people",
            "a small boat", "a bowl of soup", "a plate of pasta", "a tall building", "a wooden bench", "a horse",
            "a young girl", "a bicycle", "an airplane", "a cup of coffee", "a vase of flowers", "a street vendor"]
VERBS = ["sitting on", "standing next to", "walking along", "parked near", "lying on", "looking at", "riding",
         "holding", "flying over", "floating on", "placed on", "leaning against", "running across", "waiting at"]
PLACES = ["a sandy beach", "the kitchen table", "a busy street", "a snowy mountain", "the city park", "a wooden dock",
          "a quiet lake", "the train station", "a grassy field", "a crowded market", "an empty road", "the river bank"]
DETAILS = ["at sunset", "in the rain", "on a sunny afternoon", "with trees in the background", "under a cloudy sky",
           "surrounded by tall grass", "next to a red umbrella", "in black and white", "with soft morning light",
           "while people watch from a distance", "during a winter storm", "beside an old stone wall",
           "as cars drive past", "with mountains far behind", "in a blurry close-up photo"]


def _words(rng: random.Random) -> int:
    return max(5, min(40, round(math.exp(rng.gauss(math.log(12), 0.5)))))


def realistic_captions(n: int = 256, seed: int = 0) -> list[str]:
    """``n`` captions, each cut or extended to a drawn word count between 5 and 40."""
    rng = random.Random(seed)
    captions = []
    for _ in range(n):
        target = _words(rng)
        words = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(PLACES)}".split()
        while len(words) < target:
            words += rng.choice(DETAILS).split()
        captions.append(" ".join(words[:target]))
    return captions


if __name__ == "__main__":
    caps = realistic_captions()
    counts = sorted(len(c.split()) for c in caps)
    print(f"{len(caps)} captions, words min {counts[0]} median {counts[len(counts) // 2]} max {counts[-1]}")
    print("\n".join(caps[:5]))
