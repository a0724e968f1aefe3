"""Seed the sample datasets (tabular, images, text, series) into an organization, once each."""

import tempfile
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from jobs.samples import (
    write_image_sample,
    write_tabular_sample,
    write_text_sample,
    write_timeseries_sample,
)
from registry.models import Dataset
from registry.services import dataset_create, dataset_version_create
from tenants.actors import Actor
from tenants.models import Organization

# dataset name -> (file name, writer, description)
SAMPLES = {
    "customers": (
        "customers.csv",
        write_tabular_sample,
        "Tabular: predict `label` (tabular-classifier).",
    ),
    "shapes": (
        "shapes.zip",
        write_image_sample,
        "Images in one folder per class (image-classifier).",
    ),
    "reviews": (
        "reviews.csv",
        write_text_sample,
        "Short reviews with a `label` (text-classifier).",
    ),
    "hourly-load": (
        "hourly-load.csv",
        write_timeseries_sample,
        "Hourly series (timeseries-forecaster).",
    ),
}


class Command(BaseCommand):
    help = "Add the code-generated sample datasets to an organization (skips those it has)."

    def add_arguments(self, parser):
        parser.add_argument("--org", default="demo-lab", help="Organization slug.")

    def handle(self, *args, org, **options):
        organization = Organization.objects.filter(slug=org).first()
        if organization is None:
            raise CommandError(f"No organization with slug {org!r}; run seed_demo first.")
        owner = (
            organization.tenants_membership_set.filter(role="owner").select_related("user").first()
        )
        actor = Actor(user=owner.user if owner else None)
        with tempfile.TemporaryDirectory() as tmp:
            for name, (filename, write, description) in SAMPLES.items():
                if Dataset.objects.for_organization(organization).filter(name=name).exists():
                    continue
                path = Path(tmp) / filename
                write(path)
                dataset = dataset_create(
                    organization=organization, name=name, description=description, actor=actor
                )
                version = dataset_version_create(
                    dataset=dataset, path=path, filename=filename, actor=actor
                )
                self.stdout.write(
                    f"  sample dataset {name} v{version.number}: {version.row_count} rows"
                )
