"""The cross-tenant sweep: every org-scoped route, every method, every role.

Routes are found by walking the URL patterns, so a new route is swept without being listed here.
Each must be built on a sealed base (tests/security/test_seal.py attacks the seal itself),
declare its scope, and have an entry in CALLS: the valid request a permitted role sends and what
proves the action ran. A route without one of these fails, saying what to add.
"""

import copy
import io
import json
import re
import secrets
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from types import SimpleNamespace
from urllib.parse import urlencode

import numpy as np
import pytest
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import DEFAULT_DB_ALIAS, transaction
from django.test import override_settings
from django.urls import URLPattern, URLResolver, get_resolver, reverse
from django.utils import timezone
from rest_framework.test import APIClient
from safetensors.numpy import save as save_safetensors

from billing.models import BillingAccount, Invoice
from jobs.models import Job, JobState, ResourceClass, Sweep
from registry.models import (
    CodePackage,
    CodePackageVersion,
    Dataset,
    DatasetVersion,
    ModelAlias,
    ModelVersion,
    PendingUpload,
    RegisteredModel,
)
from registry.services import code_package_version_create
from registry.storage import get_storage
from serving import models as serving_models
from serving.models import Deployment, PredictionLog, RetrainPolicy
from serving.services import routes_set
from tenants.actors import Actor
from tenants.api.base import OrganizationScopedAPIView, OrganizationScopedViewSet
from tenants.models import ApiKey, Invitation, Membership, Organization
from tenants.scopes import ROLE_SCOPES, Role
from tenants.seal import sealed_overrides
from tenants.selectors import hash_secret
from tenants.services import api_key_create
from tenants.views.base import OrganizationPageMixin
from tests.billing.stripe_server import StripeServer
from tests.factories import (
    DatasetVersionFactory,
    JobFactory,
    MembershipFactory,
    ModelAliasFactory,
    ModelVersionFactory,
    OrganizationFactory,
    PendingUploadFactory,
)
from tests.serving.replicas import FakeReplica, ready_replica
from webhooks.models import WebhookDelivery, WebhookEndpoint, WebhookEvent, WebhookSecret

API_PREFIX = "api/v1/orgs/<slug:org_slug>/"
PAGE_PREFIX = "o/<slug:org_slug>/"
SKIPPED_METHODS = {"options", "head", "trace"}
SEALED_BASES = {
    "api": (OrganizationScopedViewSet, OrganizationScopedAPIView),
    "page": (OrganizationPageMixin,),
}


@dataclass(frozen=True)
class Route:
    kind: str  # "api" or "page"
    name: str
    view_class: type
    method: str
    action: str
    kwargs: tuple[str, ...]  # URL parameters besides org_slug

    def __str__(self):
        return f"{self.method.upper()} {self.name}"

    @property
    def scope(self):
        return self.view_class.required_scopes.get(self.action)


def _walk(patterns, prefix="", namespace=None):
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            ns = ":".join(filter(None, [namespace, pattern.namespace])) or None
            yield from _walk(pattern.url_patterns, prefix + str(pattern.pattern), ns)
        elif isinstance(pattern, URLPattern):
            name = f"{namespace}:{pattern.name}" if namespace else pattern.name
            yield prefix + str(pattern.pattern), name, pattern.callback


def _kind(path):
    if path.startswith(API_PREFIX):
        return "api"
    return "page" if path.startswith(PAGE_PREFIX) else None


def _routes():
    routes = []
    for path, name, callback in _walk(get_resolver().url_patterns):
        kind = _kind(path)
        if kind is None:
            continue
        view_class = getattr(callback, "cls", None) or callback.view_class
        kwargs = tuple(
            k for k in re.findall(r"<(?:\w+:)?(\w+)>|\(\?P<(\w+)>", path) for k in k if k
        )
        kwargs = tuple(k for k in kwargs if k != "org_slug")
        if getattr(callback, "actions", None):
            method_actions = dict(callback.actions)
        elif kind == "api":
            method_actions = {
                m: m
                for m in view_class.http_method_names
                if m not in SKIPPED_METHODS and hasattr(view_class, m)
            }
        else:
            method_actions = {m: m for m in getattr(view_class, "required_scopes", {})}
        routes += [
            Route(kind, name, view_class, method, action, kwargs)
            for method, action in method_actions.items()
            if method not in SKIPPED_METHODS and method in view_class.http_method_names
        ]
    return routes


ROUTES = _routes()
# Pages take sessions only; the API takes sessions and keys.
ROUTES_VIA = [
    (route, via)
    for route in ROUTES
    for via in ("session", "key")
    if route.kind == "api" or via == "session"
]


# Object makers: (organization, requesting user) -> the URL kwargs of the routes about that kind
# of object, plus whatever else the calls below need to reach it (keys starting with "_").


def _make_membership(organization, requester):
    return {"pk": MembershipFactory(organization=organization, role=Role.DEVELOPER).pk}


def _make_invitation(organization, requester):
    invitation = Invitation.objects.create(
        organization=organization,
        email=f"{secrets.token_hex(4)}@invited.test",
        role=Role.VIEWER,
        token_hash=hash_secret(secrets.token_hex(16)),
        expires_at=timezone.now() + timedelta(days=7),
    )
    return {"pk": invitation.pk}


def _make_api_key(organization, requester):
    creator = requester or MembershipFactory(organization=organization).user
    key = ApiKey.objects.create(
        organization=organization,
        name="swept",
        prefix="fsk" + secrets.token_hex(4),
        secret_hash=hash_secret(secrets.token_hex(16)),
        scopes=["org:read"],
        created_by=creator,
    )
    return {"pk": key.pk}


def _make_dataset_version(organization, requester):
    version = DatasetVersionFactory(organization=organization)
    upload = PendingUploadFactory(
        organization=organization, dataset=version.dataset, size_bytes=len(CSV_BYTES)
    )
    name = version.dataset.name
    return {
        "name": name,
        "dataset_name": name,
        "number": version.number,
        "pk": upload.pk,
        "_upload_key": upload.storage_key,
    }


def _make_model_version(organization, requester):
    alias = ModelAliasFactory(organization=organization)
    name = alias.registered_model.name
    return {
        "name": name,
        "model_name": name,
        "number": alias.version.number,
        "alias": alias.name,
        "_model": alias.registered_model,
    }


