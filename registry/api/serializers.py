import json

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from registry.models import (
    CodePackage,
    CodePackageVersion,
    Dataset,
    DatasetFormat,
    DatasetVersion,
    ModelAlias,
    ModelArtifact,
    ModelVersion,
    PendingUpload,
    RegisteredModel,
)
from registry.storage.base import MAX_PART_BYTES, MAX_PARTS


class DatasetSerializer(serializers.ModelSerializer):
    version_count = serializers.IntegerField(read_only=True, default=0)

    class Meta:
        model = Dataset
        fields = ["name", "description", "version_count", "created_at"]
        read_only_fields = ["version_count", "created_at"]


class DatasetUpdateSerializer(serializers.Serializer):
    description = serializers.CharField(allow_blank=True, max_length=10_000)


class CsvDialectSerializer(serializers.Serializer):
    """How the registry split the CSV into rows and cells at upload; training reads it the same."""

    delimiter = serializers.CharField()
    quote_char = serializers.CharField()
    double_quote = serializers.BooleanField()
    encoding = serializers.CharField()


class DatasetVersionSerializer(serializers.ModelSerializer):
    dataset = serializers.CharField(source="dataset.name", read_only=True)
    created_by = serializers.EmailField(
        source="created_by.email", read_only=True, default=None, allow_null=True
    )
    csv_dialect = CsvDialectSerializer(read_only=True, allow_null=True)
    state = serializers.ChoiceField(
        choices=DatasetVersion.State.choices,
        read_only=True,
        help_text="`checking` until the background check has read the file, then `ready` "
        "(usable by jobs) or `rejected` (see `rejection_reason`; the file is deleted).",
    )
    check_progress = serializers.FloatField(
        read_only=True, help_text="How much of the file the check has read, 0 to 1."
    )
    rejection_reason = serializers.CharField(
        read_only=True, help_text="Why the check refused the file; empty unless rejected."
    )

    class Meta:
        model = DatasetVersion
        fields = [
            "dataset",
            "number",
            "state",
            "check_progress",
            "rejection_reason",
            "format",
            "original_filename",
            "size_bytes",
            "sha256",
            "row_count",
            "schema",
            "csv_dialect",
            "source",
            "source_job_id",
            "created_by",
            "created_at",
        ]
        read_only_fields = fields


class DatasetVersionDetailSerializer(DatasetVersionSerializer):
    class Meta(DatasetVersionSerializer.Meta):
        fields = [*DatasetVersionSerializer.Meta.fields, "profile", "preview"]
        read_only_fields = fields


class DatasetUploadSerializer(serializers.Serializer):
    file = serializers.FileField(
        help_text="CSV, Parquet, .npz, or a zip of images in one folder per class."
    )
    format = serializers.ChoiceField(
        choices=DatasetFormat.choices, required=False, help_text="Optional; the content must agree."
    )


class PendingUploadCreateSerializer(serializers.Serializer):
    filename = serializers.CharField(max_length=255)
    format = serializers.ChoiceField(choices=DatasetFormat.choices, required=False)
    size_bytes = serializers.IntegerField(
        min_value=0, help_text="The file's exact size in bytes; the store accepts no other."
    )
    parts = serializers.BooleanField(
        required=False,
        default=False,
        help_text="Send the file in parts (PUT each to its own URL, in parallel, and after a "
        "dropped connection only the parts storage lacks) instead of in one POST.",
    )
    part_size_bytes = serializers.IntegerField(
        required=False,
        min_value=1,
        max_value=MAX_PART_BYTES,
        help_text="With `parts`: the size of every part but the last (default 8 MiB, at least "
        "5 MiB). The server may raise it so the file fits in 10,000 parts.",
    )


class PendingUploadSerializer(serializers.ModelSerializer):
    """A started upload, with the form to POST its file with, or the geometry of its parts."""

    # `url` and `fields` come from the storage's PresignedPost, which the view sets as `form`;
    # an upload in parts has none.
    url = serializers.CharField(
        source="form.url",
        read_only=True,
        allow_null=True,
        help_text="POST the file here as multipart/form-data: every entry of `fields` first, "
        "then the file's bytes as `file`. Then call finalize. Null for an upload in parts.",
    )
    part_count = serializers.IntegerField(
        read_only=True, help_text="How many parts to send (0 for an upload in one POST)."
    )

    class Meta:
        model = PendingUpload
        fields = [
            "id",
            "original_filename",
            "size_bytes",
            "url",
            "part_size_bytes",
            "part_count",
            "expires_at",
        ]
        read_only_fields = fields

    def get_fields(self):
        # Declared here: as a class attribute, `fields` would hide Serializer.fields.
        return {
            **super().get_fields(),
            "fields": serializers.DictField(
                source="form.fields",
                child=serializers.CharField(),
                read_only=True,
                allow_null=True,
                help_text="Form entries to send, unchanged, before the file (empty for local "
                "storage).",
            ),
        }


