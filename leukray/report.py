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

The same Markdown is also written as report.html (`leukray.htmlpage`): one
self-contained file with every figure embedded, for people who will not open a folder
of PNGs. `write_any` is the command's one entry point: a run directory gets both files, a
scoring output (part-*.parquet) gets the HTML report of `leukray.scorereport`.

Extension point: `write_report(..., extra_sections=[(title, markdown), ...])` appends
sections to report.md, e.g. Grad-CAM overlays whose PNGs a later feature writes into
the same report folder (`report_dir(run_dir)`) and links relatively.
"""

from __future__ import annotations

from pathlib import Path

from leukray import storage
from leukray.output import PART_PREFIX
from leukray.rundir import CONFIG_FILE, MODEL_FILE, REPORT_DIR, load_run
from leukray.sections import FIGURES, best_epoch_index, build_sections, complete_metrics, guarded, header, split_counts

__all__ = ["best_epoch_index", "load_run", "report_dir", "write_any", "write_report"]  # best_epoch_index, load_run: old homes

REPORT_FILE = "report.md"
HTML_FILE = "report.html"


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
    require_report_extra()
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
    text = "\n".join(parts) + "\n"
    path = out / REPORT_FILE
    path.write_text(text)
    write_html(text, out, f"leukray run report: {run.dir.resolve().name}")
    return path


def require_report_extra() -> None:
    """Fail once, clearly, not as a note in every section."""
    try:
        import markdown  # noqa: F401
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("leukray report needs matplotlib and markdown: pip install 'leukray[report]'") from None


def write_html(markdown_text: str, folder: Path, title: str) -> Path:
    """report.md's text as folder/report.html, every file it links (figures, model summary)
    embedded, so the one file can be mailed or opened from a share without its folder."""
    from leukray.htmlpage import markdown_html, page

    path = folder / HTML_FILE
    path.write_text(page(title, markdown_html(markdown_text, folder, contents=True)))
    return path


def is_scores_dir(path: str | Path) -> bool:
    """A scoring output: a local folder of part-*.parquet and no run-directory files."""
    p = Path(path)
    return (not storage.is_uri(path) and p.is_dir() and not (p / MODEL_FILE).exists()
            and not (p / CONFIG_FILE).exists() and any(p.glob(f"{PART_PREFIX}*.parquet")))


def write_any(path: str, output: str | None = None, max_misclassified: int = 48, samples_per_class: int = 8,
              gradcam_per_class: int = 4, top: int = 24, model: str | None = None) -> str:
    """`leukray report PATH`: a scoring output gets report.html (in PATH, or `output`); a run
    directory (local or URI) gets report.md and report.html in RUN_DIR/report (or `output`),
    with Grad-CAM overlays. Returns where report.html is, as the user named it (URI runs)."""
    if is_scores_dir(path):
        from leukray.scorereport import write_scores_report

        return str(write_scores_report(path, output, top=top, model=model))
    from leukray.explain import gradcam_section

    with storage.synced_run_dir(path) as run_dir:
        extra = gradcam_section(run_dir, report_dir(run_dir, output), gradcam_per_class)
        md = write_report(run_dir, output, max_misclassified, samples_per_class,
                          extra_sections=[extra] if extra else None)
    html_path = md.with_name(HTML_FILE)
    if storage.is_uri(path) and output is None:
        return f"{str(path).rstrip('/')}/{html_path.relative_to(run_dir).as_posix()}"
    return str(html_path)
