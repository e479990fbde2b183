"""`linear-probe`, `knn`, `few-shot`, `supervised`, `fine-tune`: how good the features are."""

from __future__ import annotations

import argparse
from pathlib import Path

from ssl_blood.cli.common import print_classifier, csv_list, add_data_args, source_from_args, source_given, add_json, print_json, embeddings_from_args


HELP = {  # one line per command for `ssl-blood --help`, which builds no command's flags
    "linear-probe": "logistic regression on frozen features",
    "knn": "weighted kNN accuracy (k=20, T=0.07)",
    "few-shot": "prototype / kNN / logistic heads with few labels",
    "supervised": "train the backbone end-to-end with labels (reference)",
    "fine-tune": "fine-tune a pretrained backbone on labelled cells",
}


def _add_eval_inputs(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="CKPT", help="embed train/val/test with it first")
    src.add_argument("--embeddings", metavar="EMB.npz", help="from ssl-blood embed (also baselines)")
    add_data_args(p)
    p.add_argument("--device", default="auto")
    add_json(p)
    p.set_defaults(baseline=None, backbone=None)


def _eval_embeddings(args: argparse.Namespace):
    from ssl_blood.features.embeddings import Embeddings

    if args.embeddings:
        return Embeddings.load(args.embeddings)
    return embeddings_from_args(args, ["train", "val", "test"])


def _eval_out_dir(args: argparse.Namespace) -> Path:
    from ssl_blood.training.run_dir import RunDir

    if args.out:
        return Path(args.out)
    if args.embeddings:
        return Path(args.embeddings).with_name(Path(args.embeddings).stem + "-eval")
    return RunDir(Path(args.checkpoint).parent).eval_dir


def _per_class_table(result: dict) -> str:
    lines = [f"{'class':24}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}"]
    for name, m in result["per_class"].items():
        lines.append(f"{name[:24]:24}{m['precision']:>10.4f}{m['recall']:>10.4f}{m['f1']:>10.4f}"
                     f"{m['support']:>9}")
    return "\n".join(lines)


def _clusters_line(c: dict) -> str:
    return f"k-means (k={c['k']}) on test: NMI {c['nmi']:.4f}  ARI {c['ari']:.4f}  purity {c['purity']:.4f}"


def _add_linear_probe(sub) -> None:
    p = sub.add_parser("linear-probe", help=HELP["linear-probe"],
                       description="Multinomial logistic regression on frozen features; weight decay "
                                   "chosen on val, test scored once; k-means cluster metrics of "
                                   "test. Writes linear_probe.json and confusion_matrix.png to "
                                   "--out (default: RUN/eval, or beside the embeddings).")
    _add_eval_inputs(p)
    _add_own_labels(p, "scored by stratified cross-validation on them instead of the data's splits")
    p.add_argument("--out", metavar="DIR")
    p.set_defaults(func=cmd_linear_probe)


def _cmd_probe_own_labels(args: argparse.Namespace) -> int:
    from ssl_blood.classify.classifier import cross_validated_probe
    from ssl_blood.files import check_writable, write_json

    checkpoint = _own_labels_checkpoint(args)
    out = check_writable(_eval_out_dir(args), folder=True)
    result = cross_validated_probe(checkpoint, args.labels,
                                   source_from_args(args) if source_given(args) else None,
                                   args.split, device=args.device, progress=None)
    out.mkdir(parents=True, exist_ok=True)
    write_json(result, out / "linear_probe_labels.json")
    if args.json:
        return print_json(result)
    low, high = result["accuracy_ci95"]
    print(f"linear probe on your {sum(result['labels_per_class'].values())} labelled cells "
          f"({result['protocol']}; weight decay {result['weight_decay']:g})\n"
          f"  ACC {result['accuracy']:.4f} (95 % CI {low:.4f}-{high:.4f})   balanced ACC "
          f"{result['balanced_accuracy']:.4f}")
    _print_own_labels(result, {"linear probe": result})
    print(f"\nwrote {out / 'linear_probe_labels.json'}")
    return 0


