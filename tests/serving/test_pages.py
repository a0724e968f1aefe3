"""Deployment pages: the list and its empty state, a deployment's routes, replicas, charts, drift
and timeline, and the retrain policy form (validation, audit, who may post it)."""

from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from jobs.models import Job, ResourceClass
from serving.charts import MAX_DRIFT_COLUMNS, RANGES, drift_chart, nice_ceiling, version_charts
from serving.models import (
    Deployment,
    DriftReport,
    LoopEvent,
    PredictionLog,
    Replica,
    RetrainPolicy,
    Route,
)
from serving.policies import RetrainPolicyInvalid, retrain_policy_set
from serving.selectors import (
    VersionSeries,
    VersionStats,
    deployment_traffic,
    version_series,
    version_stats,
)
from tenants.actors import Actor
from tenants.models import AuditEvent
from tests.factories import DatasetFactory, JobFactory, ModelVersionFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def dev(org, member_factory, client):
    client.force_login(member_factory(org, "developer"))
    return client


@pytest.fixture
def viewer(org, member_factory, client):
    client.force_login(member_factory(org, "viewer"))
    return client


def make_deployment(organization, name="churn", *, versions=1, recipe="tabular-classifier"):
    deployment = Deployment.objects.create(
        organization=organization,
        name=name,
        recipe=recipe,
        resource_class=ResourceClass.objects.get(name="cpu"),
        max_replicas=3,
    )
    made = [ModelVersionFactory(organization=organization) for _ in range(versions)]
    weights = [90, 10] if versions == 2 else [100]
    for version, weight in zip(made, weights, strict=False):
        Route.objects.create(
            organization=organization,
            deployment=deployment,
            model_version=version,
            weight=weight,
            stage=Route.Stage.CANARY if weight == 10 else Route.Stage.STABLE,
        )
    return deployment, made


def add_replica(deployment, version, *, state=Replica.State.READY):
    job = JobFactory(organization=deployment.organization, kind=Job.Kind.SERVE)
    return Replica.objects.create(
        organization=deployment.organization,
        deployment=deployment,
        model_version=version,
        job=job,
        state=state,
    )


def log(deployment, version, *, ago_s=60, latency=10.0, error="", output=None, label=None):
    return PredictionLog.objects.create(
        organization=deployment.organization,
        deployment=deployment,
        model_version=version,
        inputs={"x": 1},
        output=output if output is not None else {"label": 1},
        error=error,
        latency_ms=latency,
        label=label,
        created_at=timezone.now() - timedelta(seconds=ago_s),
    )


def test_deployments_list_shows_routes_replicas_and_last_hours_traffic(org, viewer):
    deployment, (stable, canary) = make_deployment(org, versions=2)
    add_replica(deployment, stable)
    add_replica(deployment, canary, state=Replica.State.STARTING)
    add_replica(deployment, stable, state=Replica.State.STOPPED)
    for latency in range(1, 100):
        log(deployment, stable, latency=float(latency))
    log(deployment, stable, latency=500.0, error="replica answered 500")
    log(deployment, stable, ago_s=7200, latency=9999.0)  # before the last hour

    html = viewer.get(reverse("serving:deployments", args=[org.slug])).content.decode()

    assert reverse("serving:deployment", args=[org.slug, "churn"]) in html
    assert f"{stable.registered_model.name} v{stable.number} <strong>90%</strong>" in html
    assert f"v{canary.number} <strong>10%</strong>" in html and "canary" in html
    assert "<td>1/2</td>" in html  # ready/total, the stopped one not counted
    assert "<td>100</td>" in html and "99 ms" in html and "1%" in html
    assert "9999" not in html and "No deployments yet" not in html


def test_deployments_list_explains_a_deployment_to_a_newcomer(org, viewer):
    html = viewer.get(reverse("serving:deployments", args=[org.slug])).content.decode()
    assert "No deployments yet" in html and "A deployment is a named endpoint" in html
    assert f"curl -X POST http://testserver/api/v1/orgs/{org.slug}/deployments/" in html
    assert f'href="/o/{org.slug}/deployments/"' in html  # the navigation link


