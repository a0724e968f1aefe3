"""A synthetic text-classification dataset: short product reviews labelled positive, negative or
neutral, for demos and tests of the text classifier."""

from __future__ import annotations

import csv
import random
from pathlib import Path

# fmt: off
PRODUCTS = ["blender", "headphones", "backpack", "kettle", "lamp", "keyboard", "tent", "jacket"]
# The words that give a review its class; a review also draws filler and, now and then, a word
# of another class, so that no single token decides it.
CLASS_WORDS = {
    "positive": ["great", "excellent", "love", "perfect", "amazing", "sturdy", "recommend",
                 "happy", "fantastic", "reliable", "comfortable", "superb"],
    "negative": ["terrible", "broke", "awful", "refund", "disappointed", "useless", "cheap",
                 "flimsy", "returned", "worst", "faulty", "leaks"],
    "neutral": ["okay", "average", "fine", "decent", "expected", "ordinary", "acceptable",
                "standard", "mediocre", "adequate", "alright", "typical"],
}
FILLER = ["the", "it", "was", "this", "my", "i", "bought", "for", "and", "arrived", "after",
          "days", "with", "a", "box", "color", "price", "use", "daily", "so", "far", "week", "is",
          "really"]
# fmt: on
STRAY_WORD_CHANCE = 0.15


def write_text_sample(path: Path, *, rows: int = 1200, seed: int = 0) -> None:
    """Write `rows` reviews to a CSV drawn from `seed`: text (a sentence or two) and label
    (positive, negative or neutral)."""
    if rows < 1:
        raise ValueError("rows must be at least 1.")
    rng = random.Random(seed)  # noqa: S311 (synthetic data, not secrets)
    labels = list(CLASS_WORDS)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for _ in range(rows):
            label = rng.choice(labels)
            words = rng.choices(FILLER, k=rng.randint(3, 12))
            words += rng.choices(CLASS_WORDS[label], k=rng.randint(1, 3))
            if rng.random() < STRAY_WORD_CHANCE:
                other = rng.choice([name for name in labels if name != label])
                words.append(rng.choice(CLASS_WORDS[other]))
            rng.shuffle(words)
            product = rng.choice(PRODUCTS)
            ending = rng.choice([".", "!", "...", "?"])
            writer.writerow([f"The {product}: {' '.join(words)}{ending}".capitalize(), label])
