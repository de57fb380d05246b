"""report.html of a training run and of a scoring output: self-contained, complete, small.

No Ray and no scoring run: the run directory comes from test_report.make_run and the
scoring output is written directly with pyarrow in the documented schema.
"""

import base64
import io
import re
import time
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from leukray.report import HTML_FILE, write_any, write_report
from leukray.scorereport import ERROR_EXAMPLES, MAX_FOLDERS, TOP_N, write_scores_report
from leukray.synthetic import CLASSES, make_dataset
from test_report import make_run

MODEL_ID = "0123456789abcdef"


def scores_table(paths, members, errors, probs, explanations=None, extra=None) -> pa.Table:
    """Rows in the schema of `leukray.output.result_table` (README: Parquet output of score)."""
    probs = np.asarray(probs, np.float32)
    failed = np.array([e is not None for e in errors])
    n = len(paths)
    cols = {"path": pa.array(paths, pa.string()), "member": pa.array(members, pa.string()),
            "error": pa.array(errors, pa.string()),
            "predicted_label": pa.array([None if f else CLASSES[i] for f, i in zip(failed, probs.argmax(1))],
                                        pa.string()),
            "confidence": pa.array(probs.max(1), pa.float32(), mask=failed)}
    for i, c in enumerate(CLASSES):
        cols[f"prob_{c}"] = pa.array(probs[:, i], pa.float32(), mask=failed)
    cols["malignant_probability"] = pa.array(1 - probs[:, 0], pa.float32(), mask=failed)
    if explanations is not None:
        cols["explanation"] = pa.array(explanations, pa.string())
    cols.update(extra or {})
    cols["model_id"] = pa.array([MODEL_ID] * n, pa.string())
    cols["leukray_version"] = pa.array(["0.1.0"] * n, pa.string())
    cols["scored_at"] = pa.array(["2026-11-28T10:00:00Z"] * n, pa.string())
    return pa.table(cols)


def make_scores(root):
    """A scoring output of 24 real files, 3 members of a zip, 2 error rows; Grad-CAM PNGs for
    the malignant ones. The most suspicious files: Pro/WBC-Pro-006.jpg (malignant_probability
    0.99), then Pre/WBC-Pre-002.jpg (0.98)."""
    data = make_dataset(root / "data", per_class=6, size=96, seed=5)
    files = sorted(str(p) for p in data.rglob("*.jpg"))
    with zipfile.ZipFile(root / "data" / "extra.zip", "w") as z:
        for i, f in enumerate(files[:3]):
            z.write(f, f"box/{i}.jpg")
    paths = files + [str(root / "data" / "extra.zip")] * 3 + [str(data / "Pro" / "broken.jpg"), str(data / "x.jpg")]
    members = [None] * len(files) + ["box/0.jpg", "box/1.jpg", "box/2.jpg", None, None]
    errors = [None] * (len(files) + 3) + ["corrupt or truncated: image file is truncated", "empty file"]
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), len(paths)) * 0.4 + 0.05  # P(Benign) >= 0.05: others <= 0.95
    folder = [p.split("/")[-2] for p in paths]
    probs[np.arange(len(paths)), [CLASSES.index(f) if f in CLASSES else 0 for f in folder]] += 0.4
    top = files.index(str(data / "Pro" / "WBC-Pro-006.jpg"))
    probs[top] = [0.01, 0.0, 0.0, 0.99]
    probs[files.index(str(data / "Pre" / "WBC-Pre-002.jpg"))] = [0.02, 0.0, 0.98, 0.0]  # second
    cams = root / "scores_explanations"
    cams.mkdir()
    explanations = []
    for i, p in enumerate(probs):
        if 1 - p[0] >= 0.5 and errors[i] is None:
            explanations.append(str(cams / f"{i}.png"))
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(explanations[-1])
        else:
            explanations.append(None)
    out = root / "scores"
    out.mkdir()
    pq.write_table(scores_table(paths, members, errors, probs, explanations), out / "part-a.parquet")
    return out, files[top], probs


