"""Heads on a backbone with another tokenizer: each base candidate valued as text, retokenized by the backbone."""

import pytest
import torch
from conftest import Recorder, assert_same_mix, build_model, build_tokenizer, expected_scores, make_bank, \
    run_generate

import valuemix as vm
from valuemix.compose.candidates import CandidateScorer
from valuemix.compose.cross_tokenizer import CrossTokenizerScorer
from valuemix.heads.fingerprint import tokenizer_fingerprint
from valuemix.heads.tokens import real_token_mask, retokenize_samples

WEIGHTS = {"helpful": 2.0, "concise": -1.0}
# (base's tokenizer, backbone's): byte-level BPE, whole words, SentencePiece-style unigram
PAIRS = [("word", "bpe"), ("unigram", "bpe"), ("bpe", "unigram"), ("bpe", "word"), ("unigram", "word")]


def cross_world(base_kind, backbone_kind, family="llama"):
    base_tok = build_tokenizer(kind=base_kind)
    base = build_model(family, len(base_tok), seed=0)
    bank = make_bank(build_tokenizer(kind=backbone_kind, vocab_size=300), family, heads=tuple(WEIGHTS), layers=2)
    for head in WEIGHTS:  # as train_head(..., base_tokenizer=base_tok) records it
        bank.configs[head].base_tokenizer = tokenizer_fingerprint(base_tok)
    return base, base_tok, bank


def text_brute_force(base_tok):
    """V_h(text of s·a) by one whole forward of that text as the backbone tokenizes it, per row and candidate."""
    def values(bank, input_ids, attention_mask, candidates, heads):
        out = torch.zeros(len(heads), *candidates.shape)
        real = real_token_mask(input_ids, base_tok.pad_token_id).bool()
        for b in range(candidates.shape[0]):
            prefix = input_ids[b][real[b]].tolist()
            for c, candidate in enumerate(candidates[b].tolist()):
                text = base_tok.decode(prefix + [candidate])
                ids = bank.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
                out[:, b, c] = bank.values(ids, heads=heads)[:, 0, -1]
        return out
    return values


def assert_mix_equals_text_brute_force(recorder, bank, base_tok, top_k, top_p):
    for input_ids, scores, out in recorder.calls:
        assert_same_mix(out, expected_scores(bank, input_ids, scores, WEIGHTS, top_k, top_p,
                                             brute_force=text_brute_force(base_tok)))


@pytest.mark.parametrize("base_kind, backbone_kind", PAIRS)
def test_values_equal_retokenize_and_run_inside_generate(base_kind, backbone_kind):
    base, base_tok, bank = cross_world(base_kind, backbone_kind)
    mixer = vm.Mixer(bank, WEIGHTS, top_k=6, top_p=1.0, tokenizer=base_tok)
    assert mixer.cross_tokenizer
    recorder = Recorder(mixer)
    run_generate(base, base_tok, recorder, new_tokens=6)  # two prompts of different lengths: left padding
    assert isinstance(mixer.scorer, CrossTokenizerScorer) and len(recorder.calls) == 6
    assert_mix_equals_text_brute_force(recorder, bank, base_tok, 6, 1.0)


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_other_backbone_families_and_adaptive_sets(family):
    base, base_tok, bank = cross_world("unigram", "bpe", family)
    mixer = vm.Mixer(bank, WEIGHTS, top_k=6, top_p=0.7, tokenizer=base_tok)
    recorder = Recorder(mixer)
    run_generate(base, base_tok, recorder, new_tokens=5)
    assert_mix_equals_text_brute_force(recorder, bank, base_tok, 6, 0.7)


def test_cache_expansion_fallback_with_tails_of_different_lengths():
    base, base_tok, bank = cross_world("unigram", "bpe")
    bank.tree_masks_ok = False  # as for an architecture that refuses custom 4D masks
    recorder = Recorder(vm.Mixer(bank, WEIGHTS, top_k=6, top_p=1.0, tokenizer=base_tok))
    run_generate(base, base_tok, recorder, new_tokens=5)
    assert_mix_equals_text_brute_force(recorder, bank, base_tok, 6, 1.0)


