"""Money as people read it, from integer minor units: never through a float."""

from .selectors import minor_per_unit

SYMBOLS = {"usd": "$", "eur": "€", "gbp": "£"}


def money_format(amount_minor: int, currency: str = "usd") -> str:
    """`1234567, "usd"` -> `$12,345.67`; `-5, "usd"` -> `-$0.05`; `500, "jpy"` -> `JPY 500`."""
    sign = "-" if amount_minor < 0 else ""
    symbol = SYMBOLS.get(currency.lower(), currency.upper() + " ")
    per_unit = minor_per_unit(currency)
    whole, rest = divmod(abs(int(amount_minor)), per_unit)
    digits = len(str(per_unit)) - 1
    return f"{sign}{symbol}{whole:,}" + (f".{rest:0{digits}d}" if digits else "")