def cmd_linear_probe(args: argparse.Namespace) -> int:
    from ssl_blood.evaluation.frozen import probe_embeddings
    from ssl_blood.analysis.plots import confusion_matrix_png
    from ssl_blood.files import check_writable, write_json

    if args.labels:
        return _cmd_probe_own_labels(args)
    out = check_writable(_eval_out_dir(args), folder=True)  # before minutes of work
    emb = _eval_embeddings(args)
    result = probe_embeddings(emb, progress=None)
    result["confusion_matrix_png"] = str(confusion_matrix_png(
        result["confusion_matrix"], emb.class_names, out / "confusion_matrix.png",
        f"Linear probe, test: {emb.name}"))
    write_json(result, out / "linear_probe.json")
    if args.json:
        return print_json(result)
    auc = "n/a" if result["test_auc"] is None else f"{result['test_auc']:.4f}"
    subset = f" (subset: limit {emb.subset['limit']})" if emb.subset else ""
    print(f"linear probe on {emb.name}{subset} (weight decay {result['weight_decay']:g}, chosen on val)\n"
          f"  val ACC {result['val_acc']:.4f}   test ACC {result['test_acc']:.4f}   test AUC {auc}\n"
          f"  balanced ACC {result['balanced_acc']:.4f}   macro-F1 {result['macro_f1']:.4f}\n"
          f"  {_clusters_line(result['test_clusters'])}\n")
    print(_per_class_table(result))
    print(f"\nwrote {out / 'linear_probe.json'} and {result['confusion_matrix_png']}")
    return 0


def _add_knn(sub) -> None:
    from ssl_blood.features.neighbours import KNN_K, KNN_TEMPERATURE

    p = sub.add_parser("knn", help=HELP["knn"],
                       description="DINO's weighted cosine kNN: train split as gallery (a train "
                                   "query never counts itself); k-means cluster metrics too.")
    _add_eval_inputs(p)
    p.add_argument("--k", type=int, default=KNN_K)
    p.add_argument("--temperature", type=float, default=KNN_TEMPERATURE)
    p.add_argument("--split", default="test", help="query split (default test)")
    p.set_defaults(func=cmd_knn)


def cmd_knn(args: argparse.Namespace) -> int:
    from ssl_blood.evaluation.frozen import knn_embeddings

    emb = _eval_embeddings(args)
    result = knn_embeddings(emb, args.k, args.temperature, args.split)
    if args.json:
        return print_json(result)
    auc = "n/a" if result["auc"] is None else f"{result['auc']:.4f}"
    print(f"weighted kNN (k={args.k}, T={args.temperature}) on {emb.name}, train gallery, "
          f"{args.split} queries\n  ACC {result['acc']:.4f}   AUC {auc}   balanced ACC "
          f"{result['balanced_acc']:.4f}   macro-F1 {result['macro_f1']:.4f}\n"
          f"  {_clusters_line(result[args.split + '_clusters'])}\n")
    print(_per_class_table(result))
    return 0


def _add_few_shot(sub) -> None:
    from ssl_blood.evaluation.frozen import FEW_SHOT_HEADS

    p = sub.add_parser("few-shot", help=HELP["few-shot"],
                       description="Heads trained on small class-balanced labelled sets from train; "
                                   "per setting the head with the best val accuracy is scored on "
                                   "test (mean and 95 %% CI over episodes); every head's numbers "
                                   "are listed too.")
    _add_eval_inputs(p)
    p.add_argument("--shots", default="1,5,10,20", help="labels per class (comma-separated)")
    p.add_argument("--fractions", default="0.01,0.1", help="class-balanced fractions of train")
    p.add_argument("--heads", default=",".join(FEW_SHOT_HEADS))
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    _add_own_labels(p, "every head scored by stratified cross-validation on them instead of the "
                       "data's splits; --shots/--fractions/--episodes do not apply")
    p.set_defaults(func=cmd_few_shot)


def _add_own_labels(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--labels", metavar="FILE.csv",
                   help=f"your own labels (path or id, label; as select writes): {what} "
                        f"(needs --checkpoint)")
    p.add_argument("--split", help="with --labels: the split holding the cells (default train)")


def _own_labels_checkpoint(args: argparse.Namespace) -> str:
    from ssl_blood.errors import UserError

    if not args.checkpoint:
        raise UserError("`labels` are scored on features embedded from `checkpoint`; give "
                        "`checkpoint` instead of `embeddings`", param=("labels", "checkpoint"))
    return args.checkpoint


