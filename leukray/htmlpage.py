"""Self-contained HTML pages: one file a lab opens from a share or a mail attachment.

Everything a page shows travels inside it: figures and thumbnails as base64 data URIs,
files the Markdown links (model_summary.txt) as data-URI downloads, the style sheet
inline, system fonts only. The page loads nothing over the network and needs no server,
so it opens the same from file://, behind a firewall, or years later.

Markdown is converted by the `markdown` package (tables, fenced code) rather than by hand:
the run report's sections stay Markdown, written once, and report.md and report.html can
never drift apart.
"""

from __future__ import annotations

import base64
import html
import io
import mimetypes
import re
from pathlib import Path

MAX_EMBED_BYTES = 20_000_000  # a linked file larger than this stays a relative link

STYLE = """
:root { --fg:#1f2328; --muted:#59636e; --line:#d1d9e0; --bg:#ffffff; --alt:#f6f8fa; --accent:#0969da;
        --warn:#9a6700; --warnbg:#fff8c5; --bad:#b42318; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
       font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 32px 64px; }
h1 { font-size: 1.7em; margin: 0.2em 0 0.6em; padding-bottom: 0.3em; border-bottom: 1px solid var(--line); }
h2 { font-size: 1.3em; margin: 1.8em 0 0.6em; padding-bottom: 0.25em; border-bottom: 1px solid var(--line); }
h3 { font-size: 1.05em; margin: 1.4em 0 0.5em; }
p, ul { margin: 0.5em 0 0.9em; }
li { margin: 0.15em 0; }
code { font: 0.88em/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: var(--alt);
       padding: 0.1em 0.35em; border-radius: 4px; overflow-wrap: anywhere; }
pre { background: var(--alt); border: 1px solid var(--line); border-radius: 6px; padding: 12px 14px;
      overflow-x: auto; font-size: 13px; }
pre code { background: none; padding: 0; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid var(--line); padding: 5px 11px; text-align: left; vertical-align: top; }
th { background: var(--alt); font-weight: 600; }
tbody tr:nth-child(even) td { background: #fbfcfd; }
td.num, th.num { text-align: right; }
img { max-width: 100%; height: auto; }
blockquote { margin: 0.8em 0; padding: 8px 14px; background: var(--warnbg); border-left: 4px solid var(--warn);
             border-radius: 4px; }
blockquote p { margin: 0.2em 0; }
a { color: var(--accent); }
.muted { color: var(--muted); }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 0.8em 0 1.2em; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px 16px; min-width: 130px; background: var(--alt); }
.card .value { font-size: 1.6em; font-weight: 650; font-variant-numeric: tabular-nums; }
.card .label { color: var(--muted); font-size: 0.85em; }
.card.bad .value { color: var(--bad); }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(230px, 1fr)); gap: 14px; }
.tile { border: 1px solid var(--line); border-radius: 8px; padding: 8px; background: var(--bg); }
.tile .pics { display: flex; gap: 6px; align-items: flex-start; }
.tile .pics figure { margin: 0; flex: 0 0 calc(50% - 3px); text-align: center; }
.tile .pics img { width: 100%; border-radius: 4px; }
.tile figcaption { font-size: 0.75em; color: var(--muted); }
.tile .name { font-size: 0.8em; overflow-wrap: anywhere; margin-top: 4px; }
.tile .prob { font-weight: 650; }
.noimg { display: flex; align-items: center; justify-content: center; height: 110px; background: var(--alt);
         color: var(--muted); font-size: 0.8em; border-radius: 4px; text-align: center; padding: 4px; }
.bar { display: inline-block; height: 0.8em; background: var(--accent); opacity: 0.55; vertical-align: middle;
       border-radius: 2px; }
nav.toc { font-size: 0.92em; margin: 0 0 1em; }
nav.toc ul { list-style: none; padding: 0; margin: 0; display: flex; flex-wrap: wrap; gap: 4px 18px; }
nav.toc ul ul { display: none; }
footer { margin-top: 3em; color: var(--muted); font-size: 0.85em; }
@media print { main { max-width: none; padding: 0; } .tile { break-inside: avoid; } }
"""


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def jpeg_uri(image, max_px: int, quality: int = 80) -> str:
    """A PIL image scaled down to fit `max_px` as a JPEG data URI: a thumbnail costs a few
    KB, so a page with dozens stays small."""
    im = image.convert("RGB")
    im.thumbnail((max_px, max_px))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality, optimize=True)
    return data_uri(buf.getvalue(), "image/jpeg")


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _embed_file(folder: Path, name: str) -> str | None:
    """A data URI of folder/name when it is a small local file; None otherwise (URLs,
    anchors, missing files keep their link)."""
    if "://" in name or name.startswith(("#", "data:", "/")):
        return None
    path = folder / name
    if not path.is_file() or path.stat().st_size > MAX_EMBED_BYTES:
        return None
    mime = mimetypes.guess_type(name)[0] or "application/octet-stream"
    data = path.read_bytes()
    if mime == "image/png":
        data, mime = smaller_as_jpeg(data)
    return data_uri(data, mime)


