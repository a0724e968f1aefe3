"""Schemathesis against the OpenAPI schema, every operation, as an owner's API key of one tenant.

Each operation gets 50 derandomized examples (positive and negative data). Every response must
not be a server error, must use a documented status code and content type, must match its
documented body schema, and must not carry any identifier of a second tenant seeded beside the
first (its slug, names, emails, key prefix, invoice number or object ids), unless the request
itself named it. Path parameters are drawn from the tenant's real objects, the other tenant's
objects and generated values, so requests reach real rows, foreign rows and missing ones.

A stateful test then chains calls along the links schemathesis infers from the schema (the
schema declares none), e.g. GET /orgs/ -> the slug -> the org's datasets -> one dataset.

The tenants are seeded once per module; each example (each scenario, for the stateful test) runs
in a savepoint that is rolled back, so every one sees the same seeded data.
"""

import re
import secrets
import zipfile
from datetime import timedelta
from types import SimpleNamespace

import numpy as np
import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.db import close_old_connections, transaction
from django.test import override_settings
from django.utils import timezone
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import run_state_machine_as_test
from safetensors.numpy import save as save_safetensors
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from billing.models import CreditGrant, Invoice
from factory_saas.wsgi import application
from jobs.models import Job, ResourceClass, Sweep
from registry import services as registry_services
from serving.models import Deployment, ModelCard, Retrain, RetrainPolicy
from tenants.actors import Actor
from tenants.models import ApiKey, Invitation, Membership, Organization
from tenants.scopes import ROLE_SCOPES, Role
from tenants.selectors import hash_secret
from tenants.services import api_key_create
from tests.factories import UserFactory
from webhooks.models import WebhookDelivery, WebhookEndpoint, WebhookEvent

MAX_EXAMPLES = 50
# Every identifier of the second tenant carries this marker, so a leak is easy to spot.
FOREIGN = "zq-foreign"
# The second tenant's rows get ids from this range, far above anything the sequences hand out.
FOREIGN_ID_BASE = 880_000_000

schema = schemathesis.openapi.from_wsgi("/api/v1/schema/", application)

# What the path-parameter hook draws from; filled by the `tenants` fixture before each operation.
SEEDED: dict[str, dict] = {}


def _seed_retrain(organization, *, marker, champion, weights_path, pk) -> Retrain:
    """A retrain whose challenger passed the gate and awaits approval, with its model card."""
    deployment = Deployment.objects.create(
        organization=organization,
        name=f"{marker}-deployment",
        recipe="tabular-classifier",
        resource_class=ResourceClass.objects.get(name="cpu"),
        **pk(1),
    )
    RetrainPolicy.objects.create(
        organization=organization, deployment=deployment, auto_promote=False
    )
    challenger = registry_services.model_version_register(
        registered_model=champion.registered_model,
        weights_path=weights_path,
        config={"in_features": 3, "out_features": 2},
        actor=Actor(),
    )
    retrain = Retrain.objects.create(
        organization=organization,
        deployment=deployment,
        state=Retrain.State.AWAITING_APPROVAL,
        champion=champion,
        challenger=challenger,
        **pk(1),
    )
    ModelCard.objects.create(
        organization=organization,
        model_version=challenger,
        retrain=retrain,
        champion=champion,
        metrics={
            "metric": "accuracy",
            "challenger": {"overall": 0.9},
            "champion": {"overall": 0.8},
        },
        decision=ModelCard.Decision.PASSED,
        reasons=["better"],
        **pk(1),
    )
    return retrain


