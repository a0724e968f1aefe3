"""The SDK package itself: no Django in it, and every route it calls exists in the API schema."""

import json
import re
import subprocess
import sys

import pytest
from django.core.management import call_command
from factory_sdk.client import ENDPOINTS


@pytest.mark.slow
def test_importing_the_sdk_and_its_cli_loads_no_django():
    probe = (
        "import sys, factory_sdk, factory_sdk.cli, factory_sdk.uploads; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'django', 'rest_framework'}))"
    )
    env = {"PATH": "/usr/bin:/bin"}  # no DJANGO_SETTINGS_MODULE, no PYTHONPATH to the apps
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True
    )
    assert done.stdout.strip() == "[]"


def _shape(path: str) -> str:
    """A path with its placeholders unnamed: /orgs/{org_slug}/jobs/{id}/ -> /orgs/{}/jobs/{}/."""
    return re.sub(r"\{[^}]+\}", "{}", path)


def test_every_endpoint_the_client_calls_is_in_the_schema_with_its_method(tmp_path):
    schema_path = tmp_path / "schema.json"
    call_command("spectacular", "--format", "openapi-json", "--file", str(schema_path))
    schema = json.loads(schema_path.read_text())
    offered = {
        (method.upper(), _shape(path))
        for path, operations in schema["paths"].items()
        for method in operations
    }

    missing = [
        (name, method, path)
        for name, (method, path) in ENDPOINTS.items()
        if (method, _shape(f"/api/v1/{path}")) not in offered
    ]

    assert missing == []
