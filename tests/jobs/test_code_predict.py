"""A code package's predict entry: batch inference jobs and a deployment's replicas, both running
the package in a real bubblewrap sandbox on a real pool worker; the channel between a replica's
server and the package, attacked from the package's side; and what submission refuses."""

from __future__ import annotations

import csv
import io
import json
import socket
import threading
from pathlib import Path

import pytest
from django.urls import reverse

import factory_job
from factory_job import channel
from jobs.models import Job, JobState, ResourceClass
from jobs.recipes.base import RecipeInputError
from jobs.runner.code import (
    MAX_ANSWER_BYTES,
    PackageRefused,
    ReplicaBroken,
    SandboxPredictor,
    prediction_rows_write,
)
from jobs.services import JobOptions, inference_job_submit
from jobs.services.replicas import replica_spec
from jobs.services.submission import code_job_submit
from registry.models import DatasetVersion, ModelArtifact
from registry.selectors import lineage, model_version_code_package
from registry.services import dataset_create, dataset_version_create
from registry.services.code_packages import code_package_version_create
from registry.storage import get_storage
from serving.policies import RetrainPolicyInvalid, retrain_policy_set
from serving.services import deployment_create, routes_set
from tenants.actors import Actor
from tenants.errors import DomainError
from tests.factories import DatasetVersionFactory, ModelVersionFactory
from tests.jobs.code_helpers import RUNTIME, archive, finished
from tests.processes import wait_for
from tests.serving.loop_stack import Caller

e2e = pytest.mark.django_db(transaction=True)
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny-cnn"

MANIFEST = f"""
[package]
name = "scaler"
[entry]
train = "model:train"
{{predict}}
[runtime]
name = "{RUNTIME}"
[outputs]
model = true
[parameters]
type = "object"
"""
# Trains a one-number model (w) in plain Python; its predict multiplies, and, asked to by the
# input, does what a hostile or broken package would.
MODEL = """
import json, os, socket, struct, time, factory_job
from factory_job import channel

def train():
    w = factory_job.params().get("w", 2.0)
    base = factory_job.inputs().get("model")
    if base:  # a fine-tune: it goes on from the version it was given
        with open(base + "/config.json") as config:
            w += json.load(config)["w"]
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path = factory_job.checkpoint_dir().parent / "output" / "model.safetensors"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(header)) + header + struct.pack("<f", w))
    factory_job.register_model(path, {"w": w})

def load(model_dir):
    with open(model_dir + "/config.json") as config:
        w = json.load(config)["w"]
    print("loaded", w)

    def predict(inputs):
        outputs = []
        for i, item in enumerate(inputs):
            what = item.get("do")
            if what == "forge":  # an answer of its own on the channel, past the library
                link = socket.socket(fileno=int(os.environ[channel.FD_ENV]))
                channel.send(link, {"outputs": []})
                link.detach()
            if what == "hang":
                while True:
                    time.sleep(0.05)
            if what == "nan":
                return [{"y": float("nan")}]
            x = item.get("x")
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                raise factory_job.BadInput(f"inputs[{i}] needs a number x")
            outputs.append({"label": "big" if x * w > 10 else "small", "y": x * w})
        return outputs

    return predict
"""


def _upload(org, owner, tmp_path, *, predict: bool = True):
    path = tmp_path / "scaler.tar.gz"
    entry = 'predict = "model:load"' if predict else ""
    path.write_bytes(archive({"factory.toml": MANIFEST.format(predict=entry), "model.py": MODEL}))
    return code_package_version_create(
        organization=org, path=path, filename=path.name, actor=Actor(user=owner)
    )


def _cpu(**options) -> JobOptions:
    return JobOptions(
        resource_class=ResourceClass.objects.get(name="cpu"), max_runtime_s=600, **options
    )


