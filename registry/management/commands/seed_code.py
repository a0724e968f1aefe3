"""Seed an organization with the example code package (examples/tiny-cnn), once."""

import tempfile
import zipfile
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from registry.models import CodePackage
from registry.services import code_package_version_create
from tenants.actors import Actor
from tenants.models import Organization

EXAMPLE = "tiny-cnn"


def example_folder(name: str = EXAMPLE) -> Path:
    return Path(settings.BASE_DIR) / "examples" / name


def package_zip(folder: Path, dest: Path) -> Path:
    """Zip `folder` as a package: factory.toml at the archive's root, bytecode and READMEs left
    out (what `zip -r` in the README gives, made the same way on every machine)."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder)
            if (
                path.is_dir()
                or "__pycache__" in relative.parts
                or path.suffix == ".pyc"
                or relative.name == "README.md"
            ):
                continue
            info = zipfile.ZipInfo(relative.as_posix(), date_time=(2026, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes())
    return dest


class Command(BaseCommand):
    help = "Upload the example code package (examples/tiny-cnn) to an organization, once."

    def add_arguments(self, parser):
        parser.add_argument("--org", default="demo-lab", help="Organization slug.")

    def handle(self, *args, org, **options):
        organization = Organization.objects.filter(slug=org).first()
        if organization is None:
            raise CommandError(f"No organization with slug {org!r}; run seed_demo first.")
        if CodePackage.objects.for_organization(organization).filter(name=EXAMPLE).exists():
            return
        owner = (
            organization.tenants_membership_set.filter(role="owner").select_related("user").first()
        )
        actor = Actor(user=owner.user if owner else None)
        with tempfile.TemporaryDirectory() as tmp:
            path = package_zip(example_folder(), Path(tmp) / f"{EXAMPLE}.zip")
            version = code_package_version_create(
                organization=organization, path=path, filename=path.name, actor=actor
            )
        self.stdout.write(f"  code package {version}: {version.size_bytes} bytes")
