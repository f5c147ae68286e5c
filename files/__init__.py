"""Helpers that run on the target host (python3 standard library only), uploaded by the deploy.
This file only makes the folder the package llmhost.files; it is never uploaded."""