def _trained(org, owner, tmp_path, pool, *, w: float = 2.0, base=None):
    version = _upload(org, owner, tmp_path) if base is None else model_version_code_package(base)
    job, _ = code_job_submit(
        organization=org,
        actor=Actor(user=owner),
        code_package_version=version,
        parameters={"w": w},
        model_version=base,
        options=_cpu(),
    )
    job = finished(job, pool)
    assert job.state == JobState.SUCCEEDED, job.failure_reason
    return job.output_model_version


def _csv_version(org, owner, tmp_path, text: str, name: str = "points") -> DatasetVersion:
    path = tmp_path / f"{name}.csv"
    path.write_text(text)
    actor = Actor(user=owner)
    dataset = dataset_create(organization=org, name=name, actor=actor)
    return dataset_version_create(dataset=dataset, path=path, filename=path.name, actor=actor)


@e2e
def test_a_packages_fine_tuned_model_predicts_a_dataset_in_a_batch_job_in_the_sandbox(
    sandboxed_pool, org, owner, tmp_path
):
    """The package trains a model, fine-tunes it (the job names the first version, which the
    code finds among its inputs), then its predict entry runs over a dataset in a batch job."""
    sandboxed_pool.start_worker("w1")
    first = _trained(org, owner, tmp_path, sandboxed_pool, w=2.0)
    model = _trained(org, owner, tmp_path, sandboxed_pool, w=1.0, base=first)
    assert model.parent_version == first and model.registered_model == first.registered_model
    rows = "x,note\n" + "".join(f"{x},row {x}\n" for x in range(1, 601))
    data = _csv_version(org, owner, tmp_path, rows)

    job, _ = inference_job_submit(
        organization=org,
        actor=Actor(user=owner),
        model_version=model,
        dataset_version=data,
        options=_cpu(),
    )
    assert (job.kind, job.recipe, job.code_package_version.package.name) == (
        Job.Kind.INFER,
        "code:scaler",
        "scaler",
    )
    job = finished(job, sandboxed_pool)

    assert job.state == JobState.SUCCEEDED, job.failure_reason
    output = DatasetVersion.objects.get(pk=job.output_dataset_version_id)
    assert output.dataset.name == f"{model.registered_model.name}-predictions"
    assert output.dataset.organization == org and output.row_count == 600
    with get_storage().open(output.storage_key) as stored:
        table = list(csv.DictReader(io.TextIOWrapper(stored, encoding="utf-8")))
    assert [row["row"] for row in table] == [str(n) for n in range(1, 601)]
    # x arrived as a number (the registry profiled the column as int64), in the dataset's order,
    # and met the fine-tuned w of 2 + 1.
    assert [(row["label"], float(row["y"])) for row in table[2:5]] == [
        ("small", 9.0),
        ("big", 12.0),
        ("big", 15.0),
    ]
    assert job.logs.filter(line="loaded 3.0").exists()  # the package's own print
    made = {(e["from"], e["relation"], e["to"]) for e in lineage(version=output)["edges"]}
    assert made >= {
        (f"model_version:{model.pk}", "predicted by", f"job:{job.pk}"),
        (f"model_version:{first.pk}", "fine-tuned", f"job:{model.source_job_id}"),
        (
            f"code_package_version:{job.code_package_version_id}",
            "ran",
            f"job:{first.source_job_id}",
        ),
    }


