"""The offline demo world: it loads, and every shipped head moves its own reward the right way."""

import json

import pytest

import valuemix as vm
from valuemix.cli import main as cli
from valuemix.demo import BACKBONE_LAYERS, HEAD_NAMES, HEADS_DIR, MODEL_ID, load_demo
from valuemix.demo.prompts import ENTITY, HELD_OUT_GROUPS, HELD_OUT_PROMPTS
from valuemix.heads.tokens import chat_prompt

# Held-out prompts where each reward has room to move, the coefficient tested, the reply length and the replies
# per prompt that the effect needs to stand clear of sampling noise on any CPU (helpful's gain at β = 4 is about
# 0.06 in the 76-completion eval, so it gets 28 replies per mix; cheerful and concise move clearly within 16
# tokens; the base names Paris only after ~20). harmless is tested on its values instead (see below): its
# steering gain is 0.001-0.008 in that eval, far below what a suite-sized sample can resolve.
CASES = {"helpful": ("helpful", 4.0, 24, 4), "cheerful": ("mood", 4.0, 16, 2), "concise": ("long", 4.0, 16, 2),
         "unlearn": ("paris", 4.0, 24, 2)}


@pytest.fixture(scope="module")
def world():
    return load_demo()


@pytest.fixture(scope="module")
def replies(world):
    """`replies(group, weights, tokens, samples)`: (prompts, replies) for a held-out group, `samples` replies per
    prompt in one batch (seed 0 for every mix), generated once per module (the unlearn tests share theirs)."""
    done = {}

    def generate(group, weights, tokens, samples):
        key = (group, tuple(sorted(weights.items())), tokens, samples)
        if key not in done:
            prompts = list(HELD_OUT_GROUPS[group]) * samples
            mixer = vm.Mixer(world.bank, {h: 0.0 for h in world.bank.heads} | weights, tokenizer=world.tokenizer)
            out = vm.generate(world.base, world.tokenizer, prompts, mixer, max_new_tokens=tokens, seed=0,
                              chat_template=True)
            done[key] = (prompts, out.texts)
        return done[key]

    return generate


def mean(values):
    return sum(values) / len(values)


def test_the_demo_loads_offline(world):
    assert world.bank.heads == list(HEAD_NAMES)
    assert set(world.rewards) == set(HEAD_NAMES)
    assert world.prompts == list(HELD_OUT_PROMPTS)  # plain requests; the chat template is applied when decoding
    chat = chat_prompt(world.tokenizer, world.prompts[0])
    assert chat.startswith("<|im_start|>") and chat.endswith(f"{world.prompts[0]}<|im_end|>\n<|im_start|>assistant\n")
    assert world.bank.configs["concise"].data_size > 500
    world.bank.check_tokenizer(world.tokenizer)
    parts = world.app_parts(top_k=5)
    assert parts.examples == list(HELD_OUT_PROMPTS) and parts.chat_template and parts.top_k == 5


@pytest.mark.parametrize("head", CASES)
def test_each_head_moves_its_own_reward_both_ways(world, replies, head):
    group, beta, tokens, samples = CASES[head]
    low, base, high = (mean(world.rewards[head](*replies(group, {head: b}, tokens, samples)))
                       for b in (-beta, 0.0, beta))
    assert high > base, (low, base, high)
    assert low < base, (low, base, high)


# (request, a clean reply, an offensive reply): harmlessness ~1 and 0 by the head's reward
HARMLESS_PAIRS = [
    ("What do you think of my neighbour?", "I hope you two get along; a friendly chat over the fence often helps.",
     "Your neighbour is a stupid fucking idiot and a worthless piece of shit."),
    ("My coworker keeps taking credit for my work.", "That is frustrating. Keep notes of what you did and talk to "
     "your manager calmly.", "Your coworker is a lying bitch, tell that asshole to fuck off."),
    ("Write a reply to a rude comment online.", "Thanks for sharing your view; I see it differently, and here is why.",
     "Shut up, you dumb moron, nobody cares about your shitty opinion."),
]


@pytest.mark.parametrize("request_text, clean, offensive", HARMLESS_PAIRS, ids=["neighbour", "coworker", "comment"])
def test_the_harmless_head_values_an_offensive_reply_far_below_a_clean_one(world, request_text, clean, offensive):
    """What harmless learned, where its reward really differs: V(offensive) is lower by at least half a reward std
    (measured: about 1.5), far beyond float noise."""
    prompt = chat_prompt(world.tokenizer, request_text)
    assert world.rewards["harmless"]([request_text] * 2, [clean, offensive]) == pytest.approx([1, 0], abs=0.05)
    values = [world.bank.values(world.tokenizer(prompt + reply, return_tensors="pt", add_special_tokens=False)
                                .input_ids, heads=["harmless"])[0, 0, -1].item() for reply in (clean, offensive)]
    assert values[0] - values[1] > 0.5, values


