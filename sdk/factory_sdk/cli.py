"""The `factory` command line: datasets, jobs, models, deployments, usage and code packages from
a terminal or CI. Every command takes --json and then prints only JSON on stdout."""

from __future__ import annotations

import calendar
import functools
import json
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable, Iterable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from factory_sdk import config as configuration
from factory_sdk.client import TERMINAL_JOB_STATES, Client, FactoryError, Job, LogLine
from factory_sdk.uploads import UploadInterrupted, file_sha256, upload_dataset

app = typer.Typer(no_args_is_help=True, help="factory_saas from the terminal.")
datasets_app = typer.Typer(no_args_is_help=True, help="Datasets and their versions.")
jobs_app = typer.Typer(no_args_is_help=True, help="Submit, follow and cancel jobs.")
models_app = typer.Typer(no_args_is_help=True, help="Registered models and their aliases.")
deployments_app = typer.Typer(no_args_is_help=True, help="Deployments that answer predictions.")
code_app = typer.Typer(no_args_is_help=True, help="Code packages (your own training code).")
app.add_typer(datasets_app, name="datasets")
app.add_typer(jobs_app, name="jobs")
app.add_typer(models_app, name="models")
app.add_typer(deployments_app, name="deployments")
app.add_typer(code_app, name="code")

