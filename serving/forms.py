"""The deployment pages' forms: a new deployment, its routes, its retrain policy. The rules are
the services' (serving.services, serving.policies); these only read the posted values."""

from django import forms
from django.db.models import Q

from jobs.forms import MODEL_VERSION_HEAVY, VersionChoiceField
from jobs.models import ResourceClass
from registry.models import ModelVersion
from registry.selectors import dataset_list

from .models import RetrainPolicy, Route
from .policies import slice_column_help

# The routes form's rows at most: the service's limit on routes (serving.services.MAX_ROUTES).
MAX_ROUTE_ROWS = 10

# The form's sections, in the order the page shows them.
GROUPS = (
    (
        "Triggers",
        "What starts a retrain; the cooldown and the spending limit apply to all of them.",
        ("enabled", "on_drift", "metric_below", "on_new_data", "every_s", "cooldown_s"),
    ),
    (
        "Data",
        "What the challenger is trained on, and what a retrain may cost.",
        ("dataset", "append_feedback", "max_cost_minor"),
    ),
    (
        "Gate",
        "How the challenger must compare with the champion on the same held-out rows.",
        ("gate_margin", "slice_column", "slice_tolerance", "auto_promote"),
    ),
    (
        "Canary & rollback",
        "How much live traffic a passing challenger gets while it bakes, and when it is rolled "
        "back.",
        (
            "canary_percent",
            "bake_s",
            "bake_extensions",
            "rollback_error_rate",
            "rollback_p99_ratio",
            "rollback_metric_drop",
        ),
    ),
)


class RetrainPolicyForm(forms.Form):
    enabled = forms.BooleanField(required=False, label="Enabled: the loop acts on this policy")
    on_drift = forms.BooleanField(required=False, label="Retrain when the inputs drift")
    metric_below = forms.FloatField(
        required=False,
        label="Live metric threshold",
        help_text="Retrain when the live metric crosses it (below for accuracy, above for an "
        "error such as MAE). Empty: never on the metric.",
    )
    on_new_data = forms.BooleanField(
        required=False, label="Retrain when the dataset gets a new version"
    )
    every_s = forms.IntegerField(
        required=False,
        min_value=0,
        label="Schedule (seconds)",
        help_text="Retrain at least this often. Empty: no schedule.",
    )
    cooldown_s = forms.IntegerField(
        min_value=0, label="Cooldown (seconds)", help_text="The least time between two retrains."
    )
    dataset = forms.ModelChoiceField(
        queryset=None,
        required=False,
        empty_label="The data the served version was trained on",
        help_text="Its newest version is used for each retrain.",
    )
    append_feedback = forms.BooleanField(
        required=False, label="Append labelled feedback to the training data"
    )
    max_cost_minor = forms.IntegerField(
        min_value=0,
        label="Spending limit per retrain (cents)",
        help_text="A retrain that would cost more is skipped and shown on the timeline.",
    )
    gate_margin = forms.FloatField(
        label="Margin",
        help_text="The challenger must beat the champion's metric by at least this much, in the "
        "metric's units (accuracy: a share, 0.01 is one point; MAE: the forecast values' units).",
    )
    slice_column = forms.CharField(required=False, max_length=100, label="Slice column")
    slice_tolerance = forms.FloatField(
        label="Slice tolerance",
        help_text="How far any slice may fall behind the champion's, in the metric's units.",
    )
    auto_promote = forms.BooleanField(
        required=False,
        label="Start the canary on its own when the gate passes (else a person approves)",
    )
    canary_percent = forms.IntegerField(min_value=0, label="Canary share (%)")
    bake_s = forms.IntegerField(min_value=0, label="Bake time per step (seconds)")
    bake_extensions = forms.IntegerField(
        min_value=0,
        label="Bake extensions",
        help_text="A canary with too few requests to judge bakes this many more times, then "
        "pauses as inconclusive until a person promotes it or rolls it back.",
    )
    rollback_error_rate = forms.FloatField(
        label="Roll back at an error rate above the stable one's by"
    )
    rollback_p99_ratio = forms.FloatField(label="Roll back at a p99 latency of the stable one's x")
    rollback_metric_drop = forms.FloatField(label="Roll back at a live metric drop of")

    def __init__(self, *args, organization, policy: RetrainPolicy, read_only=False, **kwargs):
        kwargs.setdefault(
            "initial",
            {name: getattr(policy, name) for name in self.base_fields if name != "dataset"}
            | {"dataset": policy.dataset_id},
        )
        super().__init__(*args, **kwargs)
        self.fields["dataset"].queryset = dataset_list(organization=organization)
        self.fields["slice_column"].help_text = slice_column_help(policy.deployment.recipe)
        if read_only:
            for field in self.fields.values():
                field.disabled = True

    def groups(self):
        """(title, explanation, bound fields) per section of the page."""
        return [(title, note, [self[name] for name in names]) for title, note, names in GROUPS]