def img_sources(html: str) -> list[str]:
    return re.findall(r'<img\b[^>]*\bsrc="([^"]+)"', html)


def assert_self_contained(html: str) -> None:
    """Nothing that a browser would fetch: every src/href is a data URI or an in-page anchor."""
    for attr, value in re.findall(r'\b(src|href)="([^"]*)"', html):
        assert value.startswith(("data:", "#")), f"{attr}={value[:80]}"
    assert "url(" not in html and "@import" not in html and "<script" not in html.lower()


def decode(uri: str) -> Image.Image:
    head, b64 = uri.split(",", 1)
    assert head.startswith("data:image/") and head.endswith(";base64"), head
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


def test_run_report_html_is_self_contained(tmp_path):
    run, metrics = make_run(tmp_path)
    md = write_report(run)
    html = (md.parent / HTML_FILE).read_text()
    assert_self_contained(html)
    sources = img_sources(html)
    assert len(sources) == 5  # samples, curves, confusion, roc, misclassified
    formats = [decode(s).format for s in sources]  # photo grids as JPEG when that halves them, charts PNG
    assert set(formats) <= {"PNG", "JPEG"} and formats.count("PNG") >= 3, formats
    assert f"{metrics['accuracy']:.4f}" in html and f"{metrics['macro_f1']:.4f}" in html
    summary = re.search(r'href="data:text/plain;base64,([^"]+)" download="model_summary.txt"', html)
    assert summary and "FLOPs" in base64.b64decode(summary.group(1)).decode()
    assert '<nav class="toc">' in html and 'href="#test-metrics"' in html


def test_write_any_tells_a_run_from_scores(tmp_path):
    run, _ = make_run(tmp_path)
    scores, _, _ = make_scores(tmp_path)
    assert write_any(str(run), gradcam_per_class=0) == str(run / "report" / HTML_FILE)
    assert (run / "report" / "report.md").is_file()
    assert write_any(str(scores)) == str(scores / HTML_FILE)
    assert not (scores / "report.md").exists()
    assert "leukray scoring report" in (scores / HTML_FILE).read_text()


def test_scores_report_content(tmp_path):
    scores, top_file, probs = make_scores(tmp_path)
    (tmp_path / "data" / "Pre" / "WBC-Pre-002.jpg").unlink()  # moved since scoring: its tile says so
    html = write_scores_report(scores).read_text()
    assert_self_contained(html)
    text = re.sub(r"<[^>]+>", " ", html)
    assert re.search(r"\b29\s+images\b", text) and re.search(r"\b27\s+scored\b", text)
    assert re.search(r"\b2\s+errors\b", text)
    assert "not assessable" not in text and "needs review" not in text  # columns absent
    # the gallery: the most suspicious first, every tile's image and Grad-CAM decoded
    gallery = html.split("Most suspicious images", 1)[1].split("<h2>", 1)[0]
    tiles = gallery.split('class="tile"')[1:]
    assert top_file.endswith("/Pro/WBC-Pro-006.jpg")
    assert "Pro/WBC-Pro-006.jpg" in tiles[0] and "0.990" in tiles[0] and "Pre/WBC-Pre-002.jpg" in tiles[1]
    assert f"files under <code>{tmp_path / 'data'}</code>" in gallery  # tiles name paths below it
    assert "not readable here" in tiles[1] and "not readable here" not in "".join(tiles[2:])
    thumbs = img_sources(gallery)
    cams = int(((1 - probs[:27, 0]) >= 0.5).sum())
    assert len(thumbs) == min(TOP_N, 27) - 1 + min(cams, TOP_N)  # the deleted file: a box, no <img>
    assert all(decode(s).format == "JPEG" and max(decode(s).size) <= 180 for s in thumbs)
    assert "extra.zip!/box/" in html
    # errors per reason, class counts per folder, model provenance
    assert "corrupt or truncated" in text and "empty file" in text
    for c in CLASSES:
        assert re.search(rf"<td>{c}</td><td class=num>\d+</td>", html), c
    assert "extra.zip!/box" in text and MODEL_ID in text and "Grad-CAM" in gallery


