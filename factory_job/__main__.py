"""`python -m factory_job`: run the package's entry point inside the sandbox.

The parent starts this as the sandbox's command, with the code on PYTHONPATH and the job's
description at $FACTORY_JOB_SPEC. It imports the entry ("module:function"), calls it with no
arguments, and once it returns prints the one @@result line the parent registers outputs from.
Exit codes are those of jobs.runner.protocol: a stop request that the entry honoured is
EXIT_STOPPED (no result: the job resumes from its last checkpoint), BadInput is EXIT_BAD_INPUT.
"""

from __future__ import annotations

import importlib
import signal
import sys
import traceback

import factory_job


def main() -> int:
    # Only raises the flag: the entry checkpoints and returns when it next asks should_stop().
    signal.signal(signal.SIGTERM, lambda _signum, _frame: factory_job._stop.set())
    sys.stdout.reconfigure(line_buffering=True)
    try:
        entry = factory_job._job()["entry"]
        module_name, _, function_name = entry.partition(":")
        function = getattr(importlib.import_module(module_name), function_name)
        function()
    except factory_job.BadInput as exc:
        print(str(exc), file=sys.stderr)
        return factory_job.EXIT_BAD_INPUT
    except Exception:
        traceback.print_exc()
        return factory_job.EXIT_FAILED
    if factory_job.should_stop():
        return factory_job.EXIT_STOPPED
    factory_job._emit("result", factory_job._result())
    return factory_job.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