def _seed_tenant(tmp_path, *, marker: str, ids: int | None = None) -> dict:
    """A tenant with one of everything the API serves; `ids` pins primary keys when given."""

    def pk(offset):
        return {"pk": ids + offset} if ids is not None else {}

    owner = UserFactory(email=f"owner@{marker}.test", **pk(1))
    developer = UserFactory(email=f"dev@{marker}.test", **pk(2))
    organization = Organization.objects.create(name=f"{marker} org", slug=f"{marker}-org", **pk(1))
    Membership.objects.create(organization=organization, user=owner, role=Role.OWNER, **pk(1))
    member = Membership.objects.create(
        organization=organization, user=developer, role=Role.DEVELOPER, **pk(2)
    )
    actor = Actor(user=owner)
    api_key, token = api_key_create(
        organization=organization,
        name=f"{marker} key",
        scopes=sorted(ROLE_SCOPES[Role.OWNER]),
        actor=actor,
    )
    invitation = Invitation.objects.create(
        organization=organization,
        email=f"invitee@{marker}.test",
        role=Role.VIEWER,
        token_hash=hash_secret(secrets.token_hex(16)),
        expires_at=timezone.now() + timedelta(days=7),
        invited_by=owner,
        **pk(1),
    )

    dataset = registry_services.dataset_create(
        organization=organization, name=f"{marker}-data", actor=actor
    )
    csv_path = tmp_path / f"{marker}.csv"
    csv_path.write_bytes(b"x,y,label\n1,2,a\n3,4,b\n5,6,a\n7,8,b\n")
    dataset_version = registry_services.dataset_version_create(
        dataset=dataset, path=csv_path, filename="train.csv", actor=actor
    )
    upload, _form = registry_services.pending_upload_create(
        dataset=dataset, filename="big.csv", declared_format="csv", size_bytes=10, actor=actor
    )

    weights_path = tmp_path / f"{marker}.safetensors"
    weights_path.write_bytes(
        save_safetensors({"linear.weight": np.arange(6, dtype=np.float32).reshape(2, 3)})
    )
    registered_model = registry_services.registered_model_create(
        organization=organization, name=f"{marker}-model", actor=actor
    )
    model_version = registry_services.model_version_register(
        registered_model=registered_model,
        weights_path=weights_path,
        config={"in_features": 3, "out_features": 2},
        actor=actor,
        metrics={"val_accuracy": 0.5},
        trained_on=[dataset_version],
    )
    registry_services.model_alias_set(
        registered_model=registered_model, alias="production", version=model_version, actor=actor
    )

    code_path = tmp_path / f"{marker}-code.zip"
    with zipfile.ZipFile(code_path, "w") as archive:
        archive.writestr(
            "factory.toml",
            f'[package]\nname = "{marker}-code"\n[entry]\ntrain = "pkg.main:run"\n'
            '[runtime]\nname = "torch-2.13-py311"\n[outputs]\nmodel = true\n',
        )
        archive.writestr("pkg/main.py", "def run(ctx):\n    pass\n")
    code_version = registry_services.code_package_version_create(
        organization=organization, path=code_path, filename="code.zip", actor=actor
    )

    cpu = ResourceClass.objects.get(name="cpu")
    retrain = _seed_retrain(
        organization, marker=marker, champion=model_version, weights_path=weights_path, pk=pk
    )
    job = Job.objects.create(
        organization=organization,
        recipe="tabular-classifier",
        parameters={"target": "label"},
        input_dataset_version=dataset_version,
        output_model_name=f"{marker}-model",
        resource_class=cpu,
        gpu_count=1,
        created_by=owner,
        **pk(1),
    )
    sweep = Sweep.objects.create(
        organization=organization,
        name=f"{marker}-sweep",
        recipe="tabular-classifier",
        base_parameters={"target": "label"},
        space={"epochs": {"values": [1, 2]}},
        trial_count=2,
        metric="val_accuracy",
        **pk(1),
    )
    start = timezone.now().replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    invoice = Invoice.objects.create(
        organization=organization,
        number=f"{marker.upper()}-0001",
        source=Invoice.Source.BUILTIN,
        status=Invoice.Status.OPEN,
        period_start=start,
        period_end=start + timedelta(days=28),
        subtotal_minor=100,
        total_minor=100,
        **pk(1),
    )
    invoice.lines.create(
        description="Storage", resource="storage", unit="gb_month", amount_minor=100
    )
    CreditGrant.objects.create(
        organization=organization,
        amount_minor=500,
        remaining_minor=500,
        reason=f"{marker} welcome credit",
        idempotency_key=f"{marker}-grant",
        **pk(1),
    )
    endpoint = WebhookEndpoint.objects.create(
        organization=organization,
        url=f"https://93.184.215.14/{marker}",
        event_types=["job.succeeded"],
        **pk(1),
    )
    delivery = WebhookDelivery.objects.create(
        organization=organization,
        endpoint=endpoint,
        event=WebhookEvent.objects.create(
            organization=organization,
            type="job.succeeded",
            payload={"type": "job.succeeded", "timestamp": "2026-01-01T00:00:00Z", "data": {}},
            **pk(1),
        ),
        message_id=f"msg_{marker}",
        state=WebhookDelivery.State.FAILED,
        attempts=1,
        **pk(1),
    )
    return {
        "token": token,
        "org_slug": [organization.slug],
        "name": {
            "datasets": [dataset.name],
            "models": [registered_model.name],
            "deployments": [retrain.deployment.name],
            "code-packages": [code_version.package.name],
        },
        "package_name": [code_version.package.name],
        "dataset_name": [dataset.name],
        "model_name": [registered_model.name],
        "number": [dataset_version.number, model_version.number],
        "alias": ["production"],
        "id": {
            "api-keys": [api_key.pk],
            "invitations": [invitation.pk],
            "members": [member.pk],
            "jobs": [job.pk],
            "sweeps": [sweep.pk],
            "invoices": [invoice.pk],
            "uploads": [upload.pk],
            "retrains": [retrain.pk],
            "webhooks": [endpoint.pk],
            "webhook-deliveries": [delivery.pk],
        },
        "identifiers": [
            organization.slug,
            organization.name,
            owner.email,
            developer.email,
            invitation.email,
            api_key.prefix,
            dataset.name,
            registered_model.name,
            sweep.name,
            invoice.number,
            retrain.deployment.name,
            code_version.package.name,
            endpoint.url,
            delivery.message_id,
        ],
    }