def test_scores_report_of_100k_rows_stays_small(tmp_path):
    """100,000 rows over 500 folders with 3 error reasons and the optional assessable /
    needs_review columns: aggregated, the page stays under 2 MB and takes seconds."""
    n = 100_000
    rng = np.random.default_rng(1)
    folders = rng.integers(0, 500, n)
    paths = [f"/lab/slides/batch{f // 50:02d}/slide{f:03d}/img{i:06d}.jpg" for i, f in enumerate(folders)]
    reasons = ["empty file", "not an image", "corrupt or truncated: broken data stream"]
    errors = [reasons[i % 3] if i % 97 == 0 else None for i in range(n)]
    probs = rng.dirichlet(np.ones(4), n)
    assessable = pa.array([None if e else bool(i % 10) for i, e in enumerate(errors)], pa.bool_())
    review = pa.array([None if e else bool(i % 7 == 0) for i, e in enumerate(errors)], pa.bool_())
    table = scores_table(paths, [None] * n, errors, probs, extra={"assessable": assessable, "needs_review": review})
    scores = tmp_path / "scores"
    scores.mkdir()
    pq.write_table(table.slice(0, n // 2), scores / "part-1.parquet")
    pq.write_table(table.slice(n // 2), scores / "part-2.parquet")
    start = time.perf_counter()
    path = write_scores_report(scores)
    seconds = time.perf_counter() - start
    html = path.read_text()
    size = path.stat().st_size
    print(f"100k rows: report.html {size / 1e6:.2f} MB in {seconds:.1f} s")
    assert size < 2_000_000
    text = re.sub(r"<[^>]+>", " ", html)
    n_err = sum(e is not None for e in errors)
    assert re.search(rf"\b{n:,}\s+images\b", text) and re.search(rf"\b{n - n_err:,}\s+scored\b", text)
    assert re.search(rf"\b{n_err:,}\s+errors\b", text)
    not_assessable = sum(1 for i, e in enumerate(errors) if e is None and i % 10 == 0)
    needs = sum(1 for i, e in enumerate(errors) if e is None and i % 7 == 0)
    assert re.search(rf"\b{not_assessable:,}\s+not assessable\b", text)
    assert re.search(rf"\b{needs:,}\s+needs review\b", text)
    assert f"The {MAX_FOLDERS} largest of 500 folders are shown" in text
    examples = html.split("Examples (first", 1)[1].split("<h2>", 1)[0]
    assert examples.count("<tr>") == 1 + 3 * ERROR_EXAMPLES  # header + K per reason
    assert html.count('class="tile"') == TOP_N


def test_scores_report_model_card(tmp_path):
    """The card comes from the model file when given, else from a model_card.md beside the scores."""
    from leukray.model import DEFAULT_MEAN, DEFAULT_STD, create_model, save_model

    scores, _, _ = make_scores(tmp_path)
    text = write_scores_report(scores).read_text()
    assert "No model card" in text
    (tmp_path / "model_card.md").write_text("# Card\n\nTrained on **lab A** smears, 2026.\n")
    text = write_scores_report(scores).read_text()
    assert "<strong>lab A</strong>" in text and "No model card" not in text
    meta = save_model(tmp_path / "m" / "model.pt", create_model("leuknet", 4),
                      {"arch": "leuknet", "classes": list(CLASSES), "image_size": 64,
                       "mean": list(DEFAULT_MEAN), "std": list(DEFAULT_STD)})
    text = write_scores_report(scores, model=str(tmp_path / "m")).read_text()
    assert f"<td>{meta['model_id']}</td>" in text and "<td>leuknet</td>" in text
