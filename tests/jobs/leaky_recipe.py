"""A recipe that tries to leave something for the next job in its process, for the warm child's
test: it reports what an earlier job left, then leaves its own marks (a module global, a class
attribute, an environment variable, files in its folder, TMPDIR and HOME) and trains as the
tabular recipe does.

The zygote that forks the worker's warm children with this recipe registered as `leaky`:
LEAKY_ZYGOTE_COMMAND.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from jobs.recipes import catalog
from jobs.recipes.tabular import TabularClassifier
from jobs.runner import child
from jobs.runner.child import main  # noqa: F401  what each forked child runs
from jobs.runner.zygote import zygote_command

LEAKY_ZYGOTE_COMMAND = zygote_command(__name__)
FOUND = "found "
LEFT_BEHIND: list[str] = []


def zygote_warm_up() -> None:
    catalog.BUILTIN_RECIPES["leaky"] = f"{__name__}:Leaky"
    child.zygote_warm_up()


class Leaky(TabularClassifier):
    name = "leaky"
    left_behind = ""

    def train(self, ctx):
        mark = f"leak-{ctx.seed}"
        folders = {"folder": Path.cwd(), "tmp": Path(tempfile.gettempdir()), "home": Path.home()}
        found = {
            "pid": os.getpid(),
            "global": list(LEFT_BEHIND),
            "class": type(self).left_behind,
            "environ": os.environ.get("LEAKY_MARK", ""),
            **{name: sorted(p.name for p in f.glob("leak-*")) for name, f in folders.items()},
        }
        ctx.log(FOUND + json.dumps(found))
        LEFT_BEHIND.append(mark)
        type(self).left_behind = mark
        os.environ["LEAKY_MARK"] = mark
        for folder in folders.values():
            (folder / mark).write_text(mark)
        return super().train(ctx)
