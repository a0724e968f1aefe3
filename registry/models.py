"""Datasets and models, their immutable versions, aliases, and the lineage between them."""

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models
from django.utils import timezone

from tenants.models import OrganizationOwned

name_validator = RegexValidator(
    r"^[a-z0-9][a-z0-9._-]{0,99}$",
    "Use 1-100 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit.",
)


class DatasetFormat(models.TextChoices):
    CSV = "csv", "CSV"
    PARQUET = "parquet", "Parquet"
    NPZ = "npz", "NumPy .npz"
    IMAGE_FOLDER_ZIP = "image_folder_zip", "Zip of images, one folder per class"


class Dataset(OrganizationOwned):
    name = models.CharField(max_length=100, validators=[name_validator])
    description = models.TextField(blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["organization", "name"], name="dataset_unique_name"),
        ]

    def __str__(self):
        return self.name


class DatasetVersionState(models.TextChoices):
    CHECKING = "checking", "Checking"
    READY = "ready", "Ready"
    REJECTED = "rejected", "Rejected"


class DatasetVersion(OrganizationOwned):
    """One immutable upload (or job output) of a dataset, with what we learned reading it.

    An upload is stored and answered at once in `checking`; a background check (the registry's
    `dataset_version_check`) reads it and makes it `ready`, filling in what it learned, or
    `rejected` with the reason, its object deleted. Only a `ready` version is ever used.
    """

    State = DatasetVersionState

    class Source(models.TextChoices):
        UPLOAD = "upload", "Upload"
        JOB_OUTPUT = "job_output", "Job output"

    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    state = models.CharField(
        max_length=10, choices=DatasetVersionState.choices, default=DatasetVersionState.READY
    )
    # Why the check refused the file, in the uploader's words; empty unless rejected.
    rejection_reason = models.TextField(blank=True)
    # How far the check has read, 0 to 1; the version page shows it while checking.
    check_progress = models.FloatField(default=0.0)
    # When the check was last owed or last wrote its progress: one silent for long was lost
    # (a broker that dropped its queue, a worker gone past redelivery) and is owed again.
    check_touched_at = models.DateTimeField(default=timezone.now)
    # What the uploader called the format, checked against the content by the check.
    declared_format = models.CharField(max_length=20, blank=True)
    # Null once rejected: its object is deleted, and the orphan sweep takes it if that failed.
    storage_key = models.CharField(max_length=500, unique=True, null=True, blank=True)
    original_filename = models.CharField(max_length=255, blank=True)
    size_bytes = models.BigIntegerField()
    # Known when the check has read the bytes (empty before for a finalized large upload).
    sha256 = models.CharField(max_length=64, blank=True)
    # Blank and null until the check has decided them.
    format = models.CharField(max_length=20, choices=DatasetFormat.choices, blank=True)
    row_count = models.BigIntegerField(null=True, blank=True)
    schema = models.JSONField(default=list)
    profile = models.JSONField(default=dict)
    preview = models.JSONField(default=list)
    # CSV only: the dialect the registry decided at upload (registry.formats.csv_reader.CsvDialect
    # as JSON); every reader of the file, the recipes included, reads it with this one. Null for
    # other formats, and for CSVs recorded before it was stored (readers then detect it the same
    # way the upload did).
    csv_dialect = models.JSONField(null=True, blank=True)
    source = models.CharField(max_length=20, choices=Source.choices, default=Source.UPLOAD)
    # The job that wrote this version; becomes a foreign key when the jobs app lands.
    source_job_id = models.BigIntegerField(null=True, blank=True)
    # Predictions: the model version and input dataset version they were made from.
    derived_from_model_version = models.ForeignKey(
        "ModelVersion", null=True, blank=True, on_delete=models.PROTECT, related_name="predictions"
    )
    derived_from_dataset_version = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="derived"
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-number"]
        constraints = [
            models.UniqueConstraint(
                fields=["dataset", "number"], name="dataset_version_unique_number"
            ),
            models.CheckConstraint(
                condition=models.Q(size_bytes__gte=0), name="dataset_version_size_nonneg"
            ),
            models.CheckConstraint(
                condition=models.Q(format__in=DatasetFormat.values)
                | (~models.Q(state=DatasetVersionState.READY) & models.Q(format="")),
                name="dataset_version_format_valid",
            ),
            models.CheckConstraint(
                condition=models.Q(state__in=DatasetVersionState.values),
                name="dataset_version_state_valid",
            ),
            # A ready version is whole; a rejected one holds no object.
            models.CheckConstraint(
                condition=~models.Q(state=DatasetVersionState.READY)
                | (models.Q(storage_key__isnull=False) & models.Q(row_count__isnull=False)),
                name="dataset_version_ready_is_whole",
            ),
            models.CheckConstraint(
                condition=~models.Q(state=DatasetVersionState.REJECTED)
                | models.Q(storage_key__isnull=True),
                name="dataset_version_rejected_has_no_object",
            ),
            models.CheckConstraint(
                condition=models.Q(check_progress__gte=0) & models.Q(check_progress__lte=1),
                name="dataset_version_progress_fraction",
            ),
        ]
        indexes = [models.Index(fields=["organization", "-created_at"], name="dsv_org_time")]

    def __str__(self):
        return f"{self.dataset.name} v{self.number}"

    @property
    def is_ready(self) -> bool:
        return self.state == DatasetVersionState.READY


