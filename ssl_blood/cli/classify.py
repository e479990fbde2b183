"""`train-classifier` and `predict`: labels in, a classifier kept, new cells classified."""

from __future__ import annotations

import argparse
from pathlib import Path

from ssl_blood.cli.common import (add_data_args, add_json, csv_list, print_classifier, print_json,
                                  source_from_args, source_given)

HELP = {  # one line per command for `ssl-blood --help`, which builds no command's flags
    "train-classifier": "train and keep a classifier from labelled cells (a labels CSV)",
    "predict": "classify new cells: class, probability, review flag, differential count",
    "robustness": "a classifier under stain, scanner and imaging shifts, with and without AdaBN",
}


def _add_train_classifier(sub) -> None:
    from ssl_blood.classify.classifier import (CALIBRATION_FOLDS, DEFAULT_REVIEW_RATE, DEFAULT_REVIEW_SCORE,
                                               HEADS, REVIEW_NEIGHBOURS, REVIEW_SCORES)
    from ssl_blood.model.inference import VIEWS

    p = sub.add_parser("train-classifier", help=HELP["train-classifier"],
                       description="A logistic head on the checkpoint's frozen features, trained on "
                                   "every labelled cell (a user's labels are all training labels): "
                                   "weight decay, calibration (temperature scaling, kept only where "
                                   "it helps; heads that train the backbone are cross-fitted and "
                                   "cooled to agree with their fold models) and the review threshold chosen "
                                   "by stratified cross-validation on them. Writes a folder with the head, its "
                                   "settings and a model card (card.md).")
    p.add_argument("--checkpoint", metavar="CKPT", help="the pretrained backbone (a new classifier)")
    p.add_argument("--from", dest="from_classifier", metavar="DIR",
                   help="add the labels to this classifier's (same backbone and classes): a "
                        "review's corrections.csv, a new lab's cells")
    p.add_argument("--labels", metavar="FILE.csv",
                   help="CSV with 'label' and 'path' (or 'id') columns, as ssl-blood select writes "
                        "(empty labels are skipped); overrides the data's own labels")
    p.add_argument("--split", help="which split holds the labelled cells (default train)")
    p.add_argument("--fraction", type=float, help="without --labels: this fraction of the data's labels")
    p.add_argument("--shots", type=int, help="without --labels: this many labels per class")
    p.add_argument("--head", choices=HEADS, default="logistic",
                   help="logistic: on the frozen features (seconds); propagate: plus labels spread "
                        "to the unlabelled cells on their kNN graph; fixmatch: first trains the "
                        "backbone on labelled and unlabelled cells (FixMatch consistency, minutes; "
                        "resumes if interrupted); fine-tune: the same on the labelled cells alone")
    p.add_argument("--minutes", type=float, help="--head fixmatch/fine-tune: time budget of the training")
    p.add_argument("--steps", type=int, help="--head fixmatch/fine-tune: training steps (default 500)")
    p.add_argument("--stain", type=float, default=0.0,
                   help="--head fixmatch/fine-tune: HED stain jitter of the training views (0.2: "
                        "about another lab's H&E balance); check eosinophil and basophil recall "
                        "with ssl-blood robustness, their identity is colour")
    p.add_argument("--shift-augment", type=float, default=0.0, metavar="P",
                   help="--head fixmatch: share of the unlabelled cells whose training view is put "
                        "under a random stain, blur, resampling or brightness shift (severity 1-5) "
                        "and taught the clean cell's call; on BloodMNIST at 0.5: +1 point under "
                        "shifts at severity 3 without adaptation, none with --adapt auto "
                        "(docs/robustness.md) (default 0)")
    p.add_argument("--calibration-folds", type=int, default=CALIBRATION_FOLDS,
                   help="--head fixmatch/fine-tune: the training runs again on this many folds of "
                        "the labelled cells to calibrate the head and set its review threshold "
                        "honestly: its temperature brings it to the average of itself and the fold "
                        "models on the folder's unlabelled cells (a --minutes budget covers all the "
                        "runs); 0 skips it, and the confidences are then over-confident (default "
                        "%(default)s)")
    p.add_argument("--ensemble", action="store_true",
                   help="--head fixmatch/fine-tune: keep the models of the calibration reruns and "
                        "predict with the average of all of them and the trained one: better "
                        "calibrated and a little more accurate, for --calibration-folds + 1 times "
                        "the prediction time (docs/classifier.md)")
    p.add_argument("--views", type=int, choices=VIEWS,
                   help="dihedral views (quarter turns, mirror images) averaged per cell: 8 "
                        "(default) is about 1.5 points more accurate than 1 on BloodMNIST at 40-400 "
                        "labels, for 8x the embedding time; --from keeps the classifier's")
    p.add_argument("--self-contained", action="store_true",
                   help="copy the backbone into the classifier folder, so it runs without the "
                        "pretraining run (head fixmatch always keeps its own)")
    p.add_argument("--review-rate", type=float, default=DEFAULT_REVIEW_RATE,
                   help="share of cells sent to review: sets the threshold by cross-validation "
                        "(--review-score smoothed, and heads fixmatch/fine-tune: on the folder's "
                        "unlabelled cells) (default %(default)s)")
    p.add_argument("--review-score", choices=REVIEW_SCORES, default=DEFAULT_REVIEW_SCORE,
                   help=f"what sends a cell to review: smoothed, the probability of its call "
                        f"averaged over the cell and its {REVIEW_NEIGHBOURS} nearest unlabelled cells of the "
                        f"folder (a call its neighbours disagree with is less sure; needs unlabelled "
                        f"cells, else top); top, its own calibrated probability; auto, the one that "
                        f"reviews the labelled cells better in cross-validation (neighbours help "
                        f"with few labels) (default %(default)s)")
    p.add_argument("--shift-copies", type=int, default=0, metavar="N",
                   help="head logistic also learns from N copies of each labelled cell under random "
                        "stain, blur, resampling and brightness shifts (severity 1-5): steadier on "
                        "slides from another stain or scanner (docs/robustness.md); --from keeps "
                        "the classifier's (default 0)")
    add_data_args(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--overwrite", action="store_true")
    add_json(p)
    p.set_defaults(func=cmd_train_classifier)


def cmd_train_classifier(args: argparse.Namespace) -> int:
    from ssl_blood.classify.classifier import train_classifier

    model = train_classifier(args.checkpoint, args.out,
                             source_from_args(args) if source_given(args) else None, args.labels,
                             args.split, args.fraction, args.shots, args.head, args.seed,
                             args.review_rate, args.device, args.overwrite, progress=None,
                             from_classifier=args.from_classifier, minutes=args.minutes,
                             steps=args.steps, self_contained=args.self_contained,
                             stain=args.stain, views=args.views,
                             calibration_folds=args.calibration_folds,
                             review_score=args.review_score, shift_copies=args.shift_copies,
                             ensemble=args.ensemble, shift_augment=args.shift_augment)
    return print_classifier(model.card, args.out, args.json)


def _add_predict(sub) -> None:
    from ssl_blood.classify.classifier import ADAPTATIONS
    from ssl_blood.model.inference import VIEWS

    p = sub.add_parser("predict", help=HELP["predict"],
                       description="Classifies every cell of the data: one CSV row per cell (path or "
                                   "id, predicted class, calibrated probability, margin, OOD score, "
                                   "review score, review flag, every class's probability) and "
                                   "OUT.counts.json, the differential count with 95 % intervals. A "
                                   "cell goes to review when its review score (the classifier's: its "
                                   "probability, or that averaged with its nearest cells of the "
                                   "training folder) is below --min-probability or its "
                                   "OOD score (distance to the nearest labelled cell over their "
                                   "typical distance) above --max-ood; defaults: the classifier's.")
    p.add_argument("--classifier", required=True, metavar="DIR")
    p.add_argument("--split", help="which split to classify (default test, or the only one)")
    p.add_argument("--min-probability", type=float)
    p.add_argument("--max-ood", type=float)
    p.add_argument("--adapt", choices=ADAPTATIONS, default="none",
                   help="adabn: re-estimate the backbone's BatchNorm statistics on these cells "
                        "and classify with the classifier's AdaBN head (a slide from another "
                        "stain or scanner; needs >= 32 cells); auto: so only where the shift "
                        "check warns")
    p.add_argument("--views", type=int, choices=VIEWS,
                   help="dihedral views averaged per cell (default: the classifier's); fewer is "
                        "faster and a little less accurate")
    p.add_argument("--review", metavar="REVIEW.html",
                   help="a page of the flagged cells to confirm or correct; it downloads "
                        "corrections.csv for ssl-blood train-classifier --from DIR --labels")
    add_data_args(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, metavar="FILE.csv")
    p.add_argument("--overwrite", action="store_true")
    add_json(p)
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    from ssl_blood.analysis.review import predict_and_review

    _, counts = predict_and_review(args.classifier, source_from_args(args) if source_given(args) else None,
                                   args.out, args.review, args.split, args.min_probability,
                                   args.max_ood, args.device, args.overwrite, progress=None,
                                   adapt=args.adapt, views=args.views)
    if args.json:
        return print_json(counts)
    print(f"{counts['cells']} cells: {counts['accepted']} accepted, {counts['review']} for review"
          + ("; SHIFT WARNING: unlike the training cells" if counts.get("shift_warning") else "")
          + ("; classified after AdaBN" if counts.get("adapted") == "adabn" else ""))
    print(f"{'class':28}{'cells':>7}{'%':>7}  {'95 % CI':>13}")
    for name, row in counts["classes"].items():
        print(f"{name:28}{row['cells']:>7}{row['percent']:>7.1f}  "
              f"{row['ci95'][0]:5.1f}-{row['ci95'][1]:5.1f}")
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.counts.json')}"
          + (f"; review the flagged cells in {args.review}" if args.review else ""))
    return 0


