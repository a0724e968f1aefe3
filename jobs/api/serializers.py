from rest_framework import serializers

from jobs.models import Job, JobEvent, JobLog, JobMetric, JobState
from jobs.selectors import job_cost_so_far


class DatasetRefSerializer(serializers.Serializer):
    dataset = serializers.CharField()
    number = serializers.IntegerField(min_value=1)


class JobSubmitSerializer(serializers.Serializer):
    recipe = serializers.CharField(max_length=100)
    parameters = serializers.DictField(default=dict)
    dataset = DatasetRefSerializer()
    resource_class = serializers.CharField(max_length=40, default="cpu")
    gpu_count = serializers.IntegerField(min_value=1, max_value=64, default=1)
    priority = serializers.IntegerField(min_value=-100, max_value=100, default=0)
    labels = serializers.DictField(child=serializers.CharField(max_length=200), default=dict)
    max_runtime_s = serializers.IntegerField(min_value=60, max_value=7 * 24 * 3600, default=3600)
    output_model = serializers.CharField(max_length=100, required=False, allow_blank=True)


class MoneySerializer(serializers.Serializer):
    amount = serializers.CharField()
    currency = serializers.CharField()


class JobSerializer(serializers.ModelSerializer):
    dataset = serializers.SerializerMethodField()
    resource_class = serializers.CharField(source="resource_class.name")
    created_by = serializers.EmailField(source="created_by.email", default=None)
    worker = serializers.CharField(source="worker.name", default=None)
    output_model = serializers.SerializerMethodField()
    cost_so_far_minor = serializers.SerializerMethodField()

    class Meta:
        model = Job
        fields = [
            "id",
            "state",
            "kind",
            "recipe",
            "recipe_version",
            "parameters",
            "dataset",
            "resource_class",
            "gpu_count",
            "priority",
            "labels",
            "max_runtime_s",
            "attempt",
            "queue_position",
            "waiting_reason",
            "failure_reason",
            "worker",
            "output_model",
            "cost_so_far_minor",
            "created_by",
            "created_at",
            "scheduled_at",
            "started_at",
            "finished_at",
            "retry_of",
        ]
        read_only_fields = fields

    def get_dataset(self, job) -> dict | None:
        version = job.input_dataset_version
        return {"dataset": version.dataset.name, "number": version.number} if version else None

    def get_output_model(self, job) -> dict | None:
        version = job.output_model_version
        return (
            {"model": version.registered_model.name, "number": version.number} if version else None
        )

    def get_cost_so_far_minor(self, job) -> int:
        return job_cost_so_far(job=job)


class JobSubmittedSerializer(JobSerializer):
    estimated_cost_per_hour = MoneySerializer(read_only=True)

    class Meta(JobSerializer.Meta):
        fields = [*JobSerializer.Meta.fields, "estimated_cost_per_hour"]
        read_only_fields = fields


class JobFilterSerializer(serializers.Serializer):
    state = serializers.ChoiceField(choices=JobState.choices, required=False)
    label = serializers.CharField(required=False, max_length=300, help_text="key or key=value")
    created_by = serializers.CharField(required=False, max_length=255)


class JobEventSerializer(serializers.ModelSerializer):
    class Meta:
        model = JobEvent
        fields = ["id", "attempt", "kind", "message", "data", "created_at"]


class JobLogSerializer(serializers.ModelSerializer):
    class Meta:
        model = JobLog
        fields = ["id", "attempt", "stream", "line", "created_at"]


class JobMetricSerializer(serializers.ModelSerializer):
    class Meta:
        model = JobMetric
        fields = ["attempt", "step", "name", "split", "value", "created_at"]


class RecipeSerializer(serializers.Serializer):
    name = serializers.CharField()
    version = serializers.CharField()
    kind = serializers.CharField()
    dataset_formats = serializers.ListField(child=serializers.CharField())
    parameter_schema = serializers.DictField()


class ResourceClassSerializer(serializers.Serializer):
    name = serializers.CharField()
    display_name = serializers.CharField()
    gpu_memory_gb = serializers.IntegerField()
    price_per_gpu_hour = serializers.CharField()
    currency = serializers.CharField()
