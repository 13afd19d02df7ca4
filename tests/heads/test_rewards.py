"""Tests for valuemix.heads.rewards: rule rewards, and model rewards on tiny models saved to disk."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from valuemix.heads.loading import ModelNotFoundError
from valuemix.heads.rewards import (
    ClassifierProbability,
    EmbeddingSimilarity,
    Harmlessness,
    Keywords,
    Length,
    Regex,
    RewardModel,
    Sentiment,
    brevity,
)

WORDS = ("the cat sat on mat a dog ran in park happy sad good bad day paris france hello world "
         "user assistant : is it of capital what ?").split()
PROMPTS = ["what is the capital of france ?", "hello", "the dog", "a good day", "the cat sat", "hello world"]
COMPLETIONS = ["paris", "hello world hello", "ran in the park on a bad day", "happy", "on the mat", "sad sad dog"]
LABELS = {0: "neg", 1: "neu", 2: "pos"}
TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def word_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS: BERT-style ("bert": [CLS] x [SEP], with pad) or
    causal ("causal": <s> x, no pad token, no chat template)."""
    specials, unk = (["[PAD]", "[UNK]", "[CLS]", "[SEP]"], "[UNK]") if kind == "bert" else (["<unk>", "<s>", "</s>"], "<unk>")
    raw = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + WORDS)}, unk_token=unk))
    raw.normalizer = normalizers.Lowercase()
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "bert":
        raw.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]")
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_bert(cls, vocab_size: int, **config):
    torch.manual_seed(0)
    return cls(BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=32, max_position_embeddings=64, **config)).eval()


def save(model, tokenizer, folder):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """(folder, model, tokenizer) of a 3-label single-label BERT classifier."""
    tok = word_tokenizer("bert")
    model = tiny_bert(BertForSequenceClassification, len(tok), num_labels=3, id2label=LABELS,
                      label2id={v: k for k, v in LABELS.items()})
    return save(model, tok, tmp_path_factory.mktemp("classifier")), model, tok


@pytest.fixture(scope="module")
def multilabel(tmp_path_factory):
    tok = word_tokenizer("bert")
    model = tiny_bert(BertForSequenceClassification, len(tok), num_labels=3, id2label=LABELS,
                      label2id={v: k for k, v in LABELS.items()}, problem_type="multi_label_classification")
    return save(model, tok, tmp_path_factory.mktemp("multilabel")), model, tok


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    """A BERT encoder saved in a sentence-transformers layout (transformer at the root)."""
    tok = word_tokenizer("bert")
    model = tiny_bert(BertModel, len(tok), add_pooling_layer=False)
    folder = tmp_path_factory.mktemp("embedder")
    save(model, tok, folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 16, "pooling_mode_mean_tokens": True}))
    return str(folder), model, tok


def tiny_llama_rm(vocab_size: int, num_labels: int = 1):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         num_labels=num_labels, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    return LlamaForSequenceClassification(config).eval()


@pytest.fixture(scope="module", params=["chat", "plain"])
def reward_model(request, tmp_path_factory):
    """A scalar Llama reward model whose tokenizer has no pad token, with or without a chat template."""
    tok = word_tokenizer("causal")
    if request.param == "chat":
        tok.chat_template = TEMPLATE
    model = tiny_llama_rm(len(tok))
    return save(model, tok, tmp_path_factory.mktemp(f"rm_{request.param}")), model, tok


# --------------------------------------------------------------------------- brute force references


@torch.inference_mode()
def brute_logits(model, tok, texts, add_special_tokens=True):
    """Logits one text at a time (no padding): (n, num_labels)."""
    return torch.cat([model(**tok(t, add_special_tokens=add_special_tokens, return_tensors="pt")).logits for t in texts])


@torch.inference_mode()
def brute_embedding(model, tok, text):
    hidden = model(**tok(text, return_tensors="pt")).last_hidden_state[0]
    return F.normalize(hidden.mean(0), dim=-1)


