from django.conf import settings
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
)
from rest_framework import mixins, status
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound
from rest_framework.parsers import JSONParser, MultiPartParser
from rest_framework.response import Response

from registry import selectors, services
from registry.formats.code_packages import CodePackageError
from registry.models import (
    CodePackage,
    CodePackageVersion,
    Dataset,
    DatasetVersion,
    ModelAlias,
    ModelVersion,
    PendingUpload,
    RegisteredModel,
)
from registry.storage import DOWNLOAD_URL_TTL_S, get_storage
from registry.uploads import refuse_oversized_body, uploaded_path
from tenants.api.base import OrganizationScopedViewSet
from tenants.api.schema import ErrorSerializer
from tenants.standing import Effect

from . import serializers as s


def download_entry(*, name: str, key: str, size: int, sha256: str) -> dict:
    url = get_storage().presigned_get_url(key, filename=name, expires_s=DOWNLOAD_URL_TTL_S)
    return {
        "name": name,
        "url": url,
        "size_bytes": size,
        "sha256": sha256,
        "expires_in": DOWNLOAD_URL_TTL_S,
    }


@extend_schema(tags=["datasets"])
@extend_schema_view(
    create=extend_schema(request=s.DatasetSerializer, responses={201: s.DatasetSerializer}),
    partial_update=extend_schema(request=s.DatasetUpdateSerializer),
)
class DatasetViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    mixins.UpdateModelMixin,
    mixins.DestroyModelMixin,
    OrganizationScopedViewSet,
):
    model = Dataset
    serializer_class = s.DatasetSerializer
    lookup_field = "name"
    http_method_names = ["get", "post", "patch", "delete", "head"]
    required_scopes = {
        "list": "datasets:read",
        "retrieve": "datasets:read",
        "create": "datasets:write",
        "partial_update": "datasets:write",
        "destroy": "datasets:write",
    }
    # An empty dataset, or its name and description, costs nothing; its versions do.
    effects = {"create": Effect.CHANGE, "partial_update": Effect.CHANGE}

    def narrow_queryset(self, queryset):
        return selectors.dataset_list(organization=self.organization)

    def create(self, request, *args, **kwargs):
        data = s.DatasetSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        dataset = services.dataset_create(
            organization=self.organization, actor=self.actor, **data.validated_data
        )
        return Response(s.DatasetSerializer(dataset).data, status=status.HTTP_201_CREATED)

    def update(self, request, *args, **kwargs):
        dataset = self.get_object()
        data = s.DatasetUpdateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        dataset = services.dataset_update(dataset=dataset, actor=self.actor, **data.validated_data)
        return Response(s.DatasetSerializer(dataset).data)

    def perform_destroy(self, instance):
        services.dataset_delete(dataset=instance, actor=self.actor)


class _InDataset:
    """Rows of one dataset, named in the URL; a missing or foreign dataset is 404."""

    def narrow_queryset(self, queryset):
        self.dataset = selectors.dataset_get(
            organization=self.organization, name=self.kwargs["dataset_name"]
        )
        return queryset.filter(dataset=self.dataset).select_related("dataset", "created_by")


