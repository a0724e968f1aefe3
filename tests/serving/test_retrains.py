"""Retrains and model cards through the API and the pages: listing, the card, and approving or
rejecting a challenger that awaits a person, attacked by everyone who may not decide."""

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone
from django.utils.html import escape

from factory_saas.templatetags.money import usage_text
from jobs.models import Job, JobAttempt
from serving.models import LoopEvent, ModelCard, Retrain, Route
from tenants.actors import Actor
from tests.serving import test_loop as loop

# The loop's own world: a routed champion, a policy waiting for a person, a passed card.
cpu, creator, data, champion = loop.cpu, loop.creator, loop.data, loop.champion
deployment, policy, awaiting = loop.deployment, loop.policy, loop.awaiting
inconclusive = loop.inconclusive

pytestmark = pytest.mark.django_db


def _api(org, path=""):
    return f"/api/v1/orgs/{org.slug}/{path}"


def _page(org, deployment, retrain, action=""):
    name = "serving:retrain" + (f"_{action}" if action else "")
    return reverse(name, args=[org.slug, deployment.name, retrain.pk])


def _unchanged(card, deployment, champion):
    """Nothing a refused decision could have written: still awaiting, champion alone routed."""
    card.refresh_from_db()
    retrain = Retrain.objects.get(pk=card.retrain_id)
    assert retrain.state == Retrain.State.AWAITING_APPROVAL
    assert (card.approved_at, card.approved_by_label, len(card.reasons)) == (None, "", 1)
    assert {
        (r.model_version_id, r.weight) for r in Route.objects.filter(deployment=deployment)
    } == {(champion.pk, 100)}
    assert not LoopEvent.objects.filter(
        kind__in=[LoopEvent.Kind.APPROVED, LoopEvent.Kind.CANARY_STARTED]
    ).exists()


# API


def test_a_deployments_retrains_list_states_versions_jobs_and_costs(
    awaiting, org, deployment, champion, client_for, member_factory
):
    retrain = awaiting.retrain
    viewer = client_for(member_factory(org, "viewer"))
    response = viewer.get(_api(org, f"deployments/{deployment.name}/retrains/"))
    assert response.status_code == 200, response.content
    (row,) = response.json()["results"]
    assert row["id"] == retrain.pk and row["state"] == "awaiting_approval"
    assert row["champion"] == {
        "id": champion.pk,
        "model": champion.registered_model.name,
        "version": champion.number,
    }
    assert row["challenger"]["id"] == awaiting.model_version_id
    assert row["job"]["id"] == retrain.job_id and row["job"]["cost_minor"] == 250
    assert row["evaluation_job"]["id"] == retrain.evaluation_job_id
    assert row["costs"] == {"training_minor": 250, "evaluation_minor": 0, "total_minor": 250}
    assert (row["decision"], row["awaiting_approval"]) == ("passed", True)


def test_a_retrain_answers_with_its_model_card(awaiting, org, client_for, member_factory):
    client = client_for(member_factory(org, "viewer"))
    body = client.get(_api(org, f"retrains/{awaiting.retrain_id}/")).json()
    card = body["model_card"]
    assert card["decision"] == "passed" and card["approved_by"] == ""
    assert card["metrics"]["challenger"]["overall"] == 0.91
    assert card["metrics"]["champion"]["overall"] == 0.85
    assert card["lineage"]["datasets"][0]["id"] == awaiting.retrain.job.input_dataset_version_id
    assert card["lineage"]["evaluated_on"]["split"] == "validation"
    assert card["reasons"] and "better by" in card["reasons"][0]


def test_a_developer_approves_through_the_api_and_the_card_says_who(
    awaiting, org, client_for, member_factory
):
    developer = member_factory(org, "developer")
    response = client_for(developer).post(_api(org, f"retrains/{awaiting.retrain_id}/approve/"))
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["state"] == "canary" and body["canary_percent"] == 10
    assert body["model_card"]["approved_via"] == "user"
    assert body["model_card"]["approved_by"] == Actor(user=developer).label
    awaiting.refresh_from_db()
    assert awaiting.approved_by == developer
    again = client_for(developer).post(_api(org, f"retrains/{awaiting.retrain_id}/approve/"))
    assert again.status_code == 409 and again.json()["code"] == "conflict"


def test_reject_needs_a_reason_and_puts_it_on_the_card(awaiting, org, client_for, owner):
    url = _api(org, f"retrains/{awaiting.retrain_id}/reject/")
    refused = client_for(owner).post(url, {}, format="json")
    assert refused.status_code == 400 and "reason" in refused.json()["fields"]
    assert Retrain.objects.get(pk=awaiting.retrain_id).state == Retrain.State.AWAITING_APPROVAL
    response = client_for(owner).post(url, {"reason": "slice eu too thin"}, format="json")
    assert response.status_code == 200, response.content
    assert response.json()["state"] == "rejected"
    assert response.json()["model_card"]["reasons"][-1].endswith(": slice eu too thin")


