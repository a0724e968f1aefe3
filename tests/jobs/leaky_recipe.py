"""A recipe that tries to leave something for the next job in its process, for the warm child's
test: it reports what an earlier job left, then leaves its own marks (a module global, a class
attribute, an environment variable, files in its folder, TMPDIR and HOME) and trains as the
tabular recipe does.

The worker's child command, started warm, with this recipe registered as `leaky`:
LEAKY_WARM_COMMAND.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from jobs.recipes.tabular import TabularClassifier

LEAKY_WARM_COMMAND = (
    sys.executable,
    "-c",
    "import sys; from jobs.recipes import catalog; "
    "catalog.BUILTIN_RECIPES['leaky'] = 'tests.jobs.leaky_recipe:Leaky'; "
    "from jobs.runner.child import main; sys.exit(main(['--warm']))",
)
FOUND = "found "
LEFT_BEHIND: list[str] = []


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
