"""The report of a scoring output: `leukray report SCORES_DIR` writes one report.html.

What a lab asks of a scored archive, without writing pandas: how many images were scored
and how many failed (and why), which classes were predicted overall and per folder, how
`malignant_probability` is distributed, which images are most suspicious (thumbnails, with
their Grad-CAM overlay when `score --explain` made one), and which model scored them.

Built for 100,000 rows and more: only the small columns are read (never `probs` or image
bytes), everything shown is an aggregate or a bounded list (top N images, first K errors
per reason, the largest folders), and only the shown images are opened. The page is one
self-contained file (`leukray.htmlpage`): it opens from file:// without a server.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from leukray.htmlpage import cards, data_uri, esc, jpeg_uri, page, table
from leukray.output import PART_PREFIX

HTML_FILE = "report.html"
CARD_FILES = ("model_card.md", "MODEL_CARD.md")  # a card kept beside the scores (or one folder up)
# The only columns read: small ones. `probs`-like and byte columns never leave the Parquet files.
COLUMNS = ("path", "member", "error", "predicted_label", "confidence", "malignant_probability", "explanation",
           "assessable", "needs_review", "model_id", "leukray_version", "scored_at")
TOP_N = 24
MAX_FOLDERS = 40
ERROR_EXAMPLES = 5  # per reason
THUMB_PX = 180


def read_scores(folder: str | Path) -> pd.DataFrame:
    """The small columns of every part-*.parquet in `folder` (parts may differ in columns:
    an older part without `explanation` reads as nulls there)."""
    parts = sorted(Path(folder).glob(f"{PART_PREFIX}*.parquet"))
    if not parts:
        raise FileNotFoundError(f"no {PART_PREFIX}*.parquet in {folder}: not a scoring output")
    tables = []
    for p in parts:
        names = pq.read_schema(p).names
        tables.append(pq.read_table(p, columns=[c for c in COLUMNS if c in names]))
    return pa.concat_tables(tables, promote_options="default").to_pandas()


def totals(df: pd.DataFrame) -> list[tuple[str, object, bool]]:
    """(label, value, is bad) for the headline boxes; optional columns only when present."""
    errors = int(df["error"].notna().sum()) if "error" in df else 0
    items = [("images", f"{len(df):,}", False), ("scored", f"{len(df) - errors:,}", False),
             ("errors", f"{errors:,}", errors > 0)]
    if "assessable" in df:
        n = int((df["assessable"] == False).sum())  # noqa: E712 - nulls (error rows) are not counted
        items.append(("not assessable", f"{n:,}", n > 0))
    if "needs_review" in df:
        n = int((df["needs_review"] == True).sum())  # noqa: E712
        items.append(("needs review", f"{n:,}", n > 0))
    return items


def folder_of(df: pd.DataFrame) -> pd.Series:
    """The folder of each row: the file's directory, or for an archive member the archive
    itself plus the member's directory (an archive is browsed like a folder)."""
    folder = df["path"].astype(str).str.rsplit("/", n=1).str[0]
    if "member" in df and df["member"].notna().any():
        member_dir = df["member"].fillna("").astype(str).str.rpartition("/")[0]
        inside = df["member"].notna()
        folder = folder.where(~inside, df["path"].astype(str) + np.where(member_dir != "", "!/" + member_dir, "!"))
    return folder


def common_root(folders: pd.Series) -> str:
    """The folder all scored files share (archives count as files): shown once, above the
    tables, so that rows and tiles name only what differs."""
    plain = pd.Series(folders.unique()).str.split("!", n=1).str[0].tolist()
    if not plain:
        return ""
    return os.path.commonpath(plain) if len(plain) > 1 else plain[0]


def relative(name: str, root: str) -> str:
    """`name` below `root`; '(top folder)' for root itself."""
    if not root or root == "/":
        return name
    return name[len(root):].lstrip("/") or "(top folder)" if name.startswith(root) else name


def class_section(df: pd.DataFrame) -> str:
    """Predicted class counts overall, with a bar each, then per folder (largest first)."""
    scored = df[df["error"].isna()] if "error" in df else df
    counts = scored["predicted_label"].value_counts()
    total = max(1, int(counts.sum()))
    rows = "".join(f'<tr><td>{esc(c)}</td><td class=num>{n:,}</td><td class=num>{100 * n / total:.1f}%</td>'
                   f'<td><span class="bar" style="width:{int(240 * n / total)}px"></span></td></tr>'
                   for c, n in counts.items())
    html = ("<h2>Predicted classes</h2><table><thead><tr><th>class</th><th class=num>images</th>"
            f"<th class=num>share</th><th></th></tr></thead><tbody>{rows}</tbody></table>")
    return html + folder_section(df, list(counts.index))