@extend_schema(tags=["datasets"])
@extend_schema_view(
    create=extend_schema(
        request={"multipart/form-data": s.DatasetUploadSerializer},
        responses={201: s.DatasetVersionDetailSerializer},
        description="Upload a file (multipart) as the dataset's next version. The answer comes "
        "once the file is stored, with the version in `checking`: a background check then reads "
        "it and makes it `ready` or `rejected`. Poll the version until then; only a ready "
        "version can be used by a job or downloaded.",
    ),
    retrieve=extend_schema(responses=s.DatasetVersionDetailSerializer),
    download=extend_schema(responses=s.DownloadSerializer),
    lineage=extend_schema(responses=s.LineageSerializer),
)
class DatasetVersionViewSet(
    _InDataset,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    OrganizationScopedViewSet,
):
    model = DatasetVersion
    serializer_class = s.DatasetVersionSerializer
    lookup_field = "number"
    parser_classes = [MultiPartParser]
    throttle_scopes = {"create": "upload"}
    required_scopes = {
        "list": "datasets:read",
        "retrieve": "datasets:read",
        "download": "datasets:read",
        "lineage": "datasets:read",
        "create": "datasets:write",
    }

    def get_serializer_class(self):
        return (
            s.DatasetVersionDetailSerializer
            if self.action == "retrieve"
            else s.DatasetVersionSerializer
        )

    def create(self, request, *args, **kwargs):
        refuse_oversized_body(request)
        dataset = selectors.dataset_get(
            organization=self.organization, name=self.kwargs["dataset_name"]
        )
        data = s.DatasetUploadSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        uploaded = data.validated_data["file"]
        with uploaded_path(uploaded) as path:
            version = services.dataset_version_upload(
                dataset=dataset,
                path=path,
                filename=uploaded.name or "data",
                declared_format=data.validated_data.get("format"),
                actor=self.actor,
            )
        return Response(
            s.DatasetVersionDetailSerializer(version).data, status=status.HTTP_201_CREATED
        )

    @action(detail=True, methods=["get"])
    def download(self, request, *args, **kwargs):
        version = self.get_object()
        selectors.dataset_version_require_ready(version, field="number")
        name = (
            version.original_filename
            or f"{version.dataset.name}-v{version.number}.{version.format}"
        )
        return Response(
            download_entry(
                name=name, key=version.storage_key, size=version.size_bytes, sha256=version.sha256
            )
        )

    @action(detail=True, methods=["get"])
    def lineage(self, request, *args, **kwargs):
        return Response(selectors.lineage(version=self.get_object()))


@extend_schema(tags=["datasets"])
@extend_schema_view(
    create=extend_schema(
        request=s.PendingUploadCreateSerializer,
        responses={201: s.PendingUploadSerializer},
        description="Start a large upload. In one POST (the default): POST the file as "
        "multipart/form-data to `url`, with every entry of `fields` before it and the bytes as "
        "`file`, exactly `size_bytes` long (the store refuses any other size); then call "
        "finalize. In parts (`parts: true`): ask for part URLs (`POST .../parts/`), PUT each "
        "part to its URL with exactly its `size_bytes`, in parallel if you like; after a dropped "
        "connection, `GET .../parts/` says which parts are still missing; then call finalize. "
        "Once finalized, the version's bytes live under a key no upload URL can write.",
    ),
    finalize=extend_schema(
        request=None,
        responses={201: s.DatasetVersionDetailSerializer},
        description="Record the uploaded file as the dataset's next version, in `checking` "
        "until the background check makes it `ready` or `rejected`. In parts: every part must "
        "be in storage at its reserved size (as storage reports it), else 400 "
        "`upload_incomplete` naming the parts to send, and nothing is recorded.",
    ),
    parts=extend_schema(
        responses={
            200: s.UploadPartsSerializer,
            400: OpenApiResponse(
                ErrorSerializer, description="`upload_not_in_parts`: a single-POST upload."
            ),
        },
        description="The parts storage holds for an upload in parts, and those still missing.",
    ),
    part_urls=extend_schema(
        request=s.UploadPartUrlsRequestSerializer,
        responses=s.UploadPartUrlsSerializer,
        description="URLs to PUT parts of an upload in parts to, each signed for its exact "
        "size; valid until the upload expires.",
    ),
    destroy=extend_schema(
        description="Cancel an upload: its place and reserved quota are freed, and what "
        "storage holds for it (sent parts, or the posted file) is dropped.",
    ),
)
class PendingUploadViewSet(_InDataset, mixins.CreateModelMixin, OrganizationScopedViewSet):
    model = PendingUpload
    serializer_class = s.PendingUploadSerializer
    parser_classes = [JSONParser]
    required_scopes = {
        "create": "datasets:write",
        "finalize": "datasets:write",
        "parts": "datasets:write",
        "part_urls": "datasets:write",
        "destroy": "datasets:write",
    }
    throttle_scopes = {"create": "upload", "finalize": "upload", "part_urls": "upload"}

    def create(self, request, *args, **kwargs):
        dataset = selectors.dataset_get(
            organization=self.organization, name=self.kwargs["dataset_name"]
        )
        data = s.PendingUploadCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        upload, form = services.pending_upload_create(
            dataset=dataset,
            filename=data.validated_data["filename"],
            declared_format=data.validated_data.get("format", ""),
            size_bytes=data.validated_data["size_bytes"],
            parts=data.validated_data["parts"],
            part_size_bytes=data.validated_data.get("part_size_bytes"),
            actor=self.actor,
        )
        upload.form = form
        return Response(s.PendingUploadSerializer(upload).data, status=status.HTTP_201_CREATED)

    @action(detail=True, methods=["post"])
    def finalize(self, request, *args, **kwargs):
        version = services.pending_upload_finalize(upload=self.get_object(), actor=self.actor)
        return Response(
            s.DatasetVersionDetailSerializer(version).data, status=status.HTTP_201_CREATED
        )

    @action(detail=True, methods=["get"])
    def parts(self, request, *args, **kwargs):
        body = selectors.pending_upload_parts(upload=self.get_object())
        return Response(s.UploadPartsSerializer(body).data)

    @action(detail=True, methods=["post"])
    def part_urls(self, request, *args, **kwargs):
        upload = self.get_object()
        data = s.UploadPartUrlsRequestSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        parts = services.pending_upload_part_urls(
            upload=upload, numbers=data.validated_data["numbers"]
        )
        body = {"parts": parts, "expires_at": upload.expires_at}
        return Response(s.UploadPartUrlsSerializer(body).data)

    def destroy(self, request, *args, **kwargs):
        services.pending_upload_cancel(upload=self.get_object(), actor=self.actor)
        return Response(status=status.HTTP_204_NO_CONTENT)