def test_no_one_without_models_promote_in_the_org_decides_through_the_api(
    awaiting, org, other_org, deployment, champion, client_for, key_client_for, member_factory
):
    owner = member_factory(org, "owner")
    stranger = member_factory(other_org, "owner")
    approve = _api(org, f"retrains/{awaiting.retrain_id}/approve/")
    reject = _api(org, f"retrains/{awaiting.retrain_id}/reject/")
    attackers = {
        "viewer": (client_for(member_factory(org, "viewer")), 403),
        "key without models:promote": (
            key_client_for(owner, org, ["deployments:read", "deployments:write", "models:write"]),
            403,
        ),
        "another org's owner": (client_for(stranger), 404),
        "another org's owner's key": (key_client_for(stranger, other_org), 404),
    }
    for who, (client, status) in attackers.items():
        for url, body in ((approve, None), (reject, {"reason": "mine now"})):
            response = client.post(url, body, format="json")
            assert response.status_code == status, (who, url, response.content)
        # Another org's owner, through their own slug: the retrain is not theirs either.
        mine = client.post(_api(other_org, f"retrains/{awaiting.retrain_id}/approve/"))
        assert mine.status_code in (403, 404), who
    _unchanged(awaiting, deployment, champion)


def test_a_retrain_the_gate_has_not_decided_cannot_be_approved(
    deployment, policy, champion, org, client_for, owner
):
    retrain, _challenger = loop._to_evaluating(deployment, champion, policy)
    response = client_for(owner).post(_api(org, f"retrains/{retrain.pk}/approve/"))
    assert response.status_code == 409, response.content
    assert Retrain.objects.get(pk=retrain.pk).state == Retrain.State.EVALUATING


def test_an_inconclusive_canary_awaits_a_decision_and_approving_promotes_it(
    inconclusive, org, deployment, client_for, member_factory
):
    retrain = inconclusive.retrain
    viewer = client_for(member_factory(org, "viewer"))
    (row,) = viewer.get(_api(org, f"deployments/{deployment.name}/retrains/")).json()["results"]
    assert (row["state"], row["canary_percent"], row["awaiting_approval"]) == (
        "inconclusive",
        10,
        True,
    )
    assert viewer.post(_api(org, f"retrains/{retrain.pk}/approve/")).status_code == 403

    response = client_for(member_factory(org, "developer")).post(
        _api(org, f"retrains/{retrain.pk}/approve/")
    )
    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["state"], body["canary_percent"], body["awaiting_approval"]) == (
        "promoted",
        100,
        False,
    )
    assert {
        (r.model_version_id, r.weight) for r in Route.objects.filter(deployment=deployment)
    } == {(inconclusive.model_version_id, 100)}


# Pages


def test_the_deployment_page_lists_retrains_with_their_steps(
    awaiting, org, deployment, client, member_factory
):
    client.force_login(member_factory(org, "viewer"))
    page = client.get(reverse("serving:deployment", args=[org.slug, deployment.name]))
    html = page.content.decode()
    assert page.status_code == 200
    assert 'id="retrains"' in html and "Awaiting approval" in html
    assert _page(org, deployment, awaiting.retrain) in html
    assert (
        f"#{awaiting.retrain.job_id}" in html and f"#{awaiting.retrain.evaluation_job_id}" in html
    )


def test_the_card_page_renders_lineage_metrics_and_the_decision(
    awaiting, org, deployment, champion, client, member_factory
):
    client.force_login(member_factory(org, "developer"))
    page = client.get(_page(org, deployment, awaiting.retrain))
    html = page.content.decode()
    assert page.status_code == 200
    trained = awaiting.retrain.job.input_dataset_version
    dataset_url = reverse(
        "registry:dataset_version", args=[org.slug, trained.dataset.name, trained.number]
    )
    assert dataset_url in html
    name = champion.registered_model.name
    assert reverse("registry:model_version", args=[org.slug, name, champion.number]) in html
    assert "0.9100" in html and "0.8500" in html and "0.0600" in html
    assert escape(awaiting.reasons[0]) in html
    assert 'id="approve-form"' in html and 'id="reject-form"' in html


