"""pip-audit for `make test`: audit when the vulnerability service answers, else say it was skipped.

pip-audit asks PyPI's JSON API (https://pypi.org/pypi/<name>/<version>/json) for each installed
distribution. Where that API does not answer (a machine that reaches only a package index's
/simple/ pages, or no network), pip-audit without --strict reports "No known vulnerabilities
found" having audited nothing, so this gate probes the service first: if it answers, pip-audit
runs with --strict and its exit status is the result; if not, it prints one line saying so and
exits 0. `make audit` runs pip-audit unconditionally, for machines with the network.
"""

import subprocess
import sys
import urllib.error
import urllib.request
from importlib.metadata import version
from pathlib import Path

SERVICE = "PyPI JSON API (https://pypi.org/pypi/<name>/<version>/json)"
# The per-version page, as pip-audit asks it: some mirrors answer /pypi/<name>/json (the latest
# release only) but not this one, and then pip-audit can audit nothing.
PROBE_URL = f"https://pypi.org/pypi/pip/{version('pip')}/json"
TIMEOUT_S = 10

# Vulnerabilities accepted for now: id -> "YYYY-MM-DD: why it does not apply, and until when".
# Each entry is passed to pip-audit as --ignore-vuln. Empty: nothing is ignored.
IGNORED_VULNERABILITIES: dict[str, str] = {}


def service_answers() -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(PROBE_URL, timeout=TIMEOUT_S) as response:
            return response.status == 200, f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}"
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        return False, str(getattr(exc, "reason", exc))


def audit_command() -> list[str]:
    pip_audit = Path(sys.executable).with_name("pip-audit")
    command = [str(pip_audit), "--strict", "--skip-editable", "--progress-spinner", "off"]
    for vulnerability in sorted(IGNORED_VULNERABILITIES):
        command += ["--ignore-vuln", vulnerability]
    return command


def main() -> int:
    answers, why = service_answers()
    if not answers:
        print(f"pip-audit skipped: {SERVICE} unreachable ({why}); run `make audit` where it is.")
        return 0
    return subprocess.run(audit_command(), check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
