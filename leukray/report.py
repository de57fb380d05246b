"""A human-readable report of one training run: `leukray report RUN_DIR`.

Reads only what a run directory already holds (`leukray.rundir.load_run`) and writes
RUN_DIR/report/ with report.md and the PNGs it links. Nothing is re-scored and Ray is
not started, so a report takes seconds on a laptop.

Every input is optional: a missing or unreadable file turns its section into a note in
the report instead of failing the whole report (a run killed before evaluation still
gets its sample grid and model summary).

The work is split three ways: `leukray.figures` draws PNGs from plain data,
`leukray.sections` turns a loaded run into (title, Markdown) sections that link those
PNGs, and this module lays the sections out as report.md. Another writer (HTML) can
reuse the first two as they are.

Extension point: `write_report(..., extra_sections=[(title, markdown), ...])` appends
sections to report.md, e.g. Grad-CAM overlays whose PNGs a later feature writes into
the same report folder (`report_dir(run_dir)`) and links relatively.
"""

from __future__ import annotations

from pathlib import Path

from leukray.rundir import REPORT_DIR, load_run
from leukray.sections import FIGURES, best_epoch_index, build_sections, complete_metrics, guarded, header, split_counts

__all__ = ["best_epoch_index", "load_run", "report_dir", "write_report"]  # best_epoch_index, load_run: old homes

REPORT_FILE = "report.md"


def report_dir(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Where a report goes: `output`, else RUN_DIR/report (also for add-on sections)."""
    return Path(output) if output is not None else Path(run_dir) / REPORT_DIR


def write_report(
    run_dir: str | Path,
    output: str | Path | None = None,
    max_misclassified: int = 48,
    samples_per_class: int = 8,
    extra_sections: list[tuple[str, str]] | None = None,
) -> Path:
    """Write report.md and its PNGs into RUN_DIR/report (or `output`); returns report.md.

    `extra_sections` are (title, markdown) pairs appended at the end; markdown may link
    files that the caller wrote into the same folder (see `report_dir`). Figures from a
    previous report that cannot be drawn this time are deleted, so no stale PNG is left.
    """
    try:
        import matplotlib  # noqa: F401 - fail once, clearly, not as a note in every section
    except ImportError:
        raise ImportError("leukray report needs matplotlib: pip install 'leukray[report]'") from None
    run = load_run(run_dir)
    complete_metrics(run)
    out = report_dir(run_dir, output)
    out.mkdir(parents=True, exist_ok=True)
    for stale in FIGURES:
        (out / stale).unlink(missing_ok=True)
    sections = build_sections(run, out, max_misclassified, samples_per_class) + list(extra_sections or [])
    head = guarded("Header", lambda: header(run))  # after the sections: it may add notes (model_id mismatch)
    parts = [f"# leukray run report: {run.dir.resolve().name}", "", head, "", "### Images per split", "",
             split_counts(run)]
    if run.notes:
        parts += ["", "### Missing or inconsistent inputs", ""] + [f"- {n}" for n in run.notes]
    for title, body in sections:
        parts += ["", f"## {title}", "", body.rstrip()]
    path = out / REPORT_FILE
    path.write_text("\n".join(parts) + "\n")
    return path
