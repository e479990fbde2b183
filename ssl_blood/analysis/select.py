"""Which cells to label first, chosen on embeddings without looking at labels.

Strategies (all on cosine geometry: L2-normalised features):
- `typiclust` (Hacohen, Dekel & Weinshall, ICML 2022): k-means into (budget + already
  labelled) clusters; from the largest clusters that hold no labelled cell, the most typical
  cell, typicality = 1 / mean cosine distance to its 20 nearest cells. Strong at small budgets.
- `kcenter` (coreset, Sener & Savarese, ICLR 2018): greedily the cell farthest from every cell
  chosen or labelled so far. Covers the space; known to pick outliers at small budgets.
- `probcover` (Yehuda, Dekel, Hacohen & Weinshall, NeurIPS 2022): greedy maximum coverage of
  cosine balls whose radius keeps 95 % of them pure; keeps its gain past the small budgets.
- `margin`: the current classifier's smallest top-two margins, diversified by k-means (later
  rounds, with a classifier).
- `random`: a seeded uniform draw, the baseline.
Clustering and neighbour search use faiss. scikit-activeml also implements TypiClust and
ProbCover; it is not a dependency yet (not checked against our pins this round), and the faiss
kNN graph here keeps a pick over 12k cells in seconds on a 2-core laptop. Candidates are the train split minus `exclude` (cells labelled or seen in an earlier
round).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ssl_blood.data.cells import cell_names
from ssl_blood.features.embeddings import Embeddings, l2_normalize
from ssl_blood.errors import UserError
from ssl_blood.features.index import CellIndex
from ssl_blood.files import atomic_write

STRATEGIES = ("typiclust", "probcover", "kcenter", "margin", "random")
NEEDS_CLASSIFIER = ("margin",)
# `select`'s default: margin where the current classifier is given, else typiclust (a cold
# start). Why rounds: on BloodMNIST (quick preset, 3 draws, test; experiments/loop_classifier.py)
# 120 cells chosen as 40 typiclust then two margin rounds of 40 gave the default classifier
# 88.6 % accepted accuracy at 15 % review and 82.4 % overall, 120 typiclust cells at once 82.4 %
# and 76.3 %; typiclust continued past the first round trails margin (label-efficiency.md).
AUTO = "auto"
COLD_START = 40  # the first round measured above; a larger first pick gets a note
TYPICALITY_NEIGHBOURS = 20
PROBCOVER_NEIGHBOURS = 512  # ball cut: larger balls are counted as this many cells


def typicality(features: np.ndarray, k: int = TYPICALITY_NEIGHBOURS) -> np.ndarray:
    """1 / mean cosine distance of each cell to its k nearest other cells."""
    from ssl_blood.features.neighbours import neighbours

    n = len(features)
    k = min(k, n - 1)
    if k < 1:
        return np.ones(n, dtype=np.float32)
    index = CellIndex.build(features, ids=np.arange(n), use_gpu=False)
    similarity, position = neighbours(index, features, k, exclude_ids=np.arange(n))
    distance = np.where(position >= 0, 1 - similarity, np.nan)
    return (1 / (np.nanmean(distance, axis=1) + 1e-6)).astype(np.float32)


def kmeans(features: np.ndarray, k: int, seed: int = 0, iterations: int = 25) -> np.ndarray:
    """Cluster of each row: spherical k-means, k-means++ seeds (scikit-learn) refined by faiss.
    Seeding matters here: from random cells, k-means puts most centres into the largest
    clusters and merges small ones, the very cells TypiClust exists to reach."""
    import faiss
    from sklearn.cluster import kmeans_plusplus

    x = np.ascontiguousarray(l2_normalize(features), dtype=np.float32)
    # plain k-means++ (one candidate per step): scikit-learn's greedy default tries 2 + log k
    # candidates per step: 25x slower at k = 1,200 on 12k cells (206 s against 8.5 s)
    seeds, _ = kmeans_plusplus(x, k, random_state=seed, n_local_trials=1)
    km = faiss.Kmeans(x.shape[1], k, niter=iterations, seed=seed, spherical=True, verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=max(256, len(x) // k + 1))
    km.train(x, init_centroids=np.ascontiguousarray(seeds, dtype=np.float32))
    return km.index.search(x, 1)[1][:, 0].astype(np.int64)


def select_typiclust(features: np.ndarray, budget: int, labelled: np.ndarray,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(chosen rows, their clusters): rows index `features`; `labelled` marks rows already
    labelled (they count as covered clusters and are never chosen)."""
    clusters = kmeans(features, min(len(features), budget + int(labelled.sum())), seed)
    typical = typicality(features)
    covered = set(clusters[labelled].tolist())
    sizes = np.bincount(clusters, minlength=clusters.max() + 1)
    order = sorted((c for c in range(len(sizes)) if sizes[c] and c not in covered),
                   key=lambda c: (-sizes[c], c))
    chosen, their = [], []
    for c in order:
        members = np.flatnonzero((clusters == c) & ~labelled)
        if len(members):
            chosen.append(int(members[np.argmax(typical[members])]))
            their.append(int(c))
        if len(chosen) == budget:
            break
    if len(chosen) < budget:  # fewer uncovered clusters than the budget: most typical of the rest
        rest = np.setdiff1d(np.flatnonzero(~labelled), chosen)
        extra = rest[np.argsort(-typical[rest], kind="stable")][:budget - len(chosen)]
        chosen += extra.tolist()
        their += clusters[extra].tolist()
    return np.asarray(chosen, dtype=np.int64), np.asarray(their, dtype=np.int64)