@e2e
def test_a_deployment_of_own_code_serves_from_the_sandbox_and_a_package_that_breaks_its_contract_is_ended(  # noqa: E501
    sandboxed_pool, org, owner, tmp_path, key_client_for
):
    """Requests reach the package through the worker's own server (the sandbox has no network):
    answers come back as the package gives them, its BadInput is the caller's 400 in its words,
    an output that is not JSON is a failed request the replica survives; a package that writes
    its own answer on the channel past the library, or answers not at all, is ended with that
    reason, and the deployment's next replica answers again."""
    sandboxed_pool.env["SERVE_UNRESPONSIVE_S"] = "3"
    sandboxed_pool.start_worker("w1")
    model = _trained(org, owner, tmp_path, sandboxed_pool, w=2.0)
    actor = Actor(user=owner)
    deployment = deployment_create(
        organization=org,
        name="scaler",
        recipe="code:scaler",
        resource_class=ResourceClass.objects.get(name="cpu"),
        actor=actor,
        min_replicas=1,
        max_replicas=1,
    )
    routes_set(
        deployment=deployment,
        routes=[{"model_version": model.pk, "weight": 100, "mode": "live"}],
        actor=actor,
    )
    caller = Caller(key_client_for(owner, org), deployment, [])

    answer = wait_for(
        lambda: caller.answered([{"x": 3}, {"x": 7}]), timeout=120, what="the first answer"
    ).json()
    assert [p["output"] for p in answer["predictions"]] == [
        {"label": "small", "y": 6.0},
        {"label": "big", "y": 14.0},
    ]
    refused = caller.predict([{"x": 1}, {"x": "seven"}])
    assert refused.status_code == 400
    assert "inputs[1] needs a number x" in refused.json()["detail"]
    assert caller.predict([{"do": "nan"}]).status_code == 502
    assert caller.predict([{"x": 1}]).status_code == 200  # the same replica goes on

    ended: set[int] = set()

    def newly_failed() -> Job | None:
        return (
            Job.objects.filter(kind=Job.Kind.SERVE, organization=org, state=JobState.FAILED)
            .exclude(pk__in=ended)
            .first()
        )

    for attack, reason in (
        ({"do": "forge"}, "answered 1 inputs with other than a list of 1 outputs"),
        ({"do": "hang"}, "did not answer a request within 3 s"),
    ):
        assert caller.predict([attack]).status_code == 502
        broken = wait_for(newly_failed, timeout=30, what=f"the replica that got {attack} to end")
        ended.add(broken.pk)
        assert reason in broken.failure_reason, broken.failure_reason
        again = wait_for(
            lambda: caller.answered([{"x": 4}]), timeout=120, what="the next replica's answer"
        )
        assert again.json()["predictions"][0]["output"] == {"label": "small", "y": 8.0}


# --- the channel, attacked from the package's side -----------------------------------------------


class _Package:
    """The package's end of a replica's channel, answering each request with `reply(inputs)`:
    bytes sent as they are (then it closes its end, as a crashed package's is), a value framed,
    or None for no answer at all."""

    def __init__(self, reply):
        self.worker_end, self.package_end = socket.socketpair()
        self.reply = reply
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        channel.send(self.package_end, {"ready": True})
        while (request := channel.receive(self.package_end, max_bytes=1 << 20)) is not None:
            answer = self.reply(request["inputs"])
            if isinstance(answer, bytes):
                self.package_end.sendall(answer)
                self.package_end.close()
                return
            elif answer is not None:
                channel.send(self.package_end, answer)


def _predictor(reply, timeout_s: float = 5.0):
    package = _Package(reply)
    ended: list[str] = []
    predictor = SandboxPredictor(package.worker_end, timeout_s=timeout_s, on_broken=ended.append)
    predictor.ready()
    return predictor, ended


def test_a_packages_answers_and_its_bad_input_reach_the_caller_as_it_gave_them():
    predictor, ended = _predictor(
        lambda inputs: (
            {"error": "x is missing" * 200, "bad_input": True}
            if inputs == ["bad"]
            else {"outputs": [{"echo": item} for item in inputs]}
        )
    )
    assert predictor([1, "two"]) == [{"echo": 1}, {"echo": "two"}]
    with pytest.raises(RecipeInputError) as refused:
        predictor(["bad"])
    assert str(refused.value).startswith("x is missing") and len(str(refused.value)) == 1000
    assert predictor(["ok"]) == [{"echo": "ok"}] and ended == []  # a 400 leaves it whole