def severity_list(text: str) -> list[int]:
    """"1-5", "3" or "1,3,5" -> [1, ..., 5]."""
    from ssl_blood.errors import UserError

    try:
        if "-" in text:
            low, high = (int(v) for v in text.split("-"))
            return list(range(low, high + 1))
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"`severities` {text!r}: give a range such as 1-5 or a list such as "
                        f"1,3,5", param="severities") from None


def _add_robustness(sub) -> None:
    from ssl_blood.data.shifts import SHIFTS

    p = sub.add_parser("robustness", help=HELP["robustness"],
                       description="Accuracy, balanced accuracy, per-class recall, ECE, the share "
                                   "sent to review and the batch shift warning of a classifier on "
                                   "labelled cells under each corruption and severity (stain "
                                   "colour, blur, resampling, brightness; MedMNIST-C's when "
                                   "medmnistc is installed), with and without --adapt adabn. "
                                   "Writes OUT/robustness.csv, .json and .png (heat map).")
    p.add_argument("--classifier", required=True, metavar="DIR")
    p.add_argument("--corruptions", metavar="A,B",
                   help=f"default: all of {', '.join(SHIFTS)} and, when medmnistc is installed, "
                        f"MedMNIST-C's (medmnistc-pixelate, medmnistc-jpeg_compression, ...)")
    p.add_argument("--severities", default="1-5", help="1-5 (default), 3, or 1,3,5")
    p.add_argument("--adapt", default="none", metavar="none,adabn,auto",
                   help="adaptations to compare (default none; none,adabn for both; auto: adabn "
                        "where predict's shift check warns)")
    p.add_argument("--labels", metavar="FILE.csv", help="the cells' classes, if the data has none")
    p.add_argument("--split", help="which split to measure (default test, or the only one)")
    add_data_args(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0, help="draws of the random shifts (stain)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--overwrite", action="store_true")
    add_json(p)
    p.set_defaults(func=cmd_robustness)