def select_kcenter(features: np.ndarray, budget: int, labelled: np.ndarray,
                   seed: int = 0) -> np.ndarray:
    """Greedy k-center on cosine distance, starting from the labelled rows (or, with none, a
    seeded random row)."""
    x = l2_normalize(features)
    chosen: list[int] = []
    if labelled.any():
        nearest = 1 - (x @ x[labelled].T).max(1)
    else:
        first = int(np.random.default_rng(seed).integers(len(x)))
        chosen.append(first)
        nearest = 1 - x @ x[first]
    nearest[labelled] = -np.inf
    while len(chosen) < budget:
        nearest[chosen] = -np.inf
        pick = int(np.argmax(nearest))
        chosen.append(pick)
        nearest = np.minimum(nearest, 1 - x @ x[pick])
    return np.asarray(chosen, dtype=np.int64)


def select_random(budget: int, labelled: np.ndarray, seed: int = 0) -> np.ndarray:
    pool = np.flatnonzero(~labelled)
    return np.random.default_rng(seed).choice(pool, budget, replace=False).astype(np.int64)


def read_cells(path: str | Path, param: str = "exclude") -> list[str]:
    """The cells a CSV names: its `path` column, else its `id` column (an earlier picks.csv,
    labels.csv or the sheet's download), or one id per line. Every row counts, labelled or not:
    a cell a person has seen is not picked again."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"`{param}` {path}: no such file; give a CSV with a 'path' or 'id' column",
                        param=param)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, OSError, csv.Error) as exc:
        raise UserError(f"`{param}` {path} cannot be read as a UTF-8 CSV ({type(exc).__name__}); "
                        f"save it as a UTF-8 CSV with a 'path' or 'id' column", param=param) from None
    rows = [r for r in rows if any(v.strip() for v in r)]
    header = [c.strip() for c in rows[0]] if rows else []
    column = "path" if "path" in header else "id" if "id" in header else None
    if column is None:
        values = [r[0].strip() for r in rows]
    else:
        at = header.index(column)
        values = [r[at].strip() for r in rows[1:] if len(r) > at and r[at].strip()]
    if column != "path" and not all(v.lstrip("-").isdigit() for v in values):
        raise UserError(f"`{param}` {path}: ids must be whole numbers, in an 'id' column or one per "
                        f"line (or name cells in a 'path' column)", param=param)
    return [str(int(v)) if column != "path" else v for v in values]


def read_ids(path: str | Path) -> np.ndarray:
    """Ids from a CSV with an `id` column or one id per line."""
    return np.asarray([int(v) for v in read_cells(path)], dtype=np.int64)


def select_margin(features: np.ndarray, budget: int, labelled: np.ndarray, margin: np.ndarray,
                  seed: int = 0, candidates_per_pick: int = 10) -> np.ndarray:
    """Uncertainty with diversity: the `candidates_per_pick` x budget unlabelled cells with the
    smallest top-two `margin` of the current classifier (per row of `features`), clustered
    (k-means) into `budget` groups, the smallest-margin cell of each. Plain smallest-margin picks near-duplicates from
    one confused region; the clustering spreads them."""
    pool = np.flatnonzero(~labelled)
    candidates = pool[np.argsort(margin[pool], kind="stable")][:max(budget, candidates_per_pick * budget)]
    if len(candidates) == budget:
        return candidates.astype(np.int64)
    clusters = kmeans(features[candidates], budget, seed)
    chosen = [int(candidates[clusters == c][np.argmin(margin[candidates[clusters == c]])])
              for c in np.unique(clusters)]
    if len(chosen) < budget:  # empty clusters: the next smallest margins
        rest = [int(c) for c in candidates if int(c) not in set(chosen)]
        chosen += rest[:budget - len(chosen)]
    return np.asarray(chosen, dtype=np.int64)


def probcover_radius(features: np.ndarray, classes: int, seed: int = 0, purity: float = 0.95,
                     k: int = PROBCOVER_NEIGHBOURS) -> float:
    """ProbCover's ball radius (Yehuda et al., NeurIPS 2022): the largest cosine distance at
    which at least `purity` of the balls hold only cells of their centre's k-means cluster
    (k-means with as many clusters as classes stands in for the unknown labels)."""
    clusters = kmeans(features, classes, seed)
    similarity, position = _knn(features, k)
    distance = 1 - similarity
    best = float(np.nanquantile(distance[:, 0], 0.05))
    for radius in np.quantile(distance[np.isfinite(distance)], np.linspace(0.02, 0.6, 30)):
        inside = (distance <= radius) & (position >= 0)
        other = inside & (clusters[np.clip(position, 0, None)] != clusters[:, None])
        if (~other.any(1)).mean() >= purity:
            best = float(radius)
    return best


def _knn(features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    from ssl_blood.features.neighbours import neighbours

    n = len(features)
    index = CellIndex.build(features, ids=np.arange(n), use_gpu=False)
    return neighbours(index, features, min(k, n - 1), exclude_ids=np.arange(n))


def select_probcover(features: np.ndarray, budget: int, labelled: np.ndarray, classes: int,
                     seed: int = 0) -> tuple[np.ndarray, float]:
    """ProbCover: greedily the cell whose ball (cosine radius from `probcover_radius`) covers
    the most cells not yet covered; balls of labelled cells count as covered. Balls are cut at
    the `PROBCOVER_NEIGHBOURS` nearest cells (faiss kNN instead of a dense n x n graph: 12k
    cells in seconds). Keeps its gain past the budgets where TypiClust's vanishes."""
    radius = probcover_radius(features, max(2, classes), seed)
    similarity, position = _knn(features, PROBCOVER_NEIGHBOURS)
    n = len(features)
    inside = (1 - similarity <= radius) & (position >= 0)
    centre, member = np.nonzero(inside)
    member = position[centre, member]
    centre, member = np.concatenate([centre, np.arange(n)]), np.concatenate([member, np.arange(n)])
    by_centre = np.argsort(centre, kind="stable")  # ball of i: the cells within the radius
    by_member = np.argsort(member, kind="stable")  # holders of j: the balls j lies in
    ball_start = np.searchsorted(centre[by_centre], np.arange(n + 1))
    hold_start = np.searchsorted(member[by_member], np.arange(n + 1))
    ball = lambda i: member[by_centre[ball_start[i]:ball_start[i + 1]]]
    holders = lambda j: centre[by_member[hold_start[j]:hold_start[j + 1]]]
    covered = np.zeros(n, dtype=bool)
    gain = np.bincount(centre, minlength=n).astype(np.int64)
    chosen: list[int] = []
    blocked = labelled.copy()

    def cover(i: int) -> None:
        newly = ball(i)[~covered[ball(i)]]
        covered[newly] = True
        for j in newly:
            np.subtract.at(gain, holders(j), 1)

    for i in np.flatnonzero(labelled):
        cover(int(i))
    rng = np.random.default_rng(seed)
    while len(chosen) < budget:
        gain[blocked] = -1
        if gain.max() <= 0:  # everything covered: the rest at random among unchosen cells
            rest = np.flatnonzero(~blocked)
            chosen += rng.choice(rest, budget - len(chosen), replace=False).tolist()
            break
        pick = int(np.argmax(gain))
        chosen.append(pick)
        blocked[pick] = True
        cover(pick)
    return np.asarray(chosen, dtype=np.int64), radius


