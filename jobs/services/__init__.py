"""Writes for the pool: submission, attempts on workers, machines and recovery."""

from .submission import (
    JobOptions,
    QuotaExceeded,
    code_job_submit,
    cost_rate_per_hour,
    export_job_submit,
    inference_job_submit,
    job_cancel,
    job_retry,
    training_job_submit,
)

__all__ = [
    "JobOptions",
    "QuotaExceeded",
    "code_job_submit",
    "cost_rate_per_hour",
    "export_job_submit",
    "inference_job_submit",
    "job_cancel",
    "job_retry",
    "training_job_submit",
]
