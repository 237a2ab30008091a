"""An asyncio Redis toolkit for FastAPI services."""

__version__ = "0.1.0"
