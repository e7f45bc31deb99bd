"""qwenjax's OpenAI-compatible HTTP server: `python -m server --model ...` (see server/README.md)."""
