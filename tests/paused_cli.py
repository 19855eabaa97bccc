"""The conceptrank CLI, paused for good right after it writes a checkpoint whose metadata matches
``PAUSE_AT`` (a JSON object), so that a test can SIGKILL it at a known point (test code only)."""

import json
import os
import sys
import time

from conceptrank.io import cache

want = json.loads(os.environ.get("PAUSE_AT", "{}"))
write = cache.write_checkpoint


def write_then_pause(path, meta, arrays=None):
    write(path, meta, arrays)
    if want and all(meta.get(k) == v for k, v in want.items()):
        while True:  # until killed
            time.sleep(1)


cache.write_checkpoint = write_then_pause

if __name__ == "__main__":
    from conceptrank.cli import app

    sys.argv[0] = "conceptrank"
    app()
