"""Synthetic scenes for training and evaluating a small VLM: shapes, one word or number, bar charts.

Data generation only (PIL, numpy, tqdm): training and evaluation import this package, never the
other way round. Each scene is a pure function of (seed, index); the default evaluation seed (1)
differs from the default training seed (0), so evaluation scenes are held out.

    scene = make_scene(seed=0, index=7)        # .image, .caption, .qa, .kind, .objects, .text, .bars
    write_dataset("data/scenes", 6000)         # images/, captions.json, instruct.json (LLaVA format)
    write_eval("data/scenes-eval", per_type=200)   # images/, questions.jsonl

Answer conventions are in :mod:`pocketvlm.scenes.questions`.
"""
from .dataset import Scene, make_scene, write_dataset, write_eval
from .questions import ANSWER_SUFFIX, CAPTION_REQUESTS, QUESTION_TYPES, QA, WORDS, chat_answer
from .render import COLOURS, SHAPES

__all__ = ["Scene", "QA", "make_scene", "write_dataset", "write_eval", "chat_answer", "ANSWER_SUFFIX",
           "CAPTION_REQUESTS", "QUESTION_TYPES", "WORDS", "COLOURS", "SHAPES"]
