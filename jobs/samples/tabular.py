"""A synthetic customer-churn table for demos and tests of the tabular classifier: numbers,
categories and a few missing cells, with a binary label that a model can learn but not perfectly
(about 3% of the labels disagree with the rule behind the others)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

PLANS = {"basic": 1.0, "standard": 0.0, "premium": -1.2}  # how each plan moves churn
REGIONS = ("north", "south", "east", "west")  # noise: the label ignores the region
MISSING_SPEND = 0.02
# Label noise relative to the spread of the churn score: about 3% of labels are flipped.
NOISE_RATIO = 0.1


def write_tabular_sample(path: Path, *, rows: int = 2000, seed: int = 0) -> None:
    """Write `rows` customers to a CSV drawn from `seed`: age (int), monthly_spend (float, 2%
    missing), tenure_months (int), support_calls (int), plan and region (text), and label,
    1 for a customer who churned and 0 for one who stayed."""
    if rows < 1:
        raise ValueError("rows must be at least 1.")
    rng = np.random.default_rng(seed)
    age = rng.integers(18, 80, rows)
    spend = np.round(rng.lognormal(3.5, 0.5, rows), 2)
    tenure = rng.integers(0, 120, rows)
    calls = rng.poisson(2.0, rows)
    plans = rng.choice(list(PLANS), rows)
    regions = rng.choice(REGIONS, rows)
    score = (
        1.5 * (calls - 2.0) / 1.4
        - 1.2 * (tenure - 60) / 35
        + 0.8 * (np.log(spend) - 3.5) / 0.5
        - 0.3 * (age - 49) / 18
        + np.array([PLANS[plan] for plan in plans])
    )
    noisy = score + rng.normal(0.0, NOISE_RATIO * score.std(), rows)
    labels = (noisy > 0).astype(int)
    missing = rng.random(rows) < MISSING_SPEND
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["age", "monthly_spend", "tenure_months", "support_calls", "plan", "region", "label"]
        )
        for row in range(rows):
            writer.writerow(
                [
                    age[row],
                    "" if missing[row] else f"{spend[row]:.2f}",
                    tenure[row],
                    calls[row],
                    plans[row],
                    regions[row],
                    labels[row],
                ]
            )
