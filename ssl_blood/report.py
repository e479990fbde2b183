"""report.html: everything of one run on one page, images embedded, nothing fetched.

The report reads what the run folder holds (config.json, metrics.jsonl, checkpoint.pt) and the
analyses kept in RUN/analysis/; what is missing there is computed first with the library's own
commands (embed, baselines, linear probe, kNN, UMAP + IG analysis, a retrieval montage) and
kept, so a second report is fast. Analyses are redone when the checkpoint or --limit changes.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ssl_blood.checkpoint import write_json
from ssl_blood.errors import UserError

ANALYSIS_DIR = "analysis"


# ----------------------------------------------------------------------------- analyses


def _load_history(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file() or not path.read_text().strip():
        raise UserError(f"{run} has no metrics.jsonl; give the folder of a pretraining run "
                        f"(ssl-blood pretrain --out DIR)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def prepare_analysis(run: Path, limit: int | None = None, device: str = "auto",
                     baselines: Sequence[str] = ("pixels", "random-init")) -> dict[str, Any]:
    """Compute (or reuse) everything the report shows; returns paths and results."""
    from ssl_blood.checkpoint import sha256_file
    from ssl_blood.data import DataSource, available_splits, load_split
    from ssl_blood.embed import Embedder, Embeddings, embed_splits
    from ssl_blood.plots import training_curves_png

    checkpoint = run / "checkpoint.pt"
    if not checkpoint.is_file():
        raise UserError(f"{run} has no checkpoint.pt; the run has not finished an epoch yet")
    out = run / ANALYSIS_DIR
    out.mkdir(exist_ok=True)
    stamp = {"checkpoint_sha256": sha256_file(checkpoint), "limit": limit, "baselines": list(baselines)}
    stamp_path = out / "analysis.json"
    fresh = not stamp_path.exists() or json.loads(stamp_path.read_text()) != stamp
    if fresh:  # another checkpoint or subset: nothing cached is valid
        for old in out.rglob("*"):
            if old.is_file():
                old.unlink()
    result: dict[str, Any] = {"dir": out, "curves": training_curves_png(_load_history(run),
                                                                        out / "training_curves.png")}
    model = Embedder.from_checkpoint(checkpoint, device)
    source = DataSource.from_dict(model.spec["source"])
    splits = list(available_splits(source))
    train = load_split(source, "train", limit) if baselines else None
    embedders = {"model": model, **{kind: Embedder.baseline(kind, train, model.spec["backbone"], 0, device)
                                    for kind in baselines}}
    embeddings = {}
    for name, embedder in embedders.items():
        path = out / f"embeddings-{name}.npz"
        if not path.exists():
            embed_splits(embedder, source, splits, limit).save(path)
        embeddings[name] = Embeddings.load(path)
    result["embeddings"] = embeddings
    labelled = set(splits) >= {"train", "val", "test"} and all(
        (embeddings["model"].select(s)[1] >= 0).all() for s in ("train", "val", "test"))
    result["labelled"] = labelled
    if labelled:
        result.update(_evaluations(out, embeddings))
        result["umap"] = _umap(out, embeddings, result["probes"]["model"])
    result["montage"] = _montage(out, embeddings["model"], source, splits)
    stamp_path.write_text(json.dumps(stamp) + "\n")
    return result


def _cached_json(path: Path, compute) -> Any:
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    write_json(value, path)
    return value


def _evaluations(out: Path, embeddings: dict) -> dict[str, Any]:
    from ssl_blood.evaluate import knn_embeddings, probe_embeddings
    from ssl_blood.plots import confusion_matrix_png

    probes = {n: _cached_json(out / f"linear_probe-{n}.json", lambda e=e: probe_embeddings(e))
              for n, e in embeddings.items()}
    knns = {n: _cached_json(out / f"knn-{n}.json", lambda e=e: knn_embeddings(e))
            for n, e in embeddings.items()}
    confusion = out / "confusion_matrix.png"
    if not confusion.exists():
        confusion_matrix_png(probes["model"]["confusion_matrix"], embeddings["model"].class_names,
                             confusion, "Linear probe, test split")
    return {"probes": probes, "knns": knns, "confusion": confusion}


def _umap(out: Path, embeddings: dict, probe: dict) -> dict[str, Any] | None:
    from ssl_blood.umap_ig import IG, class_index, umap_report

    emb = embeddings["model"]
    try:
        class_index(emb.class_names, IG)
    except UserError:  # the data has no immature-granulocyte class
        return None
    path = out / "umap" / "ig_analysis.json"
    if path.exists():
        return json.loads(path.read_text())
    return umap_report(emb, out / "umap", "test", IG, embeddings.get("pixels"), 0, probe)


def _montage(out: Path, emb, source, splits: list[str]) -> Path:
    """A few query cells (one per class from test, else the first cells) and their neighbours."""
    from ssl_blood.data import load_split
    from ssl_blood.index import CellIndex
    from ssl_blood.plots import retrieval_montage
    from ssl_blood.retrieval import neighbours

    path = out / "retrieval.png"
    if path.exists():
        return path
    query_split = "test" if "test" in splits else "train"
    gx, gy, gids = emb.select("train")
    qx, qy, qids = emb.select(query_split)
    index = CellIndex.build(gx, labels=gy, ids=gids, use_gpu=False)
    picks = [int(np.flatnonzero(qy == c)[0]) for c in np.unique(qy)][:8] if (qy >= 0).all() \
        else list(range(min(4, len(qy))))
    exclude = qids[picks] if query_split == "train" else None
    sims, pos = neighbours(index, qx[picks], 7, exclude)
    gallery = load_split(source, "train").images.numpy()
    queries = load_split(source, query_split).images.numpy()
    names = list(emb.class_names)
    rows = [{"query": queries[qids[p]],
             "caption": f"{query_split} #{qids[p]}\n" + (names[qy[p]] if qy[p] >= 0 else "query"),
             "neighbours": [gallery[gids[j]] for j in pos[r]], "labels": gy[pos[r]].tolist(),
             "similarities": sims[r].tolist()} for r, p in enumerate(picks)]
    return retrieval_montage(rows, names, path)


# ----------------------------------------------------------------------------- HTML


CSS = """
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
        rows.append([emb.name if name == "model" else f"baseline: {emb.name}", p["val_acc"],
                     p["test_acc"], p["test_auc"], p["balanced_acc"], p["macro_f1"], k["test_acc"]])
    probe = analysis["probes"]["model"]
    per_class = [[n, m["precision"], m["recall"], m["f1"], m["support"]]
                 for n, m in probe["per_class"].items()]
    return (_table(["features", "probe val ACC", "probe test ACC", "probe test AUC",
                    "balanced ACC", "macro-F1", "kNN test ACC (k=20)"], rows)
            + "<p class='muted'>Linear probe: logistic regression on frozen features, weight decay "
              "chosen on val, test scored once. kNN: DINO's weighted cosine kNN, train as gallery.</p>"
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
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1><p class="muted">{html.escape(summary)} · ssl-blood {__version__}</p>
<h2>Training</h2>{_img(analysis['curves'], 'training curves', 720)}
<details><summary>per-epoch metrics</summary>{_table(['epoch', 'loss', 'kNN val ACC', 'img/s', 'seconds'], curve_rows)}</details>
<h2>Evaluation (frozen features)</h2>{_evaluation_section(analysis)}
<h2>UMAP and immature granulocytes</h2>{_ig_section(analysis)}
<h2>Retrieval</h2><p class="muted">Query cells (left) and their nearest train cells by cosine similarity;
frames are coloured by class.</p>{_img(analysis.get('montage'), 'retrieval montage')}
<h2>Configuration</h2><pre>{html.escape(json.dumps(cfg, indent=2))}</pre>
</body></html>
"""


def build_report(run_dir: str | Path, out: str | Path | None = None, limit: int | None = None,
                 device: str = "auto", baselines: Sequence[str] = ("pixels", "random-init")) -> Path:
    """Write the run's one-file HTML report; returns its path."""
    from ssl_blood.embed import BASELINES

    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"--run {run}: no such folder; give the folder of a pretraining run")
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise UserError(f"--baselines {unknown[0]}: choose from {', '.join(BASELINES)}")
    history = _load_history(run)
    config_path = run / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else None
    analysis = prepare_analysis(run, limit, device, baselines)
    path = Path(out) if out else run / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(run, config, history, analysis))
    return path
