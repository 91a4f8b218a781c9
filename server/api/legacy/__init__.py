"""LM Studio's legacy REST API family, /api/v0: the OpenAI endpoints plus stats, model_info and runtime
(its routes are listed in server/app.py)."""
