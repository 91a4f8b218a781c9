"""The Anthropic-compatible API family: /v1/messages and /v1/messages/count_tokens (routes in server/app.py)."""
