"""The run report: one self-contained HTML page per pipeline run.

Logged on the parent MLflow run as ``report.html`` and written to
``WORK_DIR/reports/<parent run id>.html``. Its sections: the stage timeline, the pretraining
(and fine-tuning, distillation) curves, the sweep's ranked trials and plots, the results
table, the confusion matrices and the lineage (each stage's run, cache key, upstream runs,
input data set, registered versions). The figures are PNG data URIs and the page has no
script and no external resource, so it renders the same in MLflow's artifact viewer, from a
file, or attached to a mail; figures come from the stage runs' own artifacts (a cached
stage's from the run that computed it) or are drawn from their logged metric histories.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from pipelines import plots, tracking

if TYPE_CHECKING:
    from pipelines.config import PipelineConfig
    from pipelines.graph import PipelineResult, StageResult

ARTIFACT = "report.html"
_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}code{font-size:.92em}.muted{color:#777}
figure{display:inline-block;margin:.4em 1em .4em 0;vertical-align:top}figcaption{color:#555;font-size:.9em}
img{max-width:100%;border:1px solid #eee}
"""
_COLOURS = {"computed": "#4c78a8", "cached": "#b8c7d9"}


def _e(x: object) -> str:
    return html.escape(str(x))


def _png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _figure(path: Path, caption: str) -> str:
    return f'<figure><img src="{_png(path)}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>'


def _run_pngs(client: MlflowClient, run_id: str, tmp: Path, prefix: str = "") -> list[Path]:
    """The PNG artifacts at the top of ``run_id``'s artifacts, downloaded (from any artifact store)."""
    names = sorted(
        a.path
        for a in client.list_artifacts(run_id)
        if not a.is_dir and a.path.endswith(".png") and Path(a.path).name.startswith(prefix)
    )
    dst = tmp / run_id
    dst.mkdir(parents=True, exist_ok=True)
    return [
        Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=n, dst_path=str(dst), tracking_uri=client.tracking_uri
            )
        )
        for n in names
    ]


def markdown_table(md: str) -> str:
    """A markdown table (and the paragraphs after it) as HTML; first column left-aligned."""
    rows, tail = [], []
    for line in md.strip().splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-:") for c in cells):
                rows.append(cells)
        elif line.strip():
            tail.append(f"<p>{_e(line.strip())}</p>")
    out = []
    for i, cells in enumerate(rows):
        tag = "th" if i == 0 else "td"
        out.append(
            "<tr>"
            + "".join(f"<{tag}{' class=l' if j == 0 else ''}>{_e(c)}</{tag}>" for j, c in enumerate(cells))
            + "</tr>"
        )
    return "<table>" + "".join(out) + "</table>" + "".join(tail)


def timeline_svg(stages: list[StageResult], computed_in: dict[str, float] | None = None) -> str:
    """One bar per stage at its start and length in this run (a cached stage: the time to find
    it; ``computed_in`` its compute time in the run that made it)."""
    computed_in = computed_in or {}
    total = max((s.started + s.seconds for s in stages), default=0.0) or 1.0
    left, width, row = 90, 700, 22
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 260}" '
        f'height="{row * len(stages) + 30}" font-size="12" font-family="sans-serif">'
    ]
    for i, s in enumerate(stages):
        y = 4 + i * row
        x = left + width * s.started / total
        w = max(1.5, width * s.seconds / total)
        kind = "cached" if s.cached else "computed"
        parts.append(f'<text x="{left - 6}" y="{y + 13}" text-anchor="end">{_e(s.name)}</text>')
        parts.append(
            f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row - 6}" fill="{_COLOURS[kind]}">'
            f"<title>{_e(s.name)}: {kind}, {s.seconds:.1f} s</title></rect>"
        )
        note = ""
        if s.cached:
            note = f" (cached; computed in {computed_in[s.name]:.1f} s)" if s.name in computed_in else " (cached)"
        parts.append(f'<text x="{x + w + 4:.1f}" y="{y + 13}">{s.seconds:.1f} s{note}</text>')
    y = 4 + len(stages) * row + 14
    parts.append(f'<line x1="{left}" y1="{y - 10}" x2="{left + width}" y2="{y - 10}" stroke="#999"/>')
    parts.append(f'<text x="{left}" y="{y + 2}">0 s</text>')
    parts.append(f'<text x="{left + width}" y="{y + 2}" text-anchor="end">{total:.1f} s</text>')
    parts.append("</svg>")
    return "".join(parts)