def _print_own_labels(result: dict, heads: dict[str, dict]) -> None:
    """Labels, then each head's cross-validated recall per class."""
    print(f"{'class':24}{'labels':>8}" + "".join(f"{h + ' recall':>18}" for h in heads))
    for name, n in result["labels_per_class"].items():
        print(f"{name[:24]:24}{n:>8}" + "".join(f"{m['recall'][name]:>18.4f}" for m in heads.values()))


def _cmd_few_shot_own_labels(args: argparse.Namespace) -> int:
    from ssl_blood.classify.classifier import cross_validated_few_shot

    result = cross_validated_few_shot(_own_labels_checkpoint(args), args.labels,
                                      source_from_args(args) if source_given(args) else None,
                                      args.split, heads=csv_list(args.heads), seed=args.seed,
                                      device=args.device, progress=None)
    if args.json:
        return print_json(result)
    print(f"few-shot heads on your {sum(result['labels_per_class'].values())} labelled cells "
          f"({result['protocol']}); best head (*) chosen on the same folds")
    print(f"{'head':12}{'ACC':>8}{'95 % CI':>16}{'balanced ACC':>14}")
    for head, m in result["heads"].items():
        low, high = m["accuracy_ci95"]
        print(f"{head + ('*' if head == result['head'] else ''):12}{m['accuracy']:>8.4f}"
              f"{f'{low:.4f}-{high:.4f}':>16}{m['balanced_accuracy']:>14.4f}")
    print()
    _print_own_labels(result, result["heads"])
    return 0


def cmd_few_shot(args: argparse.Namespace) -> int:
    from ssl_blood.evaluation.frozen import few_shot_embeddings

    if args.labels:
        return _cmd_few_shot_own_labels(args)
    emb = _eval_embeddings(args)
    result = few_shot_embeddings(emb, progress=None, shots=csv_list(args.shots, int, "--shots"),
                                 fractions=csv_list(args.fractions, float, "--fractions"),
                                 heads=csv_list(args.heads), episodes=args.episodes, seed=args.seed)
    if args.json:
        return print_json(result)
    print(f"few-shot on {emb.name}: test accuracy, mean and 95 % CI over {args.episodes} "
          f"episodes; head chosen on val (*)")
    print(f"{'setting':16}{'labels':>7}  {'head':11}{'val acc':>9}{'test acc':>10}{'ci95':>9}")
    for r in result["results"]:
        for head, h in r["heads"].items():
            mark = "*" if head == r["head"] else " "
            ci = "" if h["test_ci95"] is None else f"±{h['test_ci95']:.4f}"
            print(f"{r['setting']:16}{r['labels']:>7}  {head + mark:11}{h['val_acc']:>9.4f}"
                  f"{h['test_acc']:>10.4f}{ci:>9}")
    return 0


def _add_labelled_subset(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--fraction", type=float, help="class-balanced fraction of the labelled "
                                                      "train cells (the subsets few-shot draws)")
    group.add_argument("--shots", type=int, help="labelled train cells per class")


def _add_supervised(sub) -> None:
    from ssl_blood.model.backbones import STEMS, backbone_names

    p = sub.add_parser("supervised", help=HELP["supervised"],
                       description="MedMNIST v2 protocol: Adam 1e-3, x0.1 at 50 %% and 75 %% of the "
                                   "epochs, batch 128; best val epoch scored once on test. With "
                                   "--fraction/--shots: the same labelled subset fine-tune uses.")
    p.add_argument("--backbone", choices=backbone_names(), default="resnet18")
    p.add_argument("--stem", choices=STEMS, default="auto")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--augment", choices=["none", "device"], default="none",
                   help="none: the MedMNIST protocol; device: the batched augmentation")
    _add_labelled_subset(p)
    add_data_args(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="DIR", help="write supervised.json and checkpoint.pt here")
    p.add_argument("--overwrite", action="store_true")
    add_json(p)
    p.set_defaults(func=cmd_supervised)


def _training_summary(result: dict, what: str) -> str:
    auc = "n/a" if result["test_auc"] is None else f"{result['test_auc']:.4f}"
    return (f"{what} on {result['labels']} labelled cells ({result['device']}, "
            f"{result['seconds']:.0f} s): best val ACC {result['val_acc']:.4f} at epoch "
            f"{result['best_epoch']}; test ACC {result['test_acc']:.4f}, test AUC {auc}")


