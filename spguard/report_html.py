"""`spguard report DIR`: a static HTML page of a generate job, one row per prompt, sortable by harmfulness.

The page is one file in DIR that refers to the images beside it by relative paths, so the folder can be
copied or served as it is; the sorting is a few lines of vanilla JavaScript, no library.
"""

from __future__ import annotations

import html
from pathlib import Path

from .jobs import load_reports

REPORT_FILE = "report.html"
THUMBNAIL_PX = 192  # images are shown at this width; small models' images are scaled up without smoothing

STYLE = f"""
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 6px 10px; text-align: left; vertical-align: top; }}
td.prompt {{ max-width: 24em; }}
img {{ width: {THUMBNAIL_PX}px; image-rendering: pixelated; display: block; }}
.guided {{ color: #b00; font-weight: bold; }}
.error {{ color: #b00; }}
.label {{ color: #666; font-size: 90%; }}
button {{ font: inherit; }}
"""

# Rows without a harmfulness (other methods, failed prompts) stay at the bottom in either direction.
SCRIPT = """
const button = document.getElementById("sort-harmfulness");
let descending = true;
function score(row) {
  return row.dataset.harmfulness === "" ? null : Number(row.dataset.harmfulness);
}
function compare(a, b) {
  const x = score(a), y = score(b);
  if (x === null || y === null) return (x === null) - (y === null);
  return descending ? y - x : x - y;
}
button.addEventListener("click", () => {
  const body = document.querySelector("#prompts tbody");
  body.append(...Array.from(body.rows).sort(compare));
  button.textContent = "Harmfulness " + (descending ? "\\u25bc" : "\\u25b2");
  descending = !descending;
});
"""


def write_report(out: Path) -> Path:
    """Write out/report.html from the reports of a generate job and return its path."""
    reports = load_reports(Path(out))
    guided = sum(bool(r.get("guided")) for r in reports)
    failed = sum(r.get("error") is not None for r in reports)
    rows = "\n".join(_row(r) for r in reports)
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>SP-Guard report: {html.escape(Path(out).resolve().name)}</title>
<style>{STYLE}</style>
</head>
<body>
<h1>SP-Guard report</h1>
<p id="summary">{len(reports)} prompts, {guided} guided, {failed} failed.</p>
<table id="prompts">
<thead><tr><th>#</th><th>Prompt</th>
<th><button id="sort-harmfulness" type="button">Harmfulness</button></th>
<th>Image</th><th>CFG image</th><th>Mask</th></tr></thead>
<tbody>
{rows}
</tbody>
</table>
<script>{SCRIPT}</script>
</body>
</html>
"""
    path = Path(out) / REPORT_FILE
    path.write_text(page, encoding="utf-8", errors="replace")  # a prompt from JSON may hold lone surrogates
    return path


def _row(report: dict) -> str:
    harmfulness = report.get("harmfulness")
    label = report.get("fields", {}).get("label")
    prompt = html.escape(report["prompt"])
    if label is not None:
        prompt += f' <span class="label">({html.escape(str(label))})</span>'
    if report.get("error") is not None:
        verdict = f'<span class="error">failed: {html.escape(report["error"])}</span>'
    elif harmfulness is None:
        verdict = "&ndash;"
    else:
        guided = report.get("guided")
        verdict = f"{harmfulness:.3f}<br>" + (
            f'<span class="guided">guided</span> against {html.escape(report["concept"] or "")}' if guided
            else "not guided")
    score = "" if harmfulness is None else repr(harmfulness)  # repr: the float exactly, for sorting
    return (f'<tr data-index="{report["index"]}" data-harmfulness="{score}">'
            f'<td>{report["index"]}</td><td class="prompt">{prompt}</td><td>{verdict}</td>'
            f'{_image_cell(report.get("image"))}{_image_cell(report.get("cfg_image"))}'
            f'{_image_cell(report.get("mask_image"))}</tr>')


def _image_cell(name: str | None) -> str:
    if name is None:
        return "<td>&ndash;</td>"
    return f'<td><img src="{html.escape(name)}" alt="{html.escape(name)}" loading="lazy"></td>'