def test_a_retokenized_boundary_takes_back_cached_tokens_of_that_row_only():
    """Row 0: "...the m" + "in" caches the backbone's "Ġm", "i", "n"; the candidate "e" makes "Ġm", "ine": its branch
    follows the cache only up to "Ġm". Once "e" is taken, the row takes back its cached "i", "n". Row 1 only grows."""
    base, base_tok, bank = cross_world("unigram", "bpe")
    vocab = base_tok.get_vocab()
    scorer = CrossTokenizerScorer(bank, list(WEIGHTS), base_tok)
    brute = text_brute_force(base_tok)
    rows = base_tok(["the cat sat on the m", "hello world"], return_tensors="pt", padding=True).input_ids
    cached, taken_back = [], []
    for step in (["in", "▁on"], ["e", "▁on"], ["▁on", "▁on"]):
        candidates = torch.tensor([[vocab[step[0]], vocab["▁on"]], [vocab[step[1]], vocab["e"]]])
        got = scorer(rows, candidates)
        torch.testing.assert_close(got, brute(bank, rows, None, candidates, list(WEIGHTS)), atol=1e-4, rtol=0)
        cached.append(bank.tokenizer.convert_ids_to_tokens(scorer.cached[0][-3:]))
        taken_back.append(scorer.taken_back)
        rows = torch.cat([rows, candidates[:, :1]], dim=1)
    assert cached[0][1:] == ["Ġthe", "Ġm"] and cached[1:] == [["Ġm", "i", "n"], ["Ġthe", "Ġm", "ine"]]
    assert taken_back == [0, 0, 1]


def test_own_loop_with_chat_template_and_the_fast_path_kept():
    base, base_tok, bank = cross_world("word", "bpe")
    mixer = vm.Mixer(bank, WEIGHTS, top_k=5, top_p=1.0, tokenizer=base_tok)
    out = vm.generate(base, base_tok, ["hello world", "the cat"], mixer, max_new_tokens=4, chat_template=True)
    assert [len(t) for t in out.token_ids] == [4, 4] and isinstance(mixer.scorer, CrossTokenizerScorer)
    same = vm.Mixer(bank, WEIGHTS, tokenizer=bank.tokenizer)
    vm.generate(build_model("llama", len(bank.tokenizer)), bank.tokenizer, ["hello"], same, max_new_tokens=2)
    assert not same.cross_tokenizer and type(same.scorer) is CandidateScorer
    with pytest.raises(ValueError, match="Tokenizer mismatch: the base model uses .* but this mixer was made for"):
        vm.generate(base, build_tokenizer(kind="unigram"), ["hello"], mixer, max_new_tokens=2)


def test_samples_retokenized_as_text_split_where_the_prompt_ends():
    base_tok, backbone_tok = build_tokenizer(kind="unigram"), build_tokenizer(kind="bpe", vocab_size=300)
    vocab = base_tok.get_vocab()
    prompts = [base_tok("the cat sat on the m", add_special_tokens=False).input_ids + [vocab["in"]]]
    completions = [[vocab["e"], vocab["▁on"]]]  # "...the min" + "e on": the backbone's "i", "n" become "ine"
    got_prompts, got_completions = retokenize_samples(backbone_tok, base_tok, prompts, completions)
    whole = backbone_tok(base_tok.decode(prompts[0] + completions[0]), add_special_tokens=False).input_ids
    assert got_prompts[0] + got_completions[0] == whole
    alone = backbone_tok(base_tok.decode(prompts[0]), add_special_tokens=False).input_ids
    assert backbone_tok.convert_ids_to_tokens(alone[-3:]) == ["Ġm", "i", "n"]
    assert got_prompts[0] == alone[:-2] and backbone_tok.convert_ids_to_tokens(got_completions[0])[0] == "ine"