def cmd_supervised(args: argparse.Namespace) -> int:
    from ssl_blood.evaluation.supervised import SupervisedConfig, train_supervised

    cfg = SupervisedConfig(backbone=args.backbone, stem=args.stem, epochs=args.epochs,
                           batch_size=args.batch_size, lr=args.lr, augment=args.augment == "device",
                           data=source_from_args(args).to_dict(), fraction=args.fraction, shots=args.shots,
                           limit=args.limit, seed=args.seed, device=args.device)
    result = train_supervised(cfg, args.out, overwrite=args.overwrite)
    if args.json:
        return print_json({k: v for k, v in result.items() if k != "history"})
    print(_training_summary(result, f"supervised {cfg.backbone}, {cfg.epochs} epochs"))
    return 0


def _add_fine_tune(sub) -> None:
    p = sub.add_parser("fine-tune", help=HELP["fine-tune"],
                       description="The pretrained backbone plus a linear head (started from the "
                                   "logistic regression of its frozen features), trained end to end "
                                   "with the device augmentation on labelled train cells; learning "
                                   "rate, backbone-lr ratio and epoch chosen on val, test scored "
                                   "once. Compare with: ssl-blood supervised --fraction F.")
    p.add_argument("--checkpoint", required=True, metavar="CKPT")
    _add_labelled_subset(p)
    p.add_argument("--epochs", type=int, default=30, help="at most; the best val epoch is kept")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lrs", default="3e-4,1e-3", help="head learning rates to try (AdamW)")
    p.add_argument("--backbone-lr-ratios", default="0.1,1", help="backbone lr / head lr to try")
    p.add_argument("--stain", type=float, default=0.0,
                   help="HED stain jitter of the training views (0.2: about another lab's H&E balance)")
    p.add_argument("--labels", metavar="FILE.csv",
                   help="your own labels: no val split is cut from them; the classifier's "
                        "fine-tune head is trained instead (as train-classifier --head fine-tune, "
                        "the logistic head and calibration by cross-validation) and kept in --out")
    p.add_argument("--steps", type=int, help="with --labels: training steps (default 500)")
    add_data_args(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="DIR", help="write fine_tune.json and checkpoint.pt here")
    p.add_argument("--overwrite", action="store_true")
    add_json(p)
    p.set_defaults(func=cmd_fine_tune)


def _cmd_fine_tune_own_labels(args: argparse.Namespace) -> int:
    from ssl_blood.classify.classifier import train_classifier
    from ssl_blood.errors import UserError

    if not args.out:
        raise UserError("with `labels` the fine-tuned classifier is kept: give `out` (a folder)",
                        param=("labels", "out"))
    model = train_classifier(args.checkpoint, args.out,
                             source_from_args(args) if source_given(args) else None, args.labels,
                             fraction=args.fraction, shots=args.shots, head="fine-tune",
                             seed=args.seed, device=args.device,
                             overwrite=args.overwrite, progress=None, stain=args.stain,
                             steps=args.steps)
    return print_classifier(model.card, args.out, args.json,
                            f"; classify new cells with ssl-blood predict --classifier {args.out}")


def cmd_fine_tune(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ssl_blood.evaluation.supervised import FineTuneConfig, fine_tune

    if args.labels:
        return _cmd_fine_tune_own_labels(args)
    cfg = FineTuneConfig(epochs=args.epochs, batch_size=args.batch_size,
                         augment_config=replace(FineTuneConfig().augment_config, stain=args.stain),
                         lrs=tuple(csv_list(args.lrs, float, "--lrs")),
                         backbone_lr_ratios=tuple(csv_list(args.backbone_lr_ratios, float,
                                                       "--backbone-lr-ratios")),
                         data=source_from_args(args).to_dict() if source_given(args) else None,
                         fraction=args.fraction, shots=args.shots, limit=args.limit,
                         seed=args.seed, device=args.device)
    result = fine_tune(args.checkpoint, cfg, args.out, overwrite=args.overwrite)
    if args.json:
        return print_json({k: v for k, v in result.items() if k != "history"})
    c = result["chosen"]
    print(_training_summary(result, "fine-tuned") +
          f"\n  chosen on val: lr {c['lr']:g}, backbone lr x{c['backbone_lr_ratio']:g}; the "
          f"initial linear probe of the same cells: test ACC {result['initial_probe_test_acc']:.4f}")
    return 0


ADDERS = {"linear-probe": _add_linear_probe, "knn": _add_knn, "few-shot": _add_few_shot, "supervised": _add_supervised, "fine-tune": _add_fine_tune}