# --------------------------------------------------------------------------- inputs


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        Length()(["a", "b"], ["c"])


def test_single_string_is_rejected():
    with pytest.raises(TypeError, match="lists of strings"):
        Length()("a prompt", "a completion")


def test_empty_batch_gives_empty_list():
    assert Regex("x")([], []) == []


# --------------------------------------------------------------------------- rules


def test_length_units():
    completions = ["one two  three", "", "ab cd"]
    assert Length("words")(["p"] * 3, completions) == [3.0, 0.0, 2.0]
    assert Length("chars")(["p"] * 3, completions) == [float(len(c)) for c in completions]


def test_length_tokens_excludes_special_tokens():
    tok = word_tokenizer("bert")  # adds [CLS] and [SEP] by default
    assert Length("tokens", tokenizer=tok)(["p", "p"], ["the cat sat", "hello"]) == [3.0, 1.0]


def test_length_tokens_needs_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        Length("tokens")


def test_length_target_and_sign():
    completions = ["a b", "a b c d e", "a b c d e f g h"]
    assert Length(target=5)(["p"] * 3, completions) == [-3.0, 0.0, -3.0]
    assert Length(sign=-1)(["p"] * 3, completions) == [-2.0, -5.0, -8.0]


def test_brevity_is_minus_length_in_tens_of_words():
    reward = brevity()
    assert reward(["p", "p"], [" ".join(["w"] * 25), "w"]) == [-2.5, -0.1]
    assert reward.description == "-length in words / 10"


def test_keywords_present_and_absent():
    prompts, completions = ["p"] * 3, ["It is Paris.", "paris!", "Lyon"]
    assert Keywords(["Paris", "Rome"])(prompts, completions) == [1.0, 1.0, 0.0]
    assert Keywords(["Paris", "Rome"], present=False)(prompts, completions) == [0.0, 0.0, 1.0]


def test_keywords_whole_word_and_case():
    prompts = ["p"] * 3
    completions = ["concatenate", "a Cat", "a cat"]
    assert Keywords("cat")(prompts, completions) == [0.0, 1.0, 1.0]
    assert Keywords("cat", whole_word=False)(prompts, completions) == [1.0, 1.0, 1.0]
    assert Keywords("cat", case_sensitive=True)(prompts, completions) == [0.0, 0.0, 1.0]


def test_keywords_with_punctuation_match_whole_words():
    assert Keywords(["C++"])(["p"] * 3, ["I like c++ a lot", "abc++", "c++11"]) == [1.0, 0.0, 0.0]


def test_keywords_count_is_negated_when_absent():
    completions = ["paris, Paris and PARIS", "rome"]
    assert Keywords("paris", count=True)(["p", "p"], completions) == [3.0, 0.0]
    assert Keywords("paris", count=True, present=False)(["p", "p"], completions) == [-3.0, -0.0]


def test_regex_present_absent_count_flags():
    completions = ["Answer: 42 and 7", "no digits"]
    assert Regex(r"\d+")(["p", "p"], completions) == [1.0, 0.0]
    assert Regex(r"\d+", present=False)(["p", "p"], completions) == [0.0, 1.0]
    assert Regex(r"\d+", count=True)(["p", "p"], completions) == [2.0, 0.0]
    assert Regex("answer")(["p"], completions[:1]) == [0.0]
    assert Regex("answer", flags=re.IGNORECASE)(["p"], completions[:1]) == [1.0]


def test_descriptions_say_what_the_reward_is():
    assert Regex("Paris", present=False).description == "regex absent: r'Paris'"
    assert repr(Regex("Paris")) == "Regex(regex present: r'Paris')"
    assert "absent" in Keywords(["Paris"], present=False).description
    assert Length(target=50).description == "-|length in words - 50|"


# --------------------------------------------------------------------------- classifier


