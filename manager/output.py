"""An agent's stdout or stderr kept on disk within a bound: its first and last bytes, the middle cut.

An agent that prints without end (a ``yes``, a log loop) would otherwise fill the disk of the node while it
runs; its result keeps only a tail anyway. The agent writes into a pipe that a thread drains at once, so it
never waits on a full pipe: the first ``OUTPUT_KEEP_BYTES`` go to the file as they come, the last
``OUTPUT_KEEP_BYTES`` stay in memory and are written after a marker once the stream ends.
"""

from __future__ import annotations

import collections
import os
import threading
from pathlib import Path

MiB = 1024 * 1024
OUTPUT_KEEP_BYTES = 2 * MiB  # per stream: this many first bytes and this many last bytes are kept
_READ_SIZE = 64 * 1024


def cut_marker(dropped: int) -> bytes:
    """The line that stands for the bytes cut out of a stream's middle."""
    return f"\n[rollouttap: {dropped} bytes of output cut here]\n".encode()


class CappedOutput:
    """One output stream of an agent: ``write_fd`` is the pipe end the agent gets; ``path`` the kept bytes."""

    def __init__(self, path: Path, keep: int = OUTPUT_KEEP_BYTES) -> None:
        self.path, self.keep = path, keep
        self.dropped = 0  # bytes cut out of the middle
        self.write_error: str | None = None  # why the file stopped keeping output (the agent's stream went on)
        read_fd, self.write_fd = os.pipe()  # not inherited by other children (PEP 446)
        try:
            self._file = open(path, "wb")
        except BaseException:
            os.close(read_fd)
            os.close(self.write_fd)
            raise
        self._head_left = keep
        self._tail: collections.deque[bytes] = collections.deque()
        self._tail_size = 0
        self._lock = threading.Lock()
        self._finished = False
        self._thread = threading.Thread(target=self._drain, args=(read_fd,), name="rollouttap-output", daemon=True)
        self._thread.start()

    def close_write_end(self) -> None:
        """Drop this process's copy of the agent's end (once the agent has it): the pipe ends with the agent."""
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    def _drain(self, fd: int) -> None:
        try:
            while chunk := os.read(fd, _READ_SIZE):
                self._take(chunk)
        except OSError:
            pass  # the stream ends as if the agent had closed it
        finally:
            os.close(fd)

    def _write(self, data: bytes) -> None:
        """Keep ``data`` on disk; a failing file (a full disk) stops the keeping, never the agent's stream."""
        if self.write_error is not None:
            return
        try:
            self._file.write(data)
        except OSError as exc:
            self.write_error = f"{type(exc).__name__}: {exc}"

    def _take(self, chunk: bytes) -> None:
        with self._lock:
            if self._finished:  # a process that escaped the agent's tree still writes: nobody keeps it
                return
            if self._head_left:
                head = chunk[:self._head_left]
                self._write(head)
                self._head_left -= len(head)
                chunk = chunk[len(head):]
            if not chunk:
                return
            self._tail.append(chunk)
            self._tail_size += len(chunk)
            while self._tail_size - len(self._tail[0]) >= self.keep:  # whole chunks only: O(1) per chunk
                old = self._tail.popleft()
                self._tail_size -= len(old)
                self.dropped += len(old)

    def finish(self, timeout: float) -> int:
        """Wait (at most ``timeout`` seconds) for the stream to end, write the kept tail; the bytes cut.

        The agent's tree is dead by now, so its pipe ends at once, unless a process that escaped the tree
        holds it: then its drain thread (a daemon) is left reading and throwing away what that one writes."""
        self.close_write_end()
        self._thread.join(timeout)
        with self._lock:
            if self._finished:
                return self.dropped
            self._finished = True
            tail = b"".join(self._tail)
            if len(tail) > self.keep:
                self.dropped += len(tail) - self.keep
                tail = tail[-self.keep:]
            if self.dropped:
                self._write(cut_marker(self.dropped))
            self._write(tail)
            self._tail.clear()
            try:
                self._file.close()
            except OSError as exc:  # the buffered rest could not be written either
                self.write_error = self.write_error or f"{type(exc).__name__}: {exc}"
        return self.dropped
