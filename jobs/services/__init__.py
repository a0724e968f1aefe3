"""Writes for the pool: submission, attempts on workers, machines and recovery."""

from .submission import QuotaExceeded, cost_rate_per_hour, job_cancel, job_retry, job_submit

__all__ = ["QuotaExceeded", "cost_rate_per_hour", "job_cancel", "job_retry", "job_submit"]
