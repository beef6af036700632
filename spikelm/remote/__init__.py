"""Thin modules referenced by a saved model's auto_map."""
