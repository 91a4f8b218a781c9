"""LM Studio's native REST API family, /api/v1 (its routes are listed in server/app.py)."""
