"""Where the tests find the repository and their data, whichever folder a test lives in."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository
DATA = ROOT / "tests" / "data"  # files the tests read: official parameter listings, KServe's CRD, settings