@extend_schema(tags=["models"])
@extend_schema_view(
    create=extend_schema(
        request=s.RegisteredModelSerializer, responses={201: s.RegisteredModelSerializer}
    ),
    partial_update=extend_schema(request=s.RegisteredModelUpdateSerializer),
    compare=extend_schema(
        parameters=[
            OpenApiParameter(
                "versions", str, required=True, description="Comma-separated numbers, e.g. 1,3"
            )
        ],
        responses=s.CompareSerializer,
    ),
)
class RegisteredModelViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    mixins.UpdateModelMixin,
    OrganizationScopedViewSet,
):
    model = RegisteredModel
    serializer_class = s.RegisteredModelSerializer
    lookup_field = "name"
    http_method_names = ["get", "post", "patch", "head"]
    required_scopes = {
        "list": "models:read",
        "retrieve": "models:read",
        "compare": "models:read",
        "create": "models:write",
        "partial_update": "models:write",
    }
    effects = {"create": Effect.CHANGE, "partial_update": Effect.CHANGE}

    def narrow_queryset(self, queryset):
        return selectors.registered_model_list(organization=self.organization)

    def create(self, request, *args, **kwargs):
        data = s.RegisteredModelSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        model = services.registered_model_create(
            organization=self.organization,
            actor=self.actor,
            name=data.validated_data["name"],
            description=data.validated_data.get("description", ""),
        )
        if data.validated_data.get("promotion_gates"):
            model = services.registered_model_update(
                registered_model=model,
                actor=self.actor,
                promotion_gates=data.validated_data["promotion_gates"],
            )
        return Response(s.RegisteredModelSerializer(model).data, status=status.HTTP_201_CREATED)

    def update(self, request, *args, **kwargs):
        model = self.get_object()
        data = s.RegisteredModelUpdateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        model = services.registered_model_update(
            registered_model=model, actor=self.actor, **data.validated_data
        )
        return Response(s.RegisteredModelSerializer(model).data)

    @action(detail=True, methods=["get"])
    def compare(self, request, *args, **kwargs):
        model = self.get_object()
        query = s.CompareQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        numbers = query.validated_data["versions"]
        return Response(selectors.model_versions_compare(registered_model=model, numbers=numbers))