def test_classifier_equals_brute_force_softmax(classifier):
    folder, model, tok = classifier
    expected = brute_logits(model, tok, COMPLETIONS).softmax(-1)[:, 2]
    got = ClassifierProbability(folder, "pos")(PROMPTS, COMPLETIONS)
    assert torch.allclose(torch.tensor(got), expected, atol=1e-5)


def test_classifier_probabilities_sum_to_one(classifier):
    folder = classifier[0]
    total = sum(torch.tensor(ClassifierProbability(folder, label)(PROMPTS, COMPLETIONS)) for label in LABELS.values())
    assert torch.allclose(total, torch.ones(len(COMPLETIONS)), atol=1e-5)


def test_classifier_batching_does_not_change_results(classifier):
    folder = classifier[0]
    small = ClassifierProbability(folder, "neg", batch_size=2)(PROMPTS, COMPLETIONS)
    large = ClassifierProbability(folder, "neg", batch_size=64)(PROMPTS, COMPLETIONS)
    assert torch.allclose(torch.tensor(small), torch.tensor(large), atol=1e-5)


def test_classifier_label_by_index_equals_label_by_name(classifier):
    folder = classifier[0]
    assert ClassifierProbability(folder, 1)(PROMPTS, COMPLETIONS) == ClassifierProbability(folder, "neu")(PROMPTS, COMPLETIONS)


def test_classifier_on_prompt_plus_completion_classifies_the_concatenation(classifier):
    folder, model, tok = classifier
    expected = brute_logits(model, tok, [p + c for p, c in zip(PROMPTS, COMPLETIONS)]).softmax(-1)[:, 0]
    got = ClassifierProbability(folder, "neg", on="prompt+completion")(PROMPTS, COMPLETIONS)
    assert torch.allclose(torch.tensor(got), expected, atol=1e-5)


def test_multilabel_classifier_uses_sigmoid(multilabel):
    folder, model, tok = multilabel
    expected = brute_logits(model, tok, COMPLETIONS).sigmoid()[:, 2]
    got = ClassifierProbability(folder, "pos")(PROMPTS, COMPLETIONS)
    assert torch.allclose(torch.tensor(got), expected, atol=1e-5)


def test_unknown_label_lists_the_model_labels(classifier):
    with pytest.raises(ValueError, match=r"Unknown label 'toxic'.*0: 'neg', 1: 'neu', 2: 'pos'"):
        ClassifierProbability(classifier[0], "toxic")


def test_loaded_pair_equals_path(classifier):
    folder, model, tok = classifier
    from_pair = ClassifierProbability((model, tok), "pos")(PROMPTS, COMPLETIONS)
    from_kwarg = ClassifierProbability(model, "pos", tokenizer=tok)(PROMPTS, COMPLETIONS)
    from_path = ClassifierProbability(folder, "pos")(PROMPTS, COMPLETIONS)
    assert torch.allclose(torch.tensor(from_pair), torch.tensor(from_path), atol=1e-5)
    assert from_kwarg == from_pair


def test_model_object_without_tokenizer_raises(classifier):
    with pytest.raises(ValueError, match="without a tokenizer"):
        ClassifierProbability(classifier[1], "pos")


# --------------------------------------------------------------------------- loading


