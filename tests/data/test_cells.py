"""CellData: the cells of one split, their labels and their subsets."""

import numpy as np
import torch

from ssl_blood.data.cells import CellData


def test_labelled_only_at_keeps_every_cell_and_the_labels_of_the_rows_given():
    cells = CellData(torch.zeros(5, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1, 2, 1, 0]),
                     torch.arange(5), "train", ("a", "b", "c"), None)
    few = cells.labelled_only_at(np.array([1, 4]))
    assert len(few) == 5 and few.labels.tolist() == [-1, 1, -1, -1, 0]
    assert few.class_names == ("a", "b", "c") and torch.equal(few.images, cells.images)
    assert cells.labels.tolist() == [0, 1, 2, 1, 0]  # the original keeps its labels
