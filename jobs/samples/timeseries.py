"""A synthetic hourly time series: a daily cycle, a slow upward trend and autocorrelated noise,
for demos and tests of the time-series forecaster."""

from __future__ import annotations

import csv
import math
import random
from datetime import datetime, timedelta
from pathlib import Path

START = datetime(2024, 1, 1)
LEVEL = 50.0
TREND_PER_HOUR = 0.02
# Noise that carries over from hour to hour: the recent past tells where the next hours lie,
# which a model reading the window can use and the value one day back cannot.
NOISE_MEMORY = 0.7
NOISE_STD = 1.0


def write_timeseries_sample(path: Path, *, points: int = 24 * 60, seed: int = 0) -> None:
    """Write `points` hourly rows to a CSV drawn from `seed`: timestamp (from 2024-01-01T00:00:00)
    and value (about 50 at the start, rising 0.48 a day, swinging about 10 around that daily)."""
    if points < 1:
        raise ValueError("points must be at least 1.")
    rng = random.Random(seed)  # noqa: S311 (synthetic data, not secrets)
    noise = 0.0
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["timestamp", "value"])
        for hour in range(points):
            angle = 2 * math.pi * hour / 24
            daily = 8 * math.sin(angle) + 3 * math.sin(2 * angle + 0.5)
            noise = NOISE_MEMORY * noise + rng.gauss(0, NOISE_STD)
            value = LEVEL + TREND_PER_HOUR * hour + daily + noise
            writer.writerow([(START + timedelta(hours=hour)).isoformat(), f"{value:.3f}"])
