"""Read a Prometheus text exposition into {(sample name, sorted labels): value}."""

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(scraped: dict, name: str, **labels) -> float:
    """One sample's value; 0 when the scrape does not have it (a label set not seen yet)."""
    return scraped.get((name, tuple(sorted(labels.items()))), 0.0)
