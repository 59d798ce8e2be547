"""Inference: the decode core (engine), sampling, the KV block pool, the scheduler, constrained decoding, embeddings."""