def folder_section(df: pd.DataFrame, classes: list[str], limit: int = MAX_FOLDERS) -> str:
    folders = folder_of(df)
    common = common_root(folders)
    grid = pd.crosstab(folders, df["predicted_label"].fillna("error")) if len(df) else pd.DataFrame()
    grid = grid.reindex(columns=[c for c in classes + ["error"] if c in grid.columns], fill_value=0)
    grid["total"] = grid.sum(axis=1)
    grid = grid.sort_values(["total"], ascending=False, kind="stable")
    names = [relative(n, common) for n in grid.index]
    header = ["folder"] + [c for c in grid.columns if c != "total"] + ["total"]
    rows = [[n] + [f"{int(v):,}" for v in grid.loc[i, header[1:]]] for n, i in zip(names, grid.index)]
    note = f'<p class="muted">Folders under <code>{esc(common)}</code>'
    note += '; "!" marks the inside of an archive.' if any("!" in n for n in names) else "."
    if len(rows) > limit:
        note += f" The {limit} largest of {len(rows):,} folders are shown."
    return ("<h3>Per folder</h3>" + note + "</p>"
            + table(header, rows[:limit], numeric=set(range(1, len(header)))))


def histogram_section(df: pd.DataFrame) -> str:
    from leukray.figures import plot_probability_histogram

    if "malignant_probability" not in df:
        return ("<h2>Malignant probability</h2><blockquote><p>No <code>malignant_probability</code> column "
                "(the model has no Benign class).</p></blockquote>")
    values = df["malignant_probability"].dropna().to_numpy(np.float64)
    if not len(values):
        return "<h2>Malignant probability</h2><p>No image was scored.</p>"
    buf = io.BytesIO()
    plot_probability_histogram(values, buf)
    q = np.quantile(values, [0.5, 0.9, 0.99])
    stats = table(["images", "median", "90th percentile", "99th percentile", "≥ 0.5", "≥ 0.9"],
                  [[f"{len(values):,}", f"{q[0]:.3f}", f"{q[1]:.3f}", f"{q[2]:.3f}",
                    f"{int((values >= 0.5).sum()):,}", f"{int((values >= 0.9).sum()):,}"]], numeric=set(range(6)))
    return (f'<h2>Malignant probability</h2>{stats}<img alt="histogram of malignant_probability" '
            f'src="{data_uri(buf.getvalue(), "image/png")}">')


def source_image(path: str, member: str | None):
    """The scored image (a file, or an archive member) as a PIL image; None if unreadable.
    Only called for the few images shown, so an archive scan per tar member is affordable."""
    from PIL import Image

    from leukray.data import read_bytes, read_member

    try:
        if member is None or (isinstance(member, float) and np.isnan(member)):
            data = read_bytes(path)
        elif path.lower().endswith(".zip"):
            data = read_member(path, member)
        else:
            import tarfile

            from leukray.data import open_input

            with open_input(path) as f, tarfile.open(fileobj=f, mode="r:*") as t:
                data = t.extractfile(member).read()
        im = Image.open(io.BytesIO(data))
        im.draft("RGB", (THUMB_PX, THUMB_PX))
        return im.convert("RGB")
    except Exception:  # noqa: BLE001 - moved or unreadable: the tile says so
        return None


