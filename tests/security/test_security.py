"""Security checks that run with the suite.

- `manage.py check --deploy --fail-level WARNING` on the production settings is asserted by
  `tests/factory_saas/test_settings.py::test_check_deploy_is_clean_on_production_settings`
  (a subprocess with the production environment); it is not repeated here.
- bandit (high severity) runs in `make lint`, beside ruff, and pip-audit in `make test` through
  `tests/security/pip_audit_gate.py` (see the Makefile).
- Here: no unsafe deserialization anywhere in the project's code, and the security headers and
  cookie flags a production response carries.
"""

import ast
import importlib
import sys
from pathlib import Path

import pytest
from django.test import override_settings
from django.urls import reverse

from tests.factories import TEST_PASSWORD, UserFactory

ROOT = Path(__file__).resolve().parents[2]
SCANNED = [
    "factory_saas",
    "charts",
    "outbox",
    "tenants",
    "registry",
    "jobs",
    "billing",
    "bench",
    "tests",
    "manage.py",
]

# "path:line" -> why this call is safe. Empty: nothing in the project deserializes with pickle.
ALLOWED_UNSAFE_LOADS: dict[str, str] = {}

# Callables that unpickle their input, by their fully qualified name.
PICKLE_LOADERS = {
    "pickle.load",
    "pickle.loads",
    "pickle.Unpickler",
    "_pickle.load",
    "_pickle.loads",
    "cPickle.load",
    "cPickle.loads",
    "joblib.load",
    "pandas.read_pickle",
    "shelve.open",
    "torch.serialization.load",
}
# Modules whose only purpose is (un)pickling arbitrary objects: importing them is the finding.
PICKLE_MODULES = {"dill", "cloudpickle"}


def _python_files():
    for entry in SCANNED:
        path = ROOT / entry
        if path.is_file():
            yield path
        else:
            yield from (p for p in path.rglob("*.py") if "migrations" not in p.parts)


class _UnsafeLoadFinder(ast.NodeVisitor):
    """Resolves names through the module's imports, then judges each call."""

    def __init__(self):
        self.aliases: dict[str, str] = {}
        self.findings: list[tuple[int, str]] = []

    def visit_Import(self, node):
        for alias in node.names:
            self.aliases[alias.asname or alias.name.split(".")[0]] = (
                alias.name if alias.asname else alias.name.split(".")[0]
            )
            if alias.name.split(".")[0] in PICKLE_MODULES:
                self.findings.append((node.lineno, f"imports {alias.name}"))

    def visit_ImportFrom(self, node):
        module = node.module or ""
        for alias in node.names:
            self.aliases[alias.asname or alias.name] = f"{module}.{alias.name}"
        if module.split(".")[0] in PICKLE_MODULES:
            self.findings.append((node.lineno, f"imports from {module}"))

    def _qualified(self, node) -> str:
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            return f"{self._qualified(node.value)}.{node.attr}"
        return ""

    def visit_Call(self, node):
        name = self._qualified(node.func)
        keywords = {k.arg: k.value for k in node.keywords if k.arg}

        def is_true(key):
            value = keywords.get(key)
            return isinstance(value, ast.Constant) and value.value is True

        if name == "torch.load" and not is_true("weights_only"):
            self.findings.append((node.lineno, "torch.load without weights_only=True"))
        elif name == "numpy.load" and "allow_pickle" in keywords:
            value = keywords["allow_pickle"]
            if not (isinstance(value, ast.Constant) and value.value is False):
                self.findings.append((node.lineno, "numpy.load with allow_pickle"))
        elif name in PICKLE_LOADERS:
            self.findings.append((node.lineno, f"{name} (unpickles its input)"))
        self.generic_visit(node)


def unsafe_loads(source: str, filename: str) -> list[tuple[int, str]]:
    finder = _UnsafeLoadFinder()
    finder.visit(ast.parse(source, filename=filename))
    return finder.findings


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import torch\ntorch.load(p)", "torch.load without weights_only=True"),
        ("import torch\ntorch.load(p, weights_only=False)", "torch.load without weights_only"),
        ("from torch import load\nload(p)", "torch.load without weights_only=True"),
        ("import pickle\npickle.loads(b)", "pickle.loads"),
        ("from pickle import load as l\nl(f)", "pickle.load"),
        ("import numpy as np\nnp.load(p, allow_pickle=True)", "numpy.load with allow_pickle"),
        ("import joblib\njoblib.load(p)", "joblib.load"),
        ("import dill", "imports dill"),
        ("from cloudpickle import loads", "imports from cloudpickle"),
    ],
)
def test_the_scanner_finds_each_kind_of_unsafe_load(source, expected):
    findings = unsafe_loads(source, "<example>")
    assert any(expected in message for _line, message in findings), findings


@pytest.mark.parametrize(
    "source",
    [
        "import torch\ntorch.load(p, map_location='cpu', weights_only=True)",
        "import numpy as np\nnp.load(p)\nnp.load(p, allow_pickle=False)",
        "import pickle\npickle.dumps(x)",
        "import json\njson.loads(s)",
    ],
)
def test_the_scanner_passes_safe_loads(source):
    assert unsafe_loads(source, "<example>") == []


def test_no_code_deserializes_with_pickle_or_loads_torch_without_weights_only():
    findings = []
    scanned = 0
    for path in _python_files():
        scanned += 1
        relative = path.relative_to(ROOT)
        for line, message in unsafe_loads(path.read_text(), str(relative)):
            where = f"{relative}:{line}"
            if where not in ALLOWED_UNSAFE_LOADS:
                findings.append(f"{where}: {message}")
    assert scanned > 100, "the scan found too few files; is ROOT right?"
    assert not findings, "Unsafe deserialization (tenant data must never be unpickled):\n" + (
        "\n".join(findings)
    )


