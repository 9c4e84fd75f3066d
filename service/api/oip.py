"""Open Inference Protocol (KServe v2) over HTTP: placeholder, being written (no routes yet)."""

from fastapi import APIRouter

router = APIRouter()
