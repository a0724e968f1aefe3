"""A zygote entry that imports what the real one does (jobs.runner.child) and whose forked
children, once warm as a job's child is, print the thread count torch gives them and exit."""

from __future__ import annotations

import json
import os

from jobs.runner import child
from jobs.runner.child import zygote_warm_up  # noqa: F401  what the zygote imports
from jobs.runner.zygote import zygote_command

TORCH_THREADS_ZYGOTE_COMMAND = zygote_command(__name__)


def main(argv: list[str]) -> int:
    child.warm_up()
    import torch

    threads = {"torch": torch.get_num_threads(), "env": os.environ["OMP_NUM_THREADS"]}
    print(json.dumps(threads), flush=True)
    return 0
