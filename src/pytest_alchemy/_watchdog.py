"""Stops a throwaway PostgreSQL server once the run that started it is gone.

Run as a script (not imported: it needs no more than psutil), in a session of its own, by
:mod:`pytest_alchemy.ephemeral`::

    python _watchdog.py PID START PG_CTL FOLDER UID GID

It exits when the run removes ``FOLDER`` (a normal stop). When process ``PID`` (started at
``START``) is gone instead, killed by SIGKILL perhaps, it stops the server and removes
``FOLDER``, so no server outlives its run.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path


def _alive(pid: int, start: float) -> bool:
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(process.create_time() - start) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True


def main(argv: list[str]) -> None:
    pid, start, pg_ctl, folder, uid, gid = argv
    data = Path(folder) / "data"
    while Path(folder).exists():
        if not _alive(int(pid), float(start)):
            subprocess.run(
                [pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"],
                capture_output=True,
                timeout=60,
                check=False,
                user=int(uid) if uid else None,
                group=int(gid) if gid else None,
                extra_groups=[] if gid else None,
            )
            shutil.rmtree(folder, ignore_errors=True)
            return
        time.sleep(0.5)


if __name__ == "__main__":
    main(sys.argv[1:])