stdout = Console()
stderr = Console(stderr=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON on stdout, nothing else.")]
PollFlag = Annotated[
    float, typer.Option("--poll-interval", help="Seconds between polls.", min=0.05, hidden=True)
]


class Settings:
    """What the top-level options chose; the client is made when a command first needs it."""

    def __init__(self, profile: str | None, org: str | None) -> None:
        self.profile = profile
        self.org = org
        self._client: Client | None = None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def client(self) -> Client:
        if self._client is None:
            config = configuration.load(self.profile)
            self._client = Client(config.url, config.api_key, org=self.org or config.org)
        return self._client


@app.callback()
def main_options(
    ctx: typer.Context,
    profile: Annotated[
        str | None, typer.Option("--profile", "-p", help="Profile in the config file.")
    ] = None,
    org: Annotated[
        str | None, typer.Option("--org", help="Organization slug (default: the key's).")
    ] = None,
) -> None:
    """Configuration: FACTORY_URL, FACTORY_API_KEY and FACTORY_ORG override the profile
    (`factory login` writes one; FACTORY_PROFILE picks one)."""
    ctx.obj = Settings(profile, org)
    ctx.call_on_close(ctx.obj.close)


def handled(command: Callable[..., Any]) -> Callable[..., Any]:
    """Print API, configuration and connection errors as one clear message (JSON under --json)
    and exit 1, never with a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = kwargs.get("as_json", False)
        try:
            return command(*args, **kwargs)
        except FactoryError as exc:
            body = exc.body or {"code": exc.code, "detail": exc.detail}
            _fail(as_json, body, f"{exc.detail} ({exc.code})", exc.fields)
        except configuration.ConfigError as exc:
            _fail(as_json, {"code": "not_configured", "detail": str(exc)}, str(exc), {})
        except httpx.TransportError as exc:
            detail = f"Could not reach the server: {exc}"
            _fail(as_json, {"code": "connection_error", "detail": detail}, detail, {})

    return wrapper


def _fail(as_json: bool, body: dict, message: str, fields: dict) -> NoReturn:
    if as_json:
        print(json.dumps(body), file=sys.stderr)
    else:
        stderr.print(f"[red]error:[/red] {escape(message)}", highlight=False)
        for name, problems in fields.items():
            stderr.print(escape(f"  {name}: {' '.join(map(str, problems))}"), highlight=False)
    raise typer.Exit(1)


def _emit(data: Any, as_json: bool, render: Callable[[Any], None]) -> None:
    if as_json:
        print(json.dumps(data, indent=2, default=str))
    else:
        render(data)


def _table(rows: Iterable[dict], columns: list[str]) -> None:
    table = Table(*columns, box=None, header_style="bold")
    for row in rows:
        table.add_row(*(Text("" if row.get(name) is None else str(row[name])) for name in columns))
    stdout.print(table)


def _fields(data: dict, names: list[str]) -> None:
    for name in names:
        if data.get(name) not in (None, "", {}, []):
            stdout.print(f"[bold]{name}[/bold]: {escape(str(data[name]))}", highlight=False)


# Configuration


@app.command()
@handled
def login(
    ctx: typer.Context,
    url: Annotated[str, typer.Option(help="The server's address.")] = configuration.DEFAULT_URL,
    api_key: Annotated[
        str | None,
        typer.Option(help="An API key (asked for, unechoed, when left out).", show_default=False),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Check an API key against the server and store it in the profile (file mode 0600)."""
    settings: Settings = ctx.obj
    key = api_key or typer.prompt("API key", hide_input=True)
    url = url.rstrip("/")
    # Asking the server proves the address and the key before they are stored.
    with Client(url, key) as client:
        orgs = [row["slug"] for row in client.orgs_list()]
    org = settings.org or (orgs[0] if len(orgs) == 1 else "")
    if org not in orgs:
        raise FactoryError(
            400, "org_required", f"Name one of this key's organizations with --org: {orgs}."
        )
    profile = settings.profile or configuration.DEFAULT_PROFILE
    path = configuration.save_profile(
        configuration.Config(url=url, api_key=key, org=org, profile=profile)
    )
    _emit(
        {"profile": profile, "url": url, "org": org, "config": str(path)},
        as_json,
        lambda data: stdout.print(
            f"Logged in to {data['url']} as organization {data['org']}; "
            f"profile {data['profile']} saved in {data['config']}.",
            highlight=False,
        ),
    )


# Datasets


@datasets_app.command("upload")
@handled
def datasets_upload(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    name: Annotated[str, typer.Option("--name", "-n", help="The dataset (made if missing).")],
    format: Annotated[
        str, typer.Option(help="csv, parquet, npz or image_folder_zip (default: from the content).")
    ] = "",
    wait: Annotated[bool, typer.Option(help="Wait for the check to make it ready.")] = False,
    poll_interval: PollFlag = 1.0,
    as_json: JsonFlag = False,
) -> None:
    """Upload FILE as the dataset's next version. After a dropped connection, run the same
    command again: it continues the upload it had started."""
    client = ctx.obj.client()
    size = file.stat().st_size
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        disable=as_json,
        transient=True,
    )
    with progress:
        task = progress.add_task(file.name, total=size)
        try:
            result = upload_dataset(
                client,
                file,
                dataset=name,
                format=format,
                progress=lambda sent: progress.advance(task, sent),
            )
        except UploadInterrupted as exc:
            detail = f"{exc}. Run the same command again to continue it."
            _fail(as_json, {"code": "upload_interrupted", "detail": detail}, detail, {})
    version = result.version
    if wait:
        version = _wait_for_check(client, name, version["number"], poll_interval)
    data = {
        "dataset": name,
        "upload_id": result.upload_id,
        "resumed": result.resumed,
        "sha256": result.sha256,
        "version": version,
    }
    _emit(data, as_json, _render_upload)
    if version["state"] == "rejected":
        raise typer.Exit(1)


def _wait_for_check(client: Client, name: str, number: int, interval: float) -> dict:
    while (version := client.dataset_version_get(name, number))["state"] == "checking":
        time.sleep(interval)
    return version


def _render_upload(data: dict) -> None:
    version = data["version"]
    resumed = " (resumed)" if data["resumed"] else ""
    stdout.print(
        f"{data['dataset']} v{version['number']}: {version['state']}{resumed}, "
        f"sha256 {data['sha256']}",
        highlight=False,
    )
    if version.get("rejection_reason"):
        stdout.print(f"rejected: {version['rejection_reason']}", markup=False, highlight=False)


@datasets_app.command("list")
@handled
def datasets_list(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(min=1)] = 50,
    as_json: JsonFlag = False,
) -> None:
    """The organization's datasets."""
    rows = ctx.obj.client().datasets_list(limit=limit)
    _emit(rows, as_json, lambda data: _table(data, ["name", "version_count", "created_at"]))


# Jobs


def _pair(value: str, sep: str, option: str) -> tuple[str, str]:
    name, found, rest = value.partition(sep)
    if not found or not name or not rest:
        raise typer.BadParameter(f"Expected NAME{sep}VALUE, got {value!r}.", param_hint=option)
    return name, rest


