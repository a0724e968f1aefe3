import pytest

from jobs.models import ResourceClass
from serving.models import Deployment
from serving.services import routes_set
from tenants.actors import Actor
from tests.factories import ModelVersionFactory

from .replicas import FakeReplica, ready_replica


@pytest.fixture
def fakes():
    """Start fake replicas by name; all are stopped at the test's end."""
    started = []

    def start(name: str, **kwargs) -> FakeReplica:
        fake = FakeReplica(name, **kwargs).start()
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.stop()


@pytest.fixture
def make_deployment(db):
    def make(organization, *, weights=(100,), shadow=(), recipe="tabular-classifier", **options):
        """A deployment routed live over new versions at `weights`, and shadow versions at the
        `shadow` percents; returns it with its versions (live first)."""
        deployment = Deployment.objects.create(
            organization=organization,
            name=options.pop("name", "churn"),
            recipe=recipe,
            resource_class=ResourceClass.objects.get(name="cpu"),
            **options,
        )
        versions = [
            ModelVersionFactory(organization=organization, recipe_name=recipe)
            for _ in (*weights, *shadow)
        ]
        routes = [
            {"model_version": v.pk, "weight": w, "mode": "live"}
            for v, w in zip(versions, weights, strict=False)
        ] + [
            {"model_version": v.pk, "weight": w, "mode": "shadow"}
            for v, w in zip(versions[len(weights) :], shadow, strict=True)
        ]
        routes_set(deployment=deployment, routes=routes, actor=Actor())
        return deployment, versions

    return make


@pytest.fixture
def serve(fakes):
    """Start a fake replica named `name` and make it a READY replica of `version`."""

    def make(deployment, version, name: str, **kwargs) -> FakeReplica:
        fake = fakes(name, **kwargs)
        ready_replica(deployment, version, fake)
        return fake

    return make
