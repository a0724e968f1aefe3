"""factory_boy factories; related objects always stay in the same organization."""

import uuid
from datetime import timedelta

import factory
from django.contrib.auth.hashers import make_password
from django.db import transaction
from django.utils import timezone

from jobs.models import Job, ResourceClass
from registry.models import (
    Dataset,
    DatasetFormat,
    DatasetVersion,
    ModelAlias,
    ModelVersion,
    PendingUpload,
    RegisteredModel,
)
from registry.services.storage_accounts import storage_charge
from tenants.models import AuditEvent, Membership, Organization, User
from tenants.scopes import Role

TEST_PASSWORD = "correct horse battery staple"


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = User
        skip_postgeneration_save = True

    email = factory.Sequence(lambda n: f"user{n}@example.test")
    # Hashed before the INSERT (`UserFactory(password="x")` hashes "x"), so a user is one write,
    # not an INSERT and then an UPDATE that stores what set_password() set after it.
    password = factory.Transformer(TEST_PASSWORD, transform=make_password)

    @factory.post_generation
    def verified(obj, create, extracted, **kwargs):
        if create:
            from allauth.account.models import EmailAddress

            EmailAddress.objects.create(user=obj, email=obj.email, verified=True, primary=True)


class OrganizationFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Organization

    name = factory.Sequence(lambda n: f"Org {n}")
    slug = factory.Sequence(lambda n: f"org-{n}")


class MembershipFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Membership

    organization = factory.SubFactory(OrganizationFactory)
    user = factory.SubFactory(UserFactory)
    role = Role.DEVELOPER


class AuditEventFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = AuditEvent

    organization = factory.SubFactory(OrganizationFactory)
    actor_label = "someone@example.test"
    action = "test.event"
    created_at = factory.LazyFunction(timezone.now)


class DatasetFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Dataset

    organization = factory.SubFactory(OrganizationFactory)
    name = factory.Sequence(lambda n: f"dataset-{n}")


class DatasetVersionFactory(factory.django.DjangoModelFactory):
    """A version row whose object is not in storage; for tests that never read the bytes."""

    class Meta:
        model = DatasetVersion
        skip_postgeneration_save = True

    organization = factory.SubFactory(OrganizationFactory)
    dataset = factory.SubFactory(
        DatasetFactory, organization=factory.SelfAttribute("..organization")
    )
    number = factory.Sequence(lambda n: n + 1)
    storage_key = factory.LazyAttribute(
        lambda o: f"orgs/{o.organization.pk}/datasets/{uuid.uuid4().hex}/data.csv"
    )
    size_bytes = 10
    sha256 = "0" * 64
    format = DatasetFormat.CSV
    row_count = 2
    schema = factory.LazyFunction(lambda: [{"name": "x", "dtype": "int64", "nullable": False}])

    @factory.post_generation
    def charge_storage(obj, create, extracted, **kwargs):
        """Keep the organization's storage account in step, as the upload service does."""
        if create:
            with transaction.atomic():
                storage_charge(organization=obj.organization, delta_bytes=obj.size_bytes)


class PendingUploadFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = PendingUpload

    organization = factory.SubFactory(OrganizationFactory)
    dataset = factory.SubFactory(
        DatasetFactory, organization=factory.SelfAttribute("..organization")
    )
    storage_key = factory.LazyAttribute(
        lambda o: f"orgs/{o.organization.pk}/uploads/{uuid.uuid4().hex}/big.csv"
    )
    original_filename = "big.csv"
    size_bytes = 100
    expires_at = factory.LazyFunction(lambda: timezone.now() + timedelta(hours=1))


class RegisteredModelFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = RegisteredModel

    organization = factory.SubFactory(OrganizationFactory)
    name = factory.Sequence(lambda n: f"model-{n}")


class ModelVersionFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = ModelVersion

    organization = factory.SubFactory(OrganizationFactory)
    registered_model = factory.SubFactory(
        RegisteredModelFactory, organization=factory.SelfAttribute("..organization")
    )
    number = factory.Sequence(lambda n: n + 1)
    metrics = factory.LazyFunction(lambda: {"accuracy": 0.9})


class ModelAliasFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = ModelAlias

    organization = factory.SubFactory(OrganizationFactory)
    version = factory.SubFactory(
        ModelVersionFactory, organization=factory.SelfAttribute("..organization")
    )
    registered_model = factory.SelfAttribute("version.registered_model")
    name = "production"


class JobFactory(factory.django.DjangoModelFactory):
    """A queued job row, without going through submission (for scheduler and attempt tests)."""

    class Meta:
        model = Job

    organization = factory.SubFactory(OrganizationFactory)
    recipe = "tabular-classifier"
    parameters = factory.LazyFunction(lambda: {"target": "x"})
    input_dataset_version = factory.SubFactory(
        DatasetVersionFactory, organization=factory.SelfAttribute("..organization")
    )
    output_model_name = "model"
    resource_class = factory.LazyFunction(lambda: ResourceClass.objects.get(name="cpu"))
    gpu_count = 1


class PriceFactory(factory.django.DjangoModelFactory):
    """A rate-card row for a resource, in force since long before any test's usage."""

    class Meta:
        model = "billing.Price"

    resource = "gpu:a100-40gb"
    unit = "gpu_second"
    unit_price = "0.0010"
    currency = "usd"
    effective_from = factory.LazyFunction(
        lambda: timezone.now().replace(
            year=2020, month=1, day=1, hour=0, minute=0, second=0, microsecond=0
        )
    )
