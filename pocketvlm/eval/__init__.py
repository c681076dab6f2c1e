"""pocketvlm.eval: quality measurements of loaded models (perplexity, VQA accuracy)."""
from .perplexity import PerplexityResult, evaluate_perplexity, perplexity, windows
from .vqa import EvalReport, EvalResult, evaluate, load_questions, pocketvlm_answerer, run_eval, transformers_answerer

__all__ = ["perplexity", "evaluate_perplexity", "PerplexityResult", "windows",
           "evaluate", "run_eval", "load_questions", "pocketvlm_answerer", "transformers_answerer",
           "EvalResult", "EvalReport"]
