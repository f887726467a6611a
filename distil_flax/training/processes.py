"""Whether a process still runs: what tells a killed writer's leftovers and a dead run's lock
from those of a live one (`atomic.remove_stale`, `workdir_lock`)."""

import os


def process_start(pid: int) -> str:
    """The kernel's start time of `pid` (Linux), to tell a reused pid apart; "" elsewhere."""
    stat = _proc_stat(pid)
    return stat[19] if stat else ""


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3... of /proc/PID/stat (state first), or None without /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name (field 2) may hold spaces and parentheses: split after its ')'.
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_alive(pid: int, start: str = "") -> bool:
    """Whether `pid` runs (a zombie does not) and, given `start`, is the process that started
    then (`process_start`), not a later one that reused its pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # Exists, owned by another user.
    stat = _proc_stat(pid)
    if stat is None:
        return True  # No /proc: a live pid is all we can know.
    return stat[0] not in ("Z", "X") and (not start or stat[19] == start)