def test_deployment_page_shows_routes_replicas_with_their_jobs_drift_and_timeline(org, viewer):
    deployment, (stable, canary) = make_deployment(org, versions=2)
    replica = add_replica(deployment, stable)
    log(deployment, stable, latency=12.0, label=1)
    log(deployment, canary, latency=30.0, output={"label": 0}, label=1)
    DriftReport.objects.create(
        organization=org,
        deployment=deployment,
        model_version=stable,
        window_start=timezone.now() - timedelta(hours=1),
        window_end=timezone.now(),
        rows=1000,
        drifted=True,
        drifted_share=0.5,
        columns={
            "age": {"kind": "numeric", "method": "wasserstein", "distance": 0.42, "drifted": True},
            "plan": {"kind": "categorical", "method": "jsd", "distance": 0.01, "drifted": False},
        },
    )
    retrain_job = JobFactory(organization=org)
    LoopEvent.objects.create(
        organization=org,
        deployment=deployment,
        kind=LoopEvent.Kind.RETRAIN_SUBMITTED,
        message="drift in age",
        job=retrain_job,
        cost_minor=250,
        created_at=timezone.now() - timedelta(minutes=5),
    )
    LoopEvent.objects.create(
        organization=org,
        deployment=deployment,
        kind=LoopEvent.Kind.CANARY_STARTED,
        message="10% to the challenger",
        model_version=canary,
    )

    page = viewer.get(reverse("serving:deployment", args=[org.slug, "churn"]))
    html = page.content.decode()

    assert page.status_code == 200
    version_url = reverse(
        "registry:model_version", args=[org.slug, canary.registered_model.name, canary.number]
    )
    assert version_url in html and "Canary</span>" in html and "90%" in html
    assert reverse("jobs:job", args=[org.slug, replica.job_id]) in html
    assert "Ready</span>" in html
    for key in ("rate", "latency", "errors", "metric"):
        assert f'id="chart-{key}"' in html
    assert html.count("<polyline") >= 2 and "stroke-dasharray" in html  # p50 dashed
    assert 'id="chart-drift"' in html and 'threshold <span class="muted">dashed' in html
    assert '<mark title="wasserstein: drifted">0.420</mark>' in html
    assert '<span title="jsd">0.010</span>' in html
    # Newest first, with links and cost.
    assert html.index("10% to the challenger") < html.index("drift in age")
    assert reverse("jobs:job", args=[org.slug, retrain_job.pk]) in html and "$2.50" in html
    # A viewer sees the policy, read-only.
    assert "Read-only" in html and "Save retrain policy" not in html
    assert 'name="canary_percent" value="10"' in html and "disabled" in html


def test_deployment_page_without_traffic_or_history_says_what_will_appear(org, dev):
    make_deployment(org)
    html = dev.get(reverse("serving:deployment", args=[org.slug, "churn"])).content.decode()
    assert "No live requests in this range" in html and "No labelled predictions" in html
    assert "No drift reports yet" in html and "Nothing yet" in html
    assert "No retrain policy yet" in html and "Save retrain policy" in html
    assert not RetrainPolicy.objects.exists()  # a GET writes nothing


def test_another_organizations_deployment_is_404_by_name_through_ones_own_slug(org, other_org, dev):
    make_deployment(other_org, "theirs")
    assert dev.get(reverse("serving:deployment", args=[org.slug, "theirs"])).status_code == 404
    # And through their slug, where this member has no membership.
    assert (
        dev.get(reverse("serving:deployment", args=[other_org.slug, "theirs"])).status_code == 404
    )
    assert (
        dev.post(
            reverse("serving:deployment", args=[org.slug, "theirs"]), policy_form()
        ).status_code
        == 404
    )
    assert not RetrainPolicy.objects.exists()


def test_list_shows_only_ones_own_deployments(org, other_org, viewer):
    make_deployment(other_org, "theirs")
    html = viewer.get(reverse("serving:deployments", args=[org.slug])).content.decode()
    assert "theirs" not in html and "No deployments yet" in html


