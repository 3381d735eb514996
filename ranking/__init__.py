"""Ranking service: fused deep model on Triton, then a LightGBM diversity re-ranker."""
