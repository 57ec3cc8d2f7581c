"""Scoring a model on episodes: teacher-forced streaming, and the closed loop.

A model is a HybridLM (or anything with its `stream` and `generate`). An episode is fed through
`model.stream` in chunks with the state carried, and only the argmax of each position is kept, so
memory stays bounded at any length (the logits of one chunk at a time); the closed loop decodes
with `model.generate`.

An answer counts when every answer token is the argmax given the true history before it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from nestlm.envs import Episode, final_window
from nestlm.envs.baselines import probe_baselines
from nestlm.envs.tokenizer import get_tokenizer


@dataclass
class EpisodeScore:
    """Every scored probe of one episode, and closed-loop survival.

    correct / kinds / lags / chance / baselines / in_window: one entry per probe of the episode, in
        order; `baselines` holds each in-context heuristic's probability of answering it
        (nestlm.envs.baselines), `in_window` marks the probes of the final 10% of the steps, which
        the per-horizon headline scores.
    first_error: first step whose full answer (answer tokens and the closing `[E]`) is not the
        greedy continuation, i.e. where a closed loop feeding back the model's own answers would
        first diverge; None if the whole episode is answered correctly.
    """

    env: str
    n_steps: int
    seed: int
    n_tokens: int
    correct: list[bool]
    kinds: list[str]
    lags: list[int]
    chance: list[float]
    baselines: list[dict[str, float]]
    in_window: list[bool]
    first_error: int | None
    seconds: float
    extra: dict = field(default_factory=dict)

    def window(self) -> EpisodeScore:
        """The same episode with only its final-window probes."""
        keep = self.in_window
        pick = lambda xs: [x for x, k in zip(xs, keep) if k]  # noqa: E731
        return replace(
            self,
            correct=pick(self.correct),
            kinds=pick(self.kinds),
            lags=pick(self.lags),
            chance=pick(self.chance),
            baselines=pick(self.baselines),
            in_window=[True] * sum(keep),
        )


@torch.no_grad()
def stream_argmax(model, tokens: list[int] | np.ndarray, chunk_size: int = 2048, device=None, state=None) -> np.ndarray:
    """Greedy prediction at every position of `tokens`, fed in chunks with the state carried.

    Returns preds [len(tokens)] (int32): preds[i] = argmax of the logits after tokens[: i + 1].
    """
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64), device=device)
    preds = np.empty(len(ids), dtype=np.int32)
    s = 0
    for out in model.stream(ids[None], chunk_size, state):
        n = out.logits.shape[1]
        preds[s : s + n] = out.logits[0].argmax(-1).to(torch.int32).cpu().numpy()
        s += n
    return preds


def score_predictions(ep: Episode, preds: np.ndarray) -> tuple[list[bool], int | None]:
    """Per probe of the episode: every answer token predicted; and the first step answered wrongly."""
    tokens = np.asarray(ep.tokens)
    correct = [bool(np.all(preds[p.span[0] - 1 : p.span[1] - 1] == tokens[p.span[0] : p.span[1]])) for p in ep.probes]
    first_error = None
    for step in range(1, ep.n_steps + 1):
        _, a, e = ep.step_spans[step]
        if not np.all(preds[a - 1 : e - 1] == tokens[a:e]):
            first_error = step
            break
    return correct, first_error


def score_episode(model, ep: Episode, chunk_size: int = 2048, device=None) -> EpisodeScore:
    t0 = time.perf_counter()
    preds = stream_argmax(model, ep.tokens, chunk_size, device)
    correct, first_error = score_predictions(ep, preds)
    lo = ep.n_steps - final_window(ep.n_steps)
    return EpisodeScore(
        env=ep.env,
        n_steps=ep.n_steps,
        seed=ep.seed,
        n_tokens=len(ep.tokens),
        correct=correct,
        kinds=[p.kind for p in ep.probes],
        lags=[p.lag for p in ep.probes],
        chance=[p.chance for p in ep.probes],
        baselines=probe_baselines(ep),
        in_window=[p.step > lo for p in ep.probes],
        first_error=first_error,
        seconds=time.perf_counter() - t0,
    )


def _answer_done(answer: list[int], end_id: int):
    """stop() for generate: the answer is closed by `end_id`, or has gone wrong (no need to decode more)."""

    def done(new: torch.Tensor) -> bool:
        got = new[0].tolist()
        return got[-1] == end_id or got != answer[: len(got)]

    return done


@torch.no_grad()
def closed_loop(model, ep: Episode, max_answer_tokens: int = 12, device=None) -> int | None:
    """Run the episode with the model answering: the environment supplies each step's prompt (up to
    and including `[A]`), the model decodes greedily until `[E]` (at most `max_answer_tokens`; a bare
    step, as many tokens as its answer), and its own tokens are fed back. Returns the first step
    whose answer differs from the environment's correct one (None: no error in the episode).

    Until the first error the model's answers equal the recorded ones, so the scripted continuation
    of the episode is exactly what the environment would produce; the run stops there.
    """
    end_id = get_tokenizer().token_to_id("[E]")
    ids = torch.as_tensor(np.asarray(ep.tokens, dtype=np.int64), device=device)
    state, fed = None, 0  # ids[:fed] are in the state
    for step in range(1, ep.n_steps + 1):
        _, a, e = ep.step_spans[step]
        answer = ep.tokens[a:e]
        # a bare step (Zoology's MQAR layout) has no `[E]` to stop at: decode exactly its answer's length
        n_new = max_answer_tokens if answer[-1] == end_id else len(answer)
        # the previous step's last token and this step's prompt, then the answer; its last token is not fed yet
        new, state = model.generate(ids[None, fed:a], n_new, state=state, stop=_answer_done(answer, end_id))
        if new[0].tolist() != answer:
            return step
        fed = e - 1  # everything produced but the final `[E]` has been fed
    return None
