"""The deployment page's retrain policy form; the policy's rules as a whole are the service's
(serving.policies), this only reads the posted values."""

from django import forms

from registry.selectors import dataset_list

from .models import RetrainPolicy

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
        help_text="The challenger must beat the champion's metric by at least this much.",
    )
    slice_column = forms.CharField(
        required=False,
        max_length=100,
        label="Slice column",
        help_text="Compare per value of this column too. Empty: overall only.",
    )
    slice_tolerance = forms.FloatField(
        label="Slice tolerance", help_text="How far any slice may fall behind the champion's."
    )
    auto_promote = forms.BooleanField(
        required=False,
        label="Start the canary on its own when the gate passes (else a person approves)",
    )
    canary_percent = forms.IntegerField(min_value=0, label="Canary share (%)")
    bake_s = forms.IntegerField(min_value=0, label="Bake time per step (seconds)")
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
        if read_only:
            for field in self.fields.values():
                field.disabled = True

    def groups(self):
        """(title, explanation, bound fields) per section of the page."""
        return [(title, note, [self[name] for name in names]) for title, note, names in GROUPS]