def cmd_robustness(args: argparse.Namespace) -> int:
    from ssl_blood.analysis.robustness import REPORTED_SEVERITY, robustness_report

    result = robustness_report(args.classifier, source_from_args(args) if source_given(args) else None,
                               args.out, args.split, csv_list(args.corruptions, flag="--corruptions"),
                               severity_list(args.severities), csv_list(args.adapt, flag="--adapt"),
                               args.labels, args.device, args.overwrite, args.seed, progress=None)
    if args.json:
        return print_json({k: v for k, v in result.items() if k != "rows"})
    print(f"{result['cells']} labelled cells, {len(result['corruptions'])} corruptions x "
          f"severities {','.join(map(str, result['severities']))}")
    for adapt, s in result["summary"].items():
        line = f"adapt {adapt}: clean {s['clean_accuracy']:.1%}"
        if f"mean_accuracy_severity{REPORTED_SEVERITY}" in s:
            line += (f", mean at severity {REPORTED_SEVERITY} {s[f'mean_accuracy_severity{REPORTED_SEVERITY}']:.1%}"
                     f" (worst {s['worst']['corruption']} {s['worst']['accuracy']:.1%}), shift warning on "
                     f"{s['warning_rate']:.0%} of them")
        print(line)
    print(f"wrote {Path(args.out) / 'robustness.csv'}, robustness.json and robustness.png")
    return 0


ADDERS = {"train-classifier": _add_train_classifier, "predict": _add_predict,
          "robustness": _add_robustness}