class RegisteredModel(OrganizationOwned):
    name = models.CharField(max_length=100, validators=[name_validator])
    description = models.TextField(blank=True)
    # Rules an alias move must satisfy, e.g.
    # [{"alias": "production", "metric": "accuracy", "op": ">=", "value": 0.9}].
    promotion_gates = models.JSONField(default=list, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "name"], name="registered_model_unique_name"
            ),
        ]

    def __str__(self):
        return self.name


class ModelVersion(OrganizationOwned):
    registered_model = models.ForeignKey(
        RegisteredModel, on_delete=models.CASCADE, related_name="versions"
    )
    number = models.PositiveIntegerField()
    recipe_name = models.CharField(max_length=100, blank=True)
    recipe_version = models.CharField(max_length=40, blank=True)
    parameters = models.JSONField(default=dict, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    input_signature = models.JSONField(default=dict, blank=True)
    # The job that trained this version; becomes a foreign key when the jobs app lands.
    source_job_id = models.BigIntegerField(null=True, blank=True)
    trained_on = models.ManyToManyField(DatasetVersion, blank=True, related_name="trained_models")
    parent_version = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="fine_tuned"
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-number"]
        constraints = [
            models.UniqueConstraint(
                fields=["registered_model", "number"], name="model_version_unique_number"
            ),
        ]
        indexes = [models.Index(fields=["organization", "-created_at"], name="mv_org_time")]

    def __str__(self):
        return f"{self.registered_model.name} v{self.number}"


class ModelArtifact(OrganizationOwned):
    """One file of a model version: safetensors weights or a JSON config, never a pickle."""

    model_version = models.ForeignKey(
        ModelVersion, on_delete=models.CASCADE, related_name="artifacts"
    )
    name = models.CharField(max_length=100)
    storage_key = models.CharField(max_length=500, unique=True)
    size_bytes = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(
                fields=["model_version", "name"], name="model_artifact_unique_name"
            ),
        ]

    def __str__(self):
        return f"{self.model_version} {self.name}"


class EdgeBundle(OrganizationOwned):
    """A model version exported for the edge: one zip of model.onnx, preprocessing.json, run.py
    and a README, made and checked by an export job (jobs.recipes.onnx_export).

    Its lineage is its version. It is not one of the version's ModelArtifacts: every job that
    reads a version downloads all of those, and the bundle is for use outside the platform.
    """

    model_version = models.ForeignKey(
        ModelVersion, on_delete=models.CASCADE, related_name="edge_bundles"
    )
    storage_key = models.CharField(max_length=500, unique=True)
    size_bytes = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    # What the export's self-check found: {"samples": n, "max_difference": x, "tolerance":
    # "atol 0.0001 on probabilities", "export_s": s, ...}.
    self_check = models.JSONField(default=dict)
    # The export job that made it.
    source_job_id = models.BigIntegerField(null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["model_version"], name="edge_bundle_one_per_version"),
            models.CheckConstraint(
                condition=models.Q(size_bytes__gte=0), name="edge_bundle_size_nonneg"
            ),
        ]

    def __str__(self):
        return f"{self.model_version} edge bundle"


class ModelAlias(OrganizationOwned):
    registered_model = models.ForeignKey(
        RegisteredModel, on_delete=models.CASCADE, related_name="aliases"
    )
    name = models.CharField(max_length=100, validators=[name_validator])
    version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="aliases")
    updated_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(
                fields=["registered_model", "name"], name="model_alias_unique_name"
            ),
        ]

    def __str__(self):
        return f"{self.registered_model.name}@{self.name} -> v{self.version.number}"