def select_cells(emb: Embeddings, budget: int, strategy: str = "typiclust",
                 exclude: Sequence[int | str] | np.ndarray = (), seed: int = 0,
                 split: str = "train", probabilities: np.ndarray | None = None) -> dict[str, Any]:
    """The `budget` cells of `split` to label next. `exclude`: cells labelled or seen already
    (ids, or paths for file sources). `probabilities`: the current classifier's, per cell of the
    split (strategies that need a classifier). Returns the picks in order with id, path where
    the cells have one, cluster (typiclust) and typicality."""
    if strategy not in STRATEGIES:
        raise UserError(f"unknown strategy '{strategy}'; choose one of {', '.join(STRATEGIES)}",
                        param="strategy")
    if strategy in NEEDS_CLASSIFIER and probabilities is None:
        raise UserError(f"strategy '{strategy}' ranks cells by the current classifier; give one "
                        f"(`classifier`) or choose {', '.join(s for s in STRATEGIES if s not in NEEDS_CLASSIFIER)}",
                        param=("strategy", "classifier"))
    if split not in emb.splits():
        raise UserError(f"the embeddings hold no '{split}' split to choose from (they hold "
                        f"{', '.join(emb.splits())}); embed the train split", param="embeddings")
    features, _, ids = emb.select(split)
    mask = emb.mask(split)
    names = cell_names({k: v[mask] for k, v in emb.metadata.items()}, ids)
    wanted = [str(int(v)) if isinstance(v, (int, np.integer)) else str(v) for v in exclude]
    unknown = sorted(set(wanted) - set(names.tolist()))
    if unknown:
        raise UserError(f"`exclude` names {len(unknown)} cell(s) not in the {split} split (first: "
                        f"{unknown[0]}); give cells of this embeddings file", param="exclude")
    labelled = np.isin(names, wanted)
    margins = None
    if probabilities is not None:
        from ssl_blood.classify.classifier import top_two_margin

        if len(probabilities) != len(features):
            raise UserError(f"the classifier's probabilities cover {len(probabilities)} cells, the "
                            f"{split} split {len(features)}", param="classifier")
        margins = top_two_margin(probabilities)
    pool = int((~labelled).sum())
    if not 1 <= budget <= pool:
        raise UserError(f"`budget` {budget} must be between 1 and the {pool} unlabelled {split} "
                        f"cells", param="budget")
    clusters, extra = None, {}
    if strategy == "typiclust":
        rows, clusters = select_typiclust(features, budget, labelled, seed)
    elif strategy == "kcenter":
        rows = select_kcenter(features, budget, labelled, seed)
    elif strategy == "probcover":
        rows, radius = select_probcover(features, budget, labelled, len(emb.class_names) or 8, seed)
        extra["radius"] = round(radius, 6)
    elif strategy == "margin":
        rows = select_margin(features, budget, labelled, margins, seed)
    else:
        rows = select_random(budget, labelled, seed)
    typical = typicality(features)
    columns = ("rank", "id", "split", "cluster", "typicality", "margin")
    metadata = {(k if k not in columns else f"meta_{k}"): v[mask] for k, v in emb.metadata.items()}
    picks = [{"rank": r + 1, "id": int(ids[row]), "split": split,
              "cluster": int(clusters[r]) if clusters is not None else None,
              "typicality": round(float(typical[row]), 6),
              **({"margin": round(float(margins[row]), 4)} if margins is not None else {}),
              **{k: str(v[row]) for k, v in metadata.items()}}
             for r, row in enumerate(rows)]
    return {"strategy": strategy, "budget": budget, "seed": seed, "excluded": int(labelled.sum()),
            "embeddings": emb.name, "identity": emb.identity, "picks": picks, **extra}