class StoredPartSerializer(serializers.Serializer):
    number = serializers.IntegerField()
    size_bytes = serializers.IntegerField(source="size")
    etag = serializers.CharField()


class UploadPartsSerializer(serializers.Serializer):
    """The parts storage holds for an upload, and those still to send."""

    part_size_bytes = serializers.IntegerField()
    part_count = serializers.IntegerField()
    parts = StoredPartSerializer(many=True, help_text="Held by storage, as storage reports them.")
    missing = serializers.ListField(
        child=serializers.IntegerField(),
        help_text="Parts to send: absent, or not their reserved size (send those again).",
    )


class UploadPartUrlsRequestSerializer(serializers.Serializer):
    numbers = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=MAX_PARTS),
        min_length=1,
        max_length=1000,
        help_text="Part numbers (1 to the upload's part_count), at most 1000 per call.",
    )


class UploadPartUrlSerializer(serializers.Serializer):
    number = serializers.IntegerField()
    size_bytes = serializers.IntegerField(
        help_text="Send exactly this many bytes, as Content-Length; the store refuses any other."
    )
    url = serializers.CharField(help_text="PUT the part's bytes here; no other header needed.")


class UploadPartUrlsSerializer(serializers.Serializer):
    parts = UploadPartUrlSerializer(many=True)
    expires_at = serializers.DateTimeField()


class DownloadSerializer(serializers.Serializer):
    name = serializers.CharField()
    url = serializers.CharField()
    size_bytes = serializers.IntegerField()
    sha256 = serializers.CharField()
    expires_in = serializers.IntegerField()


class EdgeBundleSerializer(DownloadSerializer):
    model_version = serializers.DictField(help_text="The version the bundle was exported from.")
    source_job = serializers.IntegerField(allow_null=True, help_text="The export job.")
    self_check = serializers.DictField(
        help_text="What the export checked: the sample inputs, the stated tolerance and the "
        "largest difference between the bundle's outputs and the platform model's."
    )
    created_at = serializers.DateTimeField()


class RegisteredModelSerializer(serializers.ModelSerializer):
    version_count = serializers.IntegerField(read_only=True, default=0)
    aliases = serializers.SerializerMethodField()

    class Meta:
        model = RegisteredModel
        fields = [
            "name",
            "description",
            "promotion_gates",
            "version_count",
            "aliases",
            "created_at",
        ]
        read_only_fields = ["version_count", "aliases", "created_at"]

    def get_aliases(self, obj) -> dict[str, int]:
        return {alias.name: alias.version.number for alias in obj.aliases.select_related("version")}


class RegisteredModelUpdateSerializer(serializers.Serializer):
    description = serializers.CharField(allow_blank=True, max_length=10_000, required=False)
    promotion_gates = serializers.ListField(child=serializers.DictField(), required=False)


class ModelArtifactSerializer(serializers.ModelSerializer):
    class Meta:
        model = ModelArtifact
        fields = ["name", "size_bytes", "sha256"]


class ModelVersionSerializer(serializers.ModelSerializer):
    model = serializers.CharField(source="registered_model.name", read_only=True)
    artifacts = ModelArtifactSerializer(many=True, read_only=True)
    trained_on = serializers.SerializerMethodField()
    parent_version = serializers.IntegerField(
        source="parent_version.number", read_only=True, default=None, allow_null=True
    )
    created_by = serializers.EmailField(
        source="created_by.email", read_only=True, default=None, allow_null=True
    )

    class Meta:
        model = ModelVersion
        fields = [
            "model",
            "number",
            "recipe_name",
            "recipe_version",
            "parameters",
            "metrics",
            "input_signature",
            "artifacts",
            "trained_on",
            "parent_version",
            "source_job_id",
            "created_by",
            "created_at",
        ]
        read_only_fields = fields

    def get_trained_on(self, obj) -> list[dict]:
        return [
            {"dataset": v.dataset.name, "number": v.number}
            for v in obj.trained_on.select_related("dataset")
        ]


@extend_schema_field({"type": "string", "format": "json", "description": "A JSON value, as text."})
class JSONStringField(serializers.Field):
    """A JSON value sent as a string (multipart forms carry no nested data)."""

    def __init__(self, *, kind: type, **kwargs):
        self.kind = kind
        super().__init__(**kwargs)

    def to_internal_value(self, data):
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as exc:
                raise serializers.ValidationError(f"Not valid JSON: {exc.msg}.") from exc
        if not isinstance(data, self.kind):
            raise serializers.ValidationError(f"Must be a JSON {self.kind.__name__}.")
        return data

    def to_representation(self, value):
        return value