def test_train_a_cross_tokenizer_head_save_load_and_steer(tmp_path):
    """Samples of a unigram base train a head on a BPE backbone; it is recorded as made for that base."""
    from conftest import vowel_share

    base_tok = build_tokenizer(kind="unigram")
    base = build_model("llama", len(base_tok), seed=0)
    bank = make_bank(build_tokenizer(kind="bpe", vocab_size=300), heads=(), layers=2)
    samples = vm.score(vm.sample_base(base, base_tok, ["hello world", "the cat sat", "a happy day"], n_per_prompt=4,
                                      max_new_tokens=6, seed=0, progress=False), {"vowels": vowel_share},
                       progress=False)
    bank.add_head("vowels")
    with pytest.raises(ValueError, match=r"The samples were tokenized with tokenizer .* but the bank's backbone .* "
                                         r"pass train_head\(\.\.\., base_tokenizer=<the base model's tokenizer>\)"):
        vm.train_head(bank, "vowels", samples, "vowels")
    with pytest.raises(ValueError, match="base_tokenizer is .* but the samples were tokenized with tokenizer"):
        vm.train_head(bank, "vowels", samples, "vowels", base_tokenizer=bank.tokenizer)
    vm.train_head(bank, "vowels", samples, "vowels", vm.TrainConfig(epochs=2, batch_size=4, progress=False),
                  base_tokenizer=base_tok)
    assert bank.configs["vowels"].base_tokenizer == tokenizer_fingerprint(base_tok)
    folder = bank.save_head("vowels", tmp_path / "vowels")
    assert tokenizer_fingerprint(base_tok) in (tmp_path / "vowels" / "README.md").read_text()
    other = make_bank(bank.tokenizer, heads=(), layers=2)
    other.load_head(folder)
    assert other.configs["vowels"].base_tokenizer == tokenizer_fingerprint(base_tok)
    out = vm.generate(base, base_tok, ["hello world"], vm.Mixer(other, {"vowels": 2.0}, tokenizer=base_tok),
                      max_new_tokens=3)
    assert len(out.token_ids[0]) == 3


def test_completions_the_backbone_cannot_see_are_left_out_of_training(caplog):
    """A word-level backbone drops whitespace: a completion of spaces adds no backbone token, so no state to train."""
    from conftest import vowel_share

    base_tok = build_tokenizer(kind="bpe")
    base = build_model("llama", len(base_tok), seed=0)
    bank = make_bank(build_tokenizer(kind="word", vocab_size=300), heads=(), layers=2)
    samples = vm.score(vm.sample_base(base, base_tok, ["hello world", "the cat sat"], n_per_prompt=2,
                                      max_new_tokens=4, seed=0, progress=False), {"vowels": vowel_share},
                       progress=False)
    spaces = base_tok("  \n ", add_special_tokens=False).input_ids
    blank = samples.map(lambda row, i: {"completion_ids": spaces if i in (0, 3) else row["completion_ids"]},
                        with_indices=True)
    bank.add_head("vowels")
    config = vm.TrainConfig(epochs=1, batch_size=4, progress=False)
    with caplog.at_level("WARNING", logger="valuemix.heads.training"):
        vm.train_head(bank, "vowels", blank, "vowels", config, base_tokenizer=base_tok)
    assert "2 of 4 completions have no token in the backbone's tokenizer (it drops their text): trained on the " \
           "other 2." in caplog.text
    assert bank.configs["vowels"].data_size == 2
    every = blank.map(lambda row: {"completion_ids": spaces})
    with pytest.raises(ValueError, match=r"No sample's completion has a token in the backbone's tokenizer .*: its "
                                         r"vocabulary does not cover the base's text"):
        vm.train_head(bank, "vowels", every, "vowels", config, base_tokenizer=base_tok)
