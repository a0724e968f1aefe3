import dataclasses
import json
from functools import cache

from django.utils import timezone
from drf_spectacular.utils import extend_schema_field
from rest_framework import ISO_8601, serializers
from rest_framework.settings import api_settings

from billing.selectors import PRICE_AT
from jobs.models import (
    ACTIVE_STATES,
    Job,
    JobEvent,
    JobLog,
    JobMetric,
    JobState,
    Sweep,
    UtilizationSample,
    waiting_text,
)
from jobs.selectors import (
    ATTEMPT_STARTED,
    COST_FIELDS,
    job_cost_so_far,
    job_costs_so_far,
    job_queue_position,
    job_rightsizing_hint,
    job_row_annotations,
    queue_positions,
)
from registry.selectors import (
    VERSION_KINDS,
    VERSION_NAME,
    VERSION_NUMBER,
    version_name_subqueries,
    version_names,
)
from tenants.models import Organization


class DatasetRefSerializer(serializers.Serializer):
    dataset = serializers.CharField()
    number = serializers.IntegerField(min_value=1)


class ModelRefSerializer(serializers.Serializer):
    model = serializers.CharField()
    version = serializers.CharField(help_text="A version number or an alias such as production.")


# The kinds a tenant submits: replicas and evaluations are started by deployments and their
# policies (serving), never through this API.
SUBMITTED_KINDS = [(kind, kind.label) for kind in (Job.Kind.TRAIN, Job.Kind.INFER, Job.Kind.EXPORT)]


class JobSubmitSerializer(serializers.Serializer):
    kind = serializers.ChoiceField(choices=SUBMITTED_KINDS, default=Job.Kind.TRAIN)
    recipe = serializers.CharField(
        max_length=100,
        required=False,
        allow_blank=True,
        help_text="Training: the recipe to run, or leave it out and name a code package.",
    )
    code_package = serializers.CharField(
        max_length=100,
        required=False,
        allow_blank=True,
        help_text="Training with your own code: the package whose train entry runs, instead of "
        "a recipe. Its parameters are checked against the package version's JSON Schema.",
    )
    code_package_version = serializers.IntegerField(
        min_value=1, required=False, help_text="The version number of `code_package` to run."
    )
    parameters = serializers.DictField(default=dict)
    dataset = DatasetRefSerializer(
        required=False,
        help_text="Required for recipes and inference; optional for a code package, whose "
        "code then finds it among its inputs.",
    )
    model = ModelRefSerializer(
        required=False,
        help_text="Inference: the model to run. Training: a version to continue training from "
        "(a code package finds it among its inputs). Export: the version to export to ONNX as an "
        "edge bundle (no dataset).",
    )
    output_dataset = serializers.CharField(max_length=100, required=False, allow_blank=True)
    resource_class = serializers.CharField(max_length=40, default="cpu")
    gpu_count = serializers.IntegerField(min_value=1, max_value=64, default=1)
    priority = serializers.IntegerField(min_value=-100, max_value=100, default=0)
    labels = serializers.DictField(child=serializers.CharField(max_length=200), default=dict)
    max_runtime_s = serializers.IntegerField(min_value=60, max_value=7 * 24 * 3600, default=3600)
    output_model = serializers.CharField(max_length=100, required=False, allow_blank=True)

    def validate(self, attrs):
        """A job runs a recipe or a code package version, never both; say which field is off."""
        package, number = attrs.get("code_package"), attrs.get("code_package_version")
        if not package and number is None:
            return attrs
        errors = {}
        if not package:
            errors["code_package"] = ["Name the package whose version this is."]
        if number is None:
            errors["code_package_version"] = ["Name the version number to run."]
        if attrs.get("recipe"):
            errors["recipe"] = ["Name a recipe or a code package, not both."]
        if attrs.get("kind", Job.Kind.TRAIN) != Job.Kind.TRAIN:
            errors["kind"] = ["A code package runs training jobs (its train entry)."]
        if errors:
            raise serializers.ValidationError(errors)
        return attrs


