"""Generation on token ids and embeddings: no text, no images, no templates here.

A :class:`Slot` owns one preallocated KV cache (one conversation). Each call prefills only the part of the
prompt that differs from what the cache already holds (multi-turn chat reuses its prefix), in chunks of
``prefill_chunk_size``, then decodes one token at a time. Generation is a generator of token ids.

Prompt positions are described by ``keys``: a token id, or for an image position a hashable tag such as
``("img", sha256, row)``, so that two different images behind the same placeholder token never share cache.

Exact reuse (``Slot.exact_reuse``, what the server's slots use for greedy requests): the numbers of a cached
position depend on how it was computed (which chunk it was in, how many rows that chunk had, prefill or
decode), so reusing any prefix can change a greedy answer. An exact slot reuses only whole prefill chunks
that a fresh prefill of the new prompt would compute identically (same start, same rows), so its greedy
answer is the one a fresh slot gives, whatever ran in it before.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from ..errors import ContextWindowError
from .sampling import SamplingParams, make_generator, sample
from .speculative import PromptLookup

# (start, end) -> inputs_embeds [1, end-start, hidden] for prompt positions [start, end)
EmbedFn = Callable[[int, int], torch.Tensor]


@dataclass
class StepResult:
    token: int
    finish_reason: str | None = None  # "stop" (EOS / stop id) or "length", set on the last token


class Slot:
    def __init__(self, model, context_window_size: int, prefill_chunk_size: int = 512, dtype=None, device=None,
                 decode_step: Callable | None = None):
        self.model = model
        self.context_window_size = context_window_size
        self.prefill_chunk_size = prefill_chunk_size
        self.cache = model.make_cache(1, context_window_size, dtype=dtype, device=device)
        self.keys: list = []  # what the cache holds, position by position
        self.exact_reuse = False  # greedy requests reuse only whole prefill chunks (module docstring)
        self._canonical = 0  # leading positions whose cache equals a fresh chunked prefill's
        self.decode_step = decode_step  # optional compiled single-token step
        self.max_draft = 7  # speculative greedy decoding: draft tokens per verification (0: off; speculative.py)
        self.defer_decode = False  # a scheduler batches this slot's decodes with other slots' (decode_pending)
        self.pending_token: int | None = None  # a deferred decode not run yet
        self._batched: torch.Tensor | None = None  # its logits, once decode_pending ran it
        p = next(model.parameters())
        self.device = p.device

    def reset(self) -> None:
        self.keys = []
        self._canonical = 0
        self.pending_token, self._batched = None, None

    def _forward(self, ids: torch.Tensor | None, embeds: torch.Tensor | None, start: int, logits_to_keep: int):
        n = (ids if ids is not None else embeds).shape[1]
        pos = torch.arange(start, start + n, device=self.device)
        self.cache.attend_len = start + n
        return self.model(ids, inputs_embeds=embeds, input_pos=pos, cache=self.cache, logits_to_keep=logits_to_keep)

    def prefill(self, keys: Sequence, ids: Sequence[int], embed_fn: EmbedFn | None = None,
                exact: bool = False) -> torch.Tensor:
        """Bring the cache to hold ``keys``; returns the fp32 logits ``[V]`` of the last prompt position.
        ``exact``: reuse only what a fresh prefill would compute identically (module docstring)."""
        steps = self.prefill_steps(keys, ids, embed_fn, exact)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def prefill_steps(self, keys: Sequence, ids: Sequence[int], embed_fn: EmbedFn | None = None,
                      exact: bool = False) -> Iterator[None]:
        """:meth:`prefill` one chunk per step: yields None after every chunk but the last, returns the logits."""
        n = len(keys)
        if n == 0:
            raise ContextWindowError("empty prompt")
        if n >= self.context_window_size:
            raise ContextWindowError(
                f"prompt has {n} tokens but the context window is {self.context_window_size} (and at least one "
                "token must be generated); shorten the prompt or raise context_window_size")
        common = 0
        for a, b in zip(self.keys, keys):
            if a != b:
                break
            common += 1
        common = min(common, n - 1)  # always run at least the last position to get its logits
        c = self.prefill_chunk_size
        if exact:
            common = min(common, self._canonical) // c * c
        # chunks from an aligned start that was canonical are computed as a fresh prefill computes them
        aligned = common % c == 0 and common <= self._canonical
        canonical = n // c * c if aligned else min(self._canonical, common // c * c)
        logits = None
        start = common
        while start < n:
            end = min(start + self.prefill_chunk_size, n)
            with torch.inference_mode():  # entered per chunk: never held across a yield
                if embed_fn is not None:
                    embeds, chunk_ids = embed_fn(start, end), None
                else:
                    embeds, chunk_ids = None, torch.tensor([list(ids[start:end])], device=self.device)
                logits = self._forward(chunk_ids, embeds, start, logits_to_keep=1)
            start = end
            if start < n:
                self.keys, self._canonical = [], 0  # mid-way: nothing may be reused if this stops here
                yield None
        self.keys, self._canonical = list(keys), canonical
        return logits[0, -1].float()

    def decode(self, token: int) -> torch.Tensor:
        pos = len(self.keys)
        with torch.inference_mode():
            if self.decode_step is not None:
                out = self.decode_step(self, token, pos)
            else:
                out = self._forward(torch.tensor([[token]], device=self.device), None, pos, logits_to_keep=1)[0, -1]
        self.keys.append(token)
        return out.float()

    def _lookup(self, params: SamplingParams, history: list[int]) -> PromptLookup | None:
        """A prompt-lookup drafter when speculative decoding applies (greedy, no repetition penalty, the fused
        step's several-row verification), else None."""
        if not (self.max_draft > 0 and params.greedy and params.repetition_penalty == 1.0
                and hasattr(self.decode_step, "rows")):
            return None
        lookup = PromptLookup(self.max_draft)
        lookup.extend(history)
        return lookup

    def _advance(self, tok: int, lookup: PromptLookup | None, limit: int, pick: Callable) -> list[torch.Tensor]:
        """Decode ``tok``, and with a drafter also the draft that follows it in the same step: the logits of the
        positions after ``tok`` and after each kept draft token (kept: ``pick`` of the logits before it chose it)."""
        if lookup:
            lookup.extend([tok])
        drafts = lookup.propose(min(limit, self.context_window_size - len(self.keys) - 2)) if lookup else []
        if not drafts:
            if self.defer_decode and hasattr(self.decode_step, "rows"):
                self.pending_token = tok
                return [None]  # decoded by decode_pending with other slots, or alone by _resolve
            return [self.decode(tok)]
        pos = len(self.keys)
        with torch.inference_mode():
            rows = self.decode_step.rows([self] * (1 + len(drafts)), [tok, *drafts], range(pos, pos + 1 + len(drafts)))
        kept = 0
        while kept < len(drafts) and pick(rows[kept]) == drafts[kept]:
            kept += 1
        self.keys += [tok, *drafts[:kept]]
        lookup.extend(drafts[:kept])
        lookup.record(len(drafts), kept)
        return [r.float() for r in rows[:kept + 1]]

    def _resolve(self) -> torch.Tensor:
        """The logits of the deferred decode: decode_pending's, or decoded now, alone."""
        if self._batched is not None:
            logits, self._batched = self._batched, None
            return logits
        tok, self.pending_token = self.pending_token, None
        return self.decode(tok)

    def generate(self, keys: Sequence, ids: Sequence[int], params: SamplingParams, max_new_tokens: int,
                 stop_ids: set[int] | frozenset = frozenset(), embed_fn: EmbedFn | None = None,
                 generator: torch.Generator | None = None, banned_ids: Sequence[int] = (),
                 yield_prefill: bool = False) -> Iterator[StepResult | None]:
        """Yield generated tokens; the last one carries ``finish_reason``. Stops on a stop id (not yielded
        as text by callers, but yielded here with finish_reason "stop"), on ``max_new_tokens`` or at the
        end of the context window ("length"). ``banned_ids`` are never sampled (a VLM's image token).
        Greedy requests on an ``exact_reuse`` slot prefill exactly (see :meth:`prefill`); greedy requests on the
        fused step decode speculatively (``speculative.py``: the same tokens, fewer weight reads).
        ``yield_prefill``: yield None after each prefill chunk but the last (a scheduler runs other requests in
        between); with ``defer_decode`` too, each token's decode is left for the scheduler's batch."""
        exact = self.exact_reuse and params.greedy
        if yield_prefill:
            logits = yield from self.prefill_steps(keys, ids, embed_fn, exact)
        else:
            logits = self.prefill(keys, ids, embed_fn, exact)
        gen = generator or make_generator(params.seed)
        budget = min(max_new_tokens, self.context_window_size - len(self.keys))
        history = [k for k in keys if isinstance(k, int)]
        lookup = self._lookup(params, history)

        def pick(lg: torch.Tensor) -> int:
            prev = torch.tensor(history, dtype=torch.long) if params.repetition_penalty != 1.0 else None
            if banned_ids:
                lg = lg.clone()  # an inference tensor: modify a copy
                lg[list(banned_ids)] = float("-inf")
            return sample(lg, params, gen, prev)

        queue = deque([logits])  # logits not yet sampled from (more than one after kept draft tokens)
        self.pending_token, self._batched = None, None
        # a scheduler's slot defers its decode before the token goes out, so that every active slot has one waiting
        # when the scheduler batches them (decode_pending); otherwise the token goes out first
        defer_first = yield_prefill and self.defer_decode
        for i in range(budget):
            tok = pick(self._resolve() if queue[0] is None else queue[0])
            queue.popleft()
            history.append(tok)
            if tok in stop_ids:
                yield StepResult(tok, "stop")
                return
            if i == budget - 1:
                yield StepResult(tok, "length")
                return
            if defer_first and not queue:
                queue.extend(self._advance(tok, lookup, budget - i - 2, pick))
            yield StepResult(tok)
            if not queue:  # (else tok is a kept draft token, already in the cache)
                queue.extend(self._advance(tok, lookup, budget - i - 2, pick))


def decode_pending(slots: Sequence[Slot]) -> int:
    """One fused step per model for the slots with a deferred decode (``Slot.defer_decode``), reading the weights
    once for all of them; each slot's logits are bit-identical to its own single-token step. Returns how many ran
    (a model with fewer than two waiting is left alone: a lone slot decodes itself)."""
    groups: dict[int, list[Slot]] = {}
    for s in slots:
        if getattr(s, "pending_token", None) is not None:  # (an assistant's slots are not Slots)
            groups.setdefault(id(s.decode_step), []).append(s)
    done = 0
    for ready in groups.values():
        if len(ready) < 2:
            continue
        with torch.inference_mode():
            out = ready[0].decode_step.rows(ready, [s.pending_token for s in ready], [len(s.keys) for s in ready])
        for s, logits in zip(ready, out):
            s.keys.append(s.pending_token)
            s.pending_token, s._batched = None, logits.float()
        done += len(ready)
    return done
