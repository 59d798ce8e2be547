"""The OpenAI-compatible HTTP server: app, state, protocol models, auth, metrics and routes."""
