import pytest

from jobs.models import ResourceClass
from jobs.services.pool import worker_register
from tests.factories import DatasetVersionFactory
from tests.jobs.code_helpers import sandboxed_pool  # noqa: F401 (a fixture)


@pytest.fixture
def cpu(db):
    return ResourceClass.objects.get(name="cpu")


@pytest.fixture
def a100(db):
    return ResourceClass.objects.get(name="a100-40gb")


@pytest.fixture
def register_worker(db):
    """A worker row as a GPU machine would register it (no process behind it)."""

    def make(name, gpus=0, model="NVIDIA A100-SXM4-40GB"):
        return worker_register(name=name, devices=[{"name": model, "memory_gb": 40}] * gpus)

    return make


@pytest.fixture
def dataset_version(org):
    return DatasetVersionFactory(organization=org)


@pytest.fixture
def submit(org, owner, dataset_version):
    """Submit a tabular training job as the org's owner; keyword arguments override the
    defaults (the job's own, or its JobOptions': resource_class, gpu_count, priority, ...)."""
    from dataclasses import fields

    from jobs.services import JobOptions, training_job_submit
    from tenants.actors import Actor

    option_names = {f.name for f in fields(JobOptions)}

    def make(organization=None, actor_user=None, dataset=None, **kwargs):
        kwargs.setdefault("recipe", "tabular-classifier")
        kwargs.setdefault("parameters", {"target": "x"})
        kwargs.setdefault("resource_class", ResourceClass.objects.get(name="cpu"))
        options = {name: kwargs.pop(name) for name in option_names & kwargs.keys()}
        job, _created = training_job_submit(
            organization=organization or org,
            actor=Actor(user=actor_user or owner),
            dataset_version=dataset or dataset_version,
            options=JobOptions(**options),
            **kwargs,
        )
        return job

    return make


from tests.registry.conftest import local_store, weights_bytes  # noqa: E402, F401  shared fixtures
