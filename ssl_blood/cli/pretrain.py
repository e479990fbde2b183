"""`pretrain` and `export`: a run folder in, a checkpoint out."""

from __future__ import annotations

import argparse
from pathlib import Path

from ssl_blood.cli.common import add_data_args, source_from_args, source_given
from ssl_blood.errors import UserError


HELP = {  # one line per command for `ssl-blood --help`, which builds no command's flags
    "pretrain": "pretrain a backbone with SimCLR or DINO",
    "export": "write the backbone's plain state_dict, or a classifier as ONNX",
}


_PRETRAIN_FLAGS = {  # argparse dest -> config field
    "method": "method", "backbone": "backbone", "stem": "stem", "epochs": "epochs",
    "batch_size": "batch_size", "optimizer": "optimizer", "lr": "lr",
    "weight_decay": "weight_decay", "warmup_epochs": "warmup_epochs",
    "input_size": "input_size", "limit": "limit", "seed": "seed", "device": "device",
    "knn_every": "knn_every", "precision": "precision", "stream": "stream", "minutes": "minutes",
}


def _add_pretrain(sub) -> None:
    from ssl_blood.training.config import OPTIMIZERS, PRECISIONS, PRESETS, STREAMING
    from ssl_blood.methods import method_names
    from ssl_blood.model.backbones import STEMS, backbone_names

    p = sub.add_parser("pretrain", help=HELP["pretrain"],
                       description="Pretrain a backbone self-supervised; writes OUT/checkpoint.pt, "
                                   "OUT/config.json, OUT/metrics.jsonl (atomically, every epoch).")
    p.add_argument("--method", choices=method_names(), help="default simclr")
    p.add_argument("--preset", choices=PRESETS,
                   help="quick: CPU, ~10 min (default without a GPU); standard: CPU, ~1 hour; full: "
                        "ResNet-18 on a GPU (default with one). Epochs scale with the data's size")
    p.add_argument("--config", metavar="FILE", help="start from a config.json instead of a preset")
    p.add_argument("--epochs", type=int)
    p.add_argument("--minutes", type=float,
                   help="time budget: measures a few steps on this machine, then sizes the epochs "
                        "(and the learning-rate schedule) to end within it, and says when")
    p.add_argument("--batch-size", type=int, help="global batch size")
    p.add_argument("--backbone", choices=backbone_names())
    p.add_argument("--stem", choices=STEMS, help="downsampling before the body (auto: by image size)")
    p.add_argument("--optimizer", choices=OPTIMIZERS)
    p.add_argument("--lr", type=float, help="learning rate at batch 256 (scaled linearly)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-epochs", type=int)
    p.add_argument("--input-size", type=int, help="side of the views the model sees "
                                                  "(default: the image size)")
    p.add_argument("--knn-every", type=int, help="epochs between kNN checks on val")
    add_data_args(p)
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--seed", type=int)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="auto: bf16 autocast on CUDA and on CPUs with fast bf16 (default)")
    p.add_argument("--stream", choices=STREAMING,
                   help="train split resident on the device, or read per batch (auto: by size)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any config setting, e.g. --set augment.hue=0.1 --set dino.output_dim=8192")
    p.add_argument("--out", metavar="DIR", help="run folder (default runs/METHOD-PRESET)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument("--force", action="store_true", help="with --resume: allow another --precision")
    p.set_defaults(func=cmd_pretrain)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from ssl_blood.training.config import apply_settings, default_run_dir, parse_settings
    from ssl_blood.training.recipe import build_config
    from ssl_blood.device import resolve_device
    from ssl_blood.training.loop import pretrain, resume_config

    overrides = {field: getattr(args, dest) for dest, field in _PRETRAIN_FLAGS.items()
                 if getattr(args, dest) is not None}
    if args.compile:
        overrides["compile"] = True
    if args.resume:
        if not args.out:
            raise UserError("--resume needs --out, the run folder to continue")
        if source_given(args):
            overrides["data"] = source_from_args(args).to_dict()
        cfg = resume_config(args.out, overrides)
        if args.preset is not None and args.preset != cfg.preset:
            raise UserError(f"--resume: the run used --preset {cfg.preset}, not {args.preset}")
    else:
        cfg = build_config(args.preset, args.method, args.config, overrides, source_from_args(args),
                           resolve_device(args.device or "auto").type)
    if args.set:
        cfg = apply_settings(cfg, parse_settings(args.set))
    out = Path(args.out) if args.out else default_run_dir(cfg)
    args.out = str(out)  # an interrupted run names it in its resume hint
    result = pretrain(cfg, out, resume=args.resume, overwrite=args.overwrite, force=args.force)
    last = result.history[-1] if result.history else {}
    knn = f", kNN val acc {last['knn_val_acc']:.4f}" if "knn_val_acc" in last else ""
    print(f"saved {out / 'checkpoint.pt'} (epoch {last.get('epoch', '?')}, loss "
          f"{last.get('loss', float('nan')):.4f}{knn})")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help=HELP["export"],
                       description="Write the evaluation backbone of a checkpoint as a plain "
                                   "state_dict that loads without ssl-blood (see docs/user-guide.md), "
                                   "or a classifier (train-classifier's folder) as one ONNX graph: "
                                   "uint8 images in, calibrated probabilities out.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", metavar="CKPT")
    which.add_argument("--classifier", metavar="DIR")
    p.add_argument("--format", choices=("state-dict", "onnx"), help="default: state-dict for a "
                   "checkpoint, onnx for a classifier")
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from ssl_blood.errors import UserError
    from ssl_blood.model.checkpoint import export_backbone

    if args.classifier:
        from ssl_blood.classify.export import export_onnx

        if args.format == "state-dict":
            raise UserError("a classifier exports as --format onnx")
        info = export_onnx(args.classifier, args.out, args.overwrite)
        print(f"wrote {info['out']}: ONNX (opset {info['opset']}), classes {', '.join(info['classes'])}")
        return 0
    if args.format == "onnx":
        raise UserError("--format onnx exports a classifier: give --classifier DIR")
    info = export_backbone(args.checkpoint, args.out, args.overwrite)
    print(f"wrote {info['out']}: {info['backbone']} (stem {info['stem']}) state_dict, "
          f"{info['parameters']:,} parameters; input {info['input_size']} px, normalise with mean "
          f"{[round(m, 4) for m in info['mean']]} std {[round(s, 4) for s in info['std']]}")
    return 0


ADDERS = {"pretrain": _add_pretrain, "export": _add_export}