def _version_label(version: ModelVersion) -> str:
    return f"{version.registered_model.name} v{version.number} ({version.recipe_name})"


class DeploymentCreateForm(forms.Form):
    name = forms.SlugField(
        max_length=63,
        help_text="Lowercase letters, digits and hyphens; the predict URL ends with it.",
    )
    model_version = VersionChoiceField(
        queryset=ModelVersion.objects.none(),
        label="Model version",
        help_text="It answers all requests at first; its recipe fixes the deployment's inputs "
        "and outputs.",
    )
    resource_class = forms.ModelChoiceField(
        queryset=ResourceClass.objects.order_by("name"), to_field_name="name", initial="cpu"
    )
    min_replicas = forms.IntegerField(
        min_value=0,
        initial=0,
        help_text="0: no replica runs (or costs) while no requests come; the first one waits "
        "for a replica to start.",
    )
    max_replicas = forms.IntegerField(min_value=1, initial=1)

    def __init__(self, *args, organization, **kwargs):
        super().__init__(*args, **kwargs)
        field = self.fields["model_version"]
        field.queryset = (
            ModelVersion.objects.for_organization(organization)
            .exclude(recipe_name="")
            .select_related("registered_model")
            .defer(*MODEL_VERSION_HEAVY)
            .order_by("registered_model__name", "-number")
        )
        field.label_from_instance = _version_label
        field.keep_chosen(self, "model_version")


ROUTE_VERSIONS_SHOWN = 50


class RoutesForm(forms.Form):
    """A deployment's routes as rows of (version, weight, mode, stage): the current ones and
    empty rows to add; a row without a version is dropped. The versions offered are the
    organization's of the deployment's recipe (the newest and those routed now); the service
    checks again whatever is posted."""

    ROWS_ADDED = 2

    def __init__(self, *args, organization, deployment, routes, **kwargs):
        super().__init__(*args, **kwargs)
        routed = [route.model_version_id for route in routes]
        newest = (
            ModelVersion.objects.for_organization(organization)
            .filter(recipe_name=deployment.recipe)
            .order_by("-created_at", "-pk")
            .values("pk")[:ROUTE_VERSIONS_SHOWN]
        )
        versions = (
            ModelVersion.objects.for_organization(organization)
            .filter(Q(pk__in=newest) | Q(pk__in=routed))
            .select_related("registered_model")
            .defer(*MODEL_VERSION_HEAVY)
            .order_by("registered_model__name", "-number")
        )
        choices = [("", "—")] + [(str(v.pk), _version_label(v)) for v in versions]
        self.row_count = min(len(routes) + self.ROWS_ADDED, MAX_ROUTE_ROWS)
        for index in range(self.row_count):
            route = routes[index] if index < len(routes) else None
            self.fields[f"version_{index}"] = forms.ChoiceField(
                choices=choices,
                required=False,
                label="Model version",
                initial=str(route.model_version_id) if route else "",
            )
            self.fields[f"weight_{index}"] = forms.IntegerField(
                min_value=0,
                max_value=100,
                required=False,
                label="Weight (%)",
                initial=route.weight if route else None,
            )
            self.fields[f"mode_{index}"] = forms.ChoiceField(
                choices=Route.Mode.choices,
                required=False,
                label="Mode",
                initial=route.mode if route else Route.Mode.LIVE,
            )
            self.fields[f"stage_{index}"] = forms.ChoiceField(
                choices=Route.Stage.choices,
                required=False,
                label="Stage",
                initial=route.stage if route else Route.Stage.STABLE,
            )

    def rows(self):
        return [
            [self[f"{name}_{index}"] for name in ("version", "weight", "mode", "stage")]
            for index in range(self.row_count)
        ]

    def clean(self):
        data = super().clean()
        routes = []
        for index in range(self.row_count):
            version = data.get(f"version_{index}")
            if not version:
                continue
            weight = data.get(f"weight_{index}")
            if weight is None:
                self.add_error(f"weight_{index}", "Give this route a weight from 0 to 100.")
                continue
            routes.append(
                {
                    "model_version": int(version),
                    "weight": weight,
                    "mode": data.get(f"mode_{index}") or Route.Mode.LIVE,
                    "stage": data.get(f"stage_{index}") or Route.Stage.STABLE,
                }
            )
        if not routes and not self.errors:
            raise forms.ValidationError(
                "A deployment needs at least one live route; to stop it, delete it through the API."
            )
        data["routes"] = routes
        return data
