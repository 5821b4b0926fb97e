"""Calls in flight on this host, bounded across its gunicorn workers: a call holds one byte of a lock file while it
runs (a POSIX record lock, fcntl.lockf, taken without waiting), and the kernel lets go of every lock of a process
that exits or is killed, so a worker that dies mid-call frees its slots with it.

The files are in $PASSTHRU_LIMITS_DIR, which deploy/gunicorn.conf.py makes for each server before its workers
start (as it does PROMETHEUS_MULTIPROC_DIR): its workers share them, another server on the host does not. Without it
(`flask run`, tests) the bound holds in this process alone, which is then the whole server.

Each bound is a region of REGION bytes at an offset named by a hash (a route's path, a key's token): the offsets
are sparse, the files stay empty (a lock may lie past a file's end), and a process opens one file per kind of bound
(routes, keys) whatever the number of keys.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import os
import random
import threading

LIMITS_DIR_VARIABLE = "PASSTHRU_LIMITS_DIR"
# A bound's slots at most (a route's or a key's max_parallel_requests). Taking a slot tries one lock when the bound
# has room; finding it full tries every slot, each a system call: about 2 to 5 µs each (bench figures: the README).
MAX_PARALLEL = 10_000
REGION = 1 << 14  # bytes per bound: room for MAX_PARALLEL slots
# A lock's kernel call refusing because another process holds that byte.
HELD_ELSEWHERE = (errno.EACCES, errno.EAGAIN)


def region_of(name: str) -> int:
    """The offset of a bound named by a string (a route's path): 48 bits of its sha256, in whole regions."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:6], "big") * REGION


def region_of_token(token: str) -> int:
    """The offset of a key's bound: its token is a sha256 already (64 hex digits), so 48 bits of it."""
    return int(token[:12], 16) * REGION


class SlotFile:
    """The bounds kept in one lock file, or in this process alone without one (path None).

    The file is opened by each process on first use, after gunicorn forked. A POSIX lock belongs to its process,
    so the threads of one worker never conflict on a byte through the kernel: which slots this process holds is
    kept here too, under a lock, and a thread only tries the bytes no thread of this process holds. The file is
    never closed while the process lives (closing any descriptor of it would drop all its locks).
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._held: dict[int, set[int]] = {}  # region → the slots this process holds there
        # Where this process starts looking, so that processes spread over a bound instead of all trying slot 0
        # (random is reseeded in each forked worker).
        self._home = random.getrandbits(30)

    def take(self, region: int, size: int) -> int | None:
        """Hold one of the `size` slots of the bound at `region` for a call: its index, or None when this host's
        processes hold all of them."""
        with self._lock:
            held = self._held.get(region)
            if held is None:
                held = self._held[region] = set()
            if len(held) < size:
                fd = self._fd if self._fd is not None or self.path is None else self._open(self.path)
                start = self._home % size
                for index in itertools.chain(range(start, size), range(start)):
                    if index not in held and (fd is None or _lock(fd, region + index)):
                        held.add(index)
                        return index
            if not held:
                del self._held[region]
            return None

    def give(self, region: int, index: int) -> None:
        """Let go of a slot `take` gave."""
        with self._lock:
            held = self._held.get(region)
            if held is None or index not in held:
                return
            held.discard(index)
            if not held:
                del self._held[region]
            if self._fd is not None:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, region + index)

    def _open(self, path: str) -> int:
        # The folder is the server's (made before its workers start); made again if something removed it meanwhile.
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return self._fd


def _lock(fd: int, offset: int) -> bool:
    """Lock one byte without waiting: False when another process holds it."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
    except OSError as exc:
        if exc.errno in HELD_ELSEWHERE:
            return False
        raise
    return True


def host_slots(directory: str | None) -> tuple[SlotFile, SlotFile]:
    """This process's two slot files in the server's folder (routes', keys'), or process-local ones without it."""
    if directory is None:
        return SlotFile(None), SlotFile(None)
    return SlotFile(os.path.join(directory, "routes.slots")), SlotFile(os.path.join(directory, "keys.slots"))
