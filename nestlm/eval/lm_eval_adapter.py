"""lm-evaluation-harness model `nestlm`: any nestlm checkpoint under lm-eval's tasks.

    lm_eval --model nestlm --model_args pretrained=PATH[,tokenizer=acb|byte|FILE.json] --tasks ...

PATH is an export folder or a Lightning .ckpt. The tokenizer must be the one the model was trained
with: `acb` (default; the agent-DSL tokenizer of nestlm.envs.tokenizer), `byte` (UTF-8 bytes, end of
document 256, as `nestlm prepare-data` writes), or a local tokenizer.json. Sequences are streamed in
chunks with the recurrent state carried, so long documents need no rolling windows.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from nestlm.envs.tokenizer import get_tokenizer
from nestlm.models.loading import load_model


class _AcbTok:
    def __init__(self) -> None:
        self.tok = get_tokenizer()
        self.bos_id, self.eos_id = self.tok.bos_id, self.tok.eos_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


class _ByteTok:
    bos_id = eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class _FileTok:
    def __init__(self, path: Path) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ValueError("nestlm lm-eval: tokenizer=FILE needs the `tokenizers` package") from None
        if not path.is_file():
            raise FileNotFoundError(f"nestlm lm-eval: tokenizer file {path} does not exist")
        self.tok = Tokenizer.from_file(str(path))
        names = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
        eos = next((self.tok.token_to_id(t) for t in names if self.tok.token_to_id(t) is not None), None)
        if eos is None:
            raise ValueError(f"nestlm lm-eval: {path} has no end-of-document token (looked for {names})")
        self.bos_id = self.eos_id = int(eos)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


def make_tokenizer(name: str):
    if name == "acb":
        return _AcbTok()
    if name == "byte":
        return _ByteTok()
    return _FileTok(Path(name))


@register_model("nestlm")
class NestLMEval(TemplateLM):
    """TemplateLM over a HybridLM: loglikelihood, loglikelihood_rolling, generate_until (greedy)."""

    def __init__(
        self,
        pretrained: str,
        tokenizer: str = "acb",
        device: str = "cpu",
        chunk_size: int = 2048,
        max_gen_toks: int = 64,
        attn_window: int | None = None,
        batch_size: int | str = 1,
        **kwargs,
    ):
        super().__init__()
        self.model, self.info = load_model(pretrained, device)
        self.tok = make_tokenizer(str(tokenizer))
        self.device_ = torch.device(device)
        self.chunk_size, self.max_gen_toks = int(chunk_size), int(max_gen_toks)
        self.attn_window = int(attn_window) if attn_window not in (None, "", "none") else None
        vocab = self.model.config.vocab_size
        probe = self.tok.encode("a") + [self.tok.eos_id]
        if max(probe) >= vocab:
            raise ValueError(f"nestlm lm-eval: tokenizer={tokenizer!r} produces ids >= the model's vocab_size={vocab}")

    # --- TemplateLM plumbing ----------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    @property
    def max_length(self) -> int:
        return 10**9  # the state is carried: no context limit

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tok.decode(list(tokens))

    # --- scoring ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _logprobs(self, ids: list[int], n_scored: int) -> tuple[float, bool]:
        """Sum of log p(ids[i] | ids[:i]) over the last `n_scored` tokens, and whether each is the argmax."""
        x = torch.tensor(ids[:-1], dtype=torch.long, device=self.device_)
        y = torch.tensor(ids[1:], dtype=torch.long, device=self.device_)
        first = len(y) - n_scored  # first scored target index
        s, total, greedy = 0, 0.0, True
        with self.model.attention_window(self.attn_window), torch.inference_mode():
            for out in self.model.stream(x[None], self.chunk_size):
                n, lo = out.logits.shape[1], max(first - s, 0)
                if lo < n:
                    logits, tgt = out.logits[0, lo:].float(), y[s + lo : s + n]
                    total += float(F.log_softmax(logits, -1).gather(-1, tgt[:, None]).sum())
                    greedy = greedy and bool((logits.argmax(-1) == tgt).all())
                s += n
        return total, greedy

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out = []
        for _, ctx, cont in requests:
            if not cont:
                out.append((0.0, True))
                continue
            res = self._logprobs(list(ctx) + list(cont), len(cont))
            out.append(res)
            self.cache_hook.add_partial("loglikelihood", _, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            (text,) = req.args
            ids = self.tok_encode(text)
            ll = self._logprobs([self.prefix_token_id] + ids, len(ids))[0] if ids else 0.0
            out.append(ll)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), ll)
        return out

    def _stop(self, until: list[str]):
        """stop() for generate: the end-of-text token, or a stop string in the decoded text."""

        def stop(new: torch.Tensor) -> bool:
            toks = new[0].tolist()
            return toks[-1] == self.eot_token_id or any(u in self.tok_decode(toks) for u in until)

        return stop

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = [self.prefix_token_id] + self.tok_encode(context)
            x = torch.tensor([ids], dtype=torch.long, device=self.device_)
            with self.model.attention_window(self.attn_window), torch.inference_mode():
                new, _ = self.model.generate(x, max_new, stop=self._stop(until), chunk_size=self.chunk_size)
            new = new[0].tolist()
            text = self.tok_decode(new[:-1] if new and new[-1] == self.eot_token_id else new)
            for u in until:
                text = text.split(u)[0]
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, kwargs), text)
        return out
