"""The browser demo page and the offline API docs: placeholder, being written (no routes yet)."""

from fastapi import APIRouter

router = APIRouter()