@pytest.fixture
def wsgi_keeps_the_test_transaction():
    """Django's WSGI handler closes the connection after each request, and with it the test's
    transaction; Django's own test client turns that off the same way."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.fixture(scope="module")
def seeded(django_db_setup, django_db_blocker, tmp_path_factory):
    """Both tenants, seeded once for the module in a transaction rolled back at its end.

    Each test's own transaction (pytest-django) nests inside as a savepoint, so no test sees
    another's writes; seeding once saves about a second per operation.
    """
    root = tmp_path_factory.mktemp("fuzz")
    storage = override_settings(STORAGE_BACKEND="local", STORAGE_LOCAL_ROOT=str(root / "storage"))
    storage.enable()
    outer = transaction.atomic()
    with django_db_blocker.unblock():
        outer.__enter__()
        ours = _seed_tenant(root, marker="fuzz-home")
        foreign = _seed_tenant(root, marker=FOREIGN, ids=FOREIGN_ID_BASE)
    yield ours, foreign
    with django_db_blocker.unblock():
        transaction.set_rollback(True)
        outer.__exit__(None, None, None)
    storage.disable()


@pytest.fixture
def tenants(seeded, db, wsgi_keeps_the_test_transaction):
    """Our tenant (with data) and a foreign one whose identifiers must never come back."""
    ours, foreign = seeded
    # The key has just been used, as it is after a real client's first request: each example
    # rolls back its own writes, and would otherwise record the key's use (an UPDATE) every time.
    ApiKey.objects.filter(pk__in=ours["id"]["api-keys"]).update(last_used_at=timezone.now())
    foreign_ids = [pk for pks in foreign["id"].values() for pk in pks if pk >= FOREIGN_ID_BASE]
    SEEDED.update(ours=ours, foreign=foreign)
    yield {
        "token": ours["token"],
        "foreign_identifiers": [*foreign["identifiers"], *map(str, foreign_ids)],
    }
    SEEDED.clear()


def _candidates(name: str, path: str, tenant: dict) -> list:
    value = tenant.get(name, [])
    if isinstance(value, dict):  # `id` and `name`: which kind depends on the collection
        segments = [s for s in path.split("/") if s and not s.startswith("{")]
        kind = next((s for s in reversed(segments) if s in value), None)
        if name == "id" and path.endswith("/finalize/"):
            kind = "uploads"
        value = value.get(kind, []) if kind else []
    return list(value)


@schema.hook
def flatmap_path_parameters(context, path_parameters):
    """Mostly our tenant's real objects, sometimes the foreign tenant's, sometimes generated."""
    if not SEEDED or not path_parameters:
        return st.just(path_parameters)
    path = context.operation.path
    drawn = {}
    for name, generated in path_parameters.items():
        ours = _candidates(name, path, SEEDED["ours"])
        foreign = _candidates(name, path, SEEDED["foreign"])
        # The organization slug is ours three times in five, so most requests reach real code.
        weighted = ([*ours] * 3 if name == "org_slug" else ours) + foreign + [generated]
        drawn[name] = st.sampled_from(weighted)
    return st.fixed_dictionaries(drawn)


RESPONSE_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def _request_text(case) -> str:
    parts = [case.formatted_path, str(case.query or ""), str(case.body or "")]
    parts += [str(v) for v in (case.path_parameters or {}).values()]
    return " ".join(parts)


def _foreign_identifiers_check(foreign_identifiers):
    patterns = [
        (value, re.compile(rf"(?<![\w-]){re.escape(value)}(?![\w-])", re.IGNORECASE))
        for value in foreign_identifiers
    ]

    def no_foreign_tenant_identifiers(ctx, response, case):
        body = response.content.decode("utf-8", "replace")
        sent = _request_text(case)
        leaked = [
            value
            for value, pattern in patterns
            if pattern.search(body) and not pattern.search(sent)
        ]
        if leaked:
            raise AssertionError(
                f"The response carries another tenant's identifiers {leaked}: {body[:500]}"
            )
        return True

    return no_foreign_tenant_identifiers


@pytest.mark.django_db
@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_operation_conforms_to_its_schema_and_leaks_no_other_tenant(case, tenants):
    checks = [*RESPONSE_CHECKS, _foreign_identifiers_check(tenants["foreign_identifiers"])]
    with transaction.atomic():
        case.call_and_validate(
            headers={"Authorization": f"Bearer {tenants['token']}"}, checks=checks
        )
        transaction.set_rollback(True)


# Scenarios of the stateful test; each chains up to STATEFUL_STEPS calls along the links
# schemathesis infers from the schema (e.g. GET /orgs/ -> slug -> the org's datasets -> a dataset).
STATEFUL_SCENARIOS = 20
STATEFUL_STEPS = 8


@pytest.mark.django_db
def test_api_workflows_along_inferred_links_conform_and_leak_no_other_tenant(tenants):
    checks = [*RESPONSE_CHECKS, _foreign_identifiers_check(tenants["foreign_identifiers"])]
    headers = {"Authorization": f"Bearer {tenants['token']}"}
    calls = []

    class Workflow(schema.as_state_machine()):
        def setup(self):
            self.savepoint = transaction.atomic()
            self.savepoint.__enter__()

        def teardown(self):
            transaction.set_rollback(True)
            self.savepoint.__exit__(None, None, None)

        def get_call_kwargs(self, case):
            return {"headers": headers}

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            calls.append((case.operation.label, response.status_code))
            case.validate_response(response, checks=checks, headers=headers)

    assert schema.statistic.transitions.total > 0, "schemathesis inferred no links"
    run_state_machine_as_test(
        Workflow,
        settings=settings(
            max_examples=STATEFUL_SCENARIOS,
            stateful_step_count=STATEFUL_STEPS,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
    # The scenarios went somewhere: chained calls that reached real objects of the tenant.
    reached = {label for label, status in calls if status < 300}
    assert len(calls) > STATEFUL_SCENARIOS and len(reached) > 5, (len(calls), sorted(reached))


def _fake(body: bytes, path="/api/v1/orgs/fuzz-home-org/jobs/", **request):
    response = SimpleNamespace(content=body)
    case = SimpleNamespace(
        formatted_path=path,
        query=request.get("query"),
        body=request.get("body"),
        path_parameters=request.get("path_parameters"),
    )
    return response, case


def test_the_leak_check_fails_on_another_tenants_identifier_and_passes_an_echo():
    check = _foreign_identifiers_check(["zq-foreign-org", str(FOREIGN_ID_BASE + 1)])
    with pytest.raises(AssertionError, match="zq-foreign-org"):
        check(None, *_fake(b'{"results": [{"org": "zq-foreign-org"}]}'))
    with pytest.raises(AssertionError, match=str(FOREIGN_ID_BASE + 1)):
        check(None, *_fake(b'{"id": 880000001}'))
    # The request named it itself (a 404 may echo it), and a longer number is another id.
    assert check(None, *_fake(b'{"detail": "zq-foreign-org"}', path="/api/v1/orgs/zq-foreign-org/"))
    assert check(None, *_fake(b'{"id": 8800000012}'))
