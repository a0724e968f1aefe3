"""A typed client for the factory_saas REST API (/api/v1/), over httpx.

Written by hand rather than generated from the OpenAPI schema: the CLI needs a small part of the
API, a generator's templates and output would be more code to keep than the client itself, and
tests/sdk/test_schema.py checks every entry of ENDPOINTS against `manage.py spectacular`, so a
renamed or removed route fails the suite as a stale generated client would.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO, TypedDict
from urllib.parse import quote

import httpx

from factory_sdk.config import Config

VERSION = "0.1.0"

# Every call the client makes: name -> (method, path under /api/v1/). `{org}` is the
# organization's slug; other placeholders are filled from the call's arguments.
ENDPOINTS: dict[str, tuple[str, str]] = {
    "orgs_list": ("GET", "orgs/"),
    "datasets_list": ("GET", "orgs/{org}/datasets/"),
    "dataset_get": ("GET", "orgs/{org}/datasets/{name}/"),
    "dataset_create": ("POST", "orgs/{org}/datasets/"),
    "dataset_version_get": ("GET", "orgs/{org}/datasets/{name}/versions/{number}/"),
    "upload_start": ("POST", "orgs/{org}/datasets/{name}/uploads/"),
    "upload_finalize": ("POST", "orgs/{org}/datasets/{name}/uploads/{id}/finalize/"),
    "upload_parts": ("GET", "orgs/{org}/datasets/{name}/uploads/{id}/parts/"),
    "upload_part_urls": ("POST", "orgs/{org}/datasets/{name}/uploads/{id}/parts/"),
    "upload_cancel": ("DELETE", "orgs/{org}/datasets/{name}/uploads/{id}/"),
    "jobs_list": ("GET", "orgs/{org}/jobs/"),
    "job_submit": ("POST", "orgs/{org}/jobs/"),
    "job_get": ("GET", "orgs/{org}/jobs/{id}/"),
    "job_cancel": ("POST", "orgs/{org}/jobs/{id}/cancel/"),
    "job_logs": ("GET", "orgs/{org}/jobs/{id}/logs/"),
    "models_list": ("GET", "orgs/{org}/models/"),
    "model_versions_list": ("GET", "orgs/{org}/models/{name}/versions/"),
    "model_alias_set": ("PUT", "orgs/{org}/models/{name}/aliases/{alias}/"),
    "deployments_list": ("GET", "orgs/{org}/deployments/"),
    "deployment_get": ("GET", "orgs/{org}/deployments/{name}/"),
    "deployment_predict": ("POST", "orgs/{org}/deployments/{name}/predict/"),
    "usage_report": ("GET", "orgs/{org}/billing/usage/"),
    "code_package_upload": ("POST", "orgs/{org}/code-packages/"),
}

TERMINAL_JOB_STATES = frozenset({"succeeded", "failed", "cancelled"})


class FactoryError(Exception):
    """An error answer from the API, with its stable machine-readable `code`."""

    def __init__(
        self, status: int, code: str, detail: str, fields: dict | None = None, body: Any = None
    ) -> None:
        super().__init__(f"{detail} ({code}, HTTP {status})")
        self.status = status
        self.code = code
        self.detail = detail
        self.fields = fields or {}
        self.body = body


class Organization(TypedDict):
    slug: str
    name: str
    status: str
    created_at: str


class Dataset(TypedDict):
    name: str
    description: str
    version_count: int
    created_at: str


class DatasetVersion(TypedDict, total=False):
    number: int
    state: str
    format: str
    size_bytes: int
    sha256: str
    row_count: int | None
    check_progress: float
    rejection_reason: str
    created_at: str


class PendingUpload(TypedDict, total=False):
    id: int
    original_filename: str
    size_bytes: int
    # Set for an upload in one POST (null in parts); older servers always set them.
    url: str | None
    fields: dict[str, str] | None
    # Set for an upload in parts; absent from older servers' answers.
    part_size_bytes: int | None
    part_count: int
    expires_at: str


class UploadPart(TypedDict):
    number: int
    size_bytes: int
    url: str


class Job(TypedDict, total=False):
    id: int
    state: str
    kind: str
    recipe: str
    parameters: dict
    dataset: dict | None
    resource_class: str
    gpu_count: int
    attempt: int
    queue_position: int | None
    waiting_reason: str
    failure_reason: str
    output_model: dict | None
    cost_so_far_minor: int
    # The newest attempt's averages and peaks (CPU cores, memory, GPU %, GPU memory); null at first.
    utilization: dict | None
    # One job's read only: a cheaper resource class that holds it, priced for the same run time.
    rightsizing_hint: dict | None
    created_at: str


class LogLine(TypedDict):
    id: int
    attempt: int
    stream: str
    line: str
    created_at: str


class RegisteredModel(TypedDict, total=False):
    name: str
    description: str
    aliases: dict
    created_at: str


class ModelAlias(TypedDict):
    name: str
    version: int
    updated_by: str | None
    updated_at: str


class UsageReport(TypedDict):
    start: str
    end: str
    group_by: str
    label_key: str
    currency: str
    total_minor: int
    totals: list[dict]
    rows: list[dict]
    daily: list[dict]


class Client:
    """One organization's view of the API, authenticated by an API key.

    `org` may be left empty: an API key belongs to one organization, which the client then asks
    the server for on first use.
    """

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        org: str = "",
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._org = org
        self._http = httpx.Client(
            base_url=f"{self.url}/api/v1/",
            headers={
                "Authorization": f"Bearer {api_key}",
                "User-Agent": f"factory-sdk/{VERSION}",
            },
            timeout=timeout,
            transport=transport,
        )
        # Upload URLs are presigned: the key must not travel to the store with them.
        self._storage = httpx.Client(timeout=timeout, transport=transport)

    @classmethod
    def from_config(cls, config: Config, **kwargs: Any) -> Client:
        return cls(config.url, config.api_key, org=config.org, **kwargs)

    def close(self) -> None:
        self._http.close()
        self._storage.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def org(self) -> str:
        if not self._org:
            orgs = self.orgs_list()
            if len(orgs) != 1:
                raise FactoryError(
                    400,
                    "org_required",
                    "This key sees several organizations; name one with --org or FACTORY_ORG.",
                )
            self._org = orgs[0]["slug"]
        return self._org

    # Organizations

    def orgs_list(self) -> list[Organization]:
        return self._call("orgs_list")

    # Datasets

    def datasets_list(self, *, limit: int = 50) -> list[Dataset]:
        return list(self._pages("datasets_list", limit=limit))

    def dataset_get(self, name: str) -> Dataset:
        return self._call("dataset_get", name=name)

    def dataset_create(self, name: str, *, description: str = "") -> Dataset:
        return self._call("dataset_create", json={"name": name, "description": description})

    def dataset_version_get(self, name: str, number: int) -> DatasetVersion:
        return self._call("dataset_version_get", name=name, number=number)

    def upload_start(
        self,
        dataset: str,
        *,
        filename: str,
        size_bytes: int,
        format: str = "",
        parts: bool = False,
        part_size_bytes: int | None = None,
    ) -> PendingUpload:
        """Start an upload: in one POST, or with `parts` in parts (a server that predates
        parts ignores the ask and answers an upload in one POST)."""
        body: dict[str, Any] = {"filename": filename, "size_bytes": size_bytes}
        if format:
            body["format"] = format
        if parts:
            body["parts"] = True
            if part_size_bytes:
                body["part_size_bytes"] = part_size_bytes
        return self._call("upload_start", name=dataset, json=body)

    def upload_parts(self, dataset: str, upload_id: int) -> dict[str, Any]:
        """The parts storage holds for an upload in parts, and `missing`: those to send."""
        return self._call("upload_parts", name=dataset, id=upload_id)

    def upload_part_urls(
        self, dataset: str, upload_id: int, numbers: list[int]
    ) -> list[UploadPart]:
        """Where to PUT each of the parts `numbers` (at most 1000 per call)."""
        answer = self._call(
            "upload_part_urls", name=dataset, id=upload_id, json={"numbers": numbers}
        )
        return answer["parts"]

    def upload_part_send(self, part: UploadPart, body: Iterable[bytes]) -> None:
        """PUT one part's bytes, exactly `part["size_bytes"]` of them, to its storage URL. The
        length goes as Content-Length (signed in the URL), so the body streams unchunked."""
        response = self._storage.put(
            part["url"], content=body, headers={"Content-Length": str(part["size_bytes"])}
        )
        if response.status_code >= 300:
            raise FactoryError(
                response.status_code,
                "upload_refused",
                f"The store refused part {part['number']}: {response.text[:500]}",
            )

    def upload_cancel(self, dataset: str, upload_id: int) -> None:
        self._call("upload_cancel", name=dataset, id=upload_id)

    def upload_send(self, upload: PendingUpload, file: BinaryIO, *, filename: str) -> None:
        """POST the file to the upload's storage URL (S3, or the server's local twin) with its
        form fields first, as the store's POST policy requires. No API key goes with it."""
        response = self._storage.post(
            upload["url"],
            data=upload["fields"],
            files={"file": (filename, file, "application/octet-stream")},
        )
        if response.status_code >= 300:
            raise FactoryError(
                response.status_code,
                "upload_refused",
                f"The store refused the file: {response.text[:500]}",
            )

    def upload_finalize(self, dataset: str, upload_id: int) -> DatasetVersion:
        return self._call("upload_finalize", name=dataset, id=upload_id)

    # Jobs

    def jobs_list(self, *, state: str = "", label: str = "", limit: int = 50) -> list[Job]:
        params = {key: value for key, value in (("state", state), ("label", label)) if value}
        return list(self._pages("jobs_list", params=params, limit=limit))

    def job_submit(self, spec: dict[str, Any], *, idempotency_key: str = "") -> Job:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._call("job_submit", json=spec, headers=headers)

    def job_get(self, job_id: int) -> Job:
        return self._call("job_get", id=job_id)

    def job_cancel(self, job_id: int) -> Job:
        return self._call("job_cancel", id=job_id)

    def job_logs(self, job_id: int, *, after: int = 0) -> list[LogLine]:
        """The next page of log lines after line id `after` (a page, not all of them)."""
        return self._call("job_logs", id=job_id, params={"after": after})

    # Models

    def models_list(self, *, limit: int = 50) -> list[RegisteredModel]:
        return list(self._pages("models_list", limit=limit))

    def model_versions_list(self, name: str, *, limit: int = 50) -> list[dict]:
        return list(self._pages("model_versions_list", name=name, limit=limit))

    def model_alias_set(self, name: str, alias: str, version: int) -> ModelAlias:
        return self._call("model_alias_set", name=name, alias=alias, json={"version": version})

    # Deployments

    def deployments_list(self, *, limit: int = 50) -> list[dict]:
        return list(self._pages("deployments_list", limit=limit))

    def deployment_get(self, name: str) -> dict:
        return self._call("deployment_get", name=name)

    def predict(self, deployment: str, inputs: list[Any], *, idempotency_key: str = "") -> dict:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._call(
            "deployment_predict", name=deployment, json={"inputs": inputs}, headers=headers
        )

    # Billing

    def usage_report(self, *, start: str = "", end: str = "", group_by: str = "") -> UsageReport:
        params = {
            key: value
            for key, value in (("start", start), ("end", end), ("group_by", group_by))
            if value
        }
        return self._call("usage_report", params=params)

    # Code packages

    def code_package_upload(self, file: BinaryIO, *, filename: str, sha256: str) -> dict:
        return self._call(
            "code_package_upload",
            data={"sha256": sha256},
            files={"file": (filename, file, "application/octet-stream")},
        )

    # Plumbing

    def _path(self, endpoint: str, arguments: dict[str, Any]) -> tuple[str, str]:
        method, template = ENDPOINTS[endpoint]
        values = {key: quote(str(value), safe="") for key, value in arguments.items()}
        if "{org}" in template:
            values["org"] = quote(self.org, safe="")
        return method, template.format(**values)

    def _call(
        self,
        endpoint: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        data: dict[str, str] | None = None,
        files: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        **arguments: Any,
    ) -> Any:
        method, path = self._path(endpoint, arguments)
        response = self._http.request(
            method, path, params=params, json=json, data=data, files=files, headers=headers
        )
        return _answer(response)

    def _pages(
        self, endpoint: str, *, params: dict[str, Any] | None = None, limit: int, **arguments: Any
    ) -> Iterator[Any]:
        """Up to `limit` rows of a cursor-paginated list, following `next` links."""
        method, path = self._path(endpoint, arguments)
        url: str | None = path
        query = {**(params or {}), "page_size": min(max(limit, 1), 200)}
        left = limit
        while url and left > 0:
            page = _answer(self._http.request(method, url, params=query))
            rows = page["results"] if isinstance(page, dict) and "results" in page else page
            yield from rows[:left]
            left -= len(rows)
            # `next` is a full URL carrying the cursor and the original query.
            url, query = (page.get("next"), None) if isinstance(page, dict) else (None, None)


def _answer(response: httpx.Response) -> Any:
    if response.status_code < 400:
        return response.json() if response.content else None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        raise FactoryError(
            response.status_code,
            str(body.get("code", "error")),
            str(body.get("detail", response.reason_phrase)),
            body.get("fields"),
            body,
        )
    raise FactoryError(
        response.status_code, "error", f"{response.reason_phrase}: {response.text[:300]}"
    )
