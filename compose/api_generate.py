"""A base model reached only through an OpenAI-compatible completions API, steered at decode time.

    api = APIBase("http://127.0.0.1:8000/v1", "HuggingFaceTB/SmolLM2-135M-Instruct", tokenizer)  # heads.api
    mixer = vm.Mixer(bank, {"cheerful": 8.0}, top_k=20, tokenizer=tokenizer)
    out = api_generate(api, ["Tell me about your day."], mixer, max_new_tokens=32, chat_template=True)
    out.texts, out.token_ids, out.kl, out.cost     # cost: API calls, tokens sent, seconds per new token

Each step asks the server, for every row still generating, for the next token's top-k log-probabilities
(one completions request per row: max_tokens=1, logprobs=k, the prompt as token ids); the Mixer
re-weights those candidates with the heads on the local value backbone, and valuemix samples the token
here and continues. The server's own sampled token is not used. What this costs, honestly: one request
per row per generated token, each sending the whole prefix (a server with prefix caching, as vLLM has,
does not recompute it, but every token still pays a round trip and the server's scheduling). The server
must report token ids (vLLM's `return_tokens_as_token_ids`); the tokenizer given is the base's, for the
chat template, the prompt's ids and EOS.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import torch

from valuemix.compose.generate import Generation, Stream, TextPiece, step_kl, streamed
from valuemix.compose.mixer import Mixer
from valuemix.heads.api import APIBase, APICost
from valuemix.heads.tokens import encode_prompts, left_padded


@dataclass
class APIGeneration(Generation):
    """A `Generation` from an API base, with what it cost (`APICost`)."""

    cost: APICost = field(default_factory=APICost)


def api_generate(api: APIBase, prompts: Sequence[str], mixer: Mixer, *, max_new_tokens: int = 64,
                 temperature: float = 1.0, seed: int = 0, chat_template: bool = False,
                 resume: Sequence[str] | None = None, workers: int = 8, stream: bool = False
                 ) -> APIGeneration | Stream:
    """Generate from an API base with a `Mixer` (see the module docstring); returns an `APIGeneration`, or with
    `stream=True` a `Stream` of `TextPiece`s whose `.result` is that `APIGeneration` once exhausted.

    resume: completions so far, one text per prompt (e.g. a previous result's `texts`): generation continues
        after them, for up to `max_new_tokens` more tokens; the returned texts and ids are the whole completions.
    workers: rows whose requests are sent at once.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive (got {temperature}).")
    mixer.check_tokenizer(api.tokenizer)
    tokenizer = api.tokenizer
    texts, prompt_ids, mask = encode_prompts(tokenizer, prompts, chat_template)
    if resume is not None and len(resume) != len(texts):
        raise ValueError(f"resume has {len(resume)} completions for {len(texts)} prompts: give one text per prompt.")
    rows = [ids[m.bool()].tolist() for ids, m in zip(prompt_ids, mask)]
    done = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in resume] if resume else [[] for _ in rows]

    def pieces(out: Stream) -> Iterator[TextPiece]:
        eos = tokenizer.eos_token_id
        alive = [not (d and d[-1] == eos) for d in done]
        new, kls = [[] for _ in rows], [0.0] * len(rows)
        shown = [tokenizer.decode(d, skip_special_tokens=True) for d in done]
        generator = torch.Generator().manual_seed(seed)
        before, start = replace(api.cost), time.perf_counter()
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(rows)))) as pool:
            for _ in range(max_new_tokens):
                running = [i for i, a in enumerate(alive) if a]
                if not running:
                    break
                tops = dict(zip(running, pool.map(
                    lambda i: api.top_logprobs(rows[i] + done[i] + new[i], mixer.top_k), running)))
                input_ids, _ = left_padded([rows[i] + done[i] + new[i] for i in range(len(rows))],
                                           tokenizer.pad_token_id)
                scores = torch.full((len(rows), len(tokenizer)), -torch.inf)
                for i in range(len(rows)):  # a finished row: its EOS as the only candidate (nothing is valued for it)
                    ids, logprobs = tops.get(i, ([eos], [0.0]))
                    scores[i, ids] = torch.tensor(logprobs)
                mixed, reference = mixer(input_ids, scores) / temperature, mixer.reference(scores) / temperature
                kl = step_kl(mixed, reference)
                tokens = torch.multinomial(torch.softmax(mixed, -1), 1, generator=generator).squeeze(1).tolist()
                for i in running:
                    new[i].append(tokens[i])
                    kls[i] += float(kl[i])
                    alive[i] = tokens[i] != eos
                    text = tokenizer.decode(done[i] + new[i], skip_special_tokens=True)
                    if text != shown[i] and text.startswith(shown[i]):
                        yield TextPiece(i, text[len(shown[i]):])
                        shown[i] = text
        api.cost.seconds += time.perf_counter() - start
        api.cost.new_tokens += sum(map(len, new))
        ids = [d + n for d, n in zip(done, new)]
        out.result = APIGeneration(list(texts), tokenizer.batch_decode(ids, skip_special_tokens=True), ids, kls,
                                   time.perf_counter() - start, cost=api.cost.since(before))

    return streamed(pieces, stream)
