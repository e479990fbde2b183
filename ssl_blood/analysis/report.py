"""report.html: everything of one run on one page, images and the interactive map embedded,
nothing fetched. The numbers and pictures come from `ssl_blood.analysis.report_data` (computed or reused);
this module only renders them.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any, Sequence

from ssl_blood.errors import UserError
from ssl_blood.files import write_text
from ssl_blood.training.run_dir import RunDir


# ----------------------------------------------------------------------------- HTML


CSS = """
.warn{background:#fff3e0;border-left:4px solid #e69f00;padding:6px 10px}
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1150px;
color:#222;line-height:1.45;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{border-bottom:2px solid #0072B2;padding-bottom:.2rem;margin-top:2.2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}th,td{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#eef4fa}img{max-width:100%;height:auto;border:1px solid #ddd}
pre{background:#f6f8fa;padding:.8rem;overflow:auto;font-size:.8rem;max-height:28rem}.muted{color:#666;font-size:.9rem}
"""


def _img(path: Path | str | None, alt: str, width: int = 1100) -> str:
    """The PNG inline (base64), at most `width` CSS pixels wide."""
    if path is None or not Path(path).exists():
        return ""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(alt)}" style="max-width:min(100%,{width}px)" '
            f'src="data:image/png;base64,{data}"></figure>')


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "–"
        return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _evaluation_section(analysis: dict) -> str:
    if not analysis.get("labelled"):
        return "<p class='muted'>The data has no labelled train/val/test splits: no evaluation.</p>"
    rows = []
    for name, emb in analysis["embeddings"].items():
        p, k = analysis["probes"][name], analysis["knns"][name]
        clusters = p.get("test_clusters") or {}
        rows.append([emb.name if name == "model" else f"baseline: {emb.name}", p["val_acc"],
                     p["test_acc"], p["test_auc"], p["balanced_acc"], p["macro_f1"], k["test_acc"],
                     clusters.get("nmi"), clusters.get("ari"), clusters.get("purity")])
    probe = analysis["probes"]["model"]
    per_class = [[n, m["precision"], m["recall"], m["f1"], m["support"]]
                 for n, m in probe["per_class"].items()]
    return (_table(["features", "probe val ACC", "probe test ACC", "probe test AUC",
                    "balanced ACC", "macro-F1", "kNN test ACC (k=20)", "k-means NMI", "ARI",
                    "purity"], rows)
            + "<p class='muted'>Linear probe: logistic regression on frozen features, weight decay "
              "chosen on val, test scored once. kNN: DINO's weighted cosine kNN, train as gallery. "
              "k-means (k = number of classes, cosine) on the test split: how well unsupervised "
              "clusters recover the classes.</p>"
            + "<h3>Per class (linear probe, test)</h3>"
            + _table(["class", "precision", "recall", "F1", "support"], per_class)
            + _img(analysis.get("confusion"), "confusion matrix", 640))


def _ig_section(analysis: dict) -> str:
    umap = analysis.get("umap")
    if not umap:
        return "<p class='muted'>No UMAP / IG analysis (the data has no immature-granulocyte class).</p>"
    parts = []
    for name, a in umap["analyses"].items():
        comp = a["neighbour_composition"]
        target = a["target"]
        rows = [[cls, share[cls], a["silhouette"].get(cls)] for cls, share in comp.items()]
        parts.append(f"<h3>{html.escape(name)}</h3>"
                     + _table(["class", f"same-class share of {a['k']} nearest neighbours",
                               "silhouette (cosine)"], rows)
                     + "<p>Classes nearest to " + html.escape(target) + " (centroid cosine distance): "
                     + ", ".join(f"{html.escape(r['class'])} {r['cosine_distance']:.3f}"
                                 for r in a["nearest_classes"][:4])
                     + f". Sub-clusters: {a['subclusters']['k']} ({html.escape(a['subclusters']['criterion'])}),"
                       f" sizes {a['subclusters']['sizes']}.</p>")
        if "linear_probe_confusion" in a:
            c = a["linear_probe_confusion"]
            parts.append("<p>Linear probe on " + html.escape(target) + f": recall {c['recall']:.3f}, "
                         f"precision {c['precision']:.3f}; true {html.escape(target)} predicted as: "
                         + ", ".join(f"{html.escape(k)} {v}" for k, v in c["true_as"].items() if v) + "</p>")
    files = {Path(f).name: f for f in umap["files"]}
    return ("".join(parts) + _img(files.get("umap.png"), "UMAP panels")
            + _img(files.get("ig_neighbours.png"), "neighbour composition")
            + _img(files.get("ig_subclusters.png"), "IG sub-cluster montage", 720))


def _map_section(analysis: dict) -> str:
    path = analysis.get("map")
    if path is None or not Path(path).exists():
        return "<p class='muted'>No interactive map.</p>"
    page = html.escape(Path(path).read_text(), quote=True)
    return ("<p class='muted'>Hover a cell to see it, click it to list its nearest cells, click the "
            "legend to hide a class, select with the box or lasso tool to count classes and "
            "download ids. (Also saved as analysis/map.html.)</p>"
            # sandboxed: the map's scripts run in an opaque origin, away from the report page
            f'<iframe title="interactive map" sandbox="allow-scripts allow-downloads" '
            f'srcdoc="{page}" style="width:100%;height:720px;'
            'border:1px solid #ddd"></iframe>')


def stopped_early(config: dict, history: list[dict]) -> str | None:
    """What it means that the run trained fewer epochs than planned, or None."""
    planned, done = int(config.get("epochs") or 0), int(history[-1]["epoch"]) if history else 0
    if not planned or done >= planned:
        return None
    return (f"{done} of {planned} planned epochs were trained: the learning rate never finished its "
            f"schedule and the features are those of an unfinished run, so every number on this page "
            f"is lower than the finished run would give. Continue it with ssl-blood pretrain --out "
            f"RUN --resume.")


def render(run: Path, config: dict | None, history: list[dict], analysis: dict) -> str:
    from ssl_blood import __version__

    last = history[-1]
    title = f"ssl-blood report: {run.name}"
    cfg = config or {}
    summary = (f"{cfg.get('method', '?')} · {cfg.get('backbone', '?')} · {last['epoch']} epochs · "
               f"final loss {last['loss']:.4f}"
               + (f" · kNN val {last['knn_val_acc']:.4f}" if "knn_val_acc" in last else ""))
    curve_rows = [[h["epoch"], h["loss"], h.get("knn_val_acc"), h.get("img_s"), h.get("seconds")]
                  for h in history]
    early = stopped_early(cfg, history)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1><p class="muted">{html.escape(summary)} · ssl-blood {__version__}</p>
{f'<p class="warn"><b>Stopped early.</b> {html.escape(early)}</p>' if early else ''}
<h2>Training</h2>{_img(analysis['curves'], 'training curves', 720)}
<details><summary>per-epoch metrics</summary>{_table(['epoch', 'loss', 'kNN val ACC', 'img/s', 'seconds'], curve_rows)}</details>
<h2>Evaluation (frozen features)</h2>{_evaluation_section(analysis)}
<h2>UMAP and immature granulocytes</h2>{_ig_section(analysis)}
<h2>Interactive map</h2>{_map_section(analysis)}
<h2>Retrieval</h2><p class="muted">Query cells (left) and their nearest train cells by cosine similarity;
frames are coloured by class.</p>{_img(analysis.get('montage'), 'retrieval montage')}
<h2>Configuration</h2><pre>{html.escape(json.dumps(cfg, indent=2))}</pre>
</body></html>
"""


def build_report(run_dir: str | Path, out: str | Path | None = None, limit: int | None = None,
                 device: str = "auto", baselines: Sequence[str] = ("pixels", "random-init"),
                 progress: bool | None = None) -> Path:
    """Write the run's one-file HTML report (holding the run folder's lock); returns its path.
    Bad input is refused before anything in the folder changes."""
    from ssl_blood.analysis.report_data import check_inputs, prepare_analysis

    run = RunDir(run_dir)
    check_inputs(run, limit, baselines)
    path = Path(out) if out else run.report
    if path.is_dir():
        raise UserError(f"`out` {path} is a folder; give a file name such as report.html", param="out")
    with run.lock():
        analysis = prepare_analysis(run.path, limit, device, baselines, progress)
        config = json.loads(run.config.read_text()) if run.config.exists() else None
        write_text(path, render(run.path, config, analysis["history"], analysis))
    return path
