"""Gateway: the public Recommender API. Validates, owns user state and deadlines, orchestrates
retrieval then ranking, and degrades instead of failing."""
