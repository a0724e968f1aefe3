from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from serving.models import Deployment, LoopEvent, ModelCard, Replica, Retrain, Route

from ..gateway import MAX_INPUTS
from ..services import FEEDBACK_MAX_ITEMS, MAX_ROUTES


class RouteSerializer(serializers.ModelSerializer):
    model_version = serializers.IntegerField(
        source="model_version_id", help_text="A model version id of this organization."
    )
    model = serializers.CharField(source="model_version.registered_model.name", read_only=True)
    version = serializers.IntegerField(source="model_version.number", read_only=True)

    class Meta:
        model = Route
        fields = ["model_version", "model", "version", "weight", "mode", "stage"]


class RouteInputSerializer(serializers.Serializer):
    model_version = serializers.IntegerField(help_text="A model version id of this organization.")
    weight = serializers.IntegerField(min_value=0, max_value=100)
    mode = serializers.ChoiceField(choices=Route.Mode.choices, default=Route.Mode.LIVE)
    stage = serializers.ChoiceField(choices=Route.Stage.choices, default=Route.Stage.STABLE)


class RoutesSetSerializer(serializers.Serializer):
    routes = RouteInputSerializer(many=True, min_length=1, max_length=MAX_ROUTES)


class DeploymentSerializer(serializers.ModelSerializer):
    resource_class = serializers.CharField(source="resource_class.name", read_only=True)
    routes = RouteSerializer(many=True, read_only=True)

    class Meta:
        model = Deployment
        fields = [
            "name",
            "recipe",
            "resource_class",
            "min_replicas",
            "max_replicas",
            "target_in_flight",
            "scale_to_zero_after_s",
            "log_sample_rate",
            "log_retention_days",
            "drift_column_threshold",
            "drift_share_threshold",
            "drift_window_rows",
            "routes",
            "last_request_at",
            "created_at",
        ]
        read_only_fields = fields


class _Options(serializers.Serializer):
    min_replicas = serializers.IntegerField(min_value=0, max_value=1000)
    max_replicas = serializers.IntegerField(min_value=1, max_value=1000)
    target_in_flight = serializers.IntegerField(min_value=1, max_value=10_000)
    scale_to_zero_after_s = serializers.IntegerField(min_value=60, max_value=30 * 86400)
    log_sample_rate = serializers.FloatField(min_value=0.0, max_value=1.0)
    log_retention_days = serializers.IntegerField(min_value=1, max_value=3650)
    drift_column_threshold = serializers.FloatField(min_value=0.0, max_value=10.0)
    drift_share_threshold = serializers.FloatField(min_value=0.0, max_value=1.0)
    drift_window_rows = serializers.IntegerField(min_value=10, max_value=1_000_000)


class DeploymentCreateSerializer(_Options):
    name = serializers.SlugField(max_length=63)
    recipe = serializers.CharField(max_length=100)
    resource_class = serializers.CharField(max_length=40, default="cpu")
    routes = RouteInputSerializer(many=True, required=False, max_length=MAX_ROUTES)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name in _Options().fields:
            self.fields[name].required = False


class DeploymentUpdateSerializer(_Options):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for field in self.fields.values():
            field.required = False


class ReplicaSerializer(serializers.ModelSerializer):
    model_version = serializers.IntegerField(source="model_version_id")
    job = serializers.IntegerField(source="job_id")

    class Meta:
        model = Replica
        fields = [
            "id",
            "model_version",
            "job",
            "state",
            "created_at",
            "ready_at",
            "drain_started_at",
            "stopped_at",
        ]


class LoopEventSerializer(serializers.ModelSerializer):
    model_version = serializers.IntegerField(source="model_version_id", allow_null=True)
    job = serializers.IntegerField(source="job_id", allow_null=True)

    class Meta:
        model = LoopEvent
        fields = [
            "id",
            "kind",
            "message",
            "data",
            "job",
            "model_version",
            "cost_minor",
            "created_at",
        ]


class VersionStatsSerializer(serializers.Serializer):
    model_version = serializers.IntegerField()
    mode = serializers.CharField()
    requests = serializers.IntegerField()
    errors = serializers.IntegerField()
    error_rate = serializers.FloatField()
    p50_ms = serializers.FloatField(allow_null=True)
    p99_ms = serializers.FloatField(allow_null=True)
    labelled = serializers.IntegerField()
    metric = serializers.CharField()
    metric_value = serializers.FloatField(allow_null=True)


class StatsSerializer(serializers.Serializer):
    since = serializers.DateTimeField()
    until = serializers.DateTimeField()
    versions = VersionStatsSerializer(many=True)
    shadow_copies_dropped = serializers.IntegerField()


class StatsQuerySerializer(serializers.Serializer):
    hours = serializers.IntegerField(min_value=1, max_value=24 * 90, default=24)


@extend_schema_field({"description": "Anything JSON: one input of the recipe's contract."})
class AnyJsonField(serializers.JSONField):
    pass


class DeploymentPredictSerializer(serializers.Serializer):
    inputs = serializers.ListField(child=AnyJsonField(), min_length=1, max_length=MAX_INPUTS)


class PredictionSerializer(serializers.Serializer):
    prediction_id = serializers.UUIDField(help_text="Send it back with the label as feedback.")
    output = serializers.JSONField()


class ModelVersionRefSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    number = serializers.IntegerField()


