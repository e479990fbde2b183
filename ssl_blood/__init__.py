"""ssl-blood: self-supervised representation learning for blood-cell microscopy.

Data flow, one module each: data (folders) -> augment -> models -> methods -> train
(checkpoint, runs) -> embed -> index -> retrieval / evaluate / supervised / select / qc ->
plots / umap_ig / explore -> analysis / report -> cli. The public API is re-exported here lazily,
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
    "AugmentConfig": "augment", "BatchAugment": "augment", "ViewGroup": "augment",
    "build_backbone": "models", "backbone_names": "models",
    "Method": "methods", "register_method": "methods", "method_names": "methods",
    "PretrainConfig": "config", "preset_config": "config",
    "pretrain": "train", "PretrainResult": "train",
    "load_checkpoint": "checkpoint", "load_backbone": "checkpoint", "export_backbone": "checkpoint",
    "RunDir": "runs",
    "Embedder": "embed", "EmbedderSpec": "embed", "Embeddings": "embed", "embed_splits": "embed",
    "CellIndex": "index",
    "UserError": "errors", "RunFailed": "errors",
}
_RENAMED = {"register_method": "register"}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"ssl_blood.{_EXPORTS[name]}")
        return getattr(module, _RENAMED.get(name, name))
    raise AttributeError(f"module 'ssl_blood' has no attribute {name!r}")