def _history_curves(client: MlflowClient, run: Run, suffix: str, path: Path, title: str) -> Path | None:
    """Every ``*/<suffix>`` metric of the run over its steps (one line per model), or None."""
    keys = sorted(k for k in run.data.metrics if k.endswith("/" + suffix))
    series = {}
    for k in keys:
        hist = sorted(client.get_metric_history(run.info.run_id, k), key=lambda m: m.step)
        if len(hist) > 1:
            series[k[: -len(suffix) - 1]] = [(m.step, m.value) for m in hist]
    return plots.metric_curves(series, path, title, suffix) if series else None


def _lineage(result: PipelineResult, runs: dict[str, Run]) -> str:
    head = (
        "<tr><th class=l>stage</th><th class=l>run</th><th class=l>cached</th><th class=l>cache key</th>"
        "<th class=l>upstream runs</th><th class=l>input data set</th></tr>"
    )
    rows = []
    for s in result.stages.values():
        run = runs[s.name]
        upstream = json.loads(run.data.tags.get(tracking.TAG_UPSTREAM, "{}"))
        ups = "<br>".join(f'{_e(d)}: <code title="{_e(r)}">{_e(r[:12])}</code>' for d, r in upstream.items()) or "-"
        data = "-"
        if run.inputs and run.inputs.dataset_inputs:
            ds = run.inputs.dataset_inputs[0].dataset
            data = f"{_e(ds.name)} <code>{_e(ds.digest)}</code>"
        rows.append(
            f"<tr><td class=l>{_e(s.name)}</td><td class=l><code>{_e(s.run_id)}</code></td>"
            f"<td class=l>{'yes' if s.cached else 'no'}</td><td class=l><code>{_e(s.key[:12])}</code></td>"
            f"<td class=l>{ups}</td><td class=l>{data}</td></tr>"
        )
    out = "<table>" + head + "".join(rows) + "</table>"
    reg = result.stages.get("register")
    versions = reg.outputs.get("versions", {}) if reg is not None else {}
    if versions:
        out += (
            "<p>Registered:</p><ul>"
            + "".join(
                f"<li><code>{_e(v['uri'])}</code> (from the {_e(role)}, test top-1 {v['test_top1']:.4f}"
                f"{', champion' if v.get('champion') else ''})</li>"
                for role, v in versions.items()
            )
            + "</ul>"
        )
    return out


