"""Scoring a model on episodes: teacher-forced streaming, and the closed loop.

A model is anything with the HybridLM call contract: `out = model(ids [1, t], state=state)` giving
`out.logits [1, t, V]` and `out.state` to pass to the next call. An episode is fed in chunks with the
state carried, and only the argmax of each position is kept, so memory stays bounded at any length
(the logits of one chunk at a time).

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
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} is invalid: expected an int >= 1")
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64), device=device)
    preds = np.empty(len(ids), dtype=np.int32)
    for s in range(0, len(ids), chunk_size):
        out = model(ids[None, s : s + chunk_size], state=state)
        state = out.state
        preds[s : s + chunk_size] = out.logits[0].argmax(-1).to(torch.int32).cpu().numpy()
        del out
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


@torch.no_grad()
def closed_loop(model, ep: Episode, max_answer_tokens: int = 12, device=None) -> int | None:
    """Run the episode with the model answering: the environment supplies each step's prompt (up to
    and including `[A]`), the model decodes greedily until `[E]` (at most `max_answer_tokens`), and
    its own tokens are fed back. Returns the first step whose answer differs from the environment's
    correct one (None: no error in the episode).

    Until the first error the model's answers equal the recorded ones, so the scripted continuation
    of the episode is exactly what the environment would produce; the run stops there.
    """
    end_id = get_tokenizer().token_to_id("[E]")
    ids = torch.as_tensor(np.asarray(ep.tokens, dtype=np.int64), device=device)
    state, fed = None, 0  # ids[:fed] are in the state
    for step in range(1, ep.n_steps + 1):
        _, a, e = ep.step_spans[step]
        out = model(ids[None, fed:a], state=state)  # the previous `[E]` and this step's prompt
        state, nxt = out.state, int(out.logits[0, -1].argmax())
        produced = [nxt]
        while nxt != end_id and len(produced) < max_answer_tokens:
            if produced != ep.tokens[a : a + len(produced)]:
                return step  # already wrong: no need to decode the rest of the answer
            out = model(ids.new_tensor([[nxt]]), state=state)
            state, nxt = out.state, int(out.logits[0, -1].argmax())
            produced.append(nxt)
        if produced != ep.tokens[a:e]:
            return step
        fed = e - 1  # everything produced but the final `[E]` has been fed
    return None
