"""The job reads (one job, a page of them) answer from values() rows; what they answer is exactly
what JobSerializer says of the same jobs, field by field, in every state and with every relation
a job can name."""

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from jobs.api.serializers import JobDetailSerializer, JobSerializer
from jobs.models import Job, JobAttempt, JobState, ResourceClass, Worker
from jobs.utilization import Sample, summary_merge
from registry.models import CodePackage, CodePackageVersion
from tests.factories import (
    DatasetVersionFactory,
    JobFactory,
    MembershipFactory,
    ModelVersionFactory,
)

pytestmark = pytest.mark.django_db

RUNNING_LIKE = {JobState.SCHEDULED, JobState.RUNNING, JobState.PREEMPTED, JobState.CANCELLING}


def _code_package_version(org):
    package = CodePackage.objects.create(organization=org, name="own-code")
    return CodePackageVersion.objects.create(
        organization=org,
        package=package,
        number=3,
        storage_key=f"orgs/{org.pk}/code/own-code/3.zip",
        archive_format="zip",
        size_bytes=10,
        sha256="0" * 64,
        manifest={},
    )


@pytest.fixture
def jobs(org, member_factory):
    """One job per state, each with a started attempt where it has one; the first also names
    every version, a worker, its submitter and the job it retries."""
    submitter = member_factory(org, "developer")
    worker = Worker.objects.create(
        name="w-rows", resource_class=ResourceClass.objects.get(name="cpu"), slots=4, queue="q"
    )
    first = JobFactory(organization=org, state=JobState.FAILED, failure_reason="out of memory")
    now = timezone.now()
    made = [first]
    for n, state in enumerate(JobState.values):
        running = state in RUNNING_LIKE
        job = JobFactory(
            organization=org,
            state=state,
            created_by=submitter if n % 2 else None,
            created_at=now - timedelta(minutes=n),
            attempt=1 if state != JobState.QUEUED else 0,
            started_at=now - timedelta(hours=1) if state != JobState.QUEUED else None,
            finished_at=now if not running and state != JobState.QUEUED else None,
            worker=worker if running else None,
            slot_indices=[n % 4] if running else [],
            waiting_reason="waiting for 1 free cpu" if state == JobState.QUEUED else "",
            # A reservation, whose ETA both paths work out when read (the middle of a minute).
            reserved_machine=worker.pk if state == JobState.QUEUED else None,
            expected_start_at=now + timedelta(minutes=10, seconds=30)
            if state == JobState.QUEUED
            else None,
            cost_minor=n * 7,
            labels={"team": "ml"},
        )
        if state != JobState.QUEUED:
            JobAttempt.objects.create(
                organization=org, job=job, number=1, started_at=now - timedelta(hours=1)
            )
        made.append(job)
    named = made[1]
    named.output_dataset_version = DatasetVersionFactory(organization=org)
    named.input_model_version = ModelVersionFactory(organization=org)
    named.output_model_version = ModelVersionFactory(organization=org)
    named.code_package_version = _code_package_version(org)
    named.retry_of = first
    named.utilization = summary_merge(
        None,
        [Sample(at=now, seconds=5.0, cpu_cores=1.5, memory_bytes=2**30, gpu_utilization=40.0)],
    )
    named.save()
    return made


def _expected(job: Job, serializer=JobSerializer) -> dict:
    return dict(serializer(Job.objects.get(pk=job.pk)).data)


def _assert_same(got: dict, want: dict) -> None:
    assert list(got) == list(want)  # the same fields, in the same order
    for field, value in want.items():
        if field == "cost_so_far_minor":
            # A running job's cost grows while the test runs: a cent at most between the two.
            assert value <= got[field] <= value + 1, field
        else:
            assert got[field] == value, field


