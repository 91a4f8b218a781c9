"""The OpenAI-compatible API family: /v1/models, chat completions, completions, embeddings, responses
(its routes are listed in server/app.py)."""
