"""docker/k8s, rendered as kustomize would: every object valid for Kubernetes 1.37 (the schemas
kubernetes-validate ships, offline), the ServiceMonitors for their own schema, and every
reference between objects and to the code resolving."""

import copy
import json
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from django.conf import settings
from django.core.management import get_commands

from jobs.models import ResourceClass
from tests.ops.kustomize import containers, render

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker" / "k8s"
KUBERNETES_VERSION = "1.37"
CUSTOM_KINDS = {"ServiceMonitor"}
SERVICE_MONITOR_SCHEMA = json.loads(
    (Path(__file__).parent / "servicemonitor.schema.json").read_text()
)
RENDERINGS = {"base": K8S / "base", "production": K8S / "overlays" / "production"}
# Not in the kustomizations (applying one must never overwrite the real Secret): the operator
# creates it with these keys.
SECRET_EXAMPLE = K8S / "secret.example.yaml"


def _secret():
    return yaml.safe_load(SECRET_EXAMPLE.read_text())


@pytest.fixture(scope="module", params=sorted(RENDERINGS))
def manifests(request):
    return [*render(RENDERINGS[request.param]), _secret()]


def _ids(folder):
    return [f"{doc['kind']}/{doc['metadata']['name']}" for doc in render(folder)]


@pytest.mark.parametrize("rendering", sorted(RENDERINGS))
def test_every_object_is_valid_for_kubernetes_or_its_own_schema(rendering):
    for doc in [*render(RENDERINGS[rendering]), _secret()]:
        if doc["kind"] in CUSTOM_KINDS:
            jsonschema.validate(doc, SERVICE_MONITOR_SCHEMA)
        else:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize(
    "break_it",
    [
        lambda doc: doc["spec"].update(replica=2),  # a misspelt field
        lambda doc: doc["spec"]["template"]["spec"]["containers"][0].update(ports="8000"),
        lambda doc: doc["spec"]["template"]["spec"]["containers"][0].pop("name"),
    ],
    ids=["unknown-field", "wrong-type", "missing-required"],
)
def test_the_validation_refuses_a_broken_manifest(break_it):
    [web] = [
        d
        for d in render(RENDERINGS["base"])
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "web"
    ]
    broken = copy.deepcopy(web)
    break_it(broken)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_the_service_monitor_schema_refuses_what_it_does_not_know():
    [monitor] = [d for d in render(RENDERINGS["base"]) if d["kind"] == "ServiceMonitor"][:1]
    broken = copy.deepcopy(monitor)
    broken["spec"]["endpoints"][0]["bearerTokenSecrett"] = {"name": "x", "key": "y"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SERVICE_MONITOR_SCHEMA)


def _pods(manifests):
    """(workload, pod labels, containers) of every pod template."""
    return [
        (doc, doc["spec"]["template"]["metadata"]["labels"], containers(doc))
        for doc in manifests
        if containers(doc)
    ]


