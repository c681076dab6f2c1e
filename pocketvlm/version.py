"""The version of pocketvlm (its own module: the package writers record it without importing the API)."""
__version__ = "0.1.0"