class CodePackageRefSerializer(serializers.Serializer):
    package = serializers.CharField()
    number = serializers.IntegerField()


class MoneySerializer(serializers.Serializer):
    amount = serializers.CharField()
    currency = serializers.CharField()


class EstimateRequestSerializer(serializers.Serializer):
    resource_class = serializers.CharField(max_length=40, default="cpu")
    gpu_count = serializers.IntegerField(min_value=1, max_value=64, default=1)
    max_runtime_s = serializers.IntegerField(min_value=60, max_value=7 * 24 * 3600, default=3600)


class EstimateSerializer(serializers.Serializer):
    estimated_cost_per_hour = MoneySerializer()
    estimated_max_cost = MoneySerializer(help_text="Price x GPUs x max runtime: the most it costs.")


class UtilizationSerializer(serializers.Serializer):
    """The newest sampled attempt's use of its slots (jobs.utilization.summary_merge): averages
    are weighted by the time each sample stands for. GPU fields are null on a CPU slot or where
    the worker could not read NVML; on several GPUs, utilization is their mean and memory the
    fullest one's."""

    samples = serializers.IntegerField()
    seconds = serializers.FloatField(help_text="The run time the samples cover.")
    cpu_cores_avg = serializers.FloatField(allow_null=True)
    cpu_cores_peak = serializers.FloatField(allow_null=True)
    memory_bytes_avg = serializers.IntegerField(allow_null=True, help_text="Resident memory.")
    memory_bytes_peak = serializers.IntegerField(allow_null=True)
    gpu_samples = serializers.IntegerField()
    gpu_seconds = serializers.FloatField()
    gpu_utilization_avg = serializers.FloatField(allow_null=True, help_text="Percent.")
    gpu_utilization_peak = serializers.FloatField(allow_null=True)
    gpu_memory_bytes_avg = serializers.IntegerField(allow_null=True)
    gpu_memory_bytes_peak = serializers.IntegerField(allow_null=True)
    gpu_memory_total_bytes = serializers.IntegerField(allow_null=True)


class RightsizingHintSerializer(serializers.Serializer):
    resource_class = serializers.CharField(help_text="The cheaper class that holds the job.")
    current_minor = serializers.IntegerField(help_text="The sampled run on its own class.")
    cheaper_minor = serializers.IntegerField(help_text="The same run time on `resource_class`.")
    currency = serializers.CharField()
    saving_percent = serializers.IntegerField()
    text = serializers.CharField()


