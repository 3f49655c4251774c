"""Optuna studies whose trials are federations (not built yet: see the tuning issue)."""