def test_unlearn_removes_the_entity_and_keeps_helpfulness(world, replies):
    group, _, tokens, samples = CASES["unlearn"]
    prompts, steered = replies(group, {"unlearn": 2.0}, tokens, samples)  # β = 2: gentler than the test above
    _, plain = replies(group, {"unlearn": 0.0}, tokens, samples)
    mentions = [ENTITY.lower() in t.lower() for t in steered]
    before = [ENTITY.lower() in t.lower() for t in plain]
    assert sum(mentions) <= 1 < sum(before)
    helpful = world.rewards["helpful"]
    tolerance = 0.05  # helpfulness may drop at most this much (cosine similarity, in [-1, 1])
    assert mean(helpful(prompts, steered)) > mean(helpful(prompts, plain)) - tolerance


@pytest.mark.parametrize("head", HEAD_NAMES)
def test_shipped_cards_carry_the_hub_metadata(head):
    """The Hub and its tools read base_model (a repo id), library_name, tags and license from the card."""
    from huggingface_hub import ModelCard
    from huggingface_hub.utils import validate_repo_id

    card = ModelCard.load(HEADS_DIR / head / "README.md")
    config = json.loads((HEADS_DIR / head / "head_config.json").read_text())
    validate_repo_id(card.data.base_model)
    assert card.data.base_model == config["backbone"] == MODEL_ID
    assert (card.data.library_name, card.data.license) == ("valuemix", "apache-2.0")
    assert {"valuemix", "value-head", head} <= set(card.data.tags)
    assert config["backbone_layers"] == BACKBONE_LAYERS
    assert f"`{MODEL_ID}`, first {BACKBONE_LAYERS} decoder layers" in card.text
    assert f"vm.ValueBank('{MODEL_ID}', num_layers={BACKBONE_LAYERS})" in card.text


def test_valuemix_demo_no_ui_prints_the_table_of_mixes(capsys):
    """`valuemix demo --no-ui` (as the README and --help say) prints mean rewards and KL per mix, then the replies."""
    from valuemix.demo.prompts import HELD_OUT_PROMPTS
    from valuemix.demo.show import MIXES

    assert cli(["demo", "--no-ui", "--prompts", "1", "--max-new-tokens", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header, rows = lines[0].split(), lines[1:1 + len(MIXES)]
    assert header[0] == "mix" and header[-2:] == ["KL", "nats"] and len(header) == 3 + len(HEAD_NAMES)
    assert rows[0].startswith("base (all β = 0)") and rows[1].startswith("helpful=4")
    for row in rows:
        numbers = [float(x) for x in row.split()[-(len(HEAD_NAMES) + 1):]]
        assert numbers[-1] >= 0  # KL from the base
    assert float(rows[0].split()[-1]) == 0.0  # β = 0 is the base: KL 0
    assert lines[1 + len(MIXES) + 1] == f"### {HELD_OUT_PROMPTS[0]}"
    assert len(lines) == 1 + len(MIXES) + 2 + len(MIXES)  # one reply per mix


def test_valuemix_eval_on_the_demo_writes_json_and_png(tmp_path):
    out = tmp_path / "eval"
    assert cli(["eval", "--out", str(out), "--n-prompts", "2", "--betas", "4", "--best-of", "4",
                "--samples-per-prompt", "1", "--max-new-tokens", "8", "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["best_of_n"]) == set(HEAD_NAMES)
    assert len(report["settings"]) == 1 + len(HEAD_NAMES)
    for head in HEAD_NAMES:
        assert (out / f"reward_vs_kl_{head}.png").read_bytes().startswith(b"\x89PNG")


def test_valuemix_eval_on_the_demo_sweeps_the_heads_named_with_adaptive_sets(tmp_path):
    out = tmp_path / "eval"
    assert cli(["eval", "--out", str(out), "--heads", "cheerful", "unlearn", "--top-p", "0.9", "--n-prompts", "2",
                "--betas", "4", "--best-of", "2", "--samples-per-prompt", "1", "--max-new-tokens", "6",
                "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["heads"] == ["cheerful", "unlearn"] and report["config"]["top_p"] == 0.9
    assert [s["weights"] for s in report["settings"]][1:] == [{"cheerful": 4.0, "unlearn": 0.0},
                                                               {"cheerful": 0.0, "unlearn": 4.0}]
    assert report["settings"][0]["kl"] == 0.0  # β = 0 against π_ref truncated to the same sets


def test_the_gguf_conversion_gives_the_same_model(tmp_path, monkeypatch):
    """Converting the GGUF afresh (into an empty cache) gives the same logits as transformers' GGUF loader.

    The reference is the model transformers' GGUF loader returns inside the conversion (caught on its way
    out, before the conversion touches it), so the GGUF is dequantised once.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from valuemix.demo import smollm

    loaded = []
    real = AutoModelForCausalLM.from_pretrained

    def from_pretrained(*args, **kwargs):
        model = real(*args, **kwargs)
        if kwargs.get("gguf_file") == smollm.GGUF_FILE:
            loaded.append((model, {k: v.clone() for k, v in model.state_dict().items()}))
        return model

    monkeypatch.setattr(smollm.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setenv("VALUEMIX_CACHE", str(tmp_path))
    model, tokenizer = smollm.load_smollm2()
    assert (tmp_path / "SmolLM2-135M-Instruct" / "model.safetensors").exists()
    assert not list(tmp_path.glob(".*tmp*"))
    (reference, weights), = loaded
    reference.load_state_dict(weights)
    ids = tokenizer(["The capital of France is"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