class JobSerializer(serializers.ModelSerializer):
    dataset = serializers.SerializerMethodField()
    resource_class = serializers.CharField(source="resource_class.name")
    created_by = serializers.EmailField(source="created_by.email", default=None, allow_null=True)
    worker = serializers.CharField(source="worker.name", default=None, allow_null=True)
    output_model = serializers.SerializerMethodField()
    input_model = serializers.SerializerMethodField()
    output_dataset = serializers.SerializerMethodField()
    cost_so_far_minor = serializers.SerializerMethodField()
    code_package = serializers.SerializerMethodField()
    # A reservation's ETA is worked out when read (Job.waiting_text); the position too.
    waiting_reason = serializers.CharField(source="waiting_text", read_only=True)
    queue_position = serializers.IntegerField(read_only=True, allow_null=True)
    utilization = UtilizationSerializer(
        read_only=True, allow_null=True, help_text="Null until the job's first sample."
    )

    class Meta:
        model = Job
        fields = [
            "id",
            "state",
            "kind",
            "recipe",
            "recipe_version",
            "code_package",
            "parameters",
            "dataset",
            "resource_class",
            "gpu_count",
            "priority",
            "labels",
            "max_runtime_s",
            "attempt",
            "progress",
            "queue_position",
            "waiting_reason",
            "failure_reason",
            "worker",
            "input_model",
            "output_model",
            "output_dataset",
            "cost_so_far_minor",
            "utilization",
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

    @extend_schema_field(CodePackageRefSerializer(allow_null=True))
    def get_code_package(self, job) -> dict | None:
        version = job.code_package_version
        return {"package": version.package.name, "number": version.number} if version else None

    def get_output_model(self, job) -> dict | None:
        version = job.output_model_version
        return (
            {"model": version.registered_model.name, "number": version.number} if version else None
        )

    def get_input_model(self, job) -> dict | None:
        version = job.input_model_version
        return (
            {"model": version.registered_model.name, "number": version.number} if version else None
        )

    def get_output_dataset(self, job) -> dict | None:
        version = job.output_dataset_version
        return {"dataset": version.dataset.name, "number": version.number} if version else None

    def get_cost_so_far_minor(self, job) -> int:
        return job_cost_so_far(job=job)


# The reads (one job, a page of them) answer JobSerializer's fields from values() rows: the
# serializer's per-field machinery over model instances with seven related objects each was most
# of a page's CPU (docs/benchmarks.md, API under load). Plain fields go through JobSerializer's own
# field objects, so a plain field added to it appears here too; its method fields are rebuilt
# below from the row and the names of the versions it points at, and a method field added there
# without a counterpart here fails at the first read (and in tests/jobs/test_api_rows.py).
_VERSION_FIELDS = {
    # JobSerializer method field: (the job's foreign key, kind in version_names, name key).
    "dataset": ("input_dataset_version", "dataset", "dataset"),
    "code_package": ("code_package_version", "code_package", "package"),
    "input_model": ("input_model_version", "model", "model"),
    "output_model": ("output_model_version", "model", "model"),
    "output_dataset": ("output_dataset_version", "dataset", "dataset"),
}


# JobSerializer fields read from a property a scheduling pass leaves to be worked out when read:
# the row keys each needs (job_rows_data computes them as the properties do).
_COMPUTED_FIELDS = {
    "waiting_reason": ("waiting_reason", "reserved_machine", "expected_start_at"),
    "queue_position": ("state", "resource_class"),
}


@cache
def _row_plan() -> tuple[tuple, tuple[str, ...]]:
    """(per JobSerializer field: name, row key, how to show a value), and the values() keys."""
    plan = []
    for name, field in JobSerializer().fields.items():
        if name in _COMPUTED_FIELDS:
            plan.append((name, None, None))
        elif isinstance(field, serializers.SerializerMethodField):
            if name != "cost_so_far_minor" and name not in _VERSION_FIELDS:
                raise LookupError(f"JobSerializer.{name} has no counterpart in job_rows_data.")
            plan.append((name, None, None))
        elif isinstance(field, serializers.RelatedField):
            plan.append((name, field.source, None))  # values() gives the primary key itself
        elif _iso_datetime(field):
            plan.append((name, field.source, _DATETIME))
        else:
            plan.append((name, field.source.replace(".", "__"), field.to_representation))
    keys = {key for _, key, _ in plan if key} | set(COST_FIELDS)
    keys |= {relation for relation, _, _ in _VERSION_FIELDS.values()}
    keys |= {key for needed in _COMPUTED_FIELDS.values() for key in needed}
    return tuple(plan), tuple(sorted(keys))


# DateTimeField's ISO 8601 output, the API's format, shown in job_rows_data with the current
# timezone read once per page: DRF reads it for every value (four a job); formatting a page of
# 50 rows took 1.2 ms of CPU that way, 0.5 ms this way.
_DATETIME = object()


def _iso_datetime(field) -> bool:
    return (
        isinstance(field, serializers.DateTimeField)
        and not hasattr(field, "format")
        and not hasattr(field, "timezone")
        and api_settings.DATETIME_FORMAT.lower() == ISO_8601
    )


def job_rows(queryset, *, versions: bool = False):
    """`queryset` (of jobs) as the values() rows job_rows_data reads: the row's fields and the
    subquery that prices a running job; with `versions`, the names of the versions it points at
    too, which job_rows_data otherwise reads in a query per kind (ten subqueries more to compile:
    for a statement compiled once, tenants.compiled)."""
    annotations = job_row_annotations()
    if versions:
        for relation, kind, _ in _VERSION_FIELDS.values():
            annotations |= version_name_subqueries(kind=kind, ref=relation)
    return queryset.values(*_row_plan()[1], **annotations)


def job_rows_data(
    *, rows: list[dict], organization: Organization, queue_places: dict[int, int] | None = None
) -> list[dict]:
    """JobSerializer(job).data of each row of `job_rows()`, the same dicts field by field; the
    page's running jobs priced together and its versions named in a query per kind; its queued
    jobs placed in one query, or by `queue_places` (job id: place) where the caller has them."""
    plan, _ = _row_plan()
    costs = job_costs_so_far(jobs=rows)
    ids: dict[str, set[int]] = {"dataset": set(), "model": set(), "code_package": set()}
    for row in rows:
        for relation, kind, _ in _VERSION_FIELDS.values():
            if row[relation] is not None and VERSION_NAME.format(relation) not in row:
                ids[kind].add(row[relation])
    names = version_names(
        organization=organization,
        dataset_versions=ids["dataset"],
        model_versions=ids["model"],
        code_package_versions=ids["code_package"],
    )
    positions = (
        queue_places
        if queue_places is not None
        else queue_positions(
            organization=organization,
            resource_class_ids={
                row["resource_class"] for row in rows if row["state"] == JobState.QUEUED
            },
        )
    )
    zone = timezone.get_current_timezone()
    data = []
    for row in rows:
        item = {}
        for name, key, show in plan:
            if key is not None:
                value = row[key]
                if value is None or show is None:
                    item[name] = value
                elif show is _DATETIME:
                    text = value.astimezone(zone).isoformat()
                    item[name] = text[:-6] + "Z" if text.endswith("+00:00") else text
                else:
                    item[name] = show(value)
            elif name == "cost_so_far_minor":
                item[name] = costs[row["id"]]
            elif name == "waiting_reason":
                item[name] = waiting_text(*(row[key] for key in _COMPUTED_FIELDS[name]))
            elif name == "queue_position":
                item[name] = positions.get(row["id"]) if row["state"] == JobState.QUEUED else None
            else:
                relation, kind, label = _VERSION_FIELDS[name]
                if VERSION_NAME.format(relation) in row:
                    version = (
                        (row[VERSION_NAME.format(relation)], row[VERSION_NUMBER.format(relation)])
                        if row[VERSION_NUMBER.format(relation)] is not None
                        else None
                    )
                else:
                    version = names[kind].get(row[relation])
                item[name] = {label: version[0], "number": version[1]} if version else None
        data.append(item)
    return data


# The first page of the list as JSON built by PostgreSQL (jobs.api.views._JSON_PAGES): the
# statement gives each row's JobSerializer JSON in text pieces, and between them the fields it
# leaves to Python where a row needs them (a running job's cost, a queued job's place, a
# reservation's ETA, utilization); formatting rows and rendering them in Python was about half
# of what the list cost more than bare DRF (docs/benchmarks.md). Every plain field's SQL comes
# from its serializer field's type, so a plain field added to JobSerializer appears here too,
# and a field of a type without SQL below fails at the first read.
_JSON_TABLE = "compiled"

# DRF's ISO 8601 in UTC: microseconds only where there are any, "Z" for +00:00.
_ISO_SQL = (
    "to_char({c} AT TIME ZONE 'UTC', CASE WHEN date_trunc('second', {c}) = {c} "
    """THEN 'YYYY-MM-DD"T"HH24:MI:SS"Z"' ELSE 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"' END)"""
)
# str() of the same moment, which CursorPagination keeps as a page's position.
_POSITION_SQL = (
    "to_char({c} AT TIME ZONE 'UTC', CASE WHEN date_trunc('second', {c}) = {c} "
    """THEN 'YYYY-MM-DD HH24:MI:SS"+00:00"' ELSE 'YYYY-MM-DD HH24:MI:SS.US"+00:00"' END)"""
)

# The row keys the Python side reads, after the JSON pieces (job_json_rows).
_JSON_RAW = (
    *COST_FIELDS,
    ATTEMPT_STARTED,
    *PRICE_AT,
    "resource_class",
    "waiting_reason",
    "reserved_machine",
    "expected_start_at",
    "utilization",
)


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _column(key: str) -> str:
    return f'{_JSON_TABLE}."{key}"'


def _states(states) -> str:
    return ", ".join(_literal(str(state)) for state in states)


def _json_slot_sql(name: str) -> str:
    """The JSON of a field Python works out where a row needs it: SQL gives it for the other
    rows, NULL for those."""
    state = _column("state")
    return {
        "queue_position": f"CASE WHEN {state} <> {_literal(JobState.QUEUED)} THEN 'null' END",
        "waiting_reason": (
            f"CASE WHEN {_column('reserved_machine')} IS NULL "
            f"OR {_column('expected_start_at')} IS NULL "
            f"THEN to_json({_column('waiting_reason')})::text END"
        ),
        "cost_so_far_minor": (
            f"CASE WHEN {state} NOT IN ({_states(ACTIVE_STATES)}) "
            f"THEN {_column('cost_minor')}::text END"
        ),
        "utilization": f"CASE WHEN {_column('utilization')} IS NULL THEN 'null' END",
    }[name]


def _json_field_sql(name: str, field) -> str:
    """The JSON text of a plain or version field of JobSerializer, from the page's row."""
    if name in _VERSION_FIELDS:
        relation, _, label = _VERSION_FIELDS[name]
        number = _column(VERSION_NUMBER.format(relation))
        text = _column(VERSION_NAME.format(relation))
        return (
            f"CASE WHEN {number} IS NULL THEN 'null' ELSE "
            f"""'{{"{label}":' || to_json({text})::text || ',"number":' || {number} || '}}' END"""
        )
    if isinstance(field, serializers.RelatedField):
        value = f"{_column(field.source)}::text"
    elif _iso_datetime(field):
        value = "'\"' || " + _ISO_SQL.format(c=_column(field.source)) + " || '\"'"
    elif isinstance(field, serializers.IntegerField):
        value = f"{_column(field.source.replace('.', '__'))}::text"
    elif isinstance(field, serializers.CharField | serializers.ChoiceField):
        value = f"to_json({_column(field.source.replace('.', '__'))})::text"
    elif isinstance(field, serializers.JSONField) and not field.binary:
        value = f"{_column(field.source)}::text"
    else:
        raise LookupError(f"JobSerializer.{name} has no SQL in job_json_rows.")
    return f"COALESCE({value}, 'null')"


# JobSerializer fields each row's SQL gives where it can, and Python works out where not.
_JSON_SLOTS = ("queue_position", "waiting_reason", "cost_so_far_minor", "utilization")


@cache
def _json_plan() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the SELECT list: JSON pieces with a slot's SQL between each two, then the raw keys and
    the row's cursor position), and the slots in the order they come."""
    pieces, slots, current = [], [], []
    lead = "{"
    for name, field in JobSerializer().fields.items():
        key = _literal(f'{lead}"{name}":')
        lead = ","
        if name in _JSON_SLOTS:
            pieces += [" || ".join([*current, key]), _json_slot_sql(name)]
            current = []
            slots.append(name)
        else:
            current += [key, _json_field_sql(name, field)]
    pieces.append(" || ".join([*current, "'}'"]))
    pieces += [_column(key) for key in _JSON_RAW]
    pieces.append(_POSITION_SQL.format(c=_column("created_at")))
    return tuple(pieces), tuple(slots)


def job_json_select(table: str) -> str:
    """The page's SELECT around `table` (tenants.compiled.CompiledSelect), whose rows are
    job_rows(versions=True)'s, in the list's order."""
    pieces, _ = _json_plan()
    # Written from the serializer's field names and constants; no request value reaches it.
    return (
        f"SELECT {', '.join(pieces)} FROM {table} "  # noqa: S608
        f"ORDER BY {_column('created_at')} DESC, {_column('id')} DESC"
    )


class JobJSONRow(tuple):
    """A row of job_json_select, which CursorPagination reads a position from."""

    __slots__ = ()

    @property
    def created_at(self) -> str:
        return self[-1]  # str() of the moment, as the paginator keeps it


@cache
def _utilization_field() -> serializers.Field:
    return JobSerializer().fields["utilization"]


def job_json_rows(*, rows: list[JobJSONRow], organization: Organization) -> list[str]:
    """Each row of job_json_select as JSON text, JobSerializer(job).data field by field: the
    page's running jobs priced together, its queued jobs placed in a query per class."""
    _, slots = _json_plan()
    width = 2 * len(slots) + 1
    raw = [dict(zip(_JSON_RAW, row[width:-1], strict=True)) for row in rows]
    costs = job_costs_so_far(jobs=[job for job in raw if job["state"] in ACTIVE_STATES])
    positions = queue_positions(
        organization=organization,
        resource_class_ids={
            job["resource_class"] for job in raw if job["state"] == JobState.QUEUED
        },
    )

    def work_out(name: str, job: dict):
        if name == "queue_position":
            return positions.get(job["id"])
        if name == "waiting_reason":
            return waiting_text(*(job[key] for key in _COMPUTED_FIELDS[name]))
        if name == "cost_so_far_minor":
            return costs[job["id"]]
        value = json.loads(job["utilization"])
        return None if value is None else _utilization_field().to_representation(value)

    page = []
    for row, job in zip(rows, raw, strict=True):
        parts = list(row[:width])
        for n, name in enumerate(slots):
            if parts[2 * n + 1] is None:
                parts[2 * n + 1] = json.dumps(
                    work_out(name, job), ensure_ascii=False, allow_nan=False
                )
        page.append("".join(parts))
    return page


class JobDetailSerializer(JobSerializer):
    """One job: its fields as listed, and the right-sizing hint (worked out for one job only)."""

    rightsizing_hint = serializers.SerializerMethodField(
        help_text="A cheaper resource class whose GPUs hold the job's peak GPU memory with 20% to "
        "spare, and the same run time priced on it from today's rate card; null when none is "
        "cheaper, on CPU, or before enough samples."
    )

    class Meta(JobSerializer.Meta):
        fields = [*JobSerializer.Meta.fields, "rightsizing_hint"]
        read_only_fields = fields

    @extend_schema_field(RightsizingHintSerializer(allow_null=True))
    def get_rightsizing_hint(self, job) -> dict | None:
        return _hint_data(job.utilization, job.resource_class.name, job.gpu_count)


def _hint_data(utilization: dict | None, resource_class_name: str, gpu_count: int) -> dict | None:
    hint = job_rightsizing_hint(
        utilization=utilization, resource_class_name=resource_class_name, gpu_count=gpu_count
    )
    return None if hint is None else dataclasses.asdict(hint)


def job_detail_data(*, row: dict, organization: Organization) -> dict:
    """JobDetailSerializer(job).data, from one values() row of `job_rows()`."""
    [data] = job_rows_data(rows=[row], organization=organization)
    data["rightsizing_hint"] = _hint_data(
        row["utilization"], row["resource_class__name"], row["gpu_count"]
    )
    return data


class JobSubmittedSerializer(JobSerializer):
    estimated_cost_per_hour = MoneySerializer(read_only=True)
    estimated_max_cost = MoneySerializer(
        read_only=True, help_text="Price per GPU-second x GPUs x max runtime: the most it costs."
    )

    class Meta(JobSerializer.Meta):
        fields = [*JobSerializer.Meta.fields, "estimated_cost_per_hour", "estimated_max_cost"]
        read_only_fields = fields


def _instance_value(job: Job, key: str):
    """What values(key) gives for the job: a column, a foreign key's id, or a related field
    (`resource_class__name`) read through the related objects the job holds."""
    head, *path = key.split("__")
    if not path:
        return getattr(job, Job._meta.get_field(head).attname)
    value = getattr(job, head)
    for name in path:
        if value is None:
            return None
        value = getattr(value, name)
    return value


def job_submitted_data(*, job: Job, organization: Organization, estimate: dict) -> dict:
    """JobSubmittedSerializer(job).data (with `estimate`, _estimate's two amounts), from the
    job's own attributes through job_rows_data: a submit's response without building
    ModelSerializer's fields on every request. A job just submitted holds the objects its
    versions name, so this reads nothing more than its place in the queue (one query, as
    Job.queue_position)."""
    row = {key: _instance_value(job, key) for key in _row_plan()[1]}
    for relation, kind, _ in _VERSION_FIELDS.values():
        version = getattr(job, relation)
        parent = getattr(version, VERSION_KINDS[kind][1]) if version is not None else None
        row[VERSION_NAME.format(relation)] = parent.name if parent is not None else None
        row[VERSION_NUMBER.format(relation)] = version.number if version is not None else None
    place = job_queue_position(job=job)
    [data] = job_rows_data(
        rows=[row],
        organization=organization,
        queue_places={} if place is None else {job.pk: place},
    )
    for name in ("estimated_cost_per_hour", "estimated_max_cost"):
        data[name] = {
            "amount": str(estimate[name]["amount"]),
            "currency": str(estimate[name]["currency"]),
        }
    return data


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


class UtilizationSampleSerializer(serializers.ModelSerializer):
    class Meta:
        model = UtilizationSample
        fields = [
            "attempt",
            "at",
            "seconds",
            "cpu_cores",
            "memory_bytes",
            "gpu_utilization",
            "gpu_memory_bytes",
        ]


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


class SweepCreateSerializer(serializers.Serializer):
    name = serializers.CharField(
        max_length=100, help_text="Trials register as versions of this model."
    )
    recipe = serializers.CharField(max_length=100)
    parameters = serializers.DictField(default=dict, help_text="Fixed parameters of every trial.")
    space = serializers.DictField(
        help_text='Per parameter {"values": [...]} or {"min": a, "max": b, "log": false}.'
    )
    strategy = serializers.ChoiceField(
        choices=Sweep.Strategy.choices, default=Sweep.Strategy.RANDOM
    )
    trial_count = serializers.IntegerField(min_value=1, max_value=50)
    metric = serializers.CharField(max_length=100, help_text="A result metric, e.g. val_accuracy.")
    mode = serializers.ChoiceField(choices=Sweep.Mode.choices, default=Sweep.Mode.MAX)
    dataset = DatasetRefSerializer()
    resource_class = serializers.CharField(max_length=40, default="cpu")
    gpu_count = serializers.IntegerField(min_value=1, max_value=64, default=1)
    max_runtime_s = serializers.IntegerField(min_value=60, max_value=7 * 24 * 3600, default=3600)


class SweepSerializer(serializers.ModelSerializer):
    trials = serializers.SerializerMethodField()

    class Meta:
        model = Sweep
        fields = [
            "id",
            "name",
            "recipe",
            "base_parameters",
            "space",
            "strategy",
            "trial_count",
            "metric",
            "mode",
            "state",
            "best_job",
            "trials",
            "created_at",
            "finished_at",
        ]
        read_only_fields = fields

    def get_trials(self, sweep) -> list[dict]:
        rows = []
        for job in sweep.trials.select_related("output_model_version").order_by("pk"):
            version = job.output_model_version
            rows.append(
                {
                    "job": job.pk,
                    "state": job.state,
                    "parameters": job.parameters,
                    "model_version": version.number if version else None,
                    "metric": version.metrics.get(sweep.metric) if version else None,
                }
            )
        return rows