def policy_form(**changes):
    form = {
        "enabled": "on",
        "on_drift": "on",
        "metric_below": "0.8",
        "every_s": "",
        "cooldown_s": "3600",
        "dataset": "",
        "max_cost_minor": "500",
        "gate_margin": "0.01",
        "slice_column": "plan",
        "slice_tolerance": "0.05",
        "auto_promote": "on",
        "canary_percent": "20",
        "bake_s": "600",
        "bake_extensions": "3",
        "rollback_error_rate": "0.02",
        "rollback_p99_ratio": "1.5",
        "rollback_metric_drop": "0.02",
    }
    form.update(changes)
    return {key: value for key, value in form.items() if value is not None}


def test_policy_form_saves_and_records_what_changed(org, dev):
    deployment, _ = make_deployment(org)
    dataset = DatasetFactory(organization=org)
    url = reverse("serving:deployment", args=[org.slug, "churn"])

    response = dev.post(url, policy_form(dataset=str(dataset.pk), on_new_data="on"))

    assert response.status_code == 302 and response["Location"] == url
    policy = RetrainPolicy.objects.get(deployment=deployment)
    assert (policy.canary_percent, policy.metric_below, policy.dataset) == (20, 0.8, dataset)
    assert policy.on_new_data and policy.slice_column == "plan"
    event = AuditEvent.objects.get(action="serving.retrain_policy.set")
    assert event.organization == org and event.data["created"] is True
    assert event.data["changed"]["canary_percent"] == [10, 20]
    assert event.data["changed"]["dataset"] == [None, dataset.pk]

    dev.post(url, policy_form(dataset=str(dataset.pk), on_new_data="on", canary_percent="5"))
    latest = AuditEvent.objects.filter(action="serving.retrain_policy.set").order_by("-pk")[0]
    assert latest.data == {
        "created": False,
        "changed": {"canary_percent": [20, 5]},
        "loop_acts_as": latest.actor_label,
    }


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"canary_percent": "100"}, "100% is a promotion, not a canary"),
        ({"metric_below": "1.5"}, "a share from 0 to 1"),
        ({"every_s": "30"}, "at most every 600 seconds"),
        ({"rollback_p99_ratio": "0.5"}, "from 1 to 100"),
        ({"bake_extensions": "25"}, "between 0 and 24 more times"),
        ({"metric_below": "nan"}, "Enter a number."),
        ({"max_cost_minor": "99999999999"}, "between 1 and 10000000 cents"),
        ({"on_new_data": "on"}, "choose the dataset"),
        ({"on_drift": None, "metric_below": ""}, "An enabled policy needs a trigger"),
    ],
)
def test_policy_form_refuses_a_bad_policy_with_a_clear_message_and_writes_nothing(
    org, dev, changes, message
):
    make_deployment(org)
    response = dev.post(
        reverse("serving:deployment", args=[org.slug, "churn"]), policy_form(**changes)
    )
    assert response.status_code == 400
    assert message in response.content.decode()
    assert not RetrainPolicy.objects.exists()
    assert not AuditEvent.objects.filter(action="serving.retrain_policy.set").exists()


def test_policy_form_refuses_another_organizations_dataset(org, other_org, dev):
    make_deployment(org)
    theirs = DatasetFactory(organization=other_org)
    response = dev.post(
        reverse("serving:deployment", args=[org.slug, "churn"]),
        policy_form(dataset=str(theirs.pk), on_new_data="on"),
    )
    assert response.status_code == 400 and not RetrainPolicy.objects.exists()


def test_policy_service_refuses_another_organizations_dataset_and_unknown_fields(org, owner):
    deployment, _ = make_deployment(org)
    theirs = DatasetFactory()
    with pytest.raises(RetrainPolicyInvalid) as refused:
        retrain_policy_set(deployment=deployment, actor=Actor(user=owner), dataset=theirs)
    assert refused.value.fields == {"dataset": ["That dataset does not exist."]}
    with pytest.raises(RetrainPolicyInvalid):
        retrain_policy_set(
            deployment=deployment, actor=Actor(user=owner), last_triggered_at=timezone.now()
        )
    assert not RetrainPolicy.objects.exists()


@pytest.mark.parametrize(
    "field, value",
    [
        ("canary_percent", "50"),
        ("canary_percent", True),
        ("enabled", "yes"),
        ("gate_margin", float("inf")),
        ("slice_column", "x" * 101),
        ("cooldown_s", None),
    ],
)
def test_policy_service_refuses_values_of_the_wrong_kind_as_an_api_might_send(
    org, owner, field, value
):
    deployment, _ = make_deployment(org)
    with pytest.raises(RetrainPolicyInvalid) as refused:
        retrain_policy_set(deployment=deployment, actor=Actor(user=owner), **{field: value})
    assert list(refused.value.fields) == [field]
    assert not RetrainPolicy.objects.exists()