def _code_zip(name: str) -> bytes:
    manifest = (
        f'[package]\nname = "{name}"\n[entry]\ntrain = "pkg.main:run"\n'
        '[runtime]\nname = "torch-2.13-py311"\n[outputs]\nmodel = true\n'
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("factory.toml", manifest)
        archive.writestr("pkg/main.py", "def run(ctx):\n    pass\n")
    return buffer.getvalue()


def _make_code_package_version(organization, requester):
    from pathlib import Path

    from tenants.actors import Actor

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "made.zip"
        path.write_bytes(_code_zip(f"made-{secrets.token_hex(3)}"))
        version = code_package_version_create(
            organization=organization, path=path, filename="made.zip", actor=Actor()
        )
    name = version.package.name
    return {"name": name, "package_name": name, "number": version.number}


def _make_job(organization, requester):
    return {"pk": JobFactory(organization=organization).pk}


def _make_sweep(organization, requester):
    sweep = Sweep.objects.create(
        organization=organization,
        name="swept",
        recipe="tabular-classifier",
        space={"epochs": {"values": [1, 2]}},
        trial_count=2,
        metric="val_accuracy",
    )
    return {"pk": sweep.pk}


def _make_invoice(organization, requester):
    start = timezone.now().replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    invoice = Invoice.objects.create(
        organization=organization,
        number=f"SWEPT-{secrets.token_hex(4)}",
        source=Invoice.Source.BUILTIN,
        status=Invoice.Status.OPEN,
        period_start=start,
        period_end=start + timedelta(days=28),
        subtotal_minor=100,
        total_minor=100,
    )
    invoice.lines.create(
        description="Storage", resource="storage", unit="gb_month", amount_minor=100
    )
    return {"pk": invoice.pk}


def _make_deployment(organization, requester):
    from tenants.actors import Actor

    deployment = Deployment.objects.create(
        organization=organization,
        name=f"swept-{secrets.token_hex(3)}",
        recipe="tabular-classifier",
        resource_class=ResourceClass.objects.get(name="cpu"),
    )
    version = ModelVersionFactory(organization=organization, recipe_name="tabular-classifier")
    routes_set(
        deployment=deployment, routes=[{"model_version": version, "weight": 100}], actor=Actor()
    )
    return {"name": deployment.name, "_deployment": deployment, "_version": version}


def _make_retrain(organization, requester):
    """A retrain whose challenger passed the gate and awaits a person's approval."""
    made = _make_deployment(organization, requester)
    deployment, champion = made["_deployment"], made["_version"]
    RetrainPolicy.objects.create(
        organization=organization, deployment=deployment, auto_promote=False
    )
    challenger = ModelVersionFactory(
        organization=organization,
        registered_model=champion.registered_model,
        recipe_name="tabular-classifier",
    )
    retrain = serving_models.Retrain.objects.create(
        organization=organization,
        deployment=deployment,
        state=serving_models.Retrain.State.AWAITING_APPROVAL,
        trigger={"trigger": "drift"},
        job=JobFactory(organization=organization),
        evaluation_job=JobFactory(organization=organization),
        champion=champion,
        challenger=challenger,
    )
    serving_models.ModelCard.objects.create(
        organization=organization,
        model_version=challenger,
        retrain=retrain,
        champion=champion,
        decision=serving_models.ModelCard.Decision.PASSED,
        reasons=["swept: better"],
    )
    return made | {"pk": retrain.pk, "_retrain": retrain}


# A public address written as an IP, so creating an endpoint needs no DNS here.
WEBHOOK_URL = "https://93.184.215.14/hook"


def _make_webhook_endpoint(organization, requester):
    endpoint = WebhookEndpoint.objects.create(
        organization=organization, url=WEBHOOK_URL, event_types=["job.succeeded"]
    )
    WebhookSecret.objects.create(
        organization=organization, endpoint=endpoint, salt=secrets.token_hex(32)
    )
    return {"pk": endpoint.pk, "_endpoint": endpoint}


def _make_webhook_delivery(organization, requester):
    """A delivery that failed for good, so it can be resent."""
    endpoint = _make_webhook_endpoint(organization, requester)["_endpoint"]
    event = WebhookEvent.objects.create(
        organization=organization,
        type="job.succeeded",
        payload={"type": "job.succeeded", "timestamp": "2026-01-01T00:00:00Z", "data": {}},
    )
    delivery = WebhookDelivery.objects.create(
        organization=organization,
        endpoint=endpoint,
        event=event,
        message_id=f"msg_{secrets.token_hex(16)}",
        state=WebhookDelivery.State.FAILED,
        attempts=1,
    )
    return {"pk": delivery.pk, "_delivery": delivery}


# One maker per kind of object a route is about (the view's `model`).
OBJECT_MAKERS = {
    Membership: _make_membership,
    Invitation: _make_invitation,
    ApiKey: _make_api_key,
    Dataset: _make_dataset_version,
    DatasetVersion: _make_dataset_version,
    PendingUpload: _make_dataset_version,
    RegisteredModel: _make_model_version,
    ModelVersion: _make_model_version,
    ModelAlias: _make_model_version,
    CodePackage: _make_code_package_version,
    CodePackageVersion: _make_code_package_version,
    Job: _make_job,
    Sweep: _make_sweep,
    Invoice: _make_invoice,
    Deployment: _make_deployment,
    serving_models.Retrain: _make_retrain,
    WebhookEndpoint: _make_webhook_endpoint,
    WebhookDelivery: _make_webhook_delivery,
}


# What each route is sent, and what proves it ran.


@dataclass
class Case:
    """One swept request's world: its organization, the requester, the objects the URL names."""

    org: Organization
    user: object
    made: dict
    stripe: object = None  # the fake Stripe's state, for calls that reach Stripe
    servers: list = None  # servers a call's prepare started, stopped by the `world` fixture


@dataclass(frozen=True)
class Call:
    """The valid request a permitted role sends to one route, and what proves it ran.

    `status` is the route's success code. `wrote` tells whether the route's write happened: it
    must be false before the call, true after a permitted one and still false after a refused
    one. A route that changes something states `wrote`; one whose unsafe method changes nothing
    says why in `writes_nothing`. `stripe` runs the call against the fake Stripe API.
    """

    status: int
    body: Callable[[Case], dict] | None = None
    query: Callable[[Case], dict] | None = None
    prepare: Callable[[Case], None] | None = None
    wrote: Callable[[Case], bool] | None = None
    writes_nothing: str = ""
    multipart: bool = False
    stripe: bool = False


def _renamed(case):
    return Organization.objects.filter(pk=case.org.pk, name="Renamed by the sweep").exists()


def _member_is_viewer(case):
    return Membership.objects.filter(pk=case.made["pk"], role=Role.VIEWER).exists()


def _member_gone(case):
    return not Membership.objects.filter(pk=case.made["pk"]).exists()


def _invited(case):
    return Invitation.objects.filter(organization=case.org, email="invitee@sweep.test").exists()


def _invitation_revoked(case):
    return Invitation.objects.filter(pk=case.made["pk"], revoked_at__isnull=False).exists()


def _key_made(case):
    return ApiKey.objects.filter(organization=case.org, name="made-by-the-sweep").exists()


def _key_revoked(case):
    return ApiKey.objects.filter(pk=case.made["pk"], revoked_at__isnull=False).exists()


def _dataset_made(case):
    return Dataset.objects.filter(organization=case.org, name="swept-new").exists()


def _dataset_described(case):
    return Dataset.objects.filter(
        organization=case.org, name=case.made["name"], description="swept"
    ).exists()


def _dataset_gone(case):
    return not Dataset.objects.filter(organization=case.org, name=case.made["name"]).exists()


CSV_BYTES = b"x,y\n1,0\n2,1\n3,0\n4,1\n"


def _csv_file():
    return SimpleUploadedFile("swept.csv", CSV_BYTES, content_type="text/csv")


def _version_uploaded(case):
    return DatasetVersion.objects.filter(
        organization=case.org, dataset__name=case.made["name"], original_filename="swept.csv"
    ).exists()


def _upload_started(case):
    return PendingUpload.objects.filter(
        organization=case.org, original_filename="swept.csv"
    ).exists()


def _put_upload_bytes(case):
    get_storage().save(case.made["_upload_key"], _csv_file())


def _upload_finalized(case):
    return DatasetVersion.objects.filter(
        organization=case.org, dataset__name=case.made["name"], original_filename="big.csv"
    ).exists()


def _upload_in_parts(case):
    """The case's upload turned into one in parts: one part, open in storage."""
    upload = PendingUpload.objects.get(pk=case.made["pk"])
    upload.part_size_bytes = upload.size_bytes
    upload.multipart_upload_id = get_storage().multipart_start(upload.storage_key)
    upload.save(update_fields=["part_size_bytes", "multipart_upload_id"])


def _upload_cancelled(case):
    return not PendingUpload.objects.filter(pk=case.made["pk"]).exists()


def _code_uploaded(case):
    return CodePackageVersion.objects.filter(
        organization=case.org, package__name="swept-code", original_filename="swept.zip"
    ).exists()


def _code_file():
    return SimpleUploadedFile("swept.zip", _code_zip("swept-code"))


def _model_made(case):
    return RegisteredModel.objects.filter(organization=case.org, name="swept-model").exists()


def _model_described(case):
    return RegisteredModel.objects.filter(
        organization=case.org, name=case.made["name"], description="swept"
    ).exists()


# A classifier small enough to write by hand: one number in, two classes out, no hidden layer.
TABULAR_CONFIG = {
    "recipe": "tabular-classifier",
    "recipe_version": "1",
    "architecture": {
        "numeric_features": 1,
        "embedding_sizes": [],
        "embedding_dim": 4,
        "hidden_sizes": [],
        "classes": 2,
    },
    "target": "y",
    "target_dtype": "int64",
    "classes": [0, 1],
    "columns": [{"name": "x", "dtype": "int64", "encoding": "standardize", "mean": 0, "std": 1}],
}


def _weights_bytes():
    weights = {
        "mlp.0.weight": np.array([[1.0], [-1.0]], dtype=np.float32),
        "mlp.0.bias": np.zeros(2, dtype=np.float32),
    }
    return save_safetensors(weights)


def _weights_file():
    return SimpleUploadedFile("model.safetensors", _weights_bytes())


def _version_registered(case):
    return ModelVersion.objects.filter(
        organization=case.org, registered_model__name=case.made["name"], recipe_name="x-swept"
    ).exists()


def _second_version(case):
    case.made["_v2"] = ModelVersionFactory(
        organization=case.org, registered_model=case.made["_model"], recipe_name="x-swept"
    )


def _edge_bundle_stored(case):
    from pathlib import Path

    from registry.services import edge_bundle_register
    from tenants.actors import Actor

    # The model's own organization: another one's, where the sweep asks across tenants.
    version = ModelVersion.objects.get(
        registered_model=case.made["_model"], number=case.made["number"]
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "edge.zip"
        with zipfile.ZipFile(path, "w") as bundle:
            for name in ("model.onnx", "preprocessing.json", "run.py", "README.md"):
                bundle.writestr(name, "swept")
        edge_bundle_register(model_version=version, path=path, self_check={}, actor=Actor())


def _version_made_by_a_recipe(case):
    ModelVersion.objects.filter(
        registered_model=case.made["_model"], number=case.made["number"]
    ).update(recipe_name="tabular-classifier")


def _export_queued(case):
    return Job.objects.filter(
        organization=case.org,
        kind=Job.Kind.EXPORT,
        input_model_version__registered_model=case.made["_model"],
    ).exists()


def _alias_moved(case):
    return ModelAlias.objects.filter(
        organization=case.org, name=case.made["alias"], version=case.made.get("_v2")
    ).exists()


def _alias_gone(case):
    return not ModelAlias.objects.filter(organization=case.org, name=case.made["alias"]).exists()


def _alias_set(case):
    return ModelAlias.objects.filter(organization=case.org, name="swept-alias").exists()


def _dataset_ref(case):
    version = case.made.setdefault("_input", DatasetVersionFactory(organization=case.org))
    return {"dataset": version.dataset.name, "number": version.number}


def _job_submitted(case):
    return Job.objects.filter(organization=case.org, labels__swept="yes").exists()


def _code_job_submitted(case):
    return Job.objects.filter(
        organization=case.org, code_package_version__package__name=case.made["name"]
    ).exists()


def _job_cancelled(case):
    return Job.objects.filter(
        pk=case.made["pk"], state__in=[JobState.CANCELLING, JobState.CANCELLED]
    ).exists()


def _job_failed(case):
    Job.objects.filter(pk=case.made["pk"]).update(state=JobState.FAILED)


def _job_retried(case):
    return Job.objects.filter(organization=case.org, retry_of_id=case.made["pk"]).exists()


def _sweep_made(case):
    return Sweep.objects.filter(organization=case.org, name="swept-new").exists()


def _sweep_cancelled(case):
    return Sweep.objects.filter(pk=case.made["pk"], state=Sweep.State.CANCELLED).exists()


def _budget_set(case):
    return BillingAccount.objects.filter(organization=case.org, monthly_budget_minor=12345).exists()


def _servable_in_org(case):
    case.made["_routable"] = ModelVersionFactory(
        organization=case.org, recipe_name="tabular-classifier"
    )


def _deployment_made_by_page(case):
    return Deployment.objects.filter(organization=case.org, name="swept-page").exists()


def _routed_by_page(case):
    return serving_models.Route.objects.filter(
        deployment=case.made["_deployment"], model_version=case.made["_routable"], weight=100
    ).exists()


def _retrain_in(state):
    def check(case):
        return serving_models.Retrain.objects.filter(
            pk=case.made["_retrain"].pk, state=state
        ).exists()

    return check


_approved = _retrain_in(serving_models.Retrain.State.CANARY)
_rejected = _retrain_in(serving_models.Retrain.State.REJECTED)


def _retrain_policy_set(case):
    return RetrainPolicy.objects.filter(
        deployment=case.made["_deployment"], canary_percent=15
    ).exists()


def _stripe_session(path):
    def opened(case):
        return ("POST", path) in case.stripe.requests

    return opened


def _page_job_form(case):
    version = case.made.setdefault("_input", DatasetVersionFactory(organization=case.org))
    return {
        "dataset_version": version.pk,
        "resource_class": "cpu",
        "gpu_count": 1,
        "priority": 0,
        "max_runtime_s": 3600,
        "labels": "swept=yes",
        "param_target": "x",
    }


def _page_predict_form(case):
    model_version = ModelVersionFactory(organization=case.org, recipe_name="tabular-classifier")
    rows = DatasetVersionFactory(organization=case.org)
    return {
        "model_version": model_version.pk,
        "dataset_version": rows.pk,
        "resource_class": "cpu",
        "output_dataset": "swept-predictions",
    }


def _predicted_by_job(case):
    return Job.objects.filter(
        organization=case.org, kind=Job.Kind.INFER, output_dataset_name="swept-predictions"
    ).exists()


def _deployment_made(case):
    return Deployment.objects.filter(organization=case.org, name="swept-deployment").exists()


def _deployment_resized(case):
    return Deployment.objects.filter(pk=case.made["_deployment"].pk, max_replicas=3).exists()


def _deployment_gone(case):
    return not Deployment.objects.filter(pk=case.made["_deployment"].pk).exists()


def _new_route_version(case):
    case.made["_v2"] = ModelVersionFactory(organization=case.org, recipe_name="tabular-classifier")


def _rerouted(case):
    return serving_models.Route.objects.filter(
        deployment=case.made["_deployment"], model_version=case.made.get("_v2"), weight=100
    ).exists()


def _replica_answering(case):
    """A ready replica of the deployment's version: a real HTTP server keeping the contract."""
    fake = FakeReplica("swept").start()
    case.servers.append(fake)
    ready_replica(case.made["_deployment"], case.made["_version"], fake)


def _deployment_predicted(case):
    return PredictionLog.objects.filter(deployment=case.made["_deployment"]).exists()


def _prediction_logged(case):
    case.made["_logged"] = PredictionLog.objects.create(
        organization=case.org,
        deployment=case.made["_deployment"],
        model_version=case.made["_version"],
        inputs={"x": 1},
        output={"label": "1"},
        latency_ms=1.0,
    )


def _labelled(case):
    return PredictionLog.objects.filter(pk=case.made["_logged"].pk, label="swept-label").exists()


def _labelled_logged(case):
    _prediction_logged(case)
    PredictionLog.objects.filter(pk=case.made["_logged"].pk).update(label="1")


def _feedback_saved(case):
    return DatasetVersion.objects.filter(
        organization=case.org, dataset__name="swept-feedback"
    ).exists()


def _window():
    now = timezone.now()
    return {
        "dataset": "swept-feedback",
        "since": (now - timedelta(hours=1)).isoformat(),
        "until": (now + timedelta(hours=1)).isoformat(),
    }


def _webhook_made(case):
    return WebhookEndpoint.objects.filter(organization=case.org, description="swept").exists()


def _webhook_changed(case):
    return WebhookEndpoint.objects.filter(pk=case.made["pk"], description="swept").exists()


def _webhook_gone(case):
    return not WebhookEndpoint.objects.filter(pk=case.made["pk"]).exists()


def _webhook_rotated(case):
    return WebhookSecret.objects.filter(
        endpoint_id=case.made["pk"], expires_at__isnull=False
    ).exists()


def _webhook_test_sent(case):
    return WebhookDelivery.objects.filter(
        endpoint_id=case.made["pk"], event__type="webhook.test"
    ).exists()


def _webhook_resent(case):
    return WebhookDelivery.objects.filter(
        pk=case.made["pk"], state=WebhookDelivery.State.PENDING
    ).exists()


def _webhook_form(case):
    return {"url": WEBHOOK_URL, "description": "swept", "event_types": ["job.failed"]}


OK = Call(200)
NEW_KEY = {"name": "made-by-the-sweep", "scopes": ["org:read"]}
SWEEP_BODY = {
    "name": "swept-new",
    "recipe": "tabular-classifier",
    "parameters": {"target": "x"},
    "space": {"epochs": {"values": [1, 2]}},
    "strategy": "grid",
    "trial_count": 2,
    "metric": "val_accuracy",
}

CALLS: dict[str, Call] = {
    # API: the organization, members, invitations, keys, audit
    "GET organization-detail": OK,
    "PATCH organization-detail": Call(
        200, body=lambda c: {"name": "Renamed by the sweep"}, wrote=_renamed
    ),
    "GET member-list": OK,
    "GET member-detail": OK,
    "PATCH member-detail": Call(200, body=lambda c: {"role": "viewer"}, wrote=_member_is_viewer),
    "DELETE member-detail": Call(204, wrote=_member_gone),
    "GET invitation-list": OK,
    "GET invitation-detail": OK,
    "POST invitation-list": Call(
        201, body=lambda c: {"email": "invitee@sweep.test", "role": "viewer"}, wrote=_invited
    ),
    "DELETE invitation-detail": Call(204, wrote=_invitation_revoked),
    "GET api-key-list": OK,
    "GET api-key-detail": OK,
    "POST api-key-list": Call(201, body=lambda c: NEW_KEY, wrote=_key_made),
    "DELETE api-key-detail": Call(204, wrote=_key_revoked),
    "GET audit-event-list": OK,
    # API: datasets
    "GET dataset-list": OK,
    "POST dataset-list": Call(201, body=lambda c: {"name": "swept-new"}, wrote=_dataset_made),
    "GET dataset-detail": OK,
    "PATCH dataset-detail": Call(
        200, body=lambda c: {"description": "swept"}, wrote=_dataset_described
    ),
    "DELETE dataset-detail": Call(204, wrote=_dataset_gone),
    "GET dataset-version-list": OK,
    "POST dataset-version-list": Call(
        201, body=lambda c: {"file": _csv_file()}, multipart=True, wrote=_version_uploaded
    ),
    "GET dataset-version-detail": OK,
    "GET dataset-version-download": OK,
    "GET dataset-version-lineage": OK,
    "POST dataset-upload-list": Call(
        201, body=lambda c: {"filename": "swept.csv", "size_bytes": 20}, wrote=_upload_started
    ),
    "POST dataset-upload-finalize": Call(201, prepare=_put_upload_bytes, wrote=_upload_finalized),
    "DELETE dataset-upload-detail": Call(204, wrote=_upload_cancelled),
    "GET dataset-upload-parts": Call(200, prepare=_upload_in_parts),
    "POST dataset-upload-parts": Call(
        200,
        prepare=_upload_in_parts,
        body=lambda c: {"numbers": [1]},
        writes_nothing="signs part URLs; the bytes go to storage, and finalize records them",
    ),
    # API: code packages
    "GET code-package-list": OK,
    "POST code-package-list": Call(
        201, body=lambda c: {"file": _code_file()}, multipart=True, wrote=_code_uploaded
    ),
    "GET code-package-detail": OK,
    "GET code-package-version-list": OK,
    "GET code-package-version-detail": OK,
    "GET code-package-version-download": OK,
    # API: models
    "GET model-list": OK,
    "POST model-list": Call(201, body=lambda c: {"name": "swept-model"}, wrote=_model_made),
    "GET model-detail": OK,
    "PATCH model-detail": Call(
        200, body=lambda c: {"description": "swept"}, wrote=_model_described
    ),
    "GET model-compare": Call(200, query=lambda c: {"versions": str(c.made["number"])}),
    "GET model-version-list": OK,
    "POST model-version-list": Call(
        201,
        body=lambda c: {
            "weights": _weights_file(),
            "config": json.dumps(TABULAR_CONFIG),
            "recipe_name": "x-swept",
        },
        multipart=True,
        wrote=_version_registered,
    ),
    "GET model-version-detail": OK,
    "GET model-version-download": OK,
    "GET model-version-lineage": OK,
    "GET model-version-edge-bundle": Call(200, prepare=_edge_bundle_stored),
    "GET model-alias-list": OK,
    "GET model-alias-detail": OK,
    "PUT model-alias-detail": Call(
        200,
        prepare=_second_version,
        body=lambda c: {"version": c.made["_v2"].number},
        wrote=_alias_moved,
    ),
    "DELETE model-alias-detail": Call(204, wrote=_alias_gone),
    "POST model-predict": Call(
        410, writes_nothing="Gone: it only says that deployments answer predictions now."
    ),
    # API: jobs and sweeps
    "GET job-list": OK,
    "POST job-list": Call(
        201,
        body=lambda c: {
            "recipe": "tabular-classifier",
            "parameters": {"target": "x"},
            "dataset": _dataset_ref(c),
            "labels": {"swept": "yes"},
        },
        wrote=_job_submitted,
    ),
    "POST job-estimate": Call(
        200,
        body=lambda c: {"resource_class": "cpu", "gpu_count": 1, "max_runtime_s": 3600},
        writes_nothing="an estimate only reads prices",
    ),
    "GET job-detail": OK,
    "POST job-cancel": Call(200, wrote=_job_cancelled),
    "GET job-events": OK,
    "GET job-logs": OK,
    "GET job-metrics": OK,
    "GET job-utilization": OK,
    "POST job-retry": Call(201, prepare=_job_failed, wrote=_job_retried),
    "GET sweep-list": OK,
    "POST sweep-list": Call(
        201, body=lambda c: SWEEP_BODY | {"dataset": _dataset_ref(c)}, wrote=_sweep_made
    ),
    "GET sweep-detail": OK,
    "POST sweep-cancel": Call(200, wrote=_sweep_cancelled),
    # API: deployments
    "GET deployment-list": OK,
    "POST deployment-list": Call(
        201,
        body=lambda c: {"name": "swept-deployment", "recipe": "tabular-classifier"},
        wrote=_deployment_made,
    ),
    "GET deployment-detail": OK,
    "PATCH deployment-detail": Call(
        200, body=lambda c: {"max_replicas": 3}, wrote=_deployment_resized
    ),
    "DELETE deployment-detail": Call(204, wrote=_deployment_gone),
    "PUT deployment-routes": Call(
        200,
        prepare=_new_route_version,
        body=lambda c: {"routes": [{"model_version": c.made["_v2"].pk, "weight": 100}]},
        wrote=_rerouted,
    ),
    "GET deployment-replicas": OK,
    "GET deployment-timeline": OK,
    "GET deployment-retrains": OK,
    "GET retrain-detail": OK,
    "POST retrain-approve": Call(200, wrote=_approved),
    "POST retrain-reject": Call(200, body=lambda c: {"reason": "swept"}, wrote=_rejected),
    "GET deployment-stats": OK,
    "POST deployment-predict": Call(
        200,
        prepare=_replica_answering,
        body=lambda c: {"inputs": [{"x": 1}]},
        wrote=_deployment_predicted,
    ),
    "POST deployment-feedback": Call(
        200,
        prepare=_prediction_logged,
        body=lambda c: {
            "items": [
                {"prediction_id": str(c.made["_logged"].prediction_id), "label": "swept-label"}
            ]
        },
        wrote=_labelled,
    ),
    "POST deployment-datasets": Call(
        201, prepare=_labelled_logged, body=lambda c: _window(), wrote=_feedback_saved
    ),
    # API: billing
    "GET credit-grant-list": OK,
    "GET invoice-list": OK,
    "GET invoice-detail": OK,
    "GET invoice-pdf": OK,
    "GET billing-account": OK,
    "PATCH billing-account": Call(
        200, body=lambda c: {"monthly_budget_minor": 12345}, wrote=_budget_set
    ),
    "GET billing-usage": OK,
    "GET billing-usage-export": OK,
    "POST billing-checkout": Call(200, stripe=True, wrote=_stripe_session("/v1/checkout/sessions")),
    "POST billing-portal": Call(
        200, stripe=True, wrote=_stripe_session("/v1/billing_portal/sessions")
    ),
    # API: webhooks
    "GET webhook-list": OK,
    "POST webhook-list": Call(201, body=_webhook_form, wrote=_webhook_made),
    "GET webhook-detail": OK,
    "PATCH webhook-detail": Call(
        200, body=lambda c: {"description": "swept"}, wrote=_webhook_changed
    ),
    "DELETE webhook-detail": Call(204, wrote=_webhook_gone),
    "POST webhook-rotate": Call(200, wrote=_webhook_rotated),
    "POST webhook-test": Call(202, wrote=_webhook_test_sent),
    "GET webhook-deliveries": OK,
    "GET webhook-delivery-detail": OK,
    "POST webhook-delivery-resend": Call(202, wrote=_webhook_resent),
    # Pages: a form that went through redirects (302); one that did not is re-rendered (400).
    "GET tenants:overview": OK,
    "GET tenants:settings": OK,
    "POST tenants:settings": Call(
        302, body=lambda c: {"name": "Renamed by the sweep"}, wrote=_renamed
    ),
    "GET tenants:members": OK,
    "POST tenants:members": Call(
        302, body=lambda c: {"email": "invitee@sweep.test", "role": "viewer"}, wrote=_invited
    ),
    "POST tenants:member_role": Call(
        302, body=lambda c: {"role": "viewer"}, wrote=_member_is_viewer
    ),
    "POST tenants:member_remove": Call(302, wrote=_member_gone),
    "POST tenants:invitation_revoke": Call(302, wrote=_invitation_revoked),
    "GET tenants:api_keys": OK,
    "POST tenants:api_keys": Call(201, body=lambda c: NEW_KEY, wrote=_key_made),
    "POST tenants:api_key_revoke": Call(302, wrote=_key_revoked),
    "GET tenants:audit": OK,
    "GET registry:datasets": OK,
    "POST registry:datasets": Call(302, body=lambda c: {"name": "swept-new"}, wrote=_dataset_made),
    "GET registry:dataset": OK,
    "GET registry:dataset_version": OK,
    "GET registry:dataset_version_download": Call(302),  # to the object's signed URL
    "GET registry:code_packages": OK,
    "POST registry:code_packages": Call(
        302, body=lambda c: {"file": _code_file()}, wrote=_code_uploaded
    ),
    "GET registry:code_package": OK,
    "GET registry:code_package_version": OK,
    "GET registry:models": OK,
    "POST registry:models": Call(302, body=lambda c: {"name": "swept-model"}, wrote=_model_made),
    "GET registry:model": OK,
    "POST registry:model": Call(
        302,
        body=lambda c: {"alias": "swept-alias", "version": str(c.made["number"])},
        wrote=_alias_set,
    ),
    "GET registry:model_version": OK,
    "GET jobs:jobs": OK,
    "GET jobs:job_submit": OK,
    "POST jobs:job_submit": Call(
        302,
        query=lambda c: {"recipe": "tabular-classifier"},
        body=_page_job_form,
        wrote=_job_submitted,
    ),
    "GET jobs:job_predict": OK,
    "GET jobs:code_run": OK,
    "POST jobs:code_run": Call(
        302,
        body=lambda c: {"resource_class": "cpu", "max_runtime_s": 600},
        wrote=_code_job_submitted,
    ),
    "POST jobs:job_predict": Call(302, body=_page_predict_form, wrote=_predicted_by_job),
    "GET jobs:job": OK,
    "POST jobs:job_cancel": Call(302, wrote=_job_cancelled),
    "POST jobs:job_retry": Call(302, prepare=_job_failed, wrote=_job_retried),
    "POST jobs:model_version_export": Call(
        302, prepare=_version_made_by_a_recipe, wrote=_export_queued
    ),
    "GET jobs:sweeps": OK,
    "GET jobs:sweep": OK,
    "POST jobs:sweep_cancel": Call(302, wrote=_sweep_cancelled),
    "GET serving:deployments": OK,
    "POST serving:deployments": Call(
        302,
        prepare=_servable_in_org,
        body=lambda c: {
            "name": "swept-page",
            "model_version": str(c.made["_routable"].pk),
            "resource_class": "cpu",
            "min_replicas": "0",
            "max_replicas": "1",
        },
        wrote=_deployment_made_by_page,
    ),
    "POST serving:deployment_routes": Call(
        302,
        prepare=_servable_in_org,
        body=lambda c: {
            "version_0": str(c.made["_routable"].pk),
            "weight_0": "100",
            "mode_0": "live",
            "stage_0": "stable",
        },
        wrote=_routed_by_page,
    ),
    "GET serving:deployment": OK,
    "POST serving:deployment": Call(
        302,
        body=lambda c: {
            "enabled": "on",
            "on_drift": "on",
            "cooldown_s": "3600",
            "max_cost_minor": "500",
            "gate_margin": "0",
            "slice_tolerance": "0.05",
            "canary_percent": "15",
            "bake_s": "600",
            "bake_extensions": "3",
            "rollback_error_rate": "0.02",
            "rollback_p99_ratio": "1.5",
            "rollback_metric_drop": "0.02",
        },
        wrote=_retrain_policy_set,
    ),
    "GET serving:retrain": OK,
    "POST serving:retrain_approve": Call(302, wrote=_approved),
    "POST serving:retrain_reject": Call(302, body=lambda c: {"reason": "swept"}, wrote=_rejected),
    "GET billing:billing": OK,
    "POST billing:billing": Call(
        302,
        body=lambda c: {"monthly_budget": "123.45", "budget_thresholds": "50, 80"},
        wrote=_budget_set,
    ),
    "GET billing:usage": OK,
    "GET billing:usage_csv": OK,
    "GET billing:invoice": OK,
    "GET billing:invoice_pdf": OK,
    "POST billing:checkout": Call(302, stripe=True, wrote=_stripe_session("/v1/checkout/sessions")),
    "POST billing:portal": Call(
        302, stripe=True, wrote=_stripe_session("/v1/billing_portal/sessions")
    ),
    "GET webhooks:endpoints": OK,
    "POST webhooks:endpoints": Call(201, body=_webhook_form, wrote=_webhook_made),
    "GET webhooks:endpoint": OK,
    "POST webhooks:endpoint": Call(
        302, body=lambda c: _webhook_form(c) | {"enabled": "on"}, wrote=_webhook_changed
    ),
    "POST webhooks:endpoint_rotate": Call(200, wrote=_webhook_rotated),
    "POST webhooks:endpoint_test": Call(302, wrote=_webhook_test_sent),
    "POST webhooks:endpoint_delete": Call(302, wrote=_webhook_gone),
    "GET webhooks:delivery": OK,
    "POST webhooks:delivery_resend": Call(302, wrote=_webhook_resent),
}


@pytest.fixture
def world(tmp_path, settings):
    """Builds a route's case and URL: local storage under tmp_path, the fake Stripe on demand."""
    servers = []

    def build(route, organization, requester=None, object_org=None):
        made = {}
        if route.kwargs:
            made = OBJECT_MAKERS[route.view_class.model](object_org or organization, requester)
        case = Case(organization, requester, made, servers=servers)
        call = CALLS[str(route)]
        if call.stripe:
            server = StripeServer().start()
            servers.append(server)
            settings.STRIPE_SECRET_KEY = server.fake.api_key
            settings.STRIPE_API_BASE = server.url
            settings.STRIPE_TIMEOUT_S = 2.0
            case.stripe = server.fake
        if call.prepare:
            call.prepare(case)
        kwargs = {"org_slug": organization.slug} | {k: made[k] for k in route.kwargs}
        return case, reverse(route.name, kwargs=kwargs)

    with override_settings(STORAGE_BACKEND="local", STORAGE_LOCAL_ROOT=str(tmp_path / "store")):
        yield build
    for server in servers:
        server.stop()


def _send(client, route, url, case):
    call = CALLS[str(route)]
    if call.query:
        url = f"{url}?{urlencode(call.query(case))}"
    send = getattr(client, route.method)
    if route.method == "get":
        return send(url)
    body = call.body(case) if call.body else {}
    if route.kind == "page":
        return send(url, body, format="multipart")
    return send(url, body, format="multipart" if call.multipart else "json")


# Who sends the swept requests. The organizations, members and credentials the tests sign in with
# are seeded once for the module (`seeded`); each test runs in a savepoint inside it.


def _session_for(user):
    """A session signed in as `user` by force_login; each test's client presents its cookie."""
    client = APIClient()
    client.force_login(user)
    return "session", client.cookies[settings.SESSION_COOKIE_NAME].value


def _key_for(user, organization, scopes):
    _key, token = api_key_create(
        organization=organization, name="sweep", scopes=sorted(scopes), actor=Actor(user=user)
    )
    return "key", token


def _signed_in(user, organization, via, scopes):
    return _session_for(user) if via == "session" else _key_for(user, organization, scopes)


def _client(credential):
    """A new API client presenting `credential` (a session's cookie or a key), or nothing."""
    client = APIClient()
    if credential is not None:
        kind, secret = credential
        if kind == "session":
            client.cookies[settings.SESSION_COOKIE_NAME] = secret
        else:
            client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def _row(instance):
    names = tuple(field.attname for field in instance._meta.concrete_fields)
    return type(instance), names, tuple(getattr(instance, name) for name in names)


def _fresh(row):
    """A new instance of a seeded row, as a query would load it (no query, no cached relations):
    what one test's code caches on an instance never reaches the next test."""
    model, names, values = row
    return model.from_db(DEFAULT_DB_ALIAS, names, copy.deepcopy(values))


@dataclass(frozen=True)
class Seat:
    """One seeded world, as rows: its organizations (the first is the one the requests name),
    the user who signs in and the credential presented."""

    orgs: tuple
    user: tuple | None = None
    credential: tuple | None = None


VIAS = ("session", "key")


def _seed():
    """Each test's world before its objects are made, as each test used to build it for itself:
    one world per (test, role, way in), so no test sees a row another kind would not have."""

    def seat(orgs, user=None, credential=None):
        return Seat(tuple(map(_row, orgs)), user and _row(user), credential)

    seats = {("nobody",): seat([OrganizationFactory()])}
    for via in VIAS:
        org, outsider_org = OrganizationFactory(), OrganizationFactory()
        outsider = MembershipFactory(organization=outsider_org, role=Role.OWNER).user
        credential = _signed_in(outsider, outsider_org, via, ROLE_SCOPES[Role.OWNER])
        seats["outsider", via] = seat([org], outsider, credential)
    org, other = OrganizationFactory(), OrganizationFactory()
    owner = MembershipFactory(organization=org, role=Role.OWNER).user
    seats[("foreign object",)] = seat([org, other], owner, _session_for(owner))
    for role in Role.values:
        for via in VIAS:
            org = OrganizationFactory()
            MembershipFactory(organization=org, role=Role.OWNER)  # never the last owner under test
            user = MembershipFactory(organization=org, role=role).user
            seats["role", role, via] = seat(
                [org], user, _signed_in(user, org, via, ROLE_SCOPES[role])
            )
    for narrow in ("org:read", "members:read"):
        org = OrganizationFactory()
        owner = MembershipFactory(organization=org, role=Role.OWNER).user
        seats["narrow key", narrow] = seat([org], owner, _key_for(owner, org, {narrow}))
    return seats


@pytest.fixture(scope="module")
def seeded(django_db_setup, django_db_blocker):
    """The seats, seeded once for the module in a transaction rolled back at its end.

    As in tests/fuzz/test_api_schema.py, each test's own transaction (pytest-django) nests inside
    as a savepoint that is rolled back, so every test starts from the same seeded rows and none
    sees another's writes; Redis is emptied around each test (tests/conftest.py), and `seat`
    hands out fresh instances and a fresh client. Seeding once saves each test its
    organizations, members and sign-in (force_login, api_key_create): 15 to 25 queries.
    """
    outer = transaction.atomic()
    # A test case's own block, as Django marks those: code that refuses to make a network call
    # inside an open transaction (billing.stripe_gateway) looks past it, as past the test's own.
    outer._from_testcase = True
    with django_db_blocker.unblock():
        outer.__enter__()
        seats = _seed()
    yield seats
    with django_db_blocker.unblock():
        transaction.set_rollback(True)
        outer.__exit__(None, None, None)


@pytest.fixture
def seat(seeded, db):
    """`seat(*key)`: that seeded world's organization(s), user and a client signed in as them."""

    def take(*key):
        seated = seeded[key]
        orgs = [_fresh(row) for row in seated.orgs]
        return SimpleNamespace(
            org=orgs[0],
            other=orgs[1] if len(orgs) > 1 else None,
            user=seated.user and _fresh(seated.user),
            client=_client(seated.credential),
        )

    return take


def test_sweep_finds_the_org_scoped_routes():
    names = {route.name for route in ROUTES}
    assert {"member-list", "api-key-detail", "organization-detail", "tenants:members"} <= names
    assert {"billing-checkout", "model-predict", "jobs:job", "registry:model_version"} <= names


def test_every_route_that_takes_an_organization_is_under_a_swept_prefix():
    stray = [
        f"{name} ({path})"
        for path, name, _callback in _walk(get_resolver().url_patterns)
        if "org_slug" in path and _kind(path) is None
    ]
    assert not stray, (
        f"{stray} take an organization outside {API_PREFIX} and {PAGE_PREFIX}, where this "
        "sweep cannot see them; mount them under one of those prefixes."
    )


@pytest.mark.parametrize("route", ROUTES, ids=str)
def test_route_is_built_on_a_sealed_base_and_declares_its_scope(route):
    bases = SEALED_BASES[route.kind]
    assert issubclass(route.view_class, bases), (
        f"{route} ({route.view_class.__name__}) escapes the tenancy seal: inherit "
        f"{' or '.join(b.__name__ for b in bases)}."
    )
    seal = next(b for b in bases if issubclass(route.view_class, b))
    changed = sealed_overrides(route.view_class, seal, seal._sealed)
    assert not changed, f"{route} ({route.view_class.__name__}) replaced sealed {changed}"
    assert route.scope is not None, (
        f"{route} declares no scope for {route.action!r}: add it to "
        f"{route.view_class.__name__}.required_scopes."
    )
    if route.kwargs:
        assert route.view_class.model in OBJECT_MAKERS, (
            f"{route} names {route.kwargs} in its URL: set {route.view_class.__name__}.model and "
            "add a maker for that model to OBJECT_MAKERS in tests/test_tenancy_sweep.py."
        )


@pytest.mark.parametrize("route", ROUTES, ids=str)
def test_route_has_a_call_that_proves_it_ran(route):
    call = CALLS.get(str(route))
    assert call is not None, (
        f"{route} has no entry in CALLS (tests/test_tenancy_sweep.py): add "
        f'"{route}": Call(<success status>, body=..., wrote=...) with the valid request a '
        "permitted role sends and a check that the action happened."
    )
    if route.method != "get":
        assert call.wrote or call.writes_nothing, (
            f'CALLS["{route}"] must say what the call writes (wrote=) or why it writes nothing '
            "(writes_nothing=)."
        )


def test_calls_name_only_routes_that_exist():
    stale = set(CALLS) - {str(route) for route in ROUTES}
    assert not stale, f"CALLS names routes that no longer exist: {sorted(stale)}"


@pytest.mark.django_db
@pytest.mark.parametrize("route", ROUTES, ids=str)
def test_no_credentials_is_refused(route, world, seat):
    seated = seat("nobody")
    case, url = world(route, seated.org)
    response = _send(seated.client, route, url, case)
    if route.kind == "api":
        assert response.status_code == 401
    else:
        assert response.status_code == 302
        assert response["Location"].startswith(reverse("account_login"))
    if CALLS[str(route)].wrote:
        assert not CALLS[str(route)].wrote(case)


@pytest.mark.django_db
@pytest.mark.parametrize(("route", "via"), ROUTES_VIA, ids=str)
def test_member_of_another_organization_gets_404(route, via, world, seat):
    seated = seat("outsider", via)  # an owner of another organization
    case, url = world(route, seated.org)
    assert _send(seated.client, route, url, case).status_code == 404
    if CALLS[str(route)].wrote:
        assert not CALLS[str(route)].wrote(case)


@pytest.mark.django_db
@pytest.mark.parametrize("route", [r for r in ROUTES if r.kwargs], ids=str)
def test_object_of_another_organization_is_404_through_ones_own_slug(route, world, seat):
    seated = seat("foreign object")  # an owner of `org`; the object is in `other`
    case, url = world(route, seated.org, requester=seated.user, object_org=seated.other)
    assert _send(seated.client, route, url, case).status_code == 404


@pytest.mark.django_db
@pytest.mark.parametrize("role", Role.values)
@pytest.mark.parametrize(("route", "via"), ROUTES_VIA, ids=str)
def test_each_role_is_allowed_or_403_as_the_scope_table_says(route, via, role, world, seat):
    """Allowed: the route's success code, and its write happened. Denied: 403, nothing written."""
    seated = seat("role", role, via)  # `user` has `role`, beside an owner; the key has its scopes
    client = seated.client
    call = CALLS[str(route)]
    case, url = world(route, seated.org, requester=seated.user)
    if call.wrote:
        assert not call.wrote(case), f"{route}: the write check holds before the call"
    response = _send(client, route, url, case)
    key_refused = via == "key" and route.action in getattr(
        route.view_class, "session_only_actions", ()
    )
    if route.scope in ROLE_SCOPES[role] and not key_refused:
        assert response.status_code == call.status, response.content[:500]
        if call.wrote:
            assert call.wrote(case), f"{route} answered {response.status_code} but wrote nothing"
    else:
        assert response.status_code == 403
        if call.wrote:
            assert not call.wrote(case), f"{route} refused {role} but wrote anyway"


@pytest.mark.django_db
@pytest.mark.parametrize("route", [r for r in ROUTES if r.kind == "api"], ids=str)
def test_key_without_the_scope_is_403_even_if_its_creator_has_it(route, world, seat):
    narrow = "org:read" if route.scope != "org:read" else "members:read"
    seated = seat("narrow key", narrow)  # an owner's key with the narrow scope alone
    case, url = world(route, seated.org, requester=seated.user)
    response = _send(seated.client, route, url, case)
    assert response.status_code == 403
