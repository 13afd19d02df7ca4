"""A mix on a served model: `generate` against `valuemix serve` (vLLM's OpenAI API) instead of a local base.

    served = ServedModel("http://127.0.0.1:8000", heads=["runs/heads/concise"], tokenizer=tokenizer)
    out = served.generate(["Tell me about cats"], {"concise": 2.0}, max_new_tokens=48, chat_template=True)
    out.texts, out.token_ids, out.kl      # as valuemix's own `generate` returns them

Each row is one completions request with the prompt as token ids (the chat template applied here, as
`generate` does), top-k sampling at the server's top-k and the mix in `vllm_xargs`. The KL from the base
is exact, as in `generate`: the server reports each step's mixed distribution over its top-k candidates
(`--logprobs-mode processed_logprobs`, which `valuemix serve` sets), and one more request reads the base's
logprobs of the same prefixes (`prompt_logprobs`), whose top-k are those candidates.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence

import torch

from valuemix.compose.generate import Generation, Stream, TextPiece, step_kl, streamed
from valuemix.compose.mixer import DEFAULT_TOP_P, check_top_p, read_mix
from valuemix.heads.api import OPENAI_INSTALL, TOKEN_ID
from valuemix.heads.files import read_head_config
from valuemix.heads.tokens import encode_prompts



class ServedModel:
    """A model served with value heads by `valuemix serve`; the heads' configs are read here (no weights).

    Args:
        url: the server, e.g. http://127.0.0.1:8000 (with or without /v1).
        heads: the folders or Hub ids of the heads the server was started with (for names and β ranges).
        tokenizer: the served model's tokenizer (to apply the chat template and count tokens).
        model: the served model name (default: the server's only model).
        timeout: seconds to wait for an answer.
    """

    def __init__(self, url: str, heads: Sequence[str], tokenizer, model: str | None = None, timeout: float = 300):
        try:
            import openai
        except ImportError as err:
            raise ImportError(f"A served model is reached with the openai client, which is not installed: "
                              f"{OPENAI_INSTALL}") from err
        self.url = url.rstrip("/")
        base_url = self.url if self.url.endswith("/v1") else f"{self.url}/v1"
        self.client = openai.OpenAI(base_url=base_url, api_key="none", timeout=timeout, max_retries=0)
        self.tokenizer = tokenizer
        self.configs = {}
        for source in heads:
            config = read_head_config(source)
            self.configs[config.name] = config
        try:
            names = [m.id for m in self.client.models.list().data]
        except openai.APIConnectionError as err:
            raise ConnectionError(f"No server answers at {base_url} ({err}): start one with `valuemix serve` "
                                  "and pass its address.") from err
        if model is not None and model not in names:
            raise ValueError(f"The server at {base_url} serves {', '.join(names)}, not {model!r}.")
        self.model = model or names[0]

    @property
    def heads(self) -> list[str]:
        return list(self.configs)

    def generate(self, prompts: Sequence[str], weights: Mapping[str, float] | None = None, *,
                 max_new_tokens: int = 64, temperature: float = 1.0, seed: int = 0, top_k: int = 20,
                 top_p: float = DEFAULT_TOP_P, chat_template: bool = False, stream: bool = False
                 ) -> Generation | Stream:
        """Like `compose.generate.generate` with a `Mixer(bank, weights, top_k, top_p=top_p)`, on the server."""
        check_top_p(top_p)
        weights = {h: b for h, b in read_mix(dict(weights or {}), self.configs, "weights", "on this server").items()
                   if b != 0.0}
        texts, prompt_ids, mask = encode_prompts(self.tokenizer, prompts, chat_template)
        rows = [ids[m.bool()].tolist() for ids, m in zip(prompt_ids, mask)]

        def pieces(out: Stream) -> Iterator[TextPiece]:
            start = time.perf_counter()
            completions, token_ids, kls = [], [], []
            for row, ids in enumerate(rows):
                text, tokens, mixed = "", [], []
                for chunk in self._complete(ids, weights, max_new_tokens, temperature, seed, top_k, top_p):
                    choice = chunk.choices[0]
                    if choice.text:
                        text += choice.text
                        yield TextPiece(row, choice.text)
                    if choice.logprobs is not None:
                        tokens += [int(t.removeprefix(TOKEN_ID)) for t in choice.logprobs.tokens]
                        mixed += choice.logprobs.top_logprobs
                completions.append(text)
                token_ids.append(tokens)
                kls.append(self._kl(ids, tokens, mixed, temperature, top_k, top_p) if weights else 0.0)
            out.result = Generation(list(texts), completions, token_ids, kls, time.perf_counter() - start)

        return streamed(pieces, stream)

    def _complete(self, prompt_ids, weights, max_new_tokens, temperature, seed, top_k, top_p):
        extra = {"top_k": top_k, "return_tokens_as_token_ids": True}
        if weights:
            extra["vllm_xargs"] = {"valuemix": json.dumps(weights), "valuemix_top_k": top_k, "valuemix_top_p": top_p}
        return self.client.completions.create(model=self.model, prompt=prompt_ids, max_tokens=max_new_tokens,
                                              temperature=temperature, seed=seed, logprobs=top_k, stream=True,
                                              extra_body=extra)

    def _kl(self, prompt_ids, tokens, mixed, temperature, top_k, top_p) -> float:
        """Σ_t KL(π_mix,t ‖ π_ref,t) along the reply: π_mix from its logprobs, π_ref from the prompt_logprobs
        (the base's top-k, cut to the same nucleus as the mixer's sets)."""
        if not tokens:
            return 0.0
        reply = self.client.completions.create(model=self.model, prompt=prompt_ids + tokens, max_tokens=1,
                                               temperature=0.0, extra_body={"prompt_logprobs": top_k})
        base_steps = reply.choices[0].model_extra["prompt_logprobs"][len(prompt_ids):]
        steps = []  # per step: (mixed logprob, base logprob) of each candidate
        for t, (mixed_step, base_step) in enumerate(zip(mixed, base_steps)):
            total = sum(math.exp(v) for v in mixed_step.values())
            if abs(total - 1.0) > 1e-3:
                raise ValueError(f"The server at {self.url} reports logprobs before the mix (step {t} sums to "
                                 f"{total:.4f}, not 1): start it with `valuemix serve`, which sets "
                                 "--logprobs-mode processed_logprobs.")
            base = dict(sorted(((int(k), v["logprob"]) for k, v in base_step.items()), key=lambda kv: -kv[1])[:top_k])
            mass = 0.0
            for token, logprob in base.items():  # outside the nucleus: probability 0 under π_ref, as under π_mix
                base[token], mass = (logprob if mass < top_p or top_p >= 1 else -math.inf), mass + math.exp(logprob)
            steps.append([(v, base[a]) for k, v in mixed_step.items() if (a := int(k.removeprefix(TOKEN_ID))) in base])
        pairs = torch.full((len(steps), max(map(len, steps)), 2), -math.inf)  # padding: probability 0 under both
        for t, step in enumerate(steps):
            pairs[t, :len(step)] = torch.tensor(step)
        return float(step_kl(pairs[..., 0], pairs[..., 1] / temperature).sum())  # π_ref: the base top-k at T
