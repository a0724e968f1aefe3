"""The right-sizing hint, a pure function of an attempt's utilization summary and a rate card:
the cheapest class whose GPUs hold the peak memory with room to spare, priced for the same run."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from jobs.utilization import (
    HINT_MIN_SAMPLES,
    ClassPrice,
    Sample,
    rightsizing_hint,
    summary_merge,
)

GB = 1024**3
H100 = ClassPrice("h100-80gb", 80, Decimal("0.0012"), "usd")
A100 = ClassPrice("a100-40gb", 40, Decimal("0.0008"), "usd")
L4 = ClassPrice("l4", 24, Decimal("0.0002"), "usd")
CPU = ClassPrice("cpu", 0, Decimal("0.00002"), "usd")
CARD = [CPU, L4, A100, H100]


def _summary(peak_gb: float, utilization: float, *, samples=10, total_gb=80) -> dict:
    at = datetime(2026, 12, 6, tzinfo=UTC)
    return summary_merge(
        None,
        [
            Sample(
                at=at,
                seconds=360.0,
                cpu_cores=1.0,
                memory_bytes=GB,
                gpu_utilization=utilization,
                gpu_memory_bytes=int(peak_gb * GB),
                gpu_memory_total_bytes=total_gb * GB,
            )
            for _ in range(samples)
        ],
    )


def _hint(summary, *, current=H100, classes=CARD, gpu_count=1, run_seconds=3600):
    return rightsizing_hint(
        summary=summary,
        current=current,
        classes=classes,
        gpu_count=gpu_count,
        run_seconds=run_seconds,
    )


def test_a_small_job_on_a_big_gpu_is_told_the_cheapest_class_that_holds_it():
    hint = _hint(_summary(9.1, 22))
    assert hint.resource_class == "l4"  # 9.1 GB + 20% fits 24 GB; cheaper than the A100
    assert (hint.current_minor, hint.cheaper_minor) == (432, 72)  # 3600 s x $0.0012 / $0.0002
    assert hint.saving_percent == 83
    assert hint.text == (
        "Peak GPU memory 9.1 GB of 80.0 GB, utilization 22%: the same job on 1 l4 would cost "
        "about 83% less ($0.72 instead of $4.32), if it ran as long there."
    )


def test_the_headroom_rules_out_a_class_the_peak_only_just_fits():
    hint = _hint(_summary(21, 30))  # 21 GB + 20% = 25.2 GB: not an L4's 24
    assert hint.resource_class == "a100-40gb"
    assert hint.saving_percent == 33


def test_no_hint_when_nothing_cheaper_holds_the_peak():
    assert _hint(_summary(70, 95)) is None


def test_no_hint_when_the_cheaper_class_costs_the_same():
    same = ClassPrice("other-80gb", 80, H100.unit_price, "usd")
    assert _hint(_summary(9, 10), classes=[H100, same]) is None


def test_no_hint_for_a_saving_too_small_to_weigh():
    close = ClassPrice("nearly", 80, Decimal("0.00115"), "usd")
    assert _hint(_summary(9, 10), classes=[H100, close]) is None


def test_a_free_class_that_fits_is_a_hint_and_a_free_current_class_is_none():
    free = ClassPrice("free-24gb", 24, Decimal("0"), "usd")
    hint = _hint(_summary(9, 10), classes=[H100, free])
    assert (hint.resource_class, hint.cheaper_minor, hint.saving_percent) == ("free-24gb", 0, 100)
    free_current = ClassPrice("h100-80gb", 80, Decimal("0"), "usd")
    assert _hint(_summary(9, 10), current=free_current) is None


def test_a_multi_gpu_job_is_priced_for_all_its_gpus_on_the_other_class():
    hint = _hint(_summary(9.1, 40), gpu_count=4)
    assert hint.resource_class == "l4"
    assert (hint.current_minor, hint.cheaper_minor) == (4 * 432, 4 * 72)
    assert "on 4 l4" in hint.text


@pytest.mark.parametrize(
    "summary",
    [
        None,
        _summary(9, 10, samples=HINT_MIN_SAMPLES - 1),
        summary_merge(None, [Sample(at=datetime.now(UTC), seconds=5, cpu_cores=1, memory_bytes=1)])
        | {"samples": 100},
    ],
    ids=["no samples", "too few", "no GPU readings"],
)
def test_no_hint_without_enough_gpu_samples(summary):
    assert _hint(summary) is None


def test_no_hint_for_a_run_that_cost_under_a_cent():
    assert _hint(_summary(9, 10), run_seconds=8) is None  # 8 s x $0.0012 = 0.96 cents
    assert _hint(_summary(9, 10), run_seconds=9).cheaper_minor == 0  # 1.08 cents -> 0.18


def test_a_class_priced_in_another_currency_is_not_compared():
    euros = ClassPrice("l4", 24, Decimal("0.0001"), "eur")
    assert _hint(_summary(9, 10), classes=[H100, euros]) is None


def test_averages_weigh_each_sample_by_the_span_it_stands_for():
    at = datetime(2026, 12, 6, tzinfo=UTC)
    summary = summary_merge(
        summary_merge(None, [Sample(at=at, seconds=10, cpu_cores=4.0, memory_bytes=100)]),
        [Sample(at=at, seconds=30, cpu_cores=0.0, memory_bytes=300)],
    )
    assert summary["samples"] == 2 and summary["seconds"] == 40
    assert summary["cpu_cores_avg"] == 1.0 and summary["cpu_cores_peak"] == 4.0
    assert summary["memory_bytes_avg"] == 250 and summary["memory_bytes_peak"] == 300
