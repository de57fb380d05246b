"""Drop known, harmless lines that Ray's C++ core writes straight to this process's stderr.

Ray Data hands each actor of a `map_batches` actor pool its own ObjectRefs, and the driver's
core worker logs that at ERROR, once per scoring run: "core_worker.cc:… has constructor
arguments in the object store and max_restarts > 0" (ray-project/ray#57733; the arguments
stay referenced for the job's lifetime, so the restart it warns about works). It is written
by C++ to file descriptor 2, below Python's logging and warnings, and the only switch that
hides it (RAY_BACKEND_LOG_LEVEL=fatal) hides every real core error too and prints a line of
its own in each Ray process.

So, without --verbose, once Ray has started (its own processes keep the real stderr), the
driver's fd 2 becomes a pipe read by a thread that forwards every byte to the real stderr
at once, except whole lines containing one of DROP. Partial lines (a progress bar's carriage
returns) pass through immediately; a line held back to be matched waits at most HOLD_S.
`restore()` (at exit) puts the real stderr back and drains the pipe.
"""

from __future__ import annotations

import atexit
import os
import select
import sys
import threading

# Each entry: byte strings that must all occur in a line for it to be dropped.
DROP = ((b"core_worker.cc", b"has constructor arguments in the object store"),)
HOLD_S = 0.2

_state: dict = {}


def _dropped(line: bytes) -> bool:
    return any(all(part in line for part in parts) for parts in DROP)


def _forward(buf: bytes, out: int, final: bool) -> bytes:
    """Write the lines of `buf` that are not dropped to `out`; return what is kept back: an
    unfinished line that may still turn out to be dropped (C++ log lines start with "[")."""
    *lines, rest = buf.split(b"\n")
    data = b"".join(line + b"\n" for line in lines if not _dropped(line))
    if rest and (final or not rest.startswith(b"[") or b"\r" in rest):
        data, rest = data + rest, b""
    if data:
        try:
            os.write(out, data)
        except OSError:  # the real stderr is gone (a closed pipe): keep draining, so writers never block
            pass
    return rest


def _pump(read_fd: int, out: int, stop: threading.Event) -> None:
    buf = b""
    while True:
        ready, _, _ = select.select([read_fd], [], [], HOLD_S)
        if not ready:  # quiet for HOLD_S: a held partial line goes out as it is
            buf = _forward(buf, out, final=True)
            if stop.is_set():  # restored, and the pipe is drained
                break
            continue
        chunk = os.read(read_fd, 65536)
        if not chunk:
            break
        buf = _forward(buf + chunk, out, final=False)
    _forward(buf, out, final=True)


def install_for_command() -> None:
    """What a command-line entry point calls: filter unless --verbose, deciding first, while
    fd 2 is still the terminal, whether progress is drawn as bars (`leukray.progress`)."""
    from leukray import progress

    if progress.verbose():
        return
    os.environ.setdefault(progress.BARS_ENV, "1" if progress.on_terminal() else "0")
    install()


def install() -> None:
    """Filter fd 2 of this process from now on (once; a no-op when already installed)."""
    if _state:
        return
    sys.stderr.flush()
    real = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    stop = threading.Event()
    thread = threading.Thread(target=_pump, args=(read_fd, real, stop), name="leukray-stderr-filter", daemon=True)
    thread.start()
    _state.update(real=real, thread=thread, stop=stop)
    atexit.register(restore)


def restore() -> None:
    """Put the real stderr back on fd 2 and forward what is still in the pipe."""
    if not _state:
        return
    sys.stderr.flush()
    os.dup2(_state["real"], 2)
    _state["stop"].set()  # the thread ends once the pipe has been quiet for HOLD_S
    _state["thread"].join(timeout=10 * HOLD_S)
    _state.clear()