LENGTH = (MAX_ANSWER_BYTES + 1).to_bytes(4, "big")


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (lambda inputs: {"outputs": []}, "other than a list of 1 outputs"),
        (lambda inputs: {"outputs": [1], "attempt": 7}, "something other than outputs"),
        (lambda inputs: LENGTH, f"over the {MAX_ANSWER_BYTES} accepted"),
        (lambda inputs: b"\x00\x00\x00\x03NaN", "not plain JSON"),
        (lambda inputs: b"\x00\x00\x00\x09[1,", "cut short"),
        (lambda inputs: None, "did not answer a request within 0.3 s"),
    ],
    ids=["wrong-count", "extra-field", "huge-frame", "nan", "cut-short", "silent"],
)
def test_a_package_that_breaks_the_channels_contract_is_ended_saying_why(reply, reason):
    predictor, ended = _predictor(reply, timeout_s=0.3)
    with pytest.raises(ReplicaBroken, match=reason.replace("(", r"\(")):
        predictor([1])
    assert len(ended) == 1 and reason in ended[0]
    with pytest.raises(ReplicaBroken):  # broken once, it answers nothing more
        predictor([1])


# --- submission -------------------------------------------------------------------------------


@pytest.fixture
def code_model(org, owner, tmp_path):
    def make(*, predict: bool = True):
        version = _upload(org, owner, tmp_path, predict=predict)
        model = ModelVersionFactory(
            organization=org, recipe_name="code:scaler", recipe_version=f"v{version.number}"
        )
        for name in ("model.safetensors", "config.json"):
            ModelArtifact.objects.create(
                organization=org,
                model_version=model,
                name=name,
                storage_key=f"orgs/{org.pk}/models/{model.pk}/{name}",
                size_bytes=1,
                sha256="0" * 64,
            )
        return version, model

    return make


def test_a_package_without_a_predict_entry_cannot_run_its_models(code_model, org, owner):
    _version, model = code_model(predict=False)
    data = DatasetVersionFactory(organization=org)
    with pytest.raises(DomainError, match="names no predict entry"):
        inference_job_submit(
            organization=org,
            actor=Actor(user=owner),
            model_version=model,
            dataset_version=data,
            options=_cpu(),
        )
    with pytest.raises(DomainError, match="names no predict entry"):
        replica_spec(organization=org, model_version=model)
    assert not Job.objects.filter(organization=org).exists()


def test_batch_inference_of_own_code_takes_csv_or_parquet_and_no_parameters(code_model, org, owner):
    version, model = code_model()
    for data, parameters, words in (
        (DatasetVersionFactory(organization=org, format="npz"), {}, "CSV or Parquet"),
        (DatasetVersionFactory(organization=org), {"threshold": 1}, "takes no parameters"),
    ):
        with pytest.raises(DomainError, match=words):
            inference_job_submit(
                organization=org,
                actor=Actor(user=owner),
                model_version=model,
                dataset_version=data,
                parameters=parameters,
                options=_cpu(),
            )
    spec = replica_spec(organization=org, model_version=model)
    assert (spec.code_package_version, spec.recipe_name, spec.runtime) == (
        version,
        "code:scaler",
        RUNTIME,
    )


def test_a_deployment_names_only_its_own_organizations_package_and_has_no_retrain_policy(
    code_model, org, other_org, owner
):
    code_model()
    actor = Actor(user=owner)
    cpu = ResourceClass.objects.get(name="cpu")
    with pytest.raises(DomainError, match="No code package named 'elsewhere'"):
        deployment_create(
            organization=org, name="d", recipe="code:elsewhere", resource_class=cpu, actor=actor
        )
    with pytest.raises(DomainError, match="No code package named 'scaler'"):
        deployment_create(
            organization=other_org, name="d", recipe="code:scaler", resource_class=cpu, actor=actor
        )
    deployment = deployment_create(
        organization=org, name="d", recipe="code:scaler", resource_class=cpu, actor=actor
    )
    with pytest.raises(RetrainPolicyInvalid, match="has no retrain policy"):
        retrain_policy_set(deployment=deployment, actor=actor, enabled=True)


