"""Stage 2, data: capture a synthetic BOP dataset (capture.py), read any BOP dataset (bop.py), QA its labels (qa.py)."""
