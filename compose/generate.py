"""valuemix's own decoding loop: mixing, streaming text, and exact KL(π_mix‖π_ref) per completion."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from valuemix.heads.compat import with_cache
from valuemix.heads.sampling import check_context, check_whole_number
from valuemix.heads.tokens import encode_prompts, eos_ids, position_ids_from_mask
from valuemix.compose.mixer import Mixer


@dataclass
class Generation:
    """The result of `generate`.

    Attributes:
        prompts: the prompt texts as fed to the tokenizer.
        texts: the completions (special tokens skipped).
        token_ids: the generated token ids of each row, up to and including EOS.
        kl: KL(π_mix‖π_ref) summed over each completion's tokens, in nats. π_ref is the base model
            under the same settings with every β = 0 (the top-k truncated base), so β = 0 gives 0.
        seconds: wall time of the decoding loop.
    """

    prompts: list[str]
    texts: list[str]
    token_ids: list[list[int]]
    kl: list[float]
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return sum(len(t) for t in self.token_ids) / max(self.seconds, 1e-9)


@dataclass
class TextPiece:
    """A piece of streamed text for row `row` of the batch."""

    row: int
    text: str


@dataclass
class Stream:
    """An iterator of `TextPiece`s; `.result` holds the `Generation` once the iterator is exhausted."""

    pieces: Iterator[TextPiece]
    result: Generation | None = field(default=None)

    def __iter__(self):
        return self.pieces


def step_kl(mixed: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """KL(softmax(mixed) ‖ softmax(reference)) per row, in nats: Σ_a p(a) (log p(a) − log q(a))."""
    log_p = torch.log_softmax(mixed.float(), dim=-1)
    log_q = torch.log_softmax(reference.float(), dim=-1)
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def generate(base, tokenizer, prompts: Sequence[str], mixer: Mixer | None = None, *, max_new_tokens: int = 64,
             temperature: float = 1.0, do_sample: bool = True, seed: int = 0, chat_template: bool = False,
             logits_processors: Sequence = (), stream: bool = False) -> Generation | Stream:
    """Generate from `base` with a `Mixer` in valuemix's own loop (KV cache on the base and the backbone).

    Per step: base logits -> `logits_processors` -> mixer -> / temperature -> sample (or argmax).
    Returns a `Generation`; with `stream=True`, a `Stream` of `TextPiece`s whose `.result` is the
    `Generation` once exhausted. Without a mixer this is plain sampling from the base (KL 0).
    """
    check_whole_number("max_new_tokens", max_new_tokens, 1)
    check_whole_number("seed", seed, 0, 2**63 - 1)
    if temperature <= 0:
        raise ValueError(f"temperature must be positive (got {temperature}); use do_sample=False for greedy.")
    if mixer is not None:
        mixer.check_tokenizer(tokenizer)
    prompts, input_ids, attention_mask = encode_prompts(tokenizer, prompts, chat_template)
    lengths = attention_mask.sum(-1).tolist()
    check_context(base, lengths, max_new_tokens)
    if mixer is not None:  # the backbone values every prefix plus one candidate
        check_context(mixer.bank.decoder, lengths, max_new_tokens, what="the value backbone")
    steps = _decode(base, tokenizer, input_ids.to(base.device), attention_mask.to(base.device), mixer,
                    max_new_tokens, temperature, do_sample, seed, logits_processors)

    def pieces(out: Stream) -> Iterator[TextPiece]:
        start = time.perf_counter()
        tokens = [[] for _ in prompts]
        shown = [0] * len(prompts)
        kl = torch.zeros(len(prompts))
        for new_tokens, alive, step_kls in steps:
            kl += step_kls.cpu()
            for row in alive.nonzero().flatten().tolist():
                tokens[row].append(int(new_tokens[row]))
                text = tokenizer.decode(tokens[row], skip_special_tokens=True)
                if not text.endswith("\ufffd") and len(text) > shown[row]:  # wait for a whole character
                    yield TextPiece(row, text[shown[row]:])
                    shown[row] = len(text)
        texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
        for row, text in enumerate(texts):
            if len(text) > shown[row]:
                yield TextPiece(row, text[shown[row]:])
        out.result = Generation(prompts, texts, tokens, kl.tolist(), time.perf_counter() - start)

    return streamed(pieces, stream)


def streamed(pieces: Callable[[Stream], Iterator[TextPiece]], stream: bool) -> Generation | Stream:
    """The `Stream` of `pieces(stream)`, which sets its `.result` when exhausted; or, unless `stream`, that result."""
    out = Stream(iter(()))
    out.pieces = pieces(out)
    if stream:
        return out
    for _ in out:
        pass
    return out.result


@torch.inference_mode()
def _decode(base, tokenizer, input_ids, attention_mask, mixer, max_new_tokens, temperature, do_sample, seed,
            logits_processors):
    """Yield (new token per row, rows that were still generating, step KL per row) for each step."""
    eos = torch.tensor(eos_ids(base, tokenizer), device=input_ids.device)
    pad = tokenizer.pad_token_id
    generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    cache = DynamicCache(config=base.config)
    positions = position_ids_from_mask(attention_mask)
    logits = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, **with_cache(cache),
                  use_cache=True, logits_to_keep=1).logits[:, -1]
    alive = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        scores = logits.float()
        for processor in logits_processors:
            scores = processor(input_ids, scores)
        reference = mixer.reference(scores) if mixer is not None else scores
        mixed = mixer(input_ids, scores) if mixer is not None else scores
        mixed, reference = mixed / temperature, reference / temperature
        kl = step_kl(mixed, reference) if mixer is not None else torch.zeros_like(mixed[:, 0])
        if do_sample:
            next_tokens = torch.multinomial(torch.softmax(mixed, dim=-1), 1, generator=generator).squeeze(1)
        else:
            next_tokens = mixed.argmax(dim=-1)
        next_tokens = torch.where(alive, next_tokens, torch.full_like(next_tokens, pad))
        yield next_tokens, alive, torch.where(alive, kl, torch.zeros_like(kl))
        alive = alive & ~torch.isin(next_tokens, eos)
        if not alive.any():
            return
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        logits = base(input_ids=next_tokens[:, None], attention_mask=attention_mask, position_ids=positions,
                      **with_cache(cache), use_cache=True).logits[:, -1]