# The first page of an unfiltered list reads from a statement compiled once per page size
# (jobs.api.views._FirstPage); a filter, a cursor or any other parameter builds the queryset.
@pytest.mark.parametrize("query", ["", "?page_size=200", "?other=1"])
def test_list_and_detail_answer_what_the_job_serializer_says(
    org, jobs, member_factory, client_for, query
):
    client = client_for(member_factory(org, "viewer"))
    url = f"/api/v1/orgs/{org.slug}/jobs/"
    listed = {row["id"]: row for row in client.get(url + query).json()["results"]}
    assert set(listed) == {job.pk for job in jobs}
    for job in jobs:
        want = _expected(job)
        _assert_same(listed[job.pk], want)
        detail = client.get(f"{url}{job.pk}/")
        assert detail.status_code == 200
        _assert_same(detail.json(), _expected(job, JobDetailSerializer))
    named = next(row for row in listed.values() if row["code_package"])
    assert named["code_package"] == {"package": "own-code", "number": 3}
    assert named["input_model"] and named["output_model"] and named["output_dataset"]
    assert named["retry_of"] and any(row["worker"] == "w-rows" for row in listed.values())
    running = next(job for job in jobs if job.state == JobState.RUNNING)
    assert listed[running.pk]["cost_so_far_minor"] > running.cost_minor  # an hour, priced


def test_another_organizations_job_is_404_and_never_listed(org, other_org, jobs, key_client_for):
    outsider = MembershipFactory(organization=other_org, role="owner").user
    client = key_client_for(outsider, other_org)
    assert client.get(f"/api/v1/orgs/{other_org.slug}/jobs/").json()["results"] == []
    # Ids no job can have answer 404 like a missing one, never a database error.
    for path in (f"{jobs[0].pk}/", "not-a-number/", "0/", "%C2%B2/", f"{2**63}/", f"{10**30}/"):
        assert client.get(f"/api/v1/orgs/{other_org.slug}/jobs/{path}").status_code == 404
    assert client.get(f"/api/v1/orgs/{org.slug}/jobs/{jobs[0].pk}/").status_code == 404


def test_a_page_reads_in_a_fixed_number_of_queries(org, jobs, member_factory, key_client_for):
    """The page's versions are named in one query per kind, however many jobs name them."""
    client = key_client_for(member_factory(org, "developer"), org)
    url = f"/api/v1/orgs/{org.slug}/jobs/"
    client.get(url)
    with CaptureQueriesContext(connection) as before:
        client.get(url)
    for _ in range(5):
        JobFactory(
            organization=org,
            input_model_version=ModelVersionFactory(organization=org),
            output_dataset_version=DatasetVersionFactory(organization=org),
        )
    with CaptureQueriesContext(connection) as after:
        assert len(client.get(url).json()["results"]) == len(jobs) + 5
    assert len(after.captured_queries) == len(before.captured_queries)


def test_the_first_page_links_on_as_the_queryset_path_does(org, jobs, member_factory, client_for):
    """Pages of 4 from the compiled first page and from the queryset path (a parameter more):
    the same jobs, the same order, and the next links lead through all of them once."""
    client = client_for(member_factory(org, "viewer"))
    url = f"/api/v1/orgs/{org.slug}/jobs/"
    compiled, built = (
        client.get(f"{url}?page_size=4").json(),
        client.get(f"{url}?page_size=4&other=1").json(),
    )
    assert compiled["results"] == built["results"] and compiled["previous"] is None
    assert compiled["next"].replace("&other=1", "") == built["next"].replace("&other=1", "")
    seen, page = [], compiled
    while True:
        seen += [row["id"] for row in page["results"]]
        if page["next"] is None:
            break
        page = client.get(page["next"]).json()
    want = Job.objects.filter(organization=org).order_by("-created_at", "-pk")
    assert seen == list(want.values_list("pk", flat=True))


def test_a_job_read_from_a_compiled_statement_is_another_organizations_404(
    org, other_org, jobs, key_client_for
):
    """The statement compiled for one organization's read serves the next organization's read
    with its own id, not the first one's."""
    insider = key_client_for(MembershipFactory(organization=org, role="owner").user, org)
    outsider_user = MembershipFactory(organization=other_org, role="owner").user
    outsider = key_client_for(outsider_user, other_org)
    theirs = JobFactory(organization=other_org)
    assert insider.get(f"/api/v1/orgs/{org.slug}/jobs/{jobs[0].pk}/").status_code == 200
    assert insider.get(f"/api/v1/orgs/{org.slug}/jobs/{theirs.pk}/").status_code == 404
    assert outsider.get(f"/api/v1/orgs/{other_org.slug}/jobs/{jobs[0].pk}/").status_code == 404
    assert (
        outsider.get(f"/api/v1/orgs/{other_org.slug}/jobs/{theirs.pk}/").json()["id"] == theirs.pk
    )
    listed = outsider.get(f"/api/v1/orgs/{other_org.slug}/jobs/").json()["results"]
    assert [row["id"] for row in listed] == [theirs.pk]


