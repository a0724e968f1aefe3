"""Money in templates: amounts are integer minor units (cents)."""

from django import template

register = template.Library()


@register.filter
def cents(amount_minor, currency: str = "usd") -> str:
    if amount_minor in (None, ""):
        return ""
    amount_minor = int(amount_minor)
    sign = "-" if amount_minor < 0 else ""
    symbol = {"usd": "$", "eur": "€", "gbp": "£"}.get(currency.lower(), currency.upper() + " ")
    whole, rest = divmod(abs(amount_minor), 100)
    return f"{sign}{symbol}{whole:,}.{rest:02d}"