def test_policy_threshold_of_an_error_metric_may_exceed_one(org, owner):
    deployment, _ = make_deployment(org, recipe="timeseries-forecaster")
    policy = retrain_policy_set(deployment=deployment, actor=Actor(user=owner), metric_below=3.5)
    assert policy.metric_below == 3.5
    with pytest.raises(RetrainPolicyInvalid, match="error of 0 or more"):
        retrain_policy_set(deployment=deployment, actor=Actor(user=owner), metric_below=-1.0)


def test_an_image_deployment_slices_by_true_class_and_refuses_a_column(org, dev):
    """Images have no columns: the form says the slice column is "class", and a column name is
    refused saying so."""
    make_deployment(org, recipe="image-classifier")
    url = reverse("serving:deployment", args=[org.slug, "churn"])
    assert "enter class to compare per true class" in dev.get(url).content.decode().lower()

    response = dev.post(url, policy_form(slice_column="region"))
    assert response.status_code == 400
    assert "enter class to compare per true class" in response.content.decode()
    assert not RetrainPolicy.objects.exists()

    assert dev.post(url, policy_form(slice_column="class")).status_code == 302
    assert RetrainPolicy.objects.get().slice_column == "class"


def test_a_forecaster_policy_counts_margin_and_tolerance_in_the_errors_units(org, owner):
    """MAE has the data's units: a margin or tolerance past 1 is fine, a negative tolerance is
    not; its slice is "series", not a column."""
    deployment, _ = make_deployment(org, recipe="timeseries-forecaster")
    actor = Actor(user=owner)
    policy = retrain_policy_set(
        deployment=deployment,
        actor=actor,
        gate_margin=2.5,
        slice_tolerance=4.0,
        slice_column="series",
    )
    assert (policy.gate_margin, policy.slice_tolerance, policy.slice_column) == (2.5, 4.0, "series")
    with pytest.raises(RetrainPolicyInvalid, match="rise above the champion's by 0 or more"):
        retrain_policy_set(deployment=deployment, actor=actor, slice_tolerance=-0.1)
    with pytest.raises(RetrainPolicyInvalid) as refused:
        retrain_policy_set(deployment=deployment, actor=actor, slice_column="store")
    assert "enter series to compare per series" in refused.value.fields["slice_column"][0]


def test_a_classifier_policy_keeps_margin_and_tolerance_shares(org, owner):
    deployment, _ = make_deployment(org)
    actor = Actor(user=owner)
    with pytest.raises(RetrainPolicyInvalid, match="a share between -1 and 1"):
        retrain_policy_set(deployment=deployment, actor=actor, gate_margin=2.5)
    with pytest.raises(RetrainPolicyInvalid, match="share between 0 and 1"):
        retrain_policy_set(deployment=deployment, actor=actor, slice_tolerance=4.0)
    assert retrain_policy_set(deployment=deployment, actor=actor, slice_column="class")


def test_a_viewer_cannot_post_the_policy_form(org, viewer):
    make_deployment(org)
    response = viewer.post(reverse("serving:deployment", args=[org.slug, "churn"]), policy_form())
    assert response.status_code == 403 and not RetrainPolicy.objects.exists()


def test_a_suspended_organization_cannot_change_its_policy_but_can_look(org, dev):
    make_deployment(org)
    org.status = org.Status.SUSPENDED
    org.save(update_fields=["status"])
    url = reverse("serving:deployment", args=[org.slug, "churn"])
    assert dev.get(url).status_code == 200
    assert dev.post(url, policy_form()).status_code == 403
    assert not RetrainPolicy.objects.exists()


def _queries(client, url):
    client.get(url)
    with CaptureQueriesContext(connection) as captured:
        assert client.get(url).status_code == 200
    return len(captured.captured_queries)


