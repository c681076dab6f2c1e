"""pocketvlm.eval: quality measurements of loaded models (perplexity)."""
from .perplexity import PerplexityResult, evaluate_perplexity, perplexity, windows

__all__ = ["perplexity", "evaluate_perplexity", "PerplexityResult", "windows"]
