"""leukray.stderrfilter: Ray's one known-harmless C++ line is dropped from fd 2, and nothing
else: other core_worker lines, partial lines (progress bars), output written before exit."""

import subprocess
import sys
import textwrap

DROPPED = (b"[2026-11-28 22:55:40,711 E 5322 5322] core_worker.cc:2465: Actor with class name: 'MapWorker("
           b"MapBatches(OnnxPredictor))' and ID: '8b1c' has constructor arguments in the object store and "
           b"max_restarts > 0. If the arguments ...\n")
OTHER_CORE = b"[2026-11-28 22:47:35,697 E 31225 31248] core_worker.cc:609: Attempting to recover 13 lost objects\n"

SCRIPT = textwrap.dedent("""
    import os, sys, time
    from leukray import stderrfilter
    stderrfilter.install()
    os.write(2, b"before\\n")
    for piece in sys.stdin.buffer.read().split(b"|WRITE|"):  # one os.write each, as C++ and Python do
        os.write(2, piece)
        time.sleep(0.05)
    os.write(2, b"bar 10%\\r")
    print("python stderr", file=sys.stderr)
    os.write(2, b"[no newline at the end]")
""")


def _run(stdin: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT], input=stdin, capture_output=True, timeout=60)


def test_only_the_known_line_is_dropped_and_the_rest_keeps_its_order():
    proc = _run(DROPPED + b"|WRITE|" + OTHER_CORE)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == (b"before\n" + OTHER_CORE + b"bar 10%\rpython stderr\n[no newline at the end]")


def test_a_line_split_across_writes_is_still_matched():
    half = len(DROPPED) // 2
    script_input = DROPPED[:half] + b"|WRITE|" + DROPPED[half:] + b"|WRITE|" + OTHER_CORE
    proc = _run(script_input)
    assert b"constructor arguments" not in proc.stderr and OTHER_CORE in proc.stderr
