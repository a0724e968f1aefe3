"""Money in templates: amounts are integer minor units (cents)."""

from django import template

from billing.money import money_format

register = template.Library()


@register.filter
def cents(amount_minor, currency: str = "usd") -> str:
    if amount_minor in (None, ""):
        return ""
    return money_format(int(amount_minor), currency)
