"""LM Studio's legacy REST API family (/api/v0)."""

from fastapi import APIRouter

router = APIRouter(prefix="/api/v0")