def test_pages_make_as_many_queries_for_many_rows_as_for_one(org, dev):
    deployment, (stable,) = make_deployment(org)
    add_replica(deployment, stable)
    log(deployment, ModelVersionFactory(organization=org))  # a version no longer routed
    LoopEvent.objects.create(
        organization=org,
        deployment=deployment,
        kind=LoopEvent.Kind.PROMOTED,
        job=JobFactory(organization=org),
        model_version=stable,
    )
    list_url = reverse("serving:deployments", args=[org.slug])
    page_url = reverse("serving:deployment", args=[org.slug, "churn"])
    one_list, one_page = _queries(dev, list_url), _queries(dev, page_url)

    for n in range(4):
        other, (version,) = make_deployment(org, f"more-{n}")
        log(other, version)
        version = ModelVersionFactory(organization=org)
        add_replica(deployment, version)
        log(deployment, version)
        LoopEvent.objects.create(
            organization=org,
            deployment=deployment,
            kind=LoopEvent.Kind.CANARY_STEPPED,
            job=JobFactory(organization=org),
            model_version=version,
        )
        DriftReport.objects.create(
            organization=org,
            deployment=deployment,
            model_version=version,
            window_start=timezone.now(),
            window_end=timezone.now(),
            rows=10,
            drifted=False,
            drifted_share=0.0,
            columns={"x": {"distance": 0.01, "drifted": False}},
        )
    assert _queries(dev, list_url) == one_list
    assert _queries(dev, page_url) == one_page


def test_version_series_cuts_the_log_into_windows_that_agree_with_version_stats(org):
    deployment, (stable, canary) = make_deployment(org, versions=2)
    end = timezone.now()
    for ago_s, version, latency in [(30, stable, 5.0), (90, stable, 7.0), (150, canary, 9.0)]:
        log(deployment, version, ago_s=ago_s, latency=latency, label=1)
    log(deployment, stable, ago_s=400)  # before the range

    series = version_series(
        deployment=deployment, start=end - timedelta(minutes=3), end=end, windows=3
    )

    assert len(series.starts) == 3 and series.window == timedelta(minutes=1)
    stable_cells = series.stats[stable.pk]
    assert stable_cells[0] is None
    assert stable_cells[1].requests == 1 and stable_cells[1].p99_ms == 7.0
    assert stable_cells[2].requests == 1 and stable_cells[2].metric == 1.0
    assert series.stats[canary.pk][0].p50_ms == 9.0
    whole = version_stats(deployment=deployment, since=end - timedelta(minutes=3), until=end)
    assert whole[stable.pk].requests == sum(c.requests for c in stable_cells if c)


def test_deployment_traffic_percentile_matches_the_python_one(org, other_org):
    deployment, (version,) = make_deployment(org)
    for latency in (1.0, 2.0, 3.0, 4.0, 100.0):
        log(deployment, version, latency=latency)
    theirs, (their_version,) = make_deployment(other_org)
    log(theirs, their_version, latency=5000.0)
    since = timezone.now() - timedelta(hours=1)

    traffic = deployment_traffic(organization=org, since=since)

    assert set(traffic) == {deployment.pk}
    python = version_stats(deployment=deployment, since=since)[version.pk]
    assert traffic[deployment.pk].p99_ms == python.p99_ms == 100.0
    assert traffic[deployment.pk].requests == 5 and traffic[deployment.pk].error_rate == 0.0


@pytest.mark.parametrize(
    "peak, at_least, ceiling",
    [(0, 1, 1), (1.3, 1, 2), (3, 1, 5), (7.5, 1, 10), (0.03, 0.01, 0.05), (145.9, 10, 200)],
)
def test_chart_ceilings_are_round_so_their_quarters_read_well(peak, at_least, ceiling):
    assert nice_ceiling(peak, at_least=at_least) == pytest.approx(ceiling)


