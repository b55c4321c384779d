"""Scoring a candidate pool: pixel criteria reduced per patch, streamed and on a cluster, embeddings."""