def build(result: PipelineResult, cfg: PipelineConfig, client: MlflowClient, tmp: Path) -> str:
    """The report of a finished pipeline run, as one HTML string."""
    parent = client.get_run(result.run_id)
    st = result.stages
    tags = parent.data.tags
    started = datetime.datetime.fromtimestamp(parent.info.start_time / 1000, tz=datetime.timezone.utc)
    body = [
        f"<h1>clpipe pipeline {_e(cfg.name)}</h1>",
        f"<p class=muted>MLflow run <code>{_e(result.run_id)}</code> ({_e(parent.info.run_name)}), started "
        f"{started:%Y-%m-%d %H:%M:%S} UTC, {result.seconds:.1f} s; clpipe {_e(tags.get('clpipe.version', '?'))}"
        + (
            f", commit <code>{_e(tags['mlflow.source.git.commit'][:12])}</code>"
            if "mlflow.source.git.commit" in tags
            else ""
        )
        + f"; method {_e(cfg.pretrain.method)}, backbone {_e(cfg.pretrain.backbone)}, seed {cfg.seed}</p>",
    ]

    body.append("<h2 id=timeline>Stage timeline</h2>")
    runs = {s.name: client.get_run(s.run_id) for s in st.values()}  # each stage's run, read once
    computed_in = {
        n: runs[n].data.metrics["stage/seconds"]
        for n, s in st.items()
        if s.cached and "stage/seconds" in runs[n].data.metrics
    }
    body.append(timeline_svg(list(st.values()), computed_in))
    computed = sum(s.seconds for s in st.values() if not s.cached)
    body.append(
        f"<p class=muted>{sum(not s.cached for s in st.values())} stage(s) computed in {computed:.1f} s, "
        f"{sum(s.cached for s in st.values())} taken from the cache.</p>"
    )

    figures = []
    if "pretrain" in st:
        figures += [
            _figure(p, "pretrain: train/loss and val kNN top-1 per epoch")
            for p in _run_pngs(client, st["pretrain"].run_id, tmp, "curves")
        ]
    for name, what in (("finetune", "fine-tuning"), ("distill", "distillation")):
        if name in st:
            p = _history_curves(
                client, runs[name], "val/top1", tmp / f"{name}_curves.png", f"{what}: val top-1 per epoch"
            )
            if p is not None:
                figures.append(_figure(p, f"{name}: val top-1 per epoch, each model"))
    if figures:
        body.append("<h2 id=curves>Training curves</h2>")
        body += figures

    if "sweep" in st:
        sw = st["sweep"].outputs
        body.append("<h2 id=sweep>Sweep</h2>")
        ranked = sw.get("ranked", [])
        names = [
            k
            for k in (ranked[0] if ranked else {})
            if k not in ("rank", "trial", "best", "last", "epochs_run", "stopped_early")
        ]
        cols = ["rank", "trial", *names, "last", "epochs_run", "stopped_early"]
        body.append(
            f"<p>{sw.get('trials', len(ranked))} trials ranked by {_e(sw.get('metric', ''))}; "
            f"best {_e(', '.join(f'{k}={v}' for k, v in sw.get('best', {}).items()))}.</p>"
        )
        body.append(
            "<table><tr>"
            + "".join(f"<th>{_e(c)}</th>" for c in cols)
            + "</tr>"
            + "".join(
                "<tr>"
                + "".join(f"<td>{_e(round(r[c], 4) if isinstance(r.get(c), float) else r.get(c))}</td>" for c in cols)
                + "</tr>"
                for r in ranked
            )
            + "</table>"
        )
        body += [_figure(p, f"sweep: {p.stem.replace('_', ' ')}") for p in _run_pngs(client, st["sweep"].run_id, tmp)]

    if "evaluate" in st:
        ev = st["evaluate"].outputs
        body.append("<h2 id=results>Results (test split)</h2>")
        if isinstance(ev.get("table_md"), str):
            body.append(markdown_table(ev["table_md"]))
        confusion = _run_pngs(client, st["evaluate"].run_id, tmp, "confusion_")
        if confusion:
            body.append("<h2 id=confusion>Confusion matrices</h2>")
            body += [_figure(p, p.stem.replace("_", " ")) for p in confusion]

    body.append("<h2 id=lineage>Lineage</h2>")
    body.append(_lineage(result, runs))
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f"<title>clpipe {_e(cfg.name)} {_e(result.run_id[:8])}</title><style>{_CSS}</style></head>"
        "<body>" + "\n".join(body) + "</body></html>\n"
    )


def write(result: PipelineResult, cfg: PipelineConfig) -> Path:
    """Build the report, log it on the (active) parent run and write it under the work dir."""
    client = MlflowClient(cfg.tracking_uri())
    with tempfile.TemporaryDirectory(prefix="clpipe-report-") as tmp:
        page = build(result, cfg, client, Path(tmp))
    mlflow.log_text(page, ARTIFACT)
    path = cfg.work_path() / "reports" / f"{result.run_id}.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path
