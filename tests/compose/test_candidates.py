"""RowCache: rows that join, leave and grow keep values equal to brute force (the vLLM processor's cache)."""

import pytest
import torch
from conftest import brute_force_values, build_tokenizer, make_bank

from valuemix.compose.candidates import VALUE_ATOL, RowCache

K = 5


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def ids(tok, text):
    return tok(text, return_tensors="pt").input_ids[0]


def cold_rows(bank, sequences, heads, candidates, names=None):
    """A fresh RowCache of (sequence, head) rows fed whole, left padded, after valuing the candidates; `names` name
    the sequences (their rows then share the trunk below shared-trunk heads)."""
    rows = [(s, h) for s in sequences for h in heads]
    width = max(len(s) for s, _ in rows)
    tokens = torch.stack([torch.cat([torch.zeros(width - len(s), dtype=torch.long), s]) for s, _ in rows])
    real = torch.stack([torch.cat([torch.zeros(width - len(s), dtype=torch.long), torch.ones_like(s)])
                        for s, _ in rows])
    cache = RowCache(bank, [h for _, h in rows], None if names is None else [n for n in names for _ in heads])
    cache.score(tokens, real, candidates.repeat_interleave(len(heads), 0))
    return cache


def expected(bank, sequence, heads, candidates):
    """Brute-force values of one sequence's candidates under each head: (heads, k)."""
    return brute_force_values(bank, sequence[None], torch.ones(1, len(sequence), dtype=torch.long),
                              candidates[None], heads)[:, 0]


def step_matches_brute_force(bank, cache, sequences, new_tokens, candidates):
    """Feed one new token to each (sequence, its heads) of the cache's rows, in order; check the values; return the
    grown sequences."""
    grown, rows = [], 0
    per_row = torch.tensor([len(heads) for _, heads in sequences])
    got = cache.score(torch.tensor(new_tokens).repeat_interleave(per_row)[:, None],
                      torch.ones(int(per_row.sum()), 1, dtype=torch.long), candidates.repeat_interleave(per_row, 0))
    for (sequence, heads), token, c in zip(sequences, new_tokens, candidates):
        grown.append(torch.cat([sequence, torch.tensor([token])]))
        # values here reach ~10: forwards of other widths round at ~2e-5 of that, so a relative term too
        torch.testing.assert_close(got[rows:rows + len(heads)], expected(bank, grown[-1], heads, c), atol=VALUE_ATOL,
                                   rtol=3e-5)
        rows += len(heads)
    return grown


@pytest.mark.parametrize("trunk", [False, True], ids=["full-depth", "shared-trunk"])
@pytest.mark.parametrize("tree", [True, False], ids=["tree", "expanded"])
def test_rows_that_join_leave_and_grow_keep_brute_force_values(tok, family, tree, trunk):
    """As in a server: requests join, grow and leave; with a shared-trunk head each layer's rows are re-gathered."""
    bank = make_bank(tok, family, layers=3, lora_layers={"concise": 1} if trunk else None)
    bank.tree_masks_ok = tree
    heads = ["helpful", "concise"]
    short, long, medium = (ids(tok, t) for t in ("hi there", "the cat sat on the mat and the dog ran far away",
                                                  "a bird sang on the tree"))
    torch.manual_seed(0)
    cands = lambda n: torch.randint(3, len(tok), (n, K))  # noqa: E731

    names = (lambda *n: n) if trunk else (lambda *n: None)  # noqa: E731
    cache = cold_rows(bank, [short], heads, cands(1), names("short"))
    joined = cold_rows(bank, [long], ["concise"], cands(1), names("long"))
    cache.extend(joined)  # the short rows are now left padded to the long one
    assert cache.row_heads == ["helpful", "concise", "concise"] and cache.real.shape[1] == len(long)

    short, long = step_matches_brute_force(bank, cache, [(short, heads), (long, ["concise"])], [7, 9], cands(2))

    cache.select([0, 1])  # the long request leaves: its padding columns go with it
    assert cache.real.shape[1] == len(short) and bool(cache.real.all())
    joined = cold_rows(bank, [medium], ["helpful", "concise"], cands(1), names("medium"))
    cache.extend(joined)
    if trunk and bank.trunk_sharing_ok:  # short and medium: one trunk row each below concise's LoRA
        assert [layer.keys.shape[0] for layer in cache.cache.layers] == [4, 4, 4]
        cache.select([0, 1, 3])  # medium's helpful row leaves; its trunk stays for its concise row
        assert [layer.keys.shape[0] for layer in cache.cache.layers] == [2 + 1, 2 + 1, 2 + 1]
        heads_of = [(short, heads), (medium, ["concise"])]
    else:
        heads_of = [(short, heads), (medium, ["helpful", "concise"])]
    step_matches_brute_force(bank, cache, heads_of, [11, 12], cands(2))


def test_selecting_no_rows_frees_the_cache(tok):
    bank = make_bank(tok)
    cache = cold_rows(bank, [ids(tok, "hello world")], ["helpful"], torch.randint(3, len(tok), (1, K)))
    assert cache.memory_bytes() > 0
    cache.select([])
    assert len(cache) == 0 and cache.memory_bytes() == 0 and cache.real.shape == (0, 0)