class DatasetRefSerializer(serializers.Serializer):
    dataset = serializers.CharField()
    number = serializers.IntegerField(min_value=1)


class ModelVersionRegisterSerializer(serializers.Serializer):
    weights = serializers.FileField(help_text="A safetensors file; nothing is ever unpickled.")
    config = JSONStringField(kind=dict, help_text="JSON object describing the architecture.")
    metrics = JSONStringField(kind=dict, required=False)
    parameters = JSONStringField(kind=dict, required=False)
    recipe_name = serializers.CharField(max_length=100, required=False, allow_blank=True)
    recipe_version = serializers.CharField(max_length=40, required=False, allow_blank=True)
    trained_on = JSONStringField(
        kind=list, required=False, help_text='e.g. [{"dataset": "iris", "number": 2}]'
    )
    parent_version = serializers.IntegerField(min_value=1, required=False)

    def validate_trained_on(self, value):
        refs = DatasetRefSerializer(data=value, many=True)
        refs.is_valid(raise_exception=True)
        return refs.validated_data


class ModelAliasSerializer(serializers.ModelSerializer):
    version = serializers.IntegerField(source="version.number", read_only=True)
    updated_by = serializers.EmailField(source="updated_by.email", read_only=True, default=None)

    class Meta:
        model = ModelAlias
        fields = ["name", "version", "updated_by", "updated_at"]
        read_only_fields = fields


class ModelAliasSetSerializer(serializers.Serializer):
    version = serializers.IntegerField(min_value=1)


class CompareQuerySerializer(serializers.Serializer):
    """`?versions=1,3`: the version numbers to compare, comma-separated."""

    versions = serializers.CharField(max_length=1000)

    def validate_versions(self, value: str) -> list[int]:
        parts = [part.strip() for part in value.split(",") if part.strip()]
        if not parts or not all(part.isdecimal() and int(part) > 0 for part in parts):
            raise serializers.ValidationError(
                "Give the version numbers to compare, comma-separated, e.g. 1,3."
            )
        return [int(part) for part in parts]


class CompareSerializer(serializers.Serializer):
    versions = serializers.ListField(child=serializers.IntegerField())
    parameters = serializers.DictField(child=serializers.ListField())
    metrics = serializers.DictField(child=serializers.ListField())


class LineageSerializer(serializers.Serializer):
    root = serializers.CharField()
    nodes = serializers.ListField(child=serializers.DictField())
    edges = serializers.ListField(child=serializers.DictField())


class CodePackageSerializer(serializers.ModelSerializer):
    version_count = serializers.IntegerField(read_only=True, default=0)
    latest_version = serializers.IntegerField(read_only=True, default=None, allow_null=True)

    class Meta:
        model = CodePackage
        fields = ["name", "version_count", "latest_version", "created_at"]
        read_only_fields = fields


class CodeManifestPackageSerializer(serializers.Serializer):
    name = serializers.CharField()
    version = serializers.CharField(allow_null=True)


class CodeManifestEntrySerializer(serializers.Serializer):
    train = serializers.CharField(help_text='"module:function" run by a training job.')
    predict = serializers.CharField(
        allow_null=True, help_text='"module:function" for batch inference, if the package has one.'
    )


class CodeManifestRuntimeSerializer(serializers.Serializer):
    name = serializers.CharField()


class CodeManifestOutputsSerializer(serializers.Serializer):
    model = serializers.BooleanField()
    dataset = serializers.BooleanField()


class CodeManifestSerializer(serializers.Serializer):
    """The package's factory.toml as the registry checked and stored it."""

    package = CodeManifestPackageSerializer()
    entry = CodeManifestEntrySerializer()
    runtime = CodeManifestRuntimeSerializer()
    outputs = CodeManifestOutputsSerializer()
    parameters = serializers.DictField(
        help_text="JSON Schema (Draft 2020-12) of the parameters object a job passes."
    )


class CodePackageVersionSerializer(serializers.ModelSerializer):
    package = serializers.CharField(source="package.name", read_only=True)
    created_by = serializers.EmailField(
        source="created_by.email", read_only=True, default=None, allow_null=True
    )
    manifest = CodeManifestSerializer(read_only=True)

    class Meta:
        model = CodePackageVersion
        fields = [
            "package",
            "number",
            "archive_format",
            "original_filename",
            "size_bytes",
            "sha256",
            "manifest",
            "created_by",
            "created_at",
        ]
        read_only_fields = fields


class CodePackageUploadSerializer(serializers.Serializer):
    file = serializers.FileField(
        help_text="A zip or tar.gz of the package folder, with factory.toml at its root."
    )
    sha256 = serializers.RegexField(
        r"^[0-9a-fA-F]{64}$",
        required=False,
        help_text="Optional: the file's sha256 (hex); a mismatch refuses the upload.",
    )