def test_the_first_page_json_reads_back_text_and_numbers_as_written(
    org, member_factory, client_for
):
    """The first page's JSON is written by PostgreSQL: text with quotes, backslashes, control
    characters and any script reads back as stored, U+2028 and U+2029 escaped as DRF's renderer
    escapes them, and JSON values keep their numbers and nesting."""
    text = 'a "quote" \\ tab\t line\n bell\x07 é 雪 \u2028 \u2029 </script>'
    job = JobFactory(
        organization=org,
        state=JobState.FAILED,
        failure_reason=text,
        recipe=text[:100],
        labels={"k": text},
        parameters={"lr": 0.1, "tiny": 1.5e-07, "big": 2**53, "x": [1.5, None, True, {}]},
    )
    client = client_for(member_factory(org, "viewer"))
    response = client.get(f"/api/v1/orgs/{org.slug}/jobs/")
    [row] = response.json()["results"]
    _assert_same(row, _expected(job))
    assert row["failure_reason"] == text and row["labels"] == {"k": text}
    assert row["parameters"] == {
        "lr": 0.1,
        "tiny": 1.5e-07,
        "big": 2**53,
        "x": [1.5, None, True, {}],
    }
    body = response.content.decode()
    assert "\u2028" not in body and "\u2029" not in body
    assert body.count("\\u2028") == 3  # failure_reason, recipe, the label


def test_a_prepared_read_answers_each_organization_with_its_own_jobs(
    org, other_org, jobs, key_client_for
):
    """The reads' statements are prepared once psycopg has run them prepare_threshold times on
    a connection (tenants.compiled): prepared, they still take the organization and the job as
    values of every run."""
    insider = key_client_for(MembershipFactory(organization=org, role="owner").user, org)
    outsider_user = MembershipFactory(organization=other_org, role="owner").user
    outsider = key_client_for(outsider_user, other_org)
    theirs = JobFactory(organization=other_org)
    ours, url = {job.pk for job in jobs}, "/api/v1/orgs/{}/jobs/"
    for _ in range(2 * connection.settings_dict["OPTIONS"]["prepare_threshold"] + 1):
        listed = insider.get(url.format(org.slug)).json()["results"]
        assert {row["id"] for row in listed} == ours
        assert [
            row["id"] for row in outsider.get(url.format(other_org.slug)).json()["results"]
        ] == [theirs.pk]
        assert insider.get(f"{url.format(org.slug)}{theirs.pk}/").status_code == 404
        assert outsider.get(f"{url.format(other_org.slug)}{theirs.pk}/").status_code == 200
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        prepared = [statement for (statement,) in cursor.fetchall()]
    assert any('"jobs_job"' in statement for statement in prepared)


def test_a_submit_answers_what_the_submitted_serializer_says(org, member_factory, client_for):
    """A submit's response (jobs.api.serializers.job_submitted_data) is JobSubmittedSerializer's,
    field by field: a new job (201) behind others in the queue, and a retry with its key (200)."""
    from jobs.api.serializers import JobSubmittedSerializer
    from jobs.api.views import _estimate

    version = DatasetVersionFactory(organization=org)
    for priority in (5, 0, -5):  # ahead, ahead (earlier, same priority), behind
        JobFactory(organization=org, state=JobState.QUEUED, priority=priority)
    client = client_for(member_factory(org, "developer"))
    body = {
        "recipe": "tabular-classifier",
        "parameters": {"target": "x"},
        "dataset": {"dataset": version.dataset.name, "number": version.number},
        "labels": {"team": "ml"},
        "max_runtime_s": 7200,
    }
    url = f"/api/v1/orgs/{org.slug}/jobs/"
    for status in (201, 200):
        response = client.post(url, body, format="json", HTTP_IDEMPOTENCY_KEY="k-rows")
        assert response.status_code == status, response.content
        job = Job.objects.get(pk=response.json()["id"])
        job.estimated_cost_per_hour, job.estimated_max_cost = _estimate(
            job.resource_class, job.gpu_count, job.max_runtime_s
        ).values()
        want = dict(JobSubmittedSerializer(job).data)
        assert response.json() == want
        assert list(response.json()) == list(want)
        assert want["queue_position"] == 3 and want["dataset"]["number"] == version.number
