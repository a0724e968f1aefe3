"""The `factory` commands against a live server: configuration, jobs, models, usage, code."""

import configparser
import json
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from django.db import transaction

from jobs.models import Job, JobLog
from registry.models import CodePackageVersion, ModelAlias
from registry.storage import get_storage
from tests.factories import DatasetVersionFactory, ModelVersionFactory, RegisteredModelFactory
from tests.processes import wait_for
from tests.sdk.conftest import live

pytestmark = live

ROOT = Path(__file__).resolve().parents[2]


def _json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_login_stores_the_key_owner_only_and_the_environment_overrides_it(
    cli, factory_env, server, api_key, org, tmp_path
):
    factory_env.update(FACTORY_URL=None, FACTORY_API_KEY=None)

    logged_in = _json(cli("login", "--url", server, "--api-key", api_key, "--json"))

    path = Path(logged_in["config"])
    assert path == tmp_path / "config" / "factory" / "config.ini"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stored = configparser.ConfigParser(interpolation=None)
    stored.read(path)
    assert dict(stored["default"]) == {"url": server, "api_key": api_key, "org": org.slug}
    assert _json(cli("jobs", "list", "--json")) == []
    factory_env["FACTORY_API_KEY"] = "fsk_not-a-key"
    refused = cli("jobs", "list", "--json")
    assert refused.exit_code == 1
    assert json.loads(refused.stderr)["code"] == "authentication_failed"


def test_a_missing_key_says_how_to_log_in(cli, factory_env):
    factory_env["FACTORY_API_KEY"] = None

    refused = cli("jobs", "list")

    assert refused.exit_code == 1
    assert "factory login" in refused.stderr


@pytest.fixture
def ready_version(org):
    return DatasetVersionFactory(organization=org)


def test_submit_status_list_and_cancel_a_job(cli, org, ready_version):
    dataset = f"{ready_version.dataset.name}:{ready_version.number}"
    submitted = _json(
        cli(
            "jobs",
            "submit",
            "--recipe",
            "tabular-classifier",
            "--dataset",
            dataset,
            "--param",
            "target=x",
            "--param",
            "epochs=2",
            "--label",
            "team=growth",
            "--json",
        )
    )

    job = Job.objects.get(pk=submitted["id"])
    assert (job.state, job.parameters["epochs"], job.labels) == ("queued", 2, {"team": "growth"})
    assert _json(cli("jobs", "status", job.pk, "--json"))["state"] == "queued"
    assert [row["id"] for row in _json(cli("jobs", "list", "--state", "queued", "--json"))] == [
        job.pk
    ]
    assert _json(cli("jobs", "cancel", job.pk, "--json"))["state"] == "cancelled"
    missing = cli("jobs", "status", job.pk + 1000, "--json")
    assert (missing.exit_code, json.loads(missing.stderr)["code"]) == (1, "not_found")


def _act_as_worker(job_id: int, lines: list[str], end: str) -> None:
    """What a worker's reports do to the job: it runs, logs, and ends in `end`."""
    with transaction.atomic():
        job = Job.objects.select_for_update().get(pk=job_id)
        for state in ("scheduled", "running"):
            job.transition_to(state)
        job.save(update_fields=["state"])
        JobLog.objects.bulk_create(
            JobLog(organization=job.organization, job=job, attempt=job.attempt, line=line)
            for line in lines
        )
    with transaction.atomic():
        job = Job.objects.select_for_update().get(pk=job_id)
        job.transition_to(end)
        job.failure_reason = "loss went to NaN" if end == "failed" else ""
        job.save(update_fields=["state", "failure_reason"])


def test_submit_wait_streams_the_log_and_exits_1_when_the_job_fails(
    factory_env, org, ready_version
):
    command = [
        sys.executable,
        "-m",
        "factory_sdk",
        "jobs",
        "submit",
        "--recipe",
        "tabular-classifier",
        "--dataset",
        f"{ready_version.dataset.name}:{ready_version.number}",
        "--param",
        "target=x",
        "--wait",
        "--poll-interval",
        "0.1",
    ]
    env = {name: value for name, value in factory_env.items() if value is not None}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    try:
        job = wait_for(
            lambda: Job.objects.filter(organization=org).first(), timeout=30, what="the job"
        )
        _act_as_worker(job.pk, [f"epoch {n}" for n in range(1, 4)], "failed")
        out, _ = process.communicate(timeout=30)
    finally:
        process.kill()

    assert process.returncode == 1
    assert out.splitlines()[:3] == ["epoch 1", "epoch 2", "epoch 3"]
    assert "loss went to NaN" in out


def test_logs_follow_prints_every_line_as_json_until_the_end(cli, org, ready_version):
    submitted = _json(
        cli(
            "jobs",
            "submit",
            "--recipe",
            "tabular-classifier",
            "--dataset",
            f"{ready_version.dataset.name}:{ready_version.number}",
            "--param",
            "target=x",
            "--json",
        )
    )
    # More lines than one page of the logs endpoint (500).
    _act_as_worker(submitted["id"], [f"step {n}" for n in range(1200)], "succeeded")

    followed = cli("jobs", "logs", submitted["id"], "-f", "--json")

    assert followed.exit_code == 0, followed.output
    lines = [json.loads(text)["line"] for text in followed.stdout.splitlines()]
    assert lines == [f"step {n}" for n in range(1200)]


def test_models_list_and_promote_moves_the_alias(cli, org):
    model = RegisteredModelFactory(organization=org, name="churn")
    ModelVersionFactory(organization=org, registered_model=model, number=1)
    ModelVersionFactory(organization=org, registered_model=model, number=2)

    listed = _json(cli("models", "list", "--json"))
    promoted = _json(cli("models", "promote", "churn", "2", "--alias", "staging", "--json"))

    assert [row["name"] for row in listed] == ["churn"]
    assert (promoted["name"], promoted["version"]) == ("staging", 2)
    assert ModelAlias.objects.get(registered_model=model, name="staging").version.number == 2


def test_usage_for_a_month_covers_its_days(cli, org):
    report = _json(cli("usage", "--month", "2026-02", "--json"))

    assert (report["start"], report["end"], report["total_minor"]) == (
        "2026-02-01",
        "2026-02-28",
        0,
    )
    bad = cli("usage", "--month", "February")
    assert bad.exit_code == 2 and "YYYY-MM" in bad.output


def test_predict_on_a_missing_deployment_is_a_clear_404(cli, org):
    assert _json(cli("deployments", "list", "--json")) == []

    refused = cli("predict", "nowhere", "--inputs", '[{"x": 1}]', "--json")

    assert refused.exit_code == 1
    assert json.loads(refused.stderr)["code"] == "not_found"


def test_code_push_zips_the_folder_and_uploads_a_version(cli, org, tmp_path):
    folder = ROOT / "examples" / "tiny-cnn"

    pushed = _json(cli("code", "push", folder, "--json"))

    version = CodePackageVersion.objects.get(package__organization=org)
    assert (pushed["number"], pushed["sha256"]) == (1, version.sha256)
    assert version.original_filename == "tiny-cnn.zip"
    assert "factory.toml" in zipfile.ZipFile(_download(version, tmp_path)).namelist()


def _download(version, tmp_path) -> Path:
    path = tmp_path / "package.zip"
    get_storage().download_verified(
        version.storage_key, path, size=version.size_bytes, sha256=version.sha256
    )
    return path
