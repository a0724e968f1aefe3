"""Create (or refresh) the demo organization, its owner and an operator for `make run`."""

from allauth.account.models import EmailAddress
from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import transaction

from tenants.actors import Actor
from tenants.models import Organization, User
from tenants.services import organization_create

DEMO_ORG = "Demo Lab"


class Command(BaseCommand):
    help = "Seed a demo organization with an owner, and a staff operator; prints how to log in."

    def add_arguments(self, parser):
        parser.add_argument("--password", default="factory-demo-2026")

    @transaction.atomic
    def handle(self, *args, password, **options):
        owner = self._user("owner@demo.local", password)
        operator = self._user("ops@demo.local", password, is_staff=True, is_superuser=True)
        organization = Organization.objects.filter(tenants_membership_set__user=owner).first()
        if organization is None:
            organization = organization_create(name=DEMO_ORG, owner=owner, actor=Actor(user=owner))
        url = settings.SITE_URL.rstrip("/")
        self.stdout.write(
            self.style.SUCCESS(
                f"\n  factory_saas is starting at {url}/\n"
                f"  tenant owner : {owner.email} / {password}  (org {organization.slug!r})\n"
                f"  operator     : {operator.email} / {password}  ({url}/admin/)\n"
            )
        )

    def _user(self, email: str, password: str, **flags) -> User:
        user, _ = User.objects.get_or_create(email=email, defaults=flags)
        user.set_password(password)
        user.save()
        EmailAddress.objects.update_or_create(
            user=user, email=email, defaults={"verified": True, "primary": True}
        )
        return user