def _number(text: str, option: str) -> int:
    if not text.isdigit():
        raise typer.BadParameter(f"{text!r} is not a version number.", param_hint=option)
    return int(text)


def _json_value(text: str) -> Any:
    """A parameter's value: JSON when it parses (numbers, booleans, lists), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


@jobs_app.command("submit")
@handled
def jobs_submit(
    ctx: typer.Context,
    recipe: Annotated[str, typer.Option(help="The recipe to run.")] = "",
    code: Annotated[str, typer.Option(help="Own code instead: PACKAGE:VERSION.")] = "",
    dataset: Annotated[str, typer.Option(help="Input dataset version: NAME:NUMBER.")] = "",
    model: Annotated[str, typer.Option(help="Input model: NAME:VERSION or NAME:ALIAS.")] = "",
    kind: Annotated[str, typer.Option(help="train, infer or export.")] = "train",
    param: Annotated[
        list[str] | None, typer.Option("--param", help="KEY=VALUE (JSON values parse).")
    ] = None,
    params_file: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="Parameters as JSON.")
    ] = None,
    resource_class: Annotated[str, typer.Option(help="cpu or a GPU type.")] = "cpu",
    gpus: Annotated[int, typer.Option(min=1)] = 1,
    priority: int = 0,
    label: Annotated[list[str] | None, typer.Option("--label", help="KEY=VALUE.")] = None,
    max_runtime: Annotated[int, typer.Option(help="Seconds.", min=60)] = 3600,
    output_model: Annotated[str, typer.Option(help="Register the result under this.")] = "",
    output_dataset: str = "",
    idempotency_key: Annotated[
        str, typer.Option(help="Resubmitting with the same key returns the same job.")
    ] = "",
    wait: Annotated[
        bool, typer.Option(help="Stream the log until the job ends; exit 1 unless it succeeds.")
    ] = False,
    poll_interval: PollFlag = 1.0,
    as_json: JsonFlag = False,
) -> None:
    """Submit a job (a recipe or your code package), and with --wait follow it to its end."""
    parameters = json.loads(params_file.read_text()) if params_file else {}
    for item in param or []:
        key, value = _pair(item, "=", "--param")
        parameters[key] = _json_value(value)
    spec: dict[str, Any] = {
        "kind": kind,
        "parameters": parameters,
        "resource_class": resource_class,
        "gpu_count": gpus,
        "priority": priority,
        "labels": dict(_pair(item, "=", "--label") for item in label or []),
        "max_runtime_s": max_runtime,
    }
    if recipe:
        spec["recipe"] = recipe
    if code:
        package, number = _pair(code, ":", "--code")
        spec["code_package"] = package
        spec["code_package_version"] = _number(number, "--code")
    if dataset:
        name, number = _pair(dataset, ":", "--dataset")
        spec["dataset"] = {"dataset": name, "number": _number(number, "--dataset")}
    if model:
        name, version = _pair(model, ":", "--model")
        spec["model"] = {"model": name, "version": version}
    if output_model:
        spec["output_model"] = output_model
    if output_dataset:
        spec["output_dataset"] = output_dataset
    client = ctx.obj.client()
    # A key per submission, so a retry after a lost answer does not submit twice.
    job = client.job_submit(spec, idempotency_key=idempotency_key or str(uuid.uuid4()))
    if not wait:
        _emit(job, as_json, _render_job)
        return
    if not as_json:
        stderr.print(f"Job {job['id']} submitted ({job['state']}); following its log.")
    try:
        job = _follow(
            client, job["id"], _log_printer(as_json=False, to_stderr=as_json), poll_interval
        )
    except KeyboardInterrupt:
        stderr.print(
            f"Stopped following; job {job['id']} goes on (factory jobs cancel {job['id']})."
        )
        raise typer.Exit(130) from None
    _emit(job, as_json, _render_job)
    if job["state"] != "succeeded":
        raise typer.Exit(1)


def _follow(
    client: Client, job_id: int, on_line: Callable[[LogLine], None], interval: float
) -> Job:
    """Print the job's log as it grows until the job ends; returns the job as it ended.

    The state is read before the log, so every line written before the end is printed."""
    after = 0
    while True:
        job = client.job_get(job_id)
        while lines := client.job_logs(job_id, after=after):
            for line in lines:
                on_line(line)
            after = lines[-1]["id"]
        if job["state"] in TERMINAL_JOB_STATES:
            return job
        time.sleep(interval)


def _log_printer(*, as_json: bool, to_stderr: bool = False) -> Callable[[LogLine], None]:
    target = sys.stderr if to_stderr else sys.stdout

    def show(line: LogLine) -> None:
        text = json.dumps(line) if as_json else line["line"]
        print(text, file=target, flush=True)

    return show


def _render_job(job: dict) -> None:
    _fields(
        job,
        [
            "id",
            "state",
            "kind",
            "recipe",
            "code_package",
            "dataset",
            "resource_class",
            "gpu_count",
            "attempt",
            "queue_position",
            "waiting_reason",
            "failure_reason",
            "output_model",
            "cost_so_far_minor",
            "estimated_cost_per_hour",
            "created_at",
        ],
    )


@jobs_app.command("logs")
@handled
def jobs_logs(
    ctx: typer.Context,
    job_id: int,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Until the job ends.")] = False,
    poll_interval: PollFlag = 1.0,
    as_json: JsonFlag = False,
) -> None:
    """The job's log; with -f, followed until the job ends. --json: one JSON object a line."""
    client = ctx.obj.client()
    show = _log_printer(as_json=as_json)
    if follow:
        _follow(client, job_id, show, poll_interval)
        return
    client.job_get(job_id)  # a missing job is an error, not an empty log
    after = 0
    while lines := client.job_logs(job_id, after=after):
        for line in lines:
            show(line)
        after = lines[-1]["id"]


