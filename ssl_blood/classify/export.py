"""A classifier as one ONNX graph: uint8 images (N, C, H, W) in, calibrated class probabilities
out (preprocessing, the classifier's dihedral views, backbone, their average, standardisation,
head, temperature, softmax; an ensemble classifier's models averaged), a dynamic batch axis, and the class names and thresholds in the
model's metadata; runs with onnxruntime alone. The head is the one for slides as they are (the
AdaBN head needs BatchNorm re-estimated on each slide, which a fixed graph cannot do)."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from ssl_blood.classify.classifier import Classifier, LinearHead
from ssl_blood.errors import UserError
from ssl_blood.files import check_writable, refuse_existing, write_bytes
from ssl_blood.model.augment import eval_preprocess
from ssl_blood.model.inference import dihedral_views

ONNX_OPSET = 17


class _Model(nn.Module):
    """One backbone and its standardised head, to calibrated probabilities."""

    def __init__(self, backbone: nn.Module, head: LinearHead, temperature: float, views: int):
        super().__init__()
        self.backbone = backbone.float().eval()
        self.register_buffer("feature_mean", head["mean"].float())
        self.register_buffer("feature_std", head["std"].float())
        self.head = nn.Linear(head["weight"].shape[1], head["weight"].shape[0])
        self.head.weight.data, self.head.bias.data = head["weight"].float(), head["bias"].float()
        self.temperature, self.views = float(temperature), views

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(dihedral_views(x, self.views)).reshape(self.views, x.shape[0], -1).mean(0)
        logits = self.head((features - self.feature_mean) / self.feature_std)
        return torch.softmax(logits / self.temperature, dim=1)


class _Graph(nn.Module):
    """Preprocessing, then the classifier's model, or the average of an ensemble's (each at
    temperature 1, as `Classifier.ensemble_probabilities`)."""

    def __init__(self, classifier: Classifier):
        super().__init__()
        spec = classifier.embedder.spec
        self.mean, self.std, self.size = list(spec.mean), list(spec.std), int(spec.input_size)
        temperature = 1.0 if classifier.members else classifier.temperature
        self.models = nn.ModuleList(
            [_Model(classifier.embedder.model, classifier.head, temperature, classifier.views)]
            + [_Model(m.embedder.model, m.head, 1.0, classifier.views) for m in classifier.members])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = eval_preprocess(images, self.mean, self.std, self.size)
        return torch.stack([model(x) for model in self.models]).mean(0)


def export_onnx(classifier: str | Path, out: str | Path, overwrite: bool = False) -> dict:
    """Write `classifier` (a train-classifier folder) as ONNX to `out`; returns what was written."""
    try:
        import onnx
    except ImportError:
        raise UserError("ONNX export needs onnx: pip install 'ssl-blood[onnx]'", param="format") from None
    out = check_writable(refuse_existing(out, overwrite), folder=False)
    model = Classifier.load(classifier, "cpu")
    if model.embedder.spec.kind != "checkpoint":
        raise UserError("only a classifier on a pretrained backbone can be exported", param="classifier")
    graph = _Graph(model).eval()
    spec = model.embedder.spec
    example = torch.zeros(2, spec.channels, spec.image_size, spec.image_size, dtype=torch.uint8)
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter: the dynamo one needs onnxscript
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (example,), buffer, input_names=["images"],
                          output_names=["probabilities"], opset_version=ONNX_OPSET, dynamo=False,
                          dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}})
    proto = onnx.load_from_string(buffer.getvalue())
    meta = {"class_names": json.dumps(list(model.class_names)),
            "thresholds": json.dumps(model.ensemble["thresholds"] if model.members else model.thresholds),
            "temperature": str(1.0 if model.members else model.temperature),
            "views": str(model.views), "models": str(1 + len(model.members)),
            "input": f"uint8 (N, {spec.channels}, {spec.image_size}, {spec.image_size})",
            "producer": "ssl-blood"}
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    write_bytes(out, proto.SerializeToString())
    return {"out": str(out), "classes": list(model.class_names), "opset": ONNX_OPSET}
