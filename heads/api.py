"""A base model reached only through an OpenAI-compatible completions API (e.g. `vllm serve`).

    api = APIBase("http://127.0.0.1:8000/v1", "HuggingFaceTB/SmolLM2-135M-Instruct", tokenizer)
    samples = vm.sample_base(api, tokenizer, prompts, n_per_prompt=4)    # training data, as from a local base
    out = api_generate(api, prompts, mixer, max_new_tokens=32)           # steered: compose.api_generate

The server must report token ids (vLLM's `return_tokens_as_token_ids`); the tokenizer given is the
base's, for the chat template, the prompt's ids and EOS. Requests that time out, are rate limited or
meet a server error are retried a bounded number of times; everything else gets a clear error.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, fields


TOKEN_ID = "token_id:"  # how vLLM names tokens with return_tokens_as_token_ids
OPENAI_INSTALL = "pip install openai"


@dataclass
class APICost:
    """What an API generation cost: requests made (retries included), retries, prompt tokens sent, seconds."""

    calls: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    seconds: float = 0.0
    new_tokens: int = 0

    def since(self, before: APICost) -> APICost:
        """What was spent after the snapshot `before` (a `dataclasses.replace` copy of this one)."""
        return APICost(**{f.name: getattr(self, f.name) - getattr(before, f.name) for f in fields(self)})

    def per_token(self) -> dict:
        """Calls, prompt tokens sent and seconds per generated token."""
        n = max(self.new_tokens, 1)
        return {"calls": self.calls / n, "prompt_tokens": self.prompt_tokens / n, "seconds": self.seconds / n}


class APIBase:
    """A base model behind an OpenAI-compatible completions endpoint (e.g. `vllm serve`).

    Args:
        base_url: the server's API root, e.g. http://127.0.0.1:8000/v1 (/v1 is added when missing).
        model: the served model's name (default: the server's only model).
        tokenizer: the base model's tokenizer (chat template, prompt ids, EOS, vocabulary size).
        api_key: sent as the bearer token (vLLM ignores it unless started with --api-key).
        timeout: seconds to wait for one answer.
        max_retries: retries of a request that timed out, was rate limited or met a server error (with
            exponential backoff from `backoff` seconds); then a clear error.
    """

    def __init__(self, base_url: str, model: str | None = None, tokenizer=None, *, api_key: str = "none",
                 timeout: float = 60.0, max_retries: int = 3, backoff: float = 0.5):
        try:
            import openai
        except ImportError as err:
            raise ImportError(f"An API base is reached with the openai client, which is not installed: "
                              f"{OPENAI_INSTALL}") from err
        if tokenizer is None:
            raise ValueError("APIBase needs the base model's tokenizer (AutoTokenizer.from_pretrained(<its id>)): "
                             "it gives the prompt's token ids, the chat template and EOS.")
        self.openai = openai
        self.base_url = base_url.rstrip("/") if base_url.rstrip("/").endswith("/v1") else f"{base_url.rstrip('/')}/v1"
        self.client = openai.OpenAI(base_url=self.base_url, api_key=api_key, timeout=timeout, max_retries=0)
        self.tokenizer = tokenizer
        self.max_retries, self.backoff = max_retries, backoff
        self.cost = APICost()
        names = [m.id for m in self._call(self.client.models.list).data]
        if model is not None and model not in names:
            raise ValueError(f"The server at {self.base_url} serves {', '.join(names) or 'no model'}, not {model!r}: "
                             "pass one of those as model.")
        self.model = model or names[0]

    def _call(self, request, *args, **kwargs):
        """`request(*args, **kwargs)`, retried on timeouts, rate limits and server errors; clear errors otherwise."""
        openai = self.openai
        for attempt in range(self.max_retries + 1):
            self.cost.calls += 1
            try:
                return request(*args, **kwargs)
            except (openai.APITimeoutError, openai.APIConnectionError, openai.RateLimitError,
                    openai.InternalServerError) as err:
                if attempt == self.max_retries:
                    raise ConnectionError(
                        f"The server at {self.base_url} did not answer after {self.max_retries + 1} attempts "
                        f"({type(err).__name__}: {err}): check that it runs and is reachable, or raise timeout / "
                        "max_retries.") from err
                self.cost.retries += 1
                time.sleep(self.backoff * 2 ** attempt)
            except openai.BadRequestError as err:
                raise ValueError(f"The server at {self.base_url} refused the request (HTTP 400): {err.message}") \
                    from err

    def top_logprobs(self, token_ids: Sequence[int], k: int) -> tuple[list[int], list[float]]:
        """The next token's top-k (ids, log-probabilities) after `token_ids`, at temperature 1."""
        reply = self._call(self.client.completions.create, model=self.model, prompt=list(token_ids), max_tokens=1,
                           temperature=1.0, logprobs=k, extra_body={"return_tokens_as_token_ids": True})
        self.cost.prompt_tokens += reply.usage.prompt_tokens if reply.usage else len(token_ids)
        logprobs = reply.choices[0].logprobs
        if logprobs is None or not logprobs.top_logprobs:
            raise ValueError(f"The server at {self.base_url} returned no log-probabilities for {self.model}: the API "
                             "path needs each next token's top-k log-probabilities (completions with logprobs=k).")
        top = logprobs.top_logprobs[0]
        if any(not token.startswith(TOKEN_ID) for token in top):
            raise ValueError(f"The server at {self.base_url} returned tokens as text, not ids: the API path needs "
                             "token ids (vLLM's return_tokens_as_token_ids); serve the model with vLLM.")
        best = sorted(top.items(), key=lambda item: -item[1])[:k]  # vLLM adds its sampled token when not in the top-k
        return [int(token.removeprefix(TOKEN_ID)) for token, _ in best], [logprob for _, logprob in best]

    def sample(self, prompt_ids: Sequence[int], n: int, max_new_tokens: int, temperature: float, top_k: int,
               top_p: float, seed: int) -> list[tuple[list[int], bool]]:
        """`n` completions of one prompt in one request: (token ids, up to and including EOS; whether it ended)."""
        reply = self._call(self.client.completions.create, model=self.model, prompt=list(prompt_ids), n=n,
                           max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, logprobs=0,
                           extra_body={"top_k": top_k or -1, "return_tokens_as_token_ids": True})
        self.cost.prompt_tokens += reply.usage.prompt_tokens if reply.usage else len(prompt_ids)
        completions = []
        for choice in reply.choices:
            if choice.logprobs is None or choice.logprobs.tokens is None:
                raise ValueError(f"The server at {self.base_url} returned no token ids for {self.model}: sampling "
                                 "needs them (completions with logprobs=0 and vLLM's return_tokens_as_token_ids).")
            tokens = [int(token.removeprefix(TOKEN_ID)) for token in choice.logprobs.tokens]
            finished = choice.finish_reason == "stop"
            if finished and (not tokens or tokens[-1] != self.tokenizer.eos_token_id):
                tokens.append(self.tokenizer.eos_token_id)  # a server that leaves its stop token out
            completions.append((tokens, finished))
        return completions
