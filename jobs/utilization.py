"""What an attempt used of its slots (samples and their running summary) and the right-sizing hint
priced from the rate card. Pure: no Django, no database; the runner, services and pages call it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

# A hint needs this many samples: a few seconds of a run say little about its peak.
HINT_MIN_SAMPLES = 6
# A cheaper class must hold the peak GPU memory with this much room to spare (allocators grow,
# a later batch can be larger than the ones sampled).
HINT_MEMORY_HEADROOM = 0.2
# Hints below this saving are noise next to the assumptions they rest on.
HINT_MIN_SAVING = 0.1
GB = 1024**3


@dataclass(frozen=True)
class Sample:
    """One reading of a running attempt. `seconds` is the span it stands for (since the reading
    before it), which weighs it in averages. GPU fields are None on a CPU slot or without NVML;
    on several GPUs, utilization is their mean and memory the fullest one's (each GPU must hold
    its share)."""

    at: datetime
    seconds: float
    cpu_cores: float
    memory_bytes: int
    gpu_utilization: float | None = None
    gpu_memory_bytes: int | None = None
    gpu_memory_total_bytes: int | None = None


EMPTY_SUMMARY = {
    "samples": 0,
    "seconds": 0.0,
    "cpu_cores_avg": None,
    "cpu_cores_peak": None,
    "memory_bytes_avg": None,
    "memory_bytes_peak": None,
    "gpu_samples": 0,
    "gpu_seconds": 0.0,
    "gpu_utilization_avg": None,
    "gpu_utilization_peak": None,
    "gpu_memory_bytes_avg": None,
    "gpu_memory_bytes_peak": None,
    "gpu_memory_total_bytes": None,
}


def _merge(avg, peak, weight: float, values: list[tuple[float, float]]):
    """A time-weighted average and a peak carried over `weight` seconds, with (value, seconds)
    pairs added."""
    added = sum(seconds for _value, seconds in values)
    if not values:
        return avg, peak
    total = sum(value * seconds for value, seconds in values) + (avg or 0) * weight
    highest = max(value for value, _seconds in values)
    average = total / (weight + added) if weight + added > 0 else highest
    return average, highest if peak is None else max(peak, highest)


def summary_merge(summary: dict | None, samples: list[Sample]) -> dict:
    """The attempt's running summary (counts, time-weighted averages, peaks) with `samples`
    added; a page or a list reads this one dict, never the samples."""
    merged = {**EMPTY_SUMMARY, **(summary or {})}
    weight = merged["seconds"]
    for name in ("cpu_cores", "memory_bytes"):
        merged[f"{name}_avg"], merged[f"{name}_peak"] = _merge(
            merged[f"{name}_avg"],
            merged[f"{name}_peak"],
            weight,
            [(getattr(s, name), s.seconds) for s in samples],
        )
    gpu = [s for s in samples if s.gpu_utilization is not None]
    gpu_weight = merged["gpu_seconds"]
    for name in ("gpu_utilization", "gpu_memory_bytes"):
        merged[f"{name}_avg"], merged[f"{name}_peak"] = _merge(
            merged[f"{name}_avg"],
            merged[f"{name}_peak"],
            gpu_weight,
            [(getattr(s, name), s.seconds) for s in gpu if getattr(s, name) is not None],
        )
    totals = [s.gpu_memory_total_bytes for s in gpu if s.gpu_memory_total_bytes]
    if totals:
        merged["gpu_memory_total_bytes"] = max(totals)
    merged["samples"] += len(samples)
    merged["seconds"] = round(weight + sum(s.seconds for s in samples), 3)
    merged["gpu_samples"] += len(gpu)
    merged["gpu_seconds"] = round(gpu_weight + sum(s.seconds for s in gpu), 3)
    for name in ("memory_bytes_avg", "memory_bytes_peak", "gpu_memory_bytes_avg"):
        if merged[name] is not None:
            merged[name] = round(merged[name])
    for name in ("cpu_cores_avg", "cpu_cores_peak", "gpu_utilization_avg"):
        if merged[name] is not None:
            merged[name] = round(merged[name], 3)
    return merged


@dataclass(frozen=True)
class ClassPrice:
    """A resource class as the hint weighs it: GPU memory per GPU and price per GPU-second."""

    name: str
    gpu_memory_gb: int
    unit_price: Decimal
    currency: str


@dataclass(frozen=True)
class Hint:
    """A cheaper class that holds what the job used, and the same run priced on both."""

    resource_class: str
    current_minor: int
    cheaper_minor: int
    currency: str
    saving_percent: int
    text: str


def _money(minor: int, currency: str, minor_per_unit: int) -> str:
    amount = Decimal(minor) / minor_per_unit
    symbol = "$" if currency.upper() == "USD" else ""
    suffix = "" if symbol else f" {currency.upper()}"
    return f"{symbol}{amount:,.2f}{suffix}"


def _gb(value: int) -> str:
    return f"{value / GB:.1f} GB"


def rightsizing_hint(
    *,
    summary: dict | None,
    current: ClassPrice,
    classes: list[ClassPrice],
    gpu_count: int,
    run_seconds: float,
    minor_per_unit: int = 100,
) -> Hint | None:
    """The cheapest class whose GPUs hold the job's peak GPU memory with HINT_MEMORY_HEADROOM to
    spare, if the same run time with the same GPU count costs at least HINT_MIN_SAVING less there;
    else None (no GPU samples, too few samples, a run that cost under a cent so far, nothing
    cheaper that fits).

    Assumes the run takes as long on the other class: a slower GPU takes longer, which the
    utilization tells a person to weigh (a GPU busy 20% of the time has room to spare)."""
    if not summary or summary.get("gpu_samples", 0) < HINT_MIN_SAMPLES or run_seconds <= 0:
        return None
    peak = summary["gpu_memory_bytes_peak"]
    if peak is None or current.gpu_memory_gb <= 0:
        return None
    seconds = Decimal(str(run_seconds)) * gpu_count

    def cost(price: ClassPrice) -> Decimal:  # in minor units, unrounded: a short run's cents
        return seconds * price.unit_price * minor_per_unit

    current_cost = cost(current)
    if current_cost < 1:
        return None  # under a cent: "$0.00 instead of $0.00" helps nobody
    needed_gb = peak * (1 + HINT_MEMORY_HEADROOM) / GB
    fitting = [
        c
        for c in classes
        if c.name != current.name
        and c.currency == current.currency
        and c.gpu_memory_gb > 0
        and c.gpu_memory_gb >= needed_gb
    ]
    if not fitting:
        return None
    best = min(fitting, key=lambda c: (cost(c), c.name))
    saving = 1 - cost(best) / current_cost
    if saving < HINT_MIN_SAVING:
        return None
    percent = min(100, math.floor(saving * 100))
    current_minor, cheaper_minor = round(current_cost), round(cost(best))
    total = summary.get("gpu_memory_total_bytes") or current.gpu_memory_gb * GB
    text = (
        f"Peak GPU memory {_gb(peak)} of {_gb(total)}, utilization "
        f"{summary['gpu_utilization_avg']:.0f}%: the same job on {gpu_count} {best.name} "
        f"would cost about {percent}% less "
        f"({_money(cheaper_minor, current.currency, minor_per_unit)} instead of "
        f"{_money(current_minor, current.currency, minor_per_unit)}), "
        "if it ran as long there."
    )
    return Hint(
        resource_class=best.name,
        current_minor=current_minor,
        cheaper_minor=cheaper_minor,
        currency=current.currency,
        saving_percent=percent,
        text=text,
    )