def test_windows_start_on_round_times_and_an_open_windows_rate_counts_only_its_elapsed_part():
    span = RANGES["1h"]
    now = datetime(2026, 1, 5, 8, 37, 30, tzinfo=UTC)
    end = span.end_after(now)
    assert end == datetime(2026, 1, 5, 8, 40, tzinfo=UTC)
    starts = [end - span.span + span.window * i for i in range(span.windows)]
    stats = VersionStats(requests=5, errors=1, p50_ms=3, p99_ms=9, labelled=0, metric=None)
    series = VersionSeries(
        starts=starts, window=span.window, stats={7: [None] * 10 + [stats, stats]}
    )

    rate, latency, errors, metric = version_charts(
        series=series, names={7: "m v1"}, metric="accuracy", higher_is_better=True, now=now
    )

    assert rate["x_labels"][0].text == "07:40"
    # 5 requests in the closed 5-minute window, 5 in the 2.5 minutes of the open one.
    assert [row["cells"][0] for row in rate["rows"][-2:]] == ["1", "2"]
    assert [s["name"] for s in latency["series"]] == ["m v1 p99", "m v1 p50"]
    assert errors["rows"][-1]["cells"] == ["20%"]
    assert not metric["has_data"] and rate["has_data"]


# The forms below call the gateway's services (serving.services), merged from its branch.


def servable_version(organization, recipe="tabular-classifier"):
    return ModelVersionFactory(organization=organization, recipe_name=recipe)


def create_form(version, **changes):
    form = {
        "name": "churn",
        "model_version": str(version.pk),
        "resource_class": "cpu",
        "min_replicas": "0",
        "max_replicas": "2",
    }
    return form | changes


def test_create_form_makes_a_deployment_routed_to_the_chosen_version(org, dev):
    version = servable_version(org)
    url = reverse("serving:deployments", args=[org.slug])
    assert 'id="deployment-create"' in dev.get(url).content.decode()

    response = dev.post(url, create_form(version))

    assert response.status_code == 302
    assert response["Location"] == reverse("serving:deployment", args=[org.slug, "churn"])
    deployment = Deployment.objects.get(organization=org, name="churn")
    assert (deployment.recipe, deployment.max_replicas) == ("tabular-classifier", 2)
    route = Route.objects.get(deployment=deployment)
    assert (route.model_version, route.weight, route.mode) == (version, 100, "live")


def test_create_form_refuses_another_organizations_version_and_a_taken_name(org, other_org, dev):
    url = reverse("serving:deployments", args=[org.slug])
    response = dev.post(url, create_form(servable_version(other_org)))
    assert response.status_code == 400 and not Deployment.objects.exists()
    assert "Select a valid choice" in response.content.decode()

    make_deployment(org, "churn")
    response = dev.post(url, create_form(servable_version(org)))
    assert response.status_code == 400 and "Already taken" in response.content.decode()
    assert Deployment.objects.count() == 1


def routes_form(*rows):
    form = {}
    for index, (version, weight, mode, stage) in enumerate(rows):
        form |= {
            f"version_{index}": str(version.pk) if version else "",
            f"weight_{index}": str(weight),
            f"mode_{index}": mode,
            f"stage_{index}": stage,
        }
    return form


def test_routes_form_moves_the_weights(org, dev):
    deployment, (stable,) = make_deployment(org)
    stable.recipe_name = "tabular-classifier"
    stable.save(update_fields=["recipe_name"])
    challenger = servable_version(org)
    page = dev.get(reverse("serving:deployment", args=[org.slug, "churn"])).content.decode()
    assert "Change routes" in page and f'<option value="{challenger.pk}"' in page

    response = dev.post(
        reverse("serving:deployment_routes", args=[org.slug, "churn"]),
        routes_form(
            (stable, 80, "live", "stable"),
            (challenger, 20, "live", "canary"),
            (None, "", "live", "stable"),
        ),
    )

    assert response.status_code == 302
    assert sorted(
        Route.objects.filter(deployment=deployment).values_list(
            "model_version_id", "weight", "stage"
        )
    ) == sorted([(stable.pk, 80, "stable"), (challenger.pk, 20, "canary")])


@pytest.mark.parametrize("attack", ["weights_short_of_100", "another_organizations_version"])
def test_routes_form_refuses_bad_routes_and_leaves_the_old_ones(org, other_org, dev, attack):
    deployment, (stable,) = make_deployment(org)
    stable.recipe_name = "tabular-classifier"
    stable.save(update_fields=["recipe_name"])
    if attack == "weights_short_of_100":
        rows, message = [(stable, 90, "live", "stable")], "add up to 90, not 100"
    else:
        rows, message = (
            [(stable, 50, "live", "stable"), (servable_version(other_org), 50, "live", "canary")],
            "Select a valid choice",
        )

    response = dev.post(
        reverse("serving:deployment_routes", args=[org.slug, "churn"]), routes_form(*rows)
    )

    assert response.status_code == 400 and message in response.content.decode()
    assert list(Route.objects.filter(deployment=deployment).values_list("weight", flat=True)) == [
        100
    ]


