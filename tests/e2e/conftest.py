"""Browser tests: headless Chromium (Debian's package, launched by its path; no browser is ever
downloaded) driven by Playwright against a live server, with real pool processes behind it.

Each step's screenshot goes to test-artifacts/e2e/<test>/; the browser console is printed after
each test (pytest shows it when the test fails)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "e2e"
CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture
def browser(monkeypatch):
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop in the test's thread; the ORM calls the test
    # makes between browser steps are still plain synchronous calls. Only for these tests: the
    # variable must not reach other tests' subprocesses (check --deploy refuses it).
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"No Chromium at {CHROMIUM}: `make test` installs Debian's chromium package "
            "(apt-get install chromium); CHROMIUM_PATH points elsewhere."
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        yield browser
        browser.close()


class Screens:
    """Numbered screenshots of one test's steps."""

    def __init__(self, page, folder: Path):
        self.page, self.folder, self.count = page, folder, 0
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)

    def __call__(self, name: str, page=None) -> Path:
        self.count += 1
        path = self.folder / f"{self.count:02d}-{name}.png"
        (page or self.page).screenshot(path=path, full_page=True)
        return path


@pytest.fixture
def page(browser, request):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    context.set_default_timeout(20_000)
    page = context.new_page()
    console: list[str] = []
    page.on(
        "console",
        lambda message: (
            console.append(f"{message.type}: {message.text}")
            if message.type in ("error", "warning")
            else None
        ),
    )
    page.on("pageerror", lambda error: console.append(f"page error: {error}"))
    page.console = console
    page.screens = Screens(page, ARTIFACTS / re.sub(r"[^\w.-]+", "_", request.node.name))
    yield page
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        page.screens("failure")
        print(f"Failed at {page.url}; screenshots in {page.screens.folder}")
    print("Browser console:", *(console or ["(nothing)"]), sep="\n  ")
    context.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)  # the page fixture reads rep_call
    return report
