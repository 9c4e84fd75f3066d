"""Load tests for segserve: open-loop Poisson load, request mixes, baselines, and a report with plots.

Run the whole report with `python -m loadtest run` (or `segserve loadtest run`); see `loadtest.cli`.
"""
