"""A zygote entry whose warm-up leaves a second thread running, as an import that starts one
would: forking then could hang the child on a lock that thread held, so the zygote refuses."""

from __future__ import annotations

import threading

from jobs.runner.zygote import zygote_command
from tests.jobs.idle_child import main  # noqa: F401  what each forked child would run

THREADED_ZYGOTE_COMMAND = zygote_command(__name__)


def zygote_warm_up() -> None:
    threading.Thread(target=threading.Event().wait, daemon=True).start()
