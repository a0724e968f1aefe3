"""Submitting, cancelling and retrying jobs against the real database."""

import threading

import pytest
from django.db import connection
from rest_framework.test import APIClient

from jobs.models import Job, JobState, Quota
from jobs.services import (
    JobOptions,
    QuotaExceeded,
    job_cancel,
    job_retry,
    training_job_submit,
)
from jobs.services.submission import cost_rate_per_hour
from tenants.actors import Actor
from tenants.errors import DomainError
from tenants.models import AuditEvent
from tests.factories import DatasetVersionFactory, JobFactory

pytestmark = pytest.mark.django_db


def test_submit_validates_the_recipe_parameters(submit):
    with pytest.raises(DomainError) as error:
        submit(parameters={"target": "x", "epochs": "many"})
    assert any("epochs" in field for field in error.value.fields)
    with pytest.raises(DomainError, match="recipe"):
        submit(recipe="rm-rf")


def test_submit_refuses_a_dataset_format_the_recipe_cannot_read(submit, org):
    npz = DatasetVersionFactory(organization=org, format="npz")
    with pytest.raises(DomainError, match="npz"):
        submit(dataset=npz)


def test_a_repeated_idempotency_key_returns_the_first_job(submit):
    first = submit(idempotency_key="abc")
    again = submit(idempotency_key="abc", priority=5)
    assert again.pk == first.pk and Job.objects.count() == 1


def test_gpus_over_the_quota_limit_are_refused(submit, org, a100):
    Quota.objects.create(organization=org, resource_class=a100, guaranteed_gpus=0, limit_gpus=2)
    with pytest.raises(QuotaExceeded, match="allows 2"):
        submit(resource_class=a100, gpu_count=4)


@pytest.mark.django_db(transaction=True)
def test_queued_cap_holds_under_concurrent_submits(org, owner, cpu):
    """Ten threads race to submit against a cap of 3 queued jobs: exactly 3 get in."""
    Quota.objects.create(organization=org, resource_class=cpu, limit_gpus=8, max_queued_jobs=3)
    dataset = DatasetVersionFactory(organization=org)
    results, barrier = [], threading.Barrier(10)

    def race():
        barrier.wait()
        try:
            training_job_submit(
                organization=org,
                actor=Actor(user=owner),
                recipe="tabular-classifier",
                parameters={"target": "x"},
                dataset_version=dataset,
                options=JobOptions(resource_class=cpu),
            )
            results.append("ok")
        except QuotaExceeded:
            results.append("refused")
        finally:
            connection.close()

    threads = [threading.Thread(target=race) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == ["ok"] * 3 + ["refused"] * 7
    assert Job.objects.filter(state=JobState.QUEUED).count() == 3


def test_cancelling_a_queued_job_ends_it_at_once(submit, owner):
    job = job_cancel(job=submit(), actor=Actor(user=owner))
    assert job.state == JobState.CANCELLED and job.finished_at is not None
    with pytest.raises(DomainError, match="already cancelled"):
        job_cancel(job=job, actor=Actor(user=owner))


def test_transitions_are_enforced_in_one_place(submit):
    job = submit()
    with pytest.raises(DomainError, match="queued job cannot become succeeded"):
        job.transition_to(JobState.SUCCEEDED)


def test_retry_submits_a_new_job_pointing_at_the_old_one(submit, owner):
    job = job_cancel(job=submit(labels={"project": "fraud"}), actor=Actor(user=owner))
    retried = job_retry(job=job, actor=Actor(user=owner))
    assert retried.pk != job.pk and retried.retry_of == job
    assert retried.labels == {"project": "fraud"} and retried.state == JobState.QUEUED


@pytest.mark.django_db(transaction=True)
def test_a_retry_sent_twice_at_once_makes_one_audited_job(org, owner):
    """A double click, or a client retrying a timed-out call: two retries of one failed job race.
    One new job points at the old one, with its audit event; the other is refused and leaves
    nothing behind."""
    failed = JobFactory(organization=org, state=JobState.FAILED)
    url = f"/api/v1/orgs/{org.slug}/jobs/{failed.pk}/retry/"
    statuses, barrier = [], threading.Barrier(2)

    def retry():
        client = APIClient()
        client.force_authenticate(owner)
        barrier.wait()
        try:
            statuses.append(client.post(url).status_code)
        finally:
            connection.close()

    threads = [threading.Thread(target=retry) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [201, 409]
    retried = Job.objects.exclude(pk=failed.pk).get()
    assert retried.retry_of == failed and retried.state == JobState.QUEUED
    audit = AuditEvent.objects.get(action="job.retry")
    assert (audit.target_id, audit.data["retry_of"]) == (str(retried.pk), failed.pk)


def test_cost_estimate_is_price_times_gpus_per_hour(a100):
    rate, currency = cost_rate_per_hour(resource_class=a100, gpu_count=2)
    assert (str(rate), currency) == ("5.7600000000", "usd")