def test_the_page_answered_from_the_routes_url_still_links_and_posts_to_its_own(org, dev):
    make_deployment(org)
    response = dev.post(
        reverse("serving:deployment_routes", args=[org.slug, "churn"]),
        {"version_0": "not-a-version", "weight_0": "100"},
    )
    html = response.content.decode()
    assert response.status_code == 400 and "Select a valid choice" in html
    page_url = reverse("serving:deployment", args=[org.slug, "churn"])
    assert f'<form method="post" action="{page_url}" id="retrain-policy"' in html
    assert f'href="{page_url}?range=1h"' in html


def test_a_viewer_sees_no_route_or_create_forms_and_cannot_post_them(org, viewer):
    _deployment, (stable,) = make_deployment(org)
    assert (
        "Change routes"
        not in viewer.get(reverse("serving:deployment", args=[org.slug, "churn"])).content.decode()
    )
    assert (
        'id="deployment-create"'
        not in viewer.get(reverse("serving:deployments", args=[org.slug])).content.decode()
    )
    response = viewer.post(
        reverse("serving:deployment_routes", args=[org.slug, "churn"]),
        routes_form((stable, 100, "live", "stable")),
    )
    assert response.status_code == 403
    response = viewer.post(
        reverse("serving:deployments", args=[org.slug]),
        create_form(servable_version(org), name="x"),
    )
    assert response.status_code == 403 and Deployment.objects.count() == 1


def test_each_window_of_the_series_is_exactly_version_stats_over_that_window(org):
    deployment, (stable, canary) = make_deployment(org, versions=2)
    end = timezone.now()
    for n in range(60):
        log(
            deployment,
            stable if n % 3 else canary,
            ago_s=5 + n * 5,
            latency=float((n * 37) % 101),
            error="boom" if n % 11 == 0 else "",
            output={"label": n % 2},
            label=1 if n % 4 == 0 else None,
        )
    start = end - timedelta(minutes=5)

    series = version_series(deployment=deployment, start=start, end=end, windows=4)

    for index, opened in enumerate(series.starts):
        expected = version_stats(deployment=deployment, since=opened, until=opened + series.window)
        for version in (stable, canary):
            assert series.stats[version.pk][index] == expected.get(version.pk), (version, index)


def test_drift_chart_draws_the_columns_that_drifted_most_and_skips_distances_it_cannot_read():
    now = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
    columns = {f"c{n}": {"distance": n / 100, "drifted": n > 5} for n in range(10)}
    reports = [
        DriftReport(window_end=now, columns=columns | {"bad": {"distance": float("nan")}}),
        DriftReport(
            window_end=now - timedelta(hours=1), columns={"c9": {"distance": "0.5"}, "odd": 3}
        ),
    ]

    chart = drift_chart(reports=reports, threshold=0.1)

    names = [s["name"] for s in chart["series"]]
    assert names[-1] == "threshold" and len(names) == MAX_DRIFT_COLUMNS + 1
    assert "c9" in names and "c0" not in names and "bad" not in names
    assert chart["hidden"] == 10 - MAX_DRIFT_COLUMNS
    c9 = next(s for s in chart["series"] if s["name"] == "c9")
    assert [p["label"] for p in c9["points"]] == ["0.09"]  # oldest report first: unreadable
    assert drift_chart(reports=[], threshold=0.1) is None


def test_a_long_list_says_it_is_cut_and_where_to_find_the_rest(org, viewer, monkeypatch):
    monkeypatch.setattr("serving.views.LISTED_DEPLOYMENTS", 2)
    for name in ("a", "b", "c"):
        make_deployment(org, name)
    html = viewer.get(reverse("serving:deployments", args=[org.slug])).content.decode()
    assert "Showing the first 2 by name" in html
    assert reverse("serving:deployment", args=[org.slug, "b"]) in html
    assert reverse("serving:deployment", args=[org.slug, "c"]) not in html