def _figure(image, caption: str) -> str:
    if image is None:
        return f'<figure><div class="noimg">{esc(caption)}: not readable here</div></figure>'
    return (f'<figure><img alt="{esc(caption)}" src="{jpeg_uri(image, THUMB_PX)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def _overlay(path: object):
    """The heatmap half of a `score --explain` PNG. That file is [title strip] over [model
    input | overlay] (`leukray.explain.save_overlay`); the tile already shows the image, so
    only the right-hand square is kept, at full tile size. Any other shape is shown whole."""
    from PIL import Image

    if not isinstance(path, str):
        return None
    try:
        im = Image.open(path).convert("RGB")
    except Exception:  # noqa: BLE001
        return None
    w, h = im.size
    side = w // 2
    if side and 0 <= h - side <= 0.3 * side:
        return im.crop((w - side, h - side, w, h))
    return im


def suspicious_section(df: pd.DataFrame, top: int = TOP_N) -> str:
    """The `top` images with the highest malignant_probability, each with its Grad-CAM overlay
    when the `explanation` column names one."""
    if "malignant_probability" not in df or top <= 0:
        return ""
    rows = df[df["malignant_probability"].notna()].sort_values(
        ["malignant_probability", "path"], ascending=[False, True], kind="stable").head(top)
    has_cam = "explanation" in df and df["explanation"].notna().any()
    root = common_root(folder_of(rows))
    tiles = []
    for r in rows.itertuples(index=False):
        member = getattr(r, "member", None)
        name = relative(f"{r.path}!/{member}" if isinstance(member, str) else str(r.path), root)
        pics = _figure(source_image(str(r.path), member), "image")
        if has_cam:
            cam = _overlay(getattr(r, "explanation", None))
            pics += (_figure(cam, "Grad-CAM") if cam is not None else
                     '<figure><div class="noimg">no Grad-CAM (below the threshold)</div></figure>')
        tiles.append(f'<div class="tile"><div class="pics">{pics}</div><div class="name">'
                     f'<span class="prob">{r.malignant_probability:.3f}</span> {esc(r.predicted_label)}<br>'
                     f'<span class="muted">{esc(name)}</span></div></div>')
    cam_note = "" if has_cam else " Run <code>leukray score --explain</code> to add Grad-CAM overlays."
    return (f"<h2>Most suspicious images</h2><p>The {len(rows)} highest <code>malignant_probability</code>, "
            f"highest first; files under <code>{esc(root)}</code>.{cam_note}</p><div class=\"gallery\">{''.join(tiles)}</div>")


def error_section(df: pd.DataFrame, examples: int = ERROR_EXAMPLES) -> str:
    """Errors counted per reason (the text before the first ':'), with the first examples."""
    if "error" not in df or not df["error"].notna().any():
        return "<h2>Errors</h2><p>No file failed.</p>"
    err = df.loc[df["error"].notna(), [c for c in ("path", "member", "error") if c in df]].copy()
    err["reason"] = err["error"].astype(str).str.split(":", n=1).str[0].str.strip()
    counts = err["reason"].value_counts()
    summary = table(["reason", "files"], [[r, f"{n:,}"] for r, n in counts.items()], numeric={1})
    rows = []
    for reason in counts.index:
        for r in err[err["reason"] == reason].head(examples).itertuples(index=False):
            member = getattr(r, "member", None)
            rows.append([r.path + (f"!/{member}" if isinstance(member, str) else ""), r.error])
    return (f"<h2>Errors</h2><p>{len(err):,} file(s) could not be scored; their rows hold the reason in "
            f"<code>error</code>.</p>{summary}<h3>Examples (first {examples} per reason)</h3>"
            + table(["file", "error"], rows))


def model_section(df: pd.DataFrame, folder: Path, model: str | None = None) -> str:
    """Model ids, versions and times from the rows; the model's card from `model` (a model
    file or run directory) or a model_card.md kept beside the scores."""
    parts = ["<h2>Model</h2>"]
    if "model_id" in df:
        ids = df["model_id"].fillna("n/a").value_counts()
        parts.append(table(["model_id", "rows"], [[i, f"{n:,}"] for i, n in ids.items()], numeric={1}))
        if len(ids) > 1:
            parts.append("<blockquote><p>These rows were scored by more than one model.</p></blockquote>")
    facts = []
    if "leukray_version" in df:
        facts.append(["leukray version", ", ".join(sorted(df["leukray_version"].dropna().astype(str).unique()))])
    if "scored_at" in df and df["scored_at"].notna().any():
        first, last = df["scored_at"].min(), df["scored_at"].max()
        facts.append(["scored at", first if first == last else f"{first} to {last}"])
    parts.append(table(None, facts) if facts else "")
    parts.append(model_card(folder, model))
    return "".join(parts)


def model_card(folder: Path, model: str | None) -> str:
    if model is not None:
        from leukray.modelfile import read_model_meta

        meta = read_model_meta(model)
        keep = ("model_id", "arch", "classes", "image_size", "split_id", "saved_at", "leukray_version")
        return "<h3>Model card</h3>" + table(None, [[k, meta[k]] for k in keep if k in meta])
    for where in (folder, folder.parent):
        for name in CARD_FILES:
            if (where / name).is_file():
                from leukray.htmlpage import markdown_html

                return "<h3>Model card</h3>" + markdown_html((where / name).read_text())
    return f'<p class="muted">No model card ({CARD_FILES[0]}) beside the scores or one folder up.</p>'


def write_scores_report(folder: str | Path, output: str | Path | None = None, top: int = TOP_N,
                        model: str | None = None) -> Path:
    """Write the report of scoring output `folder` to `output` (a folder or a .html file;
    default: FOLDER/report.html). Returns the file written."""
    folder = Path(folder)
    df = read_scores(folder)
    out = Path(output) if output is not None else folder
    path = out if out.suffix == ".html" else out / HTML_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    body = (f"<h1>leukray scoring report: {esc(folder.resolve().name)}</h1>"
            f'<p class="muted">{esc(folder.resolve())}</p>' + cards(totals(df)) + class_section(df)
            + histogram_section(df) + suspicious_section(df, top) + error_section(df)
            + model_section(df, folder, model))
    path.write_text(page(f"leukray scoring report: {folder.resolve().name}", body))
    return path
