"""Cells in, `CellData` out: sources (BloodMNIST, .npz, image folders, CSV manifests) listed into
catalogues, decoded once into a cache, and served as one shape of data whatever the source."""

from ssl_blood.data.catalogue import DEFAULT_FRACTIONS, Catalogue
from ssl_blood.data.cells import SPLITS, CellData, cell_names, channel_stats, stratified_indices
from ssl_blood.data.sources import (LAYOUTS, SIZE_RANGE, DataSource, FileSource, available_splits,
                                    default_split, load_split, resolve_source, source_classes)
from ssl_blood.data.sources.bloodmnist import (BLOODMNIST_SIZES, ENV_DATA_ROOT, default_data_root,
                                               medmnist_info)

__all__ = ["BLOODMNIST_SIZES", "Catalogue", "CellData", "DEFAULT_FRACTIONS", "DataSource",
           "ENV_DATA_ROOT", "FileSource", "LAYOUTS", "SIZE_RANGE", "SPLITS", "available_splits",
           "cell_names", "channel_stats", "default_data_root", "default_split", "load_split",
           "medmnist_info", "resolve_source", "source_classes", "stratified_indices"]
