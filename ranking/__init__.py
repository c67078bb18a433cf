"""A trained ranking stage after candidate retrieval: features, learning-to-rank rankers, MMR diversity."""