def test_a_batch_jobs_rows_are_the_datasets_typed_as_profiled(tmp_path, org, owner):
    data = _csv_version(
        org, owner, tmp_path, "n,x,ok,name\n1,0.5,true,a\n2,,false,\n3,nan,true,c\n"
    )
    target = tmp_path / "rows.jsonl"
    with get_storage().open(data.storage_key) as stored:
        (tmp_path / "data.csv").write_bytes(stored.read())
    count = prediction_rows_write(
        tmp_path / "data.csv",
        dataset_format="csv",
        csv_dialect=data.csv_dialect,
        schema=data.schema,
        target=target,
    )
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert count == 3 and rows[0] == {"n": 1, "x": 0.5, "ok": True, "name": "a"}
    assert rows[1]["x"] is None and rows[2]["x"] is None  # missing, and NaN: JSON has neither
    with pytest.raises(PackageRefused, match="CSV or Parquet"):
        prediction_rows_write(
            target, dataset_format="npz", csv_dialect=None, schema=[], target=tmp_path / "o"
        )


def test_the_examples_predict_entry_answers_and_refuses_in_its_own_words(tmp_path, monkeypatch):
    """examples/tiny-cnn's predict entry, with torch, outside a sandbox (the sandbox's user
    cannot read this machine's torch): a bar's direction, and a BadInput for a wrong shape."""
    import torch
    from safetensors.torch import save_file

    monkeypatch.syspath_prepend(str(EXAMPLE))
    from tinycnn.model import TinyCNN
    from tinycnn.predict import load

    torch.manual_seed(0)
    model = TinyCNN(4)
    with torch.no_grad():  # a filter that answers vertical bars, by construction
        model.conv.weight.zero_()
        model.conv.weight[:, 0, :, 1] = 1.0
        model.conv.weight[:, 0, :, 0] = model.conv.weight[:, 0, :, 2] = -0.5
        model.conv.bias.zero_()
        model.head.weight.copy_(torch.tensor([[-1.0] * 4, [1.0] * 4]))
        model.head.bias.zero_()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors"
    )
    (tmp_path / "config.json").write_text(json.dumps({"channels": 4, "size": 8, "classes": 2}))
    predict = load(str(tmp_path))
    vertical = [1.0 if column == 3 else 0.0 for _row in range(8) for column in range(8)]
    outputs = predict([{"pixels": vertical}, {f"p{i}": v for i, v in enumerate(vertical)}])
    assert [o["label"] for o in outputs] == ["vertical", "vertical"]
    assert set(outputs[0]["probabilities"]) == {"horizontal", "vertical"}
    with pytest.raises(factory_job.BadInput, match=r"inputs\[1\] needs 64 numbers"):
        predict([{"pixels": vertical}, {"pixels": [1, 2]}])


def test_a_code_models_page_names_the_package_that_made_it_and_whether_it_predicts(
    code_model, org, owner, client
):
    _version, model = code_model()
    client.force_login(owner)
    page = client.get(
        reverse(
            "registry:model_version", args=[org.slug, model.registered_model.name, model.number]
        )
    ).content.decode()
    package_url = reverse("registry:code_package_version", args=[org.slug, "scaler", 1])
    assert f'href="{package_url}"' in page
    assert "predicts with <code>model:load</code>" in page
    assert "Run a batch prediction with this version" in page


def test_the_jobs_api_queues_batch_inference_of_a_code_model_as_for_a_recipes(
    code_model, org, owner, key_client_for
):
    version, model = code_model()
    data = DatasetVersionFactory(organization=org)
    client = key_client_for(owner, org)
    body = {
        "kind": "infer",
        "model": {"model": model.registered_model.name, "version": str(model.number)},
        "dataset": {"dataset": data.dataset.name, "number": data.number},
    }
    response = client.post(f"/api/v1/orgs/{org.slug}/jobs/", body, format="json")
    assert response.status_code == 201, response.content
    job = response.json()
    assert (job["kind"], job["recipe"], job["code_package"]) == (
        "infer",
        "code:scaler",
        {"package": "scaler", "number": version.number},
    )
    refused = client.post(
        f"/api/v1/orgs/{org.slug}/jobs/", {**body, "parameters": {"t": 1}}, format="json"
    )
    assert refused.status_code == 400
    assert refused.json()["fields"] == {"parameters": ["Leave empty for a code package's model."]}


