"""ssl-blood: self-supervised representation learning for blood-cell microscopy.

Data flow, one module each: data -> augment -> models -> methods -> train (checkpoint) ->
embed -> index -> evaluate -> plots / umap_ig -> report -> cli. The public API is re-exported
here lazily, so `import ssl_blood` stays cheap:

>>> from ssl_blood import preset_config, pretrain
>>> result = pretrain(preset_config("quick"), "runs/quick")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "DataSource": "data", "CellData": "data", "load_split": "data", "resolve_source": "data",
    "AugmentConfig": "augment", "BatchAugment": "augment",
    "build_backbone": "models", "backbone_names": "models",
    "SimCLR": "methods", "DINO": "methods",
    "PretrainConfig": "config", "preset_config": "config",
    "pretrain": "train", "PretrainResult": "train",
    "load_checkpoint": "checkpoint", "load_backbone": "checkpoint", "export_backbone": "checkpoint",
    "Embedder": "embed", "Embeddings": "embed", "embed_splits": "embed",
    "CellIndex": "index",
    "UserError": "errors", "RunFailed": "errors",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"ssl_blood.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'ssl_blood' has no attribute {name!r}")
