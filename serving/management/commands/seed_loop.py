"""Give the demo organization the loop to look at: a sample model trained on `customers`, a
deployment of it with one warm replica, and a retrain policy (once; run after seed_samples).

The model is trained here, in this process, by the recipe a training job would run: `make run`
seeds before its pool worker starts, and a newcomer should find a deployment that answers, not
one waiting for a first job. Retrains after that are ordinary jobs the policy submits.
"""

import json
import tempfile
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from jobs.models import ResourceClass
from jobs.recipes.base import RecipeContext, validate_parameters
from jobs.recipes.catalog import get_recipe
from registry.models import Dataset, RegisteredModel
from registry.services import model_version_register, registered_model_create
from registry.storage import get_storage
from serving.models import Deployment
from serving.policies import retrain_policy_set
from serving.services import deployment_create
from tenants.actors import Actor
from tenants.models import Organization

DATASET = "customers"
MODEL = "customers-churn"
DEPLOYMENT = "churn"
RECIPE = "tabular-classifier"
# Small enough to train in seconds on one CPU core; good enough to be worth serving.
PARAMETERS = {"target": "label", "epochs": 5, "hidden_sizes": [16], "batch_size": 64}
SEED = 7
DRIFT_WINDOW_ROWS = 200


class Command(BaseCommand):
    help = "Add a deployment of a sample model with a retrain policy to an organization (once)."

    def add_arguments(self, parser):
        parser.add_argument("--org", default="demo-lab", help="Organization slug.")

    def handle(self, *args, org, **options):
        organization = Organization.objects.filter(slug=org).first()
        if organization is None:
            raise CommandError(f"No organization with slug {org!r}; run seed_demo first.")
        if Deployment.objects.for_organization(organization).filter(name=DEPLOYMENT).exists():
            return
        dataset = Dataset.objects.for_organization(organization).filter(name=DATASET).first()
        data = dataset and dataset.versions.order_by("-number").first()
        if data is None:
            raise CommandError(f"No {DATASET!r} dataset in {org!r}; run seed_samples first.")
        owner = organization.tenants_membership_set.filter(role="owner").first()
        actor = Actor(user=owner.user if owner else None)
        version = _trained_version(organization, data, actor)
        deployment = deployment_create(
            organization=organization,
            name=DEPLOYMENT,
            recipe=RECIPE,
            resource_class=ResourceClass.objects.get(name="cpu"),
            actor=actor,
            routes=[{"model_version": version.pk, "weight": 100, "mode": "live"}],
            min_replicas=1,
            max_replicas=2,
            # A window a newcomer fills in a few requests, so drift shows on the page soon.
            drift_window_rows=DRIFT_WINDOW_ROWS,
        )
        retrain_policy_set(
            deployment=deployment, actor=actor, enabled=True, on_drift=True, dataset=dataset
        )
        self.stdout.write(
            f"  deployment {DEPLOYMENT} serving {MODEL} v{version.number} "
            f"(val_accuracy {version.metrics.get('val_accuracy', 0):.2f}), retrain on drift"
        )


def _trained_version(organization, data, actor):
    registered = RegisteredModel.objects.for_organization(organization).filter(name=MODEL).first()
    if registered is None:
        registered = registered_model_create(organization=organization, name=MODEL, actor=actor)
    existing = registered.versions.order_by("-number").first()
    if existing is not None:
        return existing
    recipe = get_recipe(RECIPE)
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        dataset_path = workdir / f"data.{data.format}"
        with get_storage().open(data.storage_key) as source:
            dataset_path.write_bytes(source.read())
        parameters = validate_parameters(recipe, PARAMETERS)
        ctx = RecipeContext(
            workdir=workdir,
            dataset_path=dataset_path,
            dataset_format=data.format,
            parameters=parameters,
            seed=SEED,
            output_dir=workdir / "out",
            checkpoint_dir=workdir / "checkpoints",
            checkpoint_every_s=3600.0,
            devices=["cpu"],
            emit=lambda line: None,
        )
        result = recipe().train(ctx)
        out = ctx.output_dir
        return model_version_register(
            registered_model=registered,
            weights_path=out / "model.safetensors",
            config=json.loads((out / "config.json").read_text()),
            actor=actor,
            recipe_name=RECIPE,
            recipe_version=recipe.version,
            parameters=parameters,
            metrics={k: v for k, v in result.metrics.items() if isinstance(v, int | float)},
            input_signature=result.input_signature,
            trained_on=[data],
        )
