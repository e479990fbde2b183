"""Looking at the cells: selection, quality control, UMAP, plots, the explorer and the run report."""
