"""Training and evaluation of the fusion nets (never imported by a serving replica)."""
