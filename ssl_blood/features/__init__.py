"""Frozen features: embedding a split, storing embeddings, the FAISS index, retrieval."""
