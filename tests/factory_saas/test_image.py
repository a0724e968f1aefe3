"""The production image carries every package of the product: docker/Dockerfile copies each
top-level package one by one, so a new one is easily left out and the image fails to start."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOT_SHIPPED = {"tests", "bench"}


def test_every_package_is_shipped_and_copied_into_the_image():
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    shipped = {pattern.removesuffix("*") for pattern in find["find"]["include"]}
    on_disk = {path.parent.name for path in ROOT.glob("*/__init__.py")} - NOT_SHIPPED
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    copied = {
        name
        for name, into in re.findall(r"^COPY (\w+) \./(\w+)$", dockerfile, re.M)
        if name == into
    }
    assert on_disk <= shipped, f"not in pyproject's packages.find: {sorted(on_disk - shipped)}"
    assert shipped <= copied, f"not copied by docker/Dockerfile: {sorted(shipped - copied)}"