def smaller_as_jpeg(png: bytes) -> tuple[bytes, str]:
    """Photographs (sample grids, galleries, Grad-CAM tiles) as JPEG when that halves them;
    charts stay PNG, which keeps their lines crisp and is smaller for flat colour anyway."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, "JPEG", quality=85, optimize=True)
    return (buf.getvalue(), "image/jpeg") if buf.tell() < len(png) // 2 else (png, "image/png")


def embed_local(body: str, folder: Path) -> str:
    """Inline every relative <img src> and <a href> of `body` that names a file in `folder`.
    Links become downloads: browsers refuse to open a data: URL as a page."""
    def img(m: re.Match) -> str:
        uri = _embed_file(folder, html.unescape(m.group(2)))
        return f'{m.group(1)}"{uri}"' if uri else m.group(0)

    def link(m: re.Match) -> str:
        name = html.unescape(m.group(2))
        uri = _embed_file(folder, name)
        return f'{m.group(1)}"{uri}" download="{esc(Path(name).name)}"' if uri else m.group(0)

    body = re.sub(r'(<img\b[^>]*?\bsrc=)"([^"]+)"', img, body)
    return re.sub(r'(<a\b[^>]*?\bhref=)"([^"]+)"', link, body)


_NUMBER_CELL = re.compile(r"<td>((?:<strong>)?[-+]?[\d.,]+%?(?:</strong>)?|n/a)</td>")


def markdown_html(text: str, folder: Path | None = None, contents: bool = False) -> str:
    """Markdown (tables, fenced code) as HTML; files it links in `folder` are embedded.
    `contents`: a linked list of the sections after the first heading (long reports)."""
    import markdown

    md = markdown.Markdown(extensions=["tables", "fenced_code", "sane_lists", "toc"],
                           extension_configs={"toc": {"toc_depth": "2-2"}}, output_format="html")
    body = _NUMBER_CELL.sub(r"<td class=num>\1</td>", md.convert(text))  # numbers align right
    if contents and "</h1>" in body:
        body = body.replace("</h1>", '</h1>\n<nav class="toc">' + md.toc.replace('<div class="toc">', "")
                            .replace("</div>", "") + "</nav>", 1)
    return embed_local(body, folder) if folder is not None else body


def page(title: str, body: str, footer: str = "") -> str:
    """A whole HTML document around `body`: inline style, no script, no external resource."""
    foot = f"<footer>{footer}</footer>" if footer else ""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{esc(title)}</title>\n<style>{STYLE}</style>\n</head>\n"
            f"<body>\n<main>\n{body}\n{foot}\n</main>\n</body>\n</html>\n")


def table(header: list[str] | None, rows: list[list[object]], numeric: set[int] | None = None) -> str:
    """An HTML table of already-formatted cells (escaped here); `numeric` columns align right;
    no header row when `header` is None (a list of facts)."""
    numeric = numeric or set()

    def cells(tag: str, values: list[object]) -> str:
        return "".join(f'<{tag}{" class=num" if i in numeric else ""}>{esc(v)}</{tag}>' for i, v in enumerate(values))

    body = "".join(f"<tr>{cells('td', r)}</tr>" for r in rows)
    head = f"<thead><tr>{cells('th', header)}</tr></thead>" if header else ""
    return f"<table>{head}<tbody>{body}</tbody></table>"


def cards(items: list[tuple[str, object, bool]]) -> str:
    """Big numbers in boxes: (label, value, highlight as bad)."""
    boxes = "".join(f'<div class="card{" bad" if bad else ""}"><div class="value">{esc(v)}</div>'
                    f'<div class="label">{esc(label)}</div></div>' for label, v, bad in items)
    return f'<div class="cards">{boxes}</div>'
