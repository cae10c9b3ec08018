"""The servers the medops service is compared with: a plain FastAPI app and a constant ASGI app."""
