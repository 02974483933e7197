"""How a worker tells ``python -m carft_mega.launch`` the way it ended.

The launcher sets ``$CARFT_LAUNCH_STATUS_DIR``; each worker writes ``<LOCAL_RANK>.json`` there
(``{"status": "done" | "finished" | "stopped" | "error", "code": exit code}``) before it exits, so
the launcher can tell a clean stop or a reported error from a crash. Without the variable (plain
torchrun, a single process) nothing is written.
"""

from __future__ import annotations

import json
import os


def report_status(status: str, code: int) -> None:
    d = os.environ.get("CARFT_LAUNCH_STATUS_DIR")
    if not d or not os.path.isdir(d):
        return
    path = os.path.join(d, f"{os.environ.get('LOCAL_RANK', '0')}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"status": status, "code": code}, f)
    os.replace(path + ".tmp", path)