def _selects(selector: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", expression
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def _named(manifests, kind):
    return {doc["metadata"]["name"]: doc for doc in manifests if doc["kind"] == kind}


def test_every_selector_reaches_pods_and_every_port_name_exists(manifests):
    pods = _pods(manifests)
    services = _named(manifests, "Service")
    for name, service in services.items():
        selected = [
            c
            for _d, labels, c in pods
            if _selects({"matchLabels": service["spec"]["selector"]}, labels)
        ]
        assert selected, f"Service {name} selects no pod"
        ports = {p["name"] for cs in selected for c in cs for p in c.get("ports", [])}
        for port in service["spec"].get("ports", []):
            assert port["targetPort"] in ports, (
                f"Service {name}: no container port {port['targetPort']}"
            )
    for kind in ("NetworkPolicy", "PodDisruptionBudget"):
        for name, doc in _named(manifests, kind).items():
            selector = doc["spec"].get("podSelector", doc["spec"].get("selector"))
            assert any(_selects(selector, labels) for _d, labels, _c in pods), f"{kind} {name}"
            for rule in doc["spec"].get("ingress", []):
                for peer in rule["from"]:
                    if "podSelector" in peer:
                        assert any(_selects(peer["podSelector"], labels) for _d, labels, _c in pods)
    for name, monitor in _named(manifests, "ServiceMonitor").items():
        [service] = [
            s
            for s in services.values()
            if _selects(monitor["spec"]["selector"], s["metadata"]["labels"])
        ]
        port_names = {p["name"] for p in service["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in port_names and endpoint["path"] == "/metrics", name
    for name, hpa in _named(manifests, "HorizontalPodAutoscaler").items():
        target = hpa["spec"]["scaleTargetRef"]
        assert target["name"] in _named(manifests, target["kind"]), name


def _secret_and_config_keys(manifests):
    keys = {}
    for doc in manifests:
        if doc["kind"] == "ConfigMap":
            keys[("configMap", doc["metadata"]["name"])] = set(doc["data"])
        if doc["kind"] == "Secret":
            keys[("secret", doc["metadata"]["name"])] = set(doc["stringData"])
    return keys


def test_every_config_map_and_secret_reference_resolves(manifests):
    keys = _secret_and_config_keys(manifests)
    for doc in manifests:
        for container in containers(doc):
            for source in container.get("envFrom", []):
                ref = source.get("configMapRef") or source.get("secretRef")
                kind = "configMap" if "configMapRef" in source else "secret"
                assert (kind, ref["name"]) in keys, (doc["metadata"]["name"], ref)
    for monitor in _named(manifests, "ServiceMonitor").values():
        for endpoint in monitor["spec"]["endpoints"]:
            credentials = endpoint["authorization"]["credentials"]
            assert credentials["key"] in keys[("secret", credentials["name"])]


def _variables_the_code_reads() -> set[str]:
    read = set()
    for path in [
        *(ROOT / "factory_saas" / "settings").glob("*.py"),
        ROOT / "docker" / "Dockerfile",
    ]:
        text = path.read_text()
        read |= set(re.findall(r'env(?:\.\w+)?\(\s*"([A-Z][A-Z0-9_]*)"', text))
        read |= set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", text))
    # Read by prometheus_client itself (factory_saas/metrics.py).
    return read | {"PROMETHEUS_MULTIPROC_DIR"}


def test_every_environment_variable_is_one_the_code_reads(manifests):
    """A misspelt or retired name would be silently ignored by the processes."""
    read = _variables_the_code_reads()
    named = set()
    for names in _secret_and_config_keys(manifests).values():
        named |= names
    for doc in manifests:
        for container in containers(doc):
            named |= {variable["name"] for variable in container.get("env", [])}
    assert named - read == set()


def _workload(manifests, kind, name):
    return _named(manifests, kind)[name]


def test_each_process_runs_a_command_that_exists(manifests):
    commands = {
        doc["metadata"]["name"]: container.get("command")
        for doc in manifests
        for container in containers(doc)
    }
    assert commands["web"] is None  # the image's CMD: gunicorn with factory_saas.gunicorn_conf
    assert "-c python:factory_saas.gunicorn_conf" in (ROOT / "docker" / "Dockerfile").read_text()
    control = commands["control-plane"]
    assert control[:4] == ["celery", "-A", "factory_saas", "worker"]
    assert control[control.index("-Q") + 1] == settings.CELERY_TASK_DEFAULT_QUEUE
    assert commands["beat"][:4] == ["celery", "-A", "factory_saas", "beat"]
    for name in ("migrate", *[n for n in commands if n.startswith("gpu-worker-")]):
        python, manage, command = commands[name][:3]
        assert (python, manage) == ("python", "manage.py") and command in get_commands()


@pytest.mark.django_db
def test_singletons_scaling_and_gpu_placement(manifests):
    beat = _workload(manifests, "StatefulSet", "beat")
    assert beat["spec"]["replicas"] == 1
    scaled = {
        hpa["spec"]["scaleTargetRef"]["name"]
        for hpa in _named(manifests, "HorizontalPodAutoscaler").values()
    }
    assert scaled == {"web"}
    assert "replicas" not in _workload(manifests, "Deployment", "web")["spec"]  # the HPA's
    daemon_sets = _named(manifests, "DaemonSet")
    assert daemon_sets
    classes = set(ResourceClass.objects.values_list("name", flat=True))
    for name, daemon_set in daemon_sets.items():
        pod = daemon_set["spec"]["template"]["spec"]
        resource_class = pod["nodeSelector"]["factory-saas.io/resource-class"]
        assert resource_class in classes and name == f"gpu-worker-{resource_class}"
        [container] = pod["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
        env = {
            v["name"]: v.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
            for v in container["env"]
        }
        assert env["WORKER_NAME"] == "spec.nodeName"


def test_probes_and_metrics_wiring(manifests):
    web = _workload(manifests, "Deployment", "web")["spec"]["template"]["spec"]["containers"][0]
    assert web["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert web["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert web["startupProbe"]["httpGet"]["path"] == "/healthz"
    control = _workload(manifests, "Deployment", "control-plane")["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert control["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    for container in (web, control):
        env = {v["name"]: v for v in container["env"]}
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert env["PROMETHEUS_MULTIPROC_DIR"]["value"] in mounts
    env = {v["name"]: v.get("value") for v in control["env"]}
    port = {p["name"]: p["containerPort"] for p in control["ports"]}["metrics"]
    assert env["METRICS_PORT"] == str(port)
    beat = _workload(manifests, "StatefulSet", "beat")["spec"]["template"]["spec"]["containers"][0]
    assert "livenessProbe" in beat


def test_every_pod_runs_unprivileged(manifests):
    for doc, _labels, cs in _pods(manifests):
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, doc["metadata"]["name"]
        assert pod["automountServiceAccountToken"] is False
        for container in cs:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_no_kustomization_carries_a_secret():
    for folder in RENDERINGS.values():
        assert not [doc for doc in render(folder) if doc["kind"] == "Secret"]


def test_production_pins_every_image_to_a_release():
    for doc in render(RENDERINGS["production"]):
        for container in containers(doc):
            name, _, tag = container["image"].rpartition(":")
            assert name.startswith("registry.example.com/") and tag and tag != "latest"
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "factory-saas"
