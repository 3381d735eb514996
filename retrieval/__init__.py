"""Retrieval service: candidate generation by ANN search in FAISS (BERT and CF spaces) plus popular items."""
