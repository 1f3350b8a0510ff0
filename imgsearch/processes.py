"""Child processes die with their parent."""

from __future__ import annotations

import os
import platform
import signal
import sys
from typing import Any

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int, *_: Any) -> None:
    """In a child: be killed with `parent`. A parent killed with SIGKILL (or by the OOM killer) runs no clean-up, and a
    forked worker blocked on a full queue would live on holding the Milvus Lite LOCK it inherited, so the rerun is
    refused. Linux's parent-death signal does it at once; elsewhere the child's own polling of its parent must.
    SIGTERM gets its default action back: a forked child inherits the CLI's handler, which raises, and a child that
    unwinds instead of dying waits at exit to flush its queue to a parent that no longer reads it."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the caller's polling of its parent notices instead
        pass
    if os.getppid() != parent:  # it died before the signal was armed
        os._exit(1)


M_ARENA_MAX = -8  # malloc.h


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas for a long-running process: by default each thread that meets a locked arena gets a
    new one (up to 8 per core), and a service whose requests hop between worker threads keeps fragments of every
    one. False where there is no glibc (the cap is an optimisation, never required)."""
    try:
        import ctypes

        return bool(ctypes.CDLL(None).mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


def reexec_with_python_objects_in_malloc() -> None:
    """Run this process again (same PID, arguments and environment) with PYTHONMALLOC=malloc, unless that is set.
    CPython's own allocator keeps small objects in 1 MiB arenas that it unmaps only when wholly empty, and never hands
    back the free 16 KiB pools inside them: in a soak of the service they grew 5 MiB in six minutes with the live
    objects flat, 25 MiB of free pools held (docs/benchmarks.md). Through glibc's malloc the freed pages go back at
    the service's idle trim. Only with glibc: elsewhere nothing trims."""
    if os.environ.get("PYTHONMALLOC") or platform.libc_ver()[0] != "glibc":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.environ["PYTHONMALLOC"] = "malloc"
    try:
        os.execv(sys.executable, sys.orig_argv)
    except OSError:  # keep running as we are: the allocator is an optimisation, never required
        del os.environ["PYTHONMALLOC"]
