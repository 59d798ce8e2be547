"""The HTTP routes: chat and completions, admin (health, models, metrics), embeddings."""