def _example_run(work: Path, monkeypatch, *, parameters: dict, inputs: dict) -> dict:
    """Run examples/tiny-cnn's train entry in this process, through the in-job library as the
    sandbox would (its job.json in `work`); the artifacts it registered."""
    from tinycnn.train import run

    work.mkdir()
    spec = {
        "work_folder": str(work),
        "checkpoint_dir": "checkpoints",
        "output_dir": "output",
        "parameters": parameters,
        "inputs": inputs,
        "resume_from": None,
    }
    (work / "job.json").write_text(json.dumps(spec))
    monkeypatch.setenv(factory_job.SPEC_ENV, str(work / "job.json"))
    monkeypatch.setattr(factory_job, "_spec", None)
    monkeypatch.setattr(factory_job, "_artifacts", {})
    monkeypatch.setattr(factory_job, "_last_metrics", {})
    run()
    return dict(factory_job._artifacts)


def test_the_example_fine_tunes_a_registered_version_on_labelled_rows(
    tmp_path, monkeypatch, capsys
):
    """examples/tiny-cnn given a model version and a dataset: it starts from the version's
    weights and shape and trains on the rows; a row without its label is its input error."""
    from safetensors.torch import load_file

    monkeypatch.syspath_prepend(str(EXAMPLE))
    _example_run(tmp_path / "base", monkeypatch, parameters={"steps": 20, "channels": 4}, inputs={})
    base = tmp_path / "base" / "output"
    vertical = [1.0 if column == 3 else 0.0 for _row in range(8) for column in range(8)]
    horizontal = [1.0 if row == 5 else 0.0 for row in range(8) for _column in range(8)]
    rows = tmp_path / "rows.csv"
    with rows.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow([*(f"p{i}" for i in range(64)), "label"])
        writer.writerows([[*vertical, "vertical"], [*horizontal, "horizontal"]] * 8)

    artifacts = _example_run(
        tmp_path / "tuned",
        monkeypatch,
        parameters={"steps": 10, "channels": 16},  # the base version's 4 channels win
        inputs={"model": str(base), "dataset": str(rows)},
    )

    assert "fine-tuning the registered version" in capsys.readouterr().out
    tuned = tmp_path / "tuned" / artifacts["model.safetensors"]
    before, after = load_file(base / "model.safetensors"), load_file(tuned)
    assert after["conv.weight"].shape == before["conv.weight"].shape == (4, 1, 3, 3)
    assert not (after["conv.weight"] == before["conv.weight"]).all()
    (rows.parent / "bad.csv").write_text("p0,label\n1,diagonal\n")
    with pytest.raises(factory_job.BadInput, match="Line 2 of the dataset"):
        _example_run(
            tmp_path / "bad",
            monkeypatch,
            parameters={"steps": 1},
            inputs={"model": str(base), "dataset": str(rows.parent / "bad.csv")},
        )


def test_a_package_job_names_a_model_version_to_fine_tune_through_the_api(
    code_model, org, other_org, owner, key_client_for
):
    _version, model = code_model()
    client = key_client_for(owner, org)
    body = {
        "code_package": "scaler",
        "code_package_version": 1,
        "model": {"model": model.registered_model.name, "version": str(model.number)},
    }
    response = client.post(f"/api/v1/orgs/{org.slug}/jobs/", body, format="json")
    assert response.status_code == 201, response.content
    job = Job.objects.get(pk=response.json()["id"])
    assert (job.kind, job.input_model_version) == (Job.Kind.TRAIN, model)
    theirs = ModelVersionFactory(organization=other_org)
    refused = client.post(
        f"/api/v1/orgs/{org.slug}/jobs/",
        {**body, "model": {"model": theirs.registered_model.name, "version": "1"}},
        format="json",
    )
    assert refused.status_code == 400
    assert refused.json()["fields"] == {"model": ["No such model version in this organization."]}