# Settings that decide the security headers and cookie flags, taken from the production module.
SECURITY_SETTINGS = [
    "SECURE_PROXY_SSL_HEADER",
    "SECURE_SSL_REDIRECT",
    "SECURE_REDIRECT_EXEMPT",
    "SECURE_HSTS_SECONDS",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS",
    "SECURE_HSTS_PRELOAD",
    "SECURE_CONTENT_TYPE_NOSNIFF",
    "SECURE_REFERRER_POLICY",
    "SECURE_CROSS_ORIGIN_OPENER_POLICY",
    "SESSION_COOKIE_SECURE",
    "SESSION_COOKIE_HTTPONLY",
    "SESSION_COOKIE_SAMESITE",
    "CSRF_COOKIE_SECURE",
    "CSRF_COOKIE_HTTPONLY",
    "CSRF_COOKIE_SAMESITE",
    "X_FRAME_OPTIONS",
    "CONTENT_SECURITY_POLICY",
]


@pytest.fixture
def production(monkeypatch):
    """The production settings module as production would load it (its values, not copies)."""
    monkeypatch.setenv("SECRET_KEY", "a-real-looking-secret-key-for-this-test-0123456789-abcdef")
    monkeypatch.setenv("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/factory_saas")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/0")
    for name in ("DEBUG", "SECURE_SSL_REDIRECT", "SECURE_HSTS_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    sys.modules.pop("factory_saas.settings.production", None)
    module = importlib.import_module("factory_saas.settings.production")
    sys.modules.pop("factory_saas.settings.production", None)
    return module


@pytest.fixture
def production_like(production):
    from django.conf import global_settings

    values = {
        name: getattr(production, name)
        if hasattr(production, name)
        else getattr(global_settings, name)
        for name in SECURITY_SETTINGS
    }
    with override_settings(**values):
        yield values


def test_production_serves_every_response_through_the_header_middlewares(production):
    middleware = production.MIDDLEWARE
    for needed in (
        "django.middleware.security.SecurityMiddleware",
        "factory_saas.middleware.ContentSecurityPolicyMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
        "django.middleware.clickjacking.XFrameOptionsMiddleware",
    ):
        assert needed in middleware, needed
    assert middleware[0] == "django.middleware.security.SecurityMiddleware"
    assert production.SECURE_HSTS_SECONDS >= 31536000
    assert production.SECURE_SSL_REDIRECT is True


def _assert_security_headers(response):
    csp = response["Content-Security-Policy"]
    directives = {d.strip().split(" ")[0]: d.strip() for d in csp.split(";") if d.strip()}
    assert directives["frame-ancestors"] == "frame-ancestors 'none'", csp
    assert directives["default-src"] == "default-src 'self'", csp
    assert directives["object-src"] == "object-src 'none'", csp
    assert "'unsafe-eval'" not in csp and "'unsafe-inline'" not in directives["script-src"]
    assert response["X-Frame-Options"] == "DENY"
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["Referrer-Policy"] == "same-origin"
    hsts = response["Strict-Transport-Security"]
    assert "max-age=31536000" in hsts and "includeSubDomains" in hsts, hsts


@pytest.mark.django_db
@pytest.mark.parametrize(
    "url",
    ["/healthz", "/accounts/login/", "/api/v1/orgs/", "/api/v1/no-such-route/"],
    ids=["probe", "page", "api-401", "api-404"],
)
def test_production_responses_carry_the_security_headers(client, production_like, url):
    response = client.get(url, secure=True)
    assert response.status_code in {200, 401, 404}, response.status_code
    _assert_security_headers(response)


@pytest.mark.django_db
def test_production_redirects_plain_http_to_https_except_the_probes(client, production_like):
    page = client.get("/accounts/login/")
    assert page.status_code == 301 and page["Location"].startswith("https://")
    assert client.get("/healthz").status_code == 200


@pytest.mark.django_db
def test_production_cookies_are_secure_httponly_and_samesite(client, production_like):
    user = UserFactory()
    login_page = client.get(reverse("account_login"), secure=True)
    csrf = login_page.cookies["csrftoken"]
    assert csrf["secure"] is True
    assert csrf["samesite"] in {"Lax", "Strict"}

    response = client.post(
        reverse("account_login"),
        {"login": user.email, "password": TEST_PASSWORD},
        secure=True,
    )
    assert response.status_code == 302, response.content[:300]
    session = response.cookies["sessionid"]
    assert session["secure"] is True
    assert session["httponly"] is True
    assert session["samesite"] in {"Lax", "Strict"}
    _assert_security_headers(response)


@pytest.mark.django_db
@pytest.mark.parametrize(
    "weaker",
    [
        {"X_FRAME_OPTIONS": "SAMEORIGIN"},
        {"SECURE_HSTS_INCLUDE_SUBDOMAINS": False},
        {"CONTENT_SECURITY_POLICY": "default-src 'self'; frame-ancestors *"},
        {"SECURE_CONTENT_TYPE_NOSNIFF": False},
    ],
    ids=lambda weaker: next(iter(weaker)),
)
def test_the_header_assertions_fail_on_a_weaker_setting(client, production_like, weaker):
    with override_settings(**weaker):
        response = client.get("/healthz", secure=True)
    with pytest.raises((AssertionError, KeyError)):
        _assert_security_headers(response)