def write_picks(result: dict[str, Any], path: str | Path) -> Path:
    """picks.csv: rank, id, split, cluster, typicality, any per-cell metadata (a folder's cells
    their `path`) and an empty `label` column: a person fills it in and hands the file to
    `train-classifier --labels` as it is."""
    picks = result["picks"]
    columns = (list(picks[0]) if picks else ["rank", "id", "split", "cluster", "typicality"]) + ["label"]
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({**{k: "" if v is None else v for k, v in p.items()}, "label": ""} for p in picks)
    return atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def montage(result: dict[str, Any], emb: Embeddings, path: str | Path) -> Path | None:
    """The chosen cells in order, eight to a row, captioned with rank and file name (or id)."""
    from ssl_blood.analysis.plots import cell_grid

    split = result["picks"][0]["split"] if result["picks"] else "train"
    images = emb.split_images(split)
    if images is None:
        return None
    picks = result["picks"]
    rows = [picks[i:i + 8] for i in range(0, len(picks), 8)]
    return cell_grid([[images[p["id"]] for p in row] for row in rows], path,
                     title=f"{result['budget']} cells to label first ({result['strategy']})",
                     captions=[[f"{p['rank']}. " + (Path(p["path"]).name[:16] if p.get("path") else f"#{p['id']}")
                                for p in row] for row in rows], dpi=150)


