"""The pip-audit gate of `make test`: its result when the service answers, a skip line if not."""

import subprocess
from types import SimpleNamespace

from tests.security import pip_audit_gate


def test_pip_audit_runs_strictly_and_its_failure_fails_the_gate(monkeypatch):
    ran = []
    monkeypatch.setattr(pip_audit_gate, "service_answers", lambda: (True, "HTTP 200"))
    monkeypatch.setattr(
        subprocess,
        "run",
        lambda command, check: ran.append(command) or SimpleNamespace(returncode=1),
    )
    assert pip_audit_gate.main() == 1
    assert "--strict" in ran[0] and ran[0][0].endswith("pip-audit")


def test_an_unreachable_service_is_said_out_loud_and_does_not_fail(monkeypatch, capsys):
    monkeypatch.setattr(pip_audit_gate, "service_answers", lambda: (False, "HTTP 404"))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: _must_not_run())
    assert pip_audit_gate.main() == 0
    assert capsys.readouterr().out.startswith("pip-audit skipped: PyPI JSON API")


def test_ignored_vulnerabilities_are_passed_to_pip_audit(monkeypatch):
    monkeypatch.setattr(
        pip_audit_gate, "IGNORED_VULNERABILITIES", {"GHSA-xxxx": "2026-11-26: not reachable"}
    )
    assert pip_audit_gate.audit_command()[-2:] == ["--ignore-vuln", "GHSA-xxxx"]


def _must_not_run():
    raise AssertionError("pip-audit must not run when the service does not answer")