@jobs_app.command("status")
@handled
def jobs_status(ctx: typer.Context, job_id: int, as_json: JsonFlag = False) -> None:
    """The job's state, where it waits and why, and what it has cost so far."""
    _emit(ctx.obj.client().job_get(job_id), as_json, _render_job)


@jobs_app.command("cancel")
@handled
def jobs_cancel(ctx: typer.Context, job_id: int, as_json: JsonFlag = False) -> None:
    """Cancel the job (a running one stops after its grace period)."""
    _emit(ctx.obj.client().job_cancel(job_id), as_json, _render_job)


@jobs_app.command("list")
@handled
def jobs_list(
    ctx: typer.Context,
    state: Annotated[str, typer.Option(help="Only jobs in this state.")] = "",
    label: Annotated[str, typer.Option(help="KEY or KEY=VALUE.")] = "",
    limit: Annotated[int, typer.Option(min=1)] = 50,
    as_json: JsonFlag = False,
) -> None:
    """The organization's jobs, newest first."""
    rows = ctx.obj.client().jobs_list(state=state, label=label, limit=limit)
    _emit(
        rows,
        as_json,
        lambda data: _table(
            data, ["id", "state", "kind", "recipe", "resource_class", "gpu_count", "created_at"]
        ),
    )


# Models


@models_app.command("list")
@handled
def models_list(
    ctx: typer.Context, limit: Annotated[int, typer.Option(min=1)] = 50, as_json: JsonFlag = False
) -> None:
    """Registered models with their version counts and aliases."""
    rows = ctx.obj.client().models_list(limit=limit)
    _emit(
        rows, as_json, lambda data: _table(data, ["name", "version_count", "aliases", "created_at"])
    )


@models_app.command("promote")
@handled
def models_promote(
    ctx: typer.Context,
    name: str,
    version: int,
    alias: Annotated[str, typer.Option(help="The alias to point at VERSION.")] = "production",
    as_json: JsonFlag = False,
) -> None:
    """Point an alias (production by default) at a version; the model's gates may refuse it."""
    moved = ctx.obj.client().model_alias_set(name, alias, version)
    _emit(
        moved,
        as_json,
        lambda data: stdout.print(
            f"{name}@{data['name']} -> v{data['version']}", markup=False, highlight=False
        ),
    )


# Deployments and predictions


@deployments_app.command("list")
@handled
def deployments_list(
    ctx: typer.Context, limit: Annotated[int, typer.Option(min=1)] = 50, as_json: JsonFlag = False
) -> None:
    """The organization's deployments."""
    rows = ctx.obj.client().deployments_list(limit=limit)
    _emit(
        rows,
        as_json,
        lambda data: _table(
            data, ["name", "recipe", "resource_class", "min_replicas", "max_replicas"]
        ),
    )