class DeploymentPredictResponseSerializer(serializers.Serializer):
    deployment = serializers.CharField()
    model_version = ModelVersionRefSerializer()
    predictions = PredictionSerializer(many=True)


class FeedbackItemSerializer(serializers.Serializer):
    prediction_id = serializers.CharField(max_length=64)
    label = serializers.JSONField()


class FeedbackSerializer(serializers.Serializer):
    items = FeedbackItemSerializer(many=True, min_length=1, max_length=FEEDBACK_MAX_ITEMS)


class FeedbackResultSerializer(serializers.Serializer):
    labelled = serializers.IntegerField()
    unchanged = serializers.IntegerField()
    unknown = serializers.IntegerField(
        help_text="Ids that are not this deployment's logged predictions: never written."
    )


class FeedbackDatasetSerializer(serializers.Serializer):
    dataset = serializers.CharField(max_length=100)
    since = serializers.DateTimeField()
    until = serializers.DateTimeField()
    target = serializers.CharField(max_length=100, default="label")


class SavedDatasetSerializer(serializers.Serializer):
    dataset = serializers.CharField()
    number = serializers.IntegerField()
    row_count = serializers.IntegerField(allow_null=True)


class VersionRefSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    model = serializers.CharField(source="registered_model.name")
    version = serializers.IntegerField(source="number")


class JobRefSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    state = serializers.CharField()
    cost_minor = serializers.IntegerField(help_text="What the job has cost so far, in cents.")


class RetrainCostsSerializer(serializers.Serializer):
    training_minor = serializers.IntegerField()
    evaluation_minor = serializers.IntegerField()
    total_minor = serializers.IntegerField()


def model_card_of(retrain: Retrain) -> ModelCard | None:
    """The retrain's card; none until the gate has decided."""
    try:
        return retrain.model_card
    except ModelCard.DoesNotExist:
        return None


class RetrainSerializer(serializers.ModelSerializer):
    deployment = serializers.CharField(source="deployment.name")
    champion = VersionRefSerializer()
    challenger = VersionRefSerializer(allow_null=True)
    job = JobRefSerializer(allow_null=True, help_text="The training job.")
    evaluation_job = JobRefSerializer(allow_null=True)
    costs = serializers.SerializerMethodField()
    decision = serializers.SerializerMethodField(
        help_text="The gate's decision (passed, failed), or null before it decided."
    )
    awaiting_approval = serializers.SerializerMethodField(
        help_text="A person with models:promote decides now: a challenger that passed the gate "
        "(approve starts its canary, reject ends the retrain), or an inconclusive canary "
        "(approve promotes it to 100%, reject rolls it back)."
    )

    class Meta:
        model = Retrain
        fields = [
            "id",
            "deployment",
            "state",
            "trigger",
            "champion",
            "challenger",
            "job",
            "evaluation_job",
            "canary_percent",
            "costs",
            "decision",
            "awaiting_approval",
            "created_at",
            "finished_at",
        ]
        read_only_fields = fields

    @extend_schema_field(RetrainCostsSerializer)
    def get_costs(self, retrain: Retrain) -> dict:
        training = retrain.job.cost_minor if retrain.job else 0
        evaluation = retrain.evaluation_job.cost_minor if retrain.evaluation_job else 0
        return {
            "training_minor": training,
            "evaluation_minor": evaluation,
            "total_minor": training + evaluation,
        }

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_decision(self, retrain: Retrain) -> str | None:
        card = model_card_of(retrain)
        return card.decision if card else None

    @extend_schema_field(serializers.BooleanField())
    def get_awaiting_approval(self, retrain: Retrain) -> bool:
        return retrain.state in Retrain.AWAITING_DECISION_STATES


class ModelCardSerializer(serializers.ModelSerializer):
    model_version = VersionRefSerializer()
    champion = VersionRefSerializer()
    lineage = serializers.JSONField(
        help_text=(
            "datasets (dataset, version, id) the challenger trained on, parent_version, champion, "
            "training_job, evaluation_job, evaluated_on (dataset, version, split; null when the "
            "training spent the retrain's spending limit and no evaluation ran), trigger."
        )
    )
    metrics = serializers.JSONField(
        help_text=(
            "metric, higher_is_better, slice_column, rows, and for challenger and champion: "
            "overall and slices {value: score}; the gate's margin and slice tolerance."
        )
    )
    reasons = serializers.ListField(child=serializers.CharField())
    approved_by = serializers.CharField(
        source="approved_by_label", help_text="Who or what approved; empty until approved."
    )

    class Meta:
        model = ModelCard
        fields = [
            "id",
            "model_version",
            "champion",
            "lineage",
            "metrics",
            "decision",
            "reasons",
            "approved_via",
            "approved_by",
            "approved_at",
            "created_at",
        ]
        read_only_fields = fields


class RetrainDetailSerializer(RetrainSerializer):
    model_card = serializers.SerializerMethodField()

    class Meta(RetrainSerializer.Meta):
        fields = [*RetrainSerializer.Meta.fields, "model_card"]
        read_only_fields = fields

    @extend_schema_field(ModelCardSerializer(allow_null=True))
    def get_model_card(self, retrain: Retrain) -> dict | None:
        card = model_card_of(retrain)
        return ModelCardSerializer(card).data if card else None


class RetrainRejectSerializer(serializers.Serializer):
    reason = serializers.CharField(
        max_length=500, help_text="Why the challenger is turned down (shown on its model card)."
    )
