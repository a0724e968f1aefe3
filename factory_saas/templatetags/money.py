"""Money in templates: amounts are integer minor units (cents)."""

from django import template
from django.template.defaultfilters import floatformat
from django.utils.html import format_html

from billing.money import money_format

register = template.Library()


@register.filter
def cents(amount_minor, currency: str = "usd") -> str:
    if amount_minor in (None, ""):
        return ""
    return money_format(int(amount_minor), currency)


def usage_text(slot_seconds: float, resource_class: str) -> str:
    """Work done, as people count it: `42 CPU-seconds`, `1.25 GPU-hours` (an hour or more)."""
    kind = "CPU" if resource_class == "cpu" else "GPU"
    if slot_seconds >= 3600:
        return f"{slot_seconds / 3600:,.2f} {kind}-hours"
    return f"{slot_seconds:,.0f} {kind}-second{'' if round(slot_seconds) == 1 else 's'}"


@register.simple_tag
def cost_with_usage(amount_minor, slot_seconds, resource_class, currency: str = "usd") -> str:
    """A job's cost with the work it paid for beside it: CPU priced at nothing reads
    `$0.00 · 42 CPU-seconds`, not as if nothing ran."""
    return format_html(
        '{} <span class="muted">· {}</span>',
        cents(amount_minor, currency),
        usage_text(slot_seconds or 0, str(resource_class)),
    )


@register.filter
def quantity(row) -> str:
    """A usage row's quantity in its unit (`42 gpu_second`), as the ledger and the API name it;
    `mixed units` for a group whose rows count different things."""
    if row.quantity is None:
        return "mixed units"
    return f"{floatformat(row.quantity, '-3g')} {row.unit}"