def test_missing_path_raises_clear_error(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(ModelNotFoundError, match="does not exist") as info:
        ClassifierProbability(missing, "pos")
    assert isinstance(info.value, FileNotFoundError) and missing in str(info.value)


def test_hub_id_loads_from_offline_cache(classifier, hub_cache):
    folder = classifier[0]
    hub_cache(Path(folder), "org/tiny-classifier")
    from_hub = ClassifierProbability("org/tiny-classifier", "pos")
    assert from_hub(PROMPTS, COMPLETIONS) == ClassifierProbability(folder, "pos")(PROMPTS, COMPLETIONS)
    assert "org/tiny-classifier" in from_hub.description


def test_missing_hub_id_offline_raises_clear_error(hub_cache):
    with pytest.raises(ModelNotFoundError) as info:
        EmbeddingSimilarity("org/not-downloaded")
    message = str(info.value)
    assert "'org/not-downloaded'" in message and "HF_HUB_OFFLINE=1" in message
    assert "hf download org/not-downloaded" in message and "local path" in message


def test_folder_with_only_pickle_weights_is_refused(classifier, tmp_path):
    folder, model, tok = classifier
    save(model, tok, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors") as info:
        ClassifierProbability(str(tmp_path), "pos")
    assert not isinstance(info.value, ModelNotFoundError)


# --------------------------------------------------------------------------- reward model


def test_reward_model_equals_brute_force_logits(reward_model):
    folder, model, tok = reward_model
    reward = RewardModel(folder)
    if tok.chat_template:  # formatted by hand: what the template must produce
        texts = [f"<s>user: {p}\n<s>assistant: {c}\n" for p, c in zip(PROMPTS, COMPLETIONS)]
        expected = brute_logits(model, tok, texts, add_special_tokens=False)[:, 0]
    else:
        expected = brute_logits(model, tok, [p + c for p, c in zip(PROMPTS, COMPLETIONS)])[:, 0]
    assert torch.allclose(torch.tensor(reward(PROMPTS, COMPLETIONS)), expected, atol=1e-4)


def test_reward_model_uses_chat_template_when_present(reward_model):
    folder, model, tok = reward_model
    plain = brute_logits(model, tok, [p + c for p, c in zip(PROMPTS, COMPLETIONS)])[:, 0]
    got = torch.tensor(RewardModel(folder)(PROMPTS, COMPLETIONS))
    assert torch.allclose(got, plain, atol=1e-4) == (not tok.chat_template)


def test_reward_model_batching_does_not_change_results(reward_model):
    folder = reward_model[0]
    one = RewardModel(folder, batch_size=1)(PROMPTS, COMPLETIONS)
    all_ = RewardModel(folder, batch_size=64)(PROMPTS, COMPLETIONS)
    assert torch.allclose(torch.tensor(one), torch.tensor(all_), atol=1e-4)


def test_reward_model_sets_missing_pad_token_to_eos(reward_model):
    reward = RewardModel(reward_model[0])
    assert reward.tokenizer.pad_token == reward.tokenizer.eos_token
    assert reward.model.config.pad_token_id == reward.tokenizer.eos_token_id


def test_reward_model_truncation_keeps_the_end(reward_model):
    folder, model, tok = reward_model
    reward = RewardModel(folder, max_length=4)
    ids = [reward.tokenizer(reward.format(p, c), add_special_tokens=not tok.chat_template)["input_ids"][-4:]
           for p, c in zip(PROMPTS, COMPLETIONS)]
    with torch.inference_mode():
        expected = torch.cat([model(input_ids=torch.tensor([row])).logits[:, 0] for row in ids])
    assert torch.allclose(torch.tensor(reward(PROMPTS, COMPLETIONS)), expected, atol=1e-4)


def test_reward_model_with_several_outputs_needs_index(tmp_path):
    tok = word_tokenizer("causal")
    folder = save(tiny_llama_rm(len(tok), num_labels=2), tok, tmp_path)
    with pytest.raises(ValueError, match="2 outputs.*index="):
        RewardModel(folder)
    assert len(RewardModel(folder, index=1)(PROMPTS, COMPLETIONS)) == len(PROMPTS)


# --------------------------------------------------------------------------- embeddings


def test_embedding_similarity_equals_brute_force_cosine(embedder):
    folder, model, tok = embedder
    target = brute_embedding(model, tok, "a happy day")
    expected = torch.stack([brute_embedding(model, tok, c) @ target for c in COMPLETIONS])
    got = EmbeddingSimilarity(folder, description="a happy day", batch_size=4)(PROMPTS, COMPLETIONS)
    assert torch.allclose(torch.tensor(got), expected, atol=1e-5)


def test_embedding_of_the_description_itself_is_one(embedder):
    got = EmbeddingSimilarity(embedder[0], description="the cat sat on the mat")(["p"], ["the cat sat on the mat"])
    assert got[0] == pytest.approx(1.0, abs=1e-5)


def test_embedding_without_description_is_prompt_relevance(embedder):
    folder, model, tok = embedder
    expected = torch.stack([brute_embedding(model, tok, p) @ brute_embedding(model, tok, c)
                            for p, c in zip(PROMPTS, COMPLETIONS)])
    got = EmbeddingSimilarity(folder, batch_size=2)(PROMPTS, COMPLETIONS)
    assert torch.allclose(torch.tensor(got), expected, atol=1e-5)


def test_unknown_on_is_rejected_before_loading():
    with pytest.raises(ValueError, match="on must be one of"):
        ClassifierProbability("./never-loaded", "pos", on="prompt")


# --------------------------------------------------------------------------- sentiment and harmlessness (PyPI)

CHEERFUL = "What a wonderful, sunny day! I love it and I am so happy for you."
GLOOMY = "This is awful. I feel miserable, everything is terrible and sad."
POLITE = "Thank you so much for your kind help, have a lovely evening."
OFFENSIVE = "Shut up, you stupid idiot, you are a worthless piece of crap."
MIXED = [CHEERFUL, GLOOMY, POLITE, OFFENSIVE, "", "The train leaves at noon."]


def test_sentiment_equals_vader_compound():
    vader = importlib.import_module("vaderSentiment.vaderSentiment").SentimentIntensityAnalyzer()
    expected = [vader.polarity_scores(t)["compound"] for t in MIXED]
    assert Sentiment()(["p"] * len(MIXED), MIXED) == pytest.approx(expected, abs=1e-12)


def test_sentiment_prefers_cheerful_text_and_stays_in_range():
    got = Sentiment()(["p"] * len(MIXED), MIXED)
    assert got[0] > 0.5 > -0.5 > got[1]
    assert all(-1.0 <= r <= 1.0 and isinstance(r, float) for r in got)


def test_sentiment_batch_equals_one_by_one():
    reward = Sentiment()
    assert reward(["p"] * len(MIXED), MIXED) == [reward(["p"], [t])[0] for t in MIXED]


def test_sentiment_on_prompt_plus_completion_scores_the_concatenation():
    vader = importlib.import_module("vaderSentiment.vaderSentiment").SentimentIntensityAnalyzer()
    prompts = ["I hate this. ", "Great news! "]
    completions = ["Fine.", "Okay."]
    expected = [vader.polarity_scores(p + c)["compound"] for p, c in zip(prompts, completions)]
    assert Sentiment(on="prompt+completion")(prompts, completions) == pytest.approx(expected)
    assert "VADER" in Sentiment().description and "completion" in repr(Sentiment())


def test_harmlessness_equals_one_minus_profanity_probability():
    profanity_check = importlib.import_module("profanity_check")
    expected = [1.0 - float(p) for p in profanity_check.predict_prob(MIXED)]
    got = Harmlessness()(["p"] * len(MIXED), MIXED)
    assert got == pytest.approx(expected, abs=1e-12)
    assert all(isinstance(r, float) and 0.0 <= r <= 1.0 for r in got)


def test_harmlessness_prefers_polite_text():
    polite, offensive = Harmlessness()(["p", "p"], [POLITE, OFFENSIVE])
    assert polite > 0.5 > offensive


def test_harmlessness_batch_equals_one_by_one():
    reward = Harmlessness()
    batch = reward(["p"] * len(MIXED), MIXED)
    assert batch == pytest.approx([reward(["p"], [t])[0] for t in MIXED], abs=1e-12)
    assert "alt-profanity-check" in reward.description


@pytest.mark.parametrize("cls, module, package", [
    (Sentiment, "vaderSentiment", "pip install vaderSentiment"),
    (Harmlessness, "profanity_check", "pip install alt-profanity-check"),
])
def test_missing_package_names_the_pip_command(monkeypatch, cls, module, package):
    import sys

    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ImportError, match=re.escape(package)):
        cls()