def classifier_probabilities(classifier: str | Path, emb: Embeddings, split: str) -> np.ndarray:
    """The saved classifier's probabilities for the cells of `split`, from the stored features
    (no image is embedded again): the classifier must use these embeddings' backbone. The
    stored features are of one view per cell, where the classifier may average several
    (`Classifier.views`): its head reads them as `predict --views 1` does, a little less
    accurately than with its own views (BloodMNIST val, 120 labels: 79.4 against 80.7 %), which
    is enough to rank cells by their margin."""
    from ssl_blood.classify.classifier import Classifier

    model = Classifier.load(classifier, device="cpu")
    if model.embedder.identity != emb.identity:
        raise UserError(f"`classifier` {classifier} was trained on other features "
                        f"({model.embedder.identity}) than these embeddings ({emb.identity}); give "
                        f"embeddings made with its checkpoint", param="classifier")
    return model.probabilities(np.asarray(emb.select(split)[0], dtype=np.float32))


def resolved_strategy(strategy: str, classifier: str | Path | None) -> str:
    """`strategy`, with AUTO resolved: margin of the current `classifier`, else typiclust."""
    if strategy != AUTO:
        return strategy
    return "margin" if classifier else "typiclust"


def choose_cells(embeddings: str | Path, budget: int, out: str | Path, strategy: str = AUTO,
                 exclude: str | Path | None = None, labels: str | Path | None = None,
                 classifier: str | Path | None = None, seed: int = 0, montage_path: str | Path | None = None,
                 sheet: str | Path | None = None, classes: Sequence[str] | None = None,
                 overwrite: bool = False) -> dict[str, Any]:
    """`ssl-blood select`: picks.csv (and a montage, a labelling sheet) of the `budget` cells to
    label next (`strategy` AUTO: see `resolved_strategy`). Cells named in `exclude` or `labels`
    (every row: seen is seen) are not picked again; the labelled ones are the sheet's reference
    neighbours."""
    from ssl_blood.analysis.sheet import picks_sheet, sheet_classes
    from ssl_blood.classify.labels import read_labels
    from ssl_blood.files import refuse_existing

    refuse_existing(out, overwrite)
    for path, param in ((montage_path, "montage"), (sheet, "sheet")):
        if path:
            refuse_existing(path, overwrite, param)
    emb = Embeddings.load(embeddings)
    split = "train" if "train" in emb.splits() else emb.default_split()
    seen = (read_cells(exclude) if exclude else []) + (read_cells(labels, "labels") if labels else [])
    table = read_labels(labels, allow_empty=True) if labels else None
    probabilities = classifier_probabilities(classifier, emb, split) if classifier else None
    class_list = sheet_classes(classes, classifier, table, emb.class_names) if sheet else None
    strategy = resolved_strategy(strategy, classifier)
    result = select_cells(emb, budget, strategy, seen, seed, split, probabilities)
    if strategy == "typiclust" and not seen and budget > COLD_START:
        from ssl_blood import ui

        ui.note(f"typiclust suits a first round; labelling {budget} cells in rounds pays: label "
                f"{COLD_START} first, train a classifier, then select the rest {COLD_START} at a time "
                f"with `classifier` (on BloodMNIST 120 cells so chosen gave 88.6 % accepted accuracy "
                f"at 15 % review, 120 at once 82.4 %; docs/classifier.md)")
    write_picks(result, out)
    if montage_path:
        montage(result, emb, montage_path)
    if sheet:
        picks_sheet(result, emb, sheet, class_list, table)
    return result