def test_the_card_page_shows_the_work_beside_a_jobs_cost(awaiting, org, deployment, client, owner):
    """Training priced at nothing (CPU) still says what it did, not just $0.00."""
    job = awaiting.retrain.job
    Job.objects.filter(pk=job.pk).update(cost_minor=0)
    JobAttempt.objects.filter(job=job).delete()  # the loop's own attempts, of no fixed length
    started = timezone.now() - timedelta(minutes=5)
    JobAttempt.objects.create(
        organization=org,
        job=job,
        number=job.attempt,
        started_at=started,
        ended_at=started + timedelta(seconds=42),
        outcome=JobAttempt.Outcome.SUCCEEDED,
    )
    client.force_login(owner)
    html = client.get(_page(org, deployment, awaiting.retrain)).content.decode()
    usage = usage_text(42 * job.gpu_count, job.resource_class.name)
    assert f'$0.00 <span class="muted">· {usage}</span>' in html


def test_a_viewer_sees_the_state_without_buttons_and_is_refused_a_post(
    awaiting, org, deployment, champion, client, member_factory
):
    client.force_login(member_factory(org, "viewer"))
    html = client.get(_page(org, deployment, awaiting.retrain)).content.decode()
    assert "Awaiting approval" in html and "approve-form" not in html and "reject-form" not in html
    assert client.post(_page(org, deployment, awaiting.retrain, "approve")).status_code == 403
    refused = client.post(_page(org, deployment, awaiting.retrain, "reject"), {"reason": "no"})
    assert refused.status_code == 403
    _unchanged(awaiting, deployment, champion)


def test_approving_through_the_page_starts_the_canary(
    awaiting, org, deployment, champion, client, member_factory
):
    client.force_login(member_factory(org, "owner"))
    response = client.post(_page(org, deployment, awaiting.retrain, "approve"))
    assert response.status_code == 302
    assert response["Location"] == _page(org, deployment, awaiting.retrain)
    assert Retrain.objects.get(pk=awaiting.retrain_id).state == Retrain.State.CANARY
    assert Route.objects.filter(
        deployment=deployment, model_version=awaiting.model_version
    ).exists()
    html = client.get(response["Location"]).content.decode()
    assert "Approved by" in html and "approve-form" not in html


def test_rejecting_through_the_page_needs_a_reason(
    awaiting, org, deployment, champion, client, member_factory
):
    client.force_login(member_factory(org, "developer"))
    url = _page(org, deployment, awaiting.retrain, "reject")
    blank = client.post(url, {"reason": "  "})
    assert blank.status_code == 400 and 'id="decision-error"' in blank.content.decode()
    assert Retrain.objects.get(pk=awaiting.retrain_id).state == Retrain.State.AWAITING_APPROVAL
    assert client.post(url, {"reason": "too little data"}).status_code == 302
    card = ModelCard.objects.get(pk=awaiting.pk)
    assert card.retrain.state == Retrain.State.REJECTED
    assert card.reasons[-1].endswith("too little data")


def test_another_orgs_retrain_is_404_on_every_card_url(
    awaiting, org, other_org, deployment, client, member_factory
):
    client.force_login(member_factory(other_org, "owner"))
    # Their own slug with our deployment and retrain, and our slug (not their organization).
    for slug in (other_org.slug, org.slug):
        base = ["serving:retrain", [slug, deployment.name, awaiting.retrain_id]]
        assert client.get(reverse(base[0], args=base[1])).status_code == 404
        for action in ("approve", "reject"):
            url = reverse(f"serving:retrain_{action}", args=base[1])
            assert client.post(url, {"reason": "x"}).status_code == 404
    # The right organization, but a retrain of another deployment's name.
    client.force_login(member_factory(org, "owner"))
    wrong = reverse("serving:retrain", args=[org.slug, "not-this-one", awaiting.retrain_id])
    assert client.get(wrong).status_code == 404


def test_the_card_page_offers_promote_and_roll_back_for_an_inconclusive_canary(
    inconclusive, org, deployment, champion, client, member_factory
):
    retrain = inconclusive.retrain
    client.force_login(member_factory(org, "viewer"))
    html = client.get(_page(org, deployment, retrain)).content.decode()
    assert "Canary inconclusive" in html and "approve-form" not in html
    assert 'id="decide-note"' in html
    assert (
        client.post(_page(org, deployment, retrain, "reject"), {"reason": "x"}).status_code == 403
    )

    client.force_login(member_factory(org, "developer"))
    html = client.get(_page(org, deployment, retrain)).content.decode()
    assert 'id="inconclusive-note"' in html and ">Promote<" in html and ">Roll back<" in html
    response = client.post(_page(org, deployment, retrain, "reject"), {"reason": "too quiet"})
    assert response.status_code == 302
    assert Retrain.objects.get(pk=retrain.pk).state == Retrain.State.ROLLED_BACK
    assert {
        (r.model_version_id, r.weight) for r in Route.objects.filter(deployment=deployment)
    } == {(champion.pk, 100)}
    html = client.get(response["Location"]).content.decode()
    assert "rolled back" in html and "too quiet" in html
