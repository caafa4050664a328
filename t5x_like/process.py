"""Process start-up, standard library only: what an entry point does before anything else,
and what every worker process it spawns does first.

Entry points (`t5x_like/<entry>.py`, run as `python -m t5x_like.<entry>`) call
`restart_with_huge_pages()` before their imports. Large allocations then come from
transparent huge pages: XLA on CPU maps every step's temporary buffer afresh (752 MB for
bench/reference_llama.gin), and in 4 KiB pages the kernel faulted in and zeroed about
184,000 of them per step; in huge pages the step takes about 0.9x as long
(docs/PERFORMANCE.md, change 5). glibc's malloc asks for huge pages when
`glibc.malloc.hugetlb` is set, and reads its tunables only at start-up, so the entry point
restarts itself once with it. A GLIBC_TUNABLES that already names the tunable (e.g. =0,
to opt out) is left alone; elsewhere than Linux and without transparent huge pages it
changes nothing. Code that imports t5x_like into its own process sets it itself:
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python ...`.

Worker processes (data workers, prepare's shard writers) call `die_with_parent(pid)` first
thing in their initializer: they get SIGKILL when their parent dies, even by kill -9, and
exit at once if it already has.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping

HUGETLB = "glibc.malloc.hugetlb"
HUGE_PAGES_TUNABLE = f"{HUGETLB}=1"


def _names_hugetlb(env: Mapping[str, str]) -> bool:
    return HUGETLB in env.get("GLIBC_TUNABLES", "")


def with_huge_pages(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of `env` with HUGE_PAGES_TUNABLE added to GLIBC_TUNABLES, unless that
    already says how glibc.malloc.hugetlb is set."""
    if _names_hugetlb(env):
        return dict(env)
    tunables = env.get("GLIBC_TUNABLES", "")
    return dict(env, GLIBC_TUNABLES=":".join(filter(None, [tunables, HUGE_PAGES_TUNABLE])))


def restart_with_huge_pages() -> None:
    """Replaces this process by the same command with HUGE_PAGES_TUNABLE set (Linux, when
    GLIBC_TUNABLES does not name it yet); returns only where nothing needs restarting."""
    if sys.platform == "linux" and sys.executable and not _names_hugetlb(os.environ):
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
                  with_huge_pages(os.environ))


def die_with_parent(parent_pid: int) -> None:
    """This process gets SIGKILL when `parent_pid` (its parent) dies (Linux's
    PR_SET_PDEATHSIG), and exits now if the parent died before that was armed."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


def start_worker(parent_pid: int, init=None) -> None:
    """A worker pool's initializer: `die_with_parent`, then the caller's `init`."""
    die_with_parent(parent_pid)
    if init is not None:
        init()
