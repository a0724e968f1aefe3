"""The web process routes a deployment from what it read of its routes and replicas for up to
SERVING_ROUTING_CACHE_S (gateway.routing_read): no query for them on a cached predict, a change
seen once the entry is old, a replica that stopped answering never costs the caller an error,
and one organization's entry never answers another's request."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from jobs.models import JobState
from jobs.services.replicas import replica_token
from serving import gateway
from serving.models import Deployment, PredictionLog, Replica
from serving.services import routes_set
from tenants.actors import Actor

ROW = {"x": 1}


def _url(deployment):
    return f"/api/v1/orgs/{deployment.organization.slug}/deployments/{deployment.name}/predict/"


@pytest.fixture(autouse=True)
def cache_on(settings, monkeypatch):
    """The cache on for a minute, on a clock the test moves."""
    settings.SERVING_ROUTING_CACHE_S = 60
    now = [1000.0]
    monkeypatch.setattr(gateway, "clock", lambda: now[0])
    gateway._routings.clear()
    yield now
    gateway._routings.clear()


@pytest.fixture
def caller(org, member_factory, key_client_for):
    return key_client_for(member_factory(org, "developer"), org)


def _answer(caller, deployment) -> str:
    response = caller.post(_url(deployment), {"inputs": [ROW]}, format="json")
    assert response.status_code == 200, response.content
    return response.json()["predictions"][0]["output"]["label"]


def test_a_cached_predict_reads_no_deployment_route_or_replica(org, caller, make_deployment, serve):
    deployment, (a,) = make_deployment(org)
    serve(deployment, a, "a")
    assert _answer(caller, deployment) == "a"
    with CaptureQueriesContext(connection) as captured:
        assert _answer(caller, deployment) == "a"
    read = [q["sql"] for q in captured.captured_queries if q["sql"].startswith("SELECT")]
    tables = ("serving_deployment", "serving_route", "serving_replica")
    assert not [sql for sql in read if any(f'FROM "{t}"' in sql for t in tables)], read


def test_a_route_change_is_seen_once_the_entry_is_old(
    org, caller, make_deployment, serve, cache_on
):
    deployment, (a, b) = make_deployment(org, weights=(100,), shadow=(1,))
    serve(deployment, a, "a")
    serve(deployment, b, "b")
    assert _answer(caller, deployment) == "a"
    routes_set(
        deployment=deployment,
        routes=[{"model_version": b.pk, "weight": 100, "mode": "live"}],
        actor=Actor(),
    )
    assert _answer(caller, deployment) == "a"  # within the minute: what this process read
    cache_on[0] += 59
    assert _answer(caller, deployment) == "a"
    cache_on[0] += 2
    assert _answer(caller, deployment) == "b"


@pytest.mark.django_db(transaction=True)
def test_a_cached_replica_that_stopped_answering_is_replaced_without_an_error(
    org, caller, make_deployment, serve
):
    """The reconciler moved the replica (its worker was lost): the web process still routes to
    the old address, finds nothing listening, reads again and answers from the new one. The
    caller sees a 200, and the log has no error for the version."""
    deployment, (a,) = make_deployment(org)
    old = serve(deployment, a, "old")
    assert _answer(caller, deployment) == "old"
    old.stop()
    gateway.http_client().close()
    gateway._http = None  # no kept-alive connection to the stopped server
    moved = Replica.objects.get(deployment=deployment)
    moved.job.state = JobState.FAILED
    moved.job.save(update_fields=["state"])
    moved.state = Replica.State.STOPPED
    moved.save(update_fields=["state"])
    serve(deployment, a, "new")
    assert _answer(caller, deployment) == "new"
    assert not PredictionLog.objects.filter(deployment=deployment).exclude(error="").exists()


def test_an_address_that_answers_as_another_replica_is_read_again_not_a_502(
    org, caller, make_deployment, serve
):
    """The replica's job was placed again (a new attempt, so a new token) and something at the
    cached address refuses the old token: the request reads the routing again and answers."""
    deployment, (a,) = make_deployment(org)
    fake = serve(deployment, a, "a")
    assert _answer(caller, deployment) == "a"
    job = Replica.objects.get(deployment=deployment).job
    job.attempt = 2
    job.save(update_fields=["attempt"])
    fake.token = replica_token(job.pk, 2)
    assert _answer(caller, deployment) == "a"
    assert fake.unauthorized == 1
    assert not PredictionLog.objects.filter(deployment=deployment).exclude(error="").exists()


def test_a_deleted_deployment_answers_404_once_its_replica_is_gone(
    org, caller, make_deployment, serve
):
    deployment, (a,) = make_deployment(org)
    fake = serve(deployment, a, "a")
    assert _answer(caller, deployment) == "a"
    fake.stop()
    gateway.http_client().close()
    gateway._http = None
    Deployment.objects.filter(pk=deployment.pk).delete()
    response = caller.post(_url(deployment), {"inputs": [ROW]}, format="json")
    assert response.status_code == 404


def test_one_organizations_entry_never_answers_anothers_request(
    org, other_org, caller, member_factory, key_client_for, make_deployment, serve
):
    """Both organizations have a deployment named `churn`: each caller gets its own version's
    answers, whichever was cached first."""
    ours, (a,) = make_deployment(org)
    theirs, (b,) = make_deployment(other_org)
    serve(ours, a, "ours")
    serve(theirs, b, "theirs")
    their_caller = key_client_for(member_factory(other_org, "developer"), other_org)
    for _ in range(3):
        assert _answer(caller, ours) == "ours"
        assert _answer(their_caller, theirs) == "theirs"
    # A caller naming the other organization's slug is refused before any routing.
    response = caller.post(_url(theirs), {"inputs": [ROW]}, format="json")
    assert response.status_code == 404