@deployments_app.command("status")
@handled
def deployments_status(ctx: typer.Context, name: str, as_json: JsonFlag = False) -> None:
    """One deployment: its settings and routes."""
    _emit(
        ctx.obj.client().deployment_get(name),
        as_json,
        lambda data: _fields(
            data, ["name", "recipe", "resource_class", "min_replicas", "max_replicas", "routes"]
        ),
    )


@app.command()
@handled
def predict(
    ctx: typer.Context,
    deployment: str,
    inputs: Annotated[
        str, typer.Option(help="A JSON list of inputs, or - to read it from stdin.")
    ] = "-",
    as_json: JsonFlag = False,
) -> None:
    """Predict with a deployment: one output per input, each with its prediction id."""
    text = sys.stdin.read() if inputs == "-" else inputs
    try:
        values = json.loads(text)
    except ValueError as exc:
        raise typer.BadParameter(f"Not JSON: {exc}", param_hint="--inputs") from exc
    if not isinstance(values, list):
        raise typer.BadParameter("Give a JSON list of inputs.", param_hint="--inputs")
    answer = ctx.obj.client().predict(deployment, values)
    _emit(
        answer,
        as_json,
        lambda data: _table(data["predictions"], ["prediction_id", "output"]),
    )


# Usage


@app.command()
@handled
def usage(
    ctx: typer.Context,
    month: Annotated[
        str, typer.Option(help="YYYY-MM (default: this month).", show_default=False)
    ] = "",
    group_by: Annotated[str, typer.Option(help="resource, day, user, key, job or label.")] = "",
    as_json: JsonFlag = False,
) -> None:
    """What the organization spent in a month, from the ledger."""
    start, end = _month_range(month)
    report = ctx.obj.client().usage_report(
        start=start.isoformat(), end=end.isoformat(), group_by=group_by
    )

    def render(data: dict) -> None:
        _table(
            [
                {**row, "amount": f"{row['amount_minor'] / 100:.2f} {row['currency']}"}
                for row in data["rows"]
            ],
            ["group", "quantity", "unit", "amount"],
        )
        stdout.print(
            f"total {data['start']} to {data['end']}: "
            f"{data['total_minor'] / 100:.2f} {data['currency']}",
            highlight=False,
        )

    _emit(report, as_json, render)


def _month_range(month: str) -> tuple[date, date]:
    if not month:
        today = datetime.now(UTC).date()
        return today.replace(day=1), today
    try:
        first = datetime.strptime(month, "%Y-%m").date()
    except ValueError as exc:
        raise typer.BadParameter("Use YYYY-MM, e.g. 2026-11.", param_hint="--month") from exc
    last = first.replace(day=calendar.monthrange(first.year, first.month)[1])
    return first, last


# Code packages

# Left out of a pushed folder: version control, caches, environments.
SKIPPED_PARTS = {".git", ".hg", "__pycache__", ".venv", "venv", ".mypy_cache", ".pytest_cache"}


@code_app.command("push")
@handled
def code_push(
    ctx: typer.Context,
    directory: Annotated[Path, typer.Argument(exists=True, file_okay=False)],
    as_json: JsonFlag = False,
) -> None:
    """Zip DIR (with factory.toml at its root) and upload it as the package's next version."""
    if not (directory / "factory.toml").is_file():
        raise typer.BadParameter(
            f"{directory} has no factory.toml at its root.", param_hint="DIRECTORY"
        )
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / f"{directory.resolve().name}.zip"
        _zip_folder(directory, archive)
        with archive.open("rb") as file:
            version = ctx.obj.client().code_package_upload(
                file, filename=archive.name, sha256=file_sha256(archive)
            )
    _emit(version, as_json, lambda data: _fields(data, ["package", "number", "sha256"]))


def _zip_folder(directory: Path, archive: Path) -> None:
    files = sorted(
        path
        for path in directory.rglob("*")
        if path.is_file() and not SKIPPED_PARTS.intersection(path.relative_to(directory).parts)
    )
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        for path in files:
            bundle.write(path, path.relative_to(directory).as_posix())


def main() -> None:
    app()
