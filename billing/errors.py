"""Billing's domain errors: a clear message and a 400 (or the status given), never a 500."""

from tenants.errors import DomainError


class BillingError(DomainError):
    code = "billing_error"