class _InModel:
    """Rows of one registered model, named in the URL; a missing or foreign model is 404."""

    def narrow_queryset(self, queryset):
        self.registered_model = selectors.registered_model_get(
            organization=self.organization, name=self.kwargs["model_name"]
        )
        return queryset.filter(registered_model=self.registered_model)


@extend_schema(tags=["models"])
@extend_schema_view(
    create=extend_schema(
        request={"multipart/form-data": s.ModelVersionRegisterSerializer},
        responses={201: s.ModelVersionSerializer},
        description="Register a version from safetensors weights and a JSON config.",
    ),
    download=extend_schema(responses=s.DownloadSerializer(many=True)),
    lineage=extend_schema(responses=s.LineageSerializer),
    edge_bundle=extend_schema(
        responses=s.EdgeBundleSerializer,
        description="The version's ONNX edge bundle (a zip: model.onnx, preprocessing.json, "
        "run.py, README.md), made by an export job (POST jobs/ with kind `export`); 404 until "
        "one has.",
    ),
)
class ModelVersionViewSet(
    _InModel,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    OrganizationScopedViewSet,
):
    model = ModelVersion
    serializer_class = s.ModelVersionSerializer
    lookup_field = "number"
    parser_classes = [MultiPartParser]
    throttle_scopes = {"create": "upload"}
    required_scopes = {
        "list": "models:read",
        "retrieve": "models:read",
        "download": "models:read",
        "lineage": "models:read",
        "edge_bundle": "models:read",
        "create": "models:write",
    }

    def narrow_queryset(self, queryset):
        return (
            super()
            .narrow_queryset(queryset)
            .select_related("registered_model", "parent_version", "created_by")
        )

    def create(self, request, *args, **kwargs):
        refuse_oversized_body(request)
        registered_model = selectors.registered_model_get(
            organization=self.organization, name=self.kwargs["model_name"]
        )
        data = s.ModelVersionRegisterSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        fields = dict(data.validated_data)
        trained_on = [
            selectors.dataset_version_get(
                organization=self.organization, dataset_name=ref["dataset"], number=ref["number"]
            )
            for ref in fields.pop("trained_on", [])
        ]
        parent_number = fields.pop("parent_version", None)
        parent = (
            selectors.model_version_get(
                organization=self.organization, model_name=registered_model.name, ref=parent_number
            )
            if parent_number
            else None
        )
        with uploaded_path(fields.pop("weights")) as path:
            version = services.model_version_register(
                registered_model=registered_model,
                weights_path=path,
                actor=self.actor,
                trained_on=trained_on,
                parent_version=parent,
                **fields,
            )
        return Response(s.ModelVersionSerializer(version).data, status=status.HTTP_201_CREATED)

    @action(detail=True, methods=["get"])
    def download(self, request, *args, **kwargs):
        version = self.get_object()
        return Response(
            [
                download_entry(name=a.name, key=a.storage_key, size=a.size_bytes, sha256=a.sha256)
                for a in version.artifacts.all()
            ]
        )

    @action(detail=True, methods=["get"])
    def lineage(self, request, *args, **kwargs):
        return Response(selectors.lineage(version=self.get_object()))

    @action(detail=True, methods=["get"], url_path="edge-bundle")
    def edge_bundle(self, request, *args, **kwargs):
        version = self.get_object()
        bundle = selectors.edge_bundle_get(model_version=version)
        if bundle is None:
            raise NotFound(
                f"{version} has no edge bundle yet; export it with a job of kind export."
            )
        entry = download_entry(
            name=f"{version.registered_model.name}-v{version.number}-edge.zip",
            key=bundle.storage_key,
            size=bundle.size_bytes,
            sha256=bundle.sha256,
        )
        return Response(
            entry
            | {
                "model_version": {"model": version.registered_model.name, "number": version.number},
                "source_job": bundle.source_job_id,
                "self_check": bundle.self_check,
                "created_at": bundle.created_at,
            }
        )


