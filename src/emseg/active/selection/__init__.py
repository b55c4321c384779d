"""Choosing a batch from a scored pool: top-k, diversity (k-means, k-center), hybrid."""