class PendingUpload(OrganizationOwned):
    """A large upload the client sends straight to storage, then asks us to finalize.

    Sent in one POST, its key is only ever written by the client; finalizing copies the object
    to a fresh key that no upload URL points at, so a version's bytes cannot change after they
    were checked. Sent in parts (a multipart upload), its key is the version's: nothing is there
    until finalizing completes the upload, and a completed upload takes no more parts.
    """

    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="pending_uploads")
    storage_key = models.CharField(max_length=500, unique=True)
    original_filename = models.CharField(max_length=255, blank=True)
    declared_format = models.CharField(max_length=20, choices=DatasetFormat.choices, blank=True)
    # The exact size the client declared; the store refuses any other, finalize checks it again.
    size_bytes = models.BigIntegerField()
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    # Set by the finalize that is copying the upload, so a second one is refused before it
    # copies; it lapses by itself, so a finalize that died mid-way does not block a retry.
    finalize_claimed_until = models.DateTimeField(null=True, blank=True)
    # Set for an upload in parts: the store's multipart upload id and the size of every part
    # but the last (which holds the rest).
    multipart_upload_id = models.CharField(max_length=255, blank=True)
    part_size_bytes = models.BigIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(size_bytes__gte=0), name="pending_upload_size_nonneg"
            ),
            models.CheckConstraint(
                condition=models.Q(part_size_bytes__isnull=True) | models.Q(part_size_bytes__gt=0),
                name="pending_upload_part_size_positive",
            ),
        ]

    def __str__(self):
        return f"upload to {self.dataset.name} ({self.original_filename})"

    @property
    def in_parts(self) -> bool:
        return self.part_size_bytes is not None

    @property
    def part_count(self) -> int:
        """How many parts make the file (0 for an upload in one POST)."""
        if self.part_size_bytes is None:
            return 0
        return max(1, -(-self.size_bytes // self.part_size_bytes))

    def part_size(self, number: int) -> int:
        """The exact size part `number` (1-based) must have."""
        if not 1 <= number <= self.part_count:
            raise ValueError(f"part {number} is not among 1..{self.part_count}")
        return min(self.part_size_bytes, self.size_bytes - (number - 1) * self.part_size_bytes)


class StorageAccount(OrganizationOwned):
    """Bytes an organization keeps in storage, against its quota; billing meters GB-hours."""

    quota_bytes = models.BigIntegerField()
    used_bytes = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["organization"], name="storage_account_one_per_org"),
            models.CheckConstraint(
                condition=models.Q(used_bytes__gte=0), name="storage_used_nonneg"
            ),
        ]

    def __str__(self):
        return f"{self.organization}: {self.used_bytes}/{self.quota_bytes} bytes"


class CodePackage(OrganizationOwned):
    """A tenant's own training code, by name; its bytes live only in immutable versions.

    It lives in the registry beside Dataset because it is the same kind of thing: a named,
    versioned, tenant-owned artifact in storage, uploaded through the same size limits, quota,
    archive guards and orphan sweep, and read by jobs the way they read dataset versions.
    Running it is the jobs app's business (the sandbox), never the registry's.
    """

    name = models.CharField(max_length=100, validators=[name_validator])
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "name"], name="code_package_unique_name"
            ),
        ]

    def __str__(self):
        return self.name


class CodePackageVersion(OrganizationOwned):
    """One uploaded archive (zip or tar.gz) of a code package and its parsed `factory.toml`.

    Never changed after it is written: a job that ran version 3 can always say exactly which
    bytes it ran (the sha256) and what the manifest promised.
    """

    class ArchiveFormat(models.TextChoices):
        ZIP = "zip", "Zip"
        TAR_GZ = "tar.gz", "Gzipped tar"

    package = models.ForeignKey(CodePackage, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    storage_key = models.CharField(max_length=500, unique=True)
    original_filename = models.CharField(max_length=255, blank=True)
    archive_format = models.CharField(max_length=10, choices=ArchiveFormat.choices)
    size_bytes = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    # The manifest as registry.formats.code_packages.parse_manifest returned it: normalized,
    # with every field checked, so readers never parse TOML again.
    manifest = models.JSONField()
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-number"]
        constraints = [
            models.UniqueConstraint(
                fields=["package", "number"], name="code_package_version_unique_number"
            ),
            models.CheckConstraint(
                condition=models.Q(size_bytes__gte=0), name="code_package_version_size_nonneg"
            ),
        ]
        indexes = [models.Index(fields=["organization", "-created_at"], name="cpv_org_time")]

    def __str__(self):
        return f"{self.package.name} v{self.number}"
