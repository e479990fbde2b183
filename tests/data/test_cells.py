"""CellData: the cells of one split, their labels and their subsets."""

import numpy as np
import pytest
import torch

from ssl_blood.data.cells import CellData


def test_labelled_only_at_keeps_every_cell_and_the_labels_of_the_rows_given():
    cells = CellData(torch.zeros(5, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1, 2, 1, 0]),
                     torch.arange(5), "train", ("a", "b", "c"), None)
    few = cells.labelled_only_at(np.array([1, 4]))
    assert len(few) == 5 and few.labels.tolist() == [-1, 1, -1, -1, 0]
    assert few.class_names == ("a", "b", "c") and torch.equal(few.images, cells.images)
    assert cells.labels.tolist() == [0, 1, 2, 1, 0]  # the original keeps its labels


def test_with_images_keeps_the_cells_and_drops_their_cache_file(tmp_path):
    """Shifted pixels of the same cells (robustness, new_lab): labels, ids and names kept, and no
    decode cache behind them, which would otherwise be streamed instead of the new pixels."""
    cells = CellData(torch.zeros(3, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1, 2]), torch.arange(3),
                     "test", ("a", "b", "c"), None, {"path": np.array(["x.png", "y.png", "z.png"])},
                     image_file=tmp_path / "cache.u8", row_offset=7)
    moved = cells.with_images(np.full((3, 3, 4, 4), 9, dtype=np.uint8))
    assert moved.image_file is None and moved.row_offset == 0 and int(moved.images.sum()) == 9 * 3 * 3 * 16
    assert moved.labels.tolist() == [0, 1, 2] and list(moved.cell_names) == ["x.png", "y.png", "z.png"]
    assert cells.image_file is not None and int(cells.images.sum()) == 0  # the original untouched
    with pytest.raises(ValueError, match="images"):
        cells.with_images(np.zeros((2, 3, 4, 4), dtype=np.uint8))
