"""ssl-blood: self-supervised representation learning for blood-cell microscopy.

The tree is the data flow, each package importing only from those before it (docs/architecture.md):
core (errors, ui, files, device) -> data (sources -> catalogue -> decode -> CellData) -> model
(augment, backbones, inference, checkpoint) -> features (embeddings, index, retrieval) ->
methods -> training -> evaluation -> classify -> analysis -> cli. The public API is re-exported here lazily,
so `import ssl_blood` stays cheap:

>>> from ssl_blood import preset_config, pretrain
>>> result = pretrain(preset_config("quick"), "runs/quick")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_EXPORTS = {
    "DataSource": "data", "CellData": "data", "load_split": "data", "resolve_source": "data",
    "AugmentConfig": "model.augment", "BatchAugment": "model.augment", "ViewGroup": "model.augment",
    "build_backbone": "model.backbones", "backbone_names": "model.backbones",
    "load_checkpoint": "model.checkpoint", "load_backbone": "model.checkpoint",
    "export_backbone": "model.checkpoint",
    "Embedder": "features.embeddings", "EmbedderSpec": "features.embeddings",
    "Embeddings": "features.embeddings", "embed_splits": "features.embeddings",
    "CellIndex": "features.index",
    "Method": "methods", "register_method": "methods", "method_names": "methods",
    "PretrainConfig": "training.config", "preset_config": "training.config",
    "pretrain": "training.loop", "PretrainResult": "training.loop", "RunDir": "training.run_dir",
    "Classifier": "classify.classifier", "train_classifier": "classify.classifier",
    "ConsistencyConfig": "classify.consistency", "run_robustness": "analysis.robustness",
    "UserError": "errors", "RunFailed": "errors",
}
_RENAMED = {"register_method": "register"}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"ssl_blood.{_EXPORTS[name]}")
        return getattr(module, _RENAMED.get(name, name))
    raise AttributeError(f"module 'ssl_blood' has no attribute {name!r}")