@extend_schema(tags=["models"])
@extend_schema_view(
    update=extend_schema(
        request=s.ModelAliasSetSerializer,
        responses=s.ModelAliasSerializer,
        description="Point the alias at a version (creates it if new). Needs `models:promote`; "
        "the model's promotion gates for this alias must pass.",
    )
)
class ModelAliasViewSet(
    _InModel,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.DestroyModelMixin,
    OrganizationScopedViewSet,
):
    model = ModelAlias
    serializer_class = s.ModelAliasSerializer
    lookup_field = "name"
    lookup_url_kwarg = "alias"
    pagination_class = None
    http_method_names = ["get", "put", "delete", "head"]
    required_scopes = {
        "list": "models:read",
        "retrieve": "models:read",
        "update": "models:promote",
        "destroy": "models:promote",
    }

    def narrow_queryset(self, queryset):
        return super().narrow_queryset(queryset).select_related("version", "updated_by")

    def update(self, request, *args, **kwargs):
        self.get_queryset()  # resolves the model (404 when missing or foreign)
        data = s.ModelAliasSetSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        version = selectors.model_version_get(
            organization=self.organization,
            model_name=self.registered_model.name,
            ref=data.validated_data["version"],
        )
        alias = services.model_alias_set(
            registered_model=self.registered_model,
            alias=self.kwargs["alias"],
            version=version,
            actor=self.actor,
        )
        return Response(s.ModelAliasSerializer(alias).data)

    def perform_destroy(self, instance):
        services.model_alias_delete(alias=instance, actor=self.actor)


@extend_schema(tags=["code"])
@extend_schema_view(
    create=extend_schema(
        request={"multipart/form-data": s.CodePackageUploadSerializer},
        responses={201: s.CodePackageVersionSerializer},
        description="Upload a code package (a zip or tar.gz with factory.toml at its root) as "
        "the next version of the package its manifest names; the package is created on its "
        "first upload. A bad archive or manifest is refused with a 400 naming the field, and "
        "nothing is stored. Running packages comes with a later release.",
    ),
)
class CodePackageViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    OrganizationScopedViewSet,
):
    model = CodePackage
    serializer_class = s.CodePackageSerializer
    lookup_field = "name"
    http_method_names = ["get", "post", "head"]
    parser_classes = [MultiPartParser]
    throttle_scopes = {"create": "upload"}
    required_scopes = {
        "list": "code:read",
        "retrieve": "code:read",
        "create": "code:write",
    }

    def narrow_queryset(self, queryset):
        return selectors.code_package_list(organization=self.organization)

    def create(self, request, *args, **kwargs):
        refuse_oversized_body(
            request, limit=settings.CODE_PACKAGE_MAX_UPLOAD_BYTES, error=CodePackageError
        )
        data = s.CodePackageUploadSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        uploaded = data.validated_data["file"]
        with uploaded_path(uploaded) as path:
            version = services.code_package_version_create(
                organization=self.organization,
                path=path,
                filename=uploaded.name or "package",
                expected_sha256=data.validated_data.get("sha256"),
                actor=self.actor,
            )
        return Response(
            s.CodePackageVersionSerializer(version).data, status=status.HTTP_201_CREATED
        )


@extend_schema(tags=["code"])
@extend_schema_view(download=extend_schema(responses=s.DownloadSerializer))
class CodePackageVersionViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, OrganizationScopedViewSet
):
    model = CodePackageVersion
    serializer_class = s.CodePackageVersionSerializer
    lookup_field = "number"
    required_scopes = {
        "list": "code:read",
        "retrieve": "code:read",
        "download": "code:read",
    }

    def narrow_queryset(self, queryset):
        self.package = selectors.code_package_get(
            organization=self.organization, name=self.kwargs["package_name"]
        )
        return queryset.filter(package=self.package).select_related("package", "created_by")

    @action(detail=True, methods=["get"])
    def download(self, request, *args, **kwargs):
        version = self.get_object()
        ext = "zip" if version.archive_format == CodePackageVersion.ArchiveFormat.ZIP else "tar.gz"
        return Response(
            download_entry(
                name=f"{version.package.name}-v{version.number}.{ext}",
                key=version.storage_key,
                size=version.size_bytes,
                sha256=version.sha256,
            )
        )
