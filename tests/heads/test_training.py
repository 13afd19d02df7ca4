"""TD(λ) training: λ-returns against a reference loop, isolation of the trained head, resume, steering."""

import pytest
import torch
from conftest import build_model, build_tokenizer, make_bank, vowel_share

import valuemix as vm
from valuemix.heads.training import TrainConfig, td_targets, train_head


def reference_lambda_returns(values, rewards, states, lam):
    """G_last = r; G_t = (1 − λ) V_{t+1} + λ G_{t+1}, one row and one step at a time."""
    out = torch.zeros_like(values)
    for b in range(values.shape[0]):
        positions = states[b].nonzero().flatten().tolist()
        g = rewards[b].item()
        out[b, positions[-1]] = g
        for t in reversed(positions[:-1]):
            g = (1 - lam) * values[b, t + 1].item() + lam * g
            out[b, t] = g
    return out


@pytest.mark.parametrize("lam", [0.0, 0.5, 0.95, 1.0])
def test_td_targets_equal_a_reference_loop(lam):
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(4, 12, generator=generator, dtype=torch.float64)
    rewards = torch.randn(4, generator=generator, dtype=torch.float64)
    states = torch.zeros(4, 12, dtype=torch.bool)
    for b, (start, end) in enumerate([(2, 12), (5, 9), (0, 1), (3, 11)]):
        states[b, start:end] = True
    got = td_targets(values, rewards, states, lam)
    torch.testing.assert_close(got[states], reference_lambda_returns(values, rewards, states, lam)[states])


def test_monte_carlo_targets_are_the_reward():
    states = torch.ones(2, 5, dtype=torch.bool)
    rewards = torch.tensor([0.3, -2.0])
    got = td_targets(torch.randn(2, 5), rewards, states, 1.0)
    assert torch.equal(got, rewards[:, None].expand(2, 5))


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def samples(vowel_samples):
    return vowel_samples


def test_training_touches_only_the_chosen_head(tok, samples):
    bank = make_bank(tok, heads=("helpful", "vowels"))
    backbone = {n: p.clone() for n, p in bank.model.named_parameters() if "lora_" not in n}
    other = bank.head_state("helpful")
    before = bank.head_state("vowels")
    train_head(bank, "vowels", samples, reward="vowels", config=TrainConfig(epochs=1, batch_size=8, progress=False))
    assert all(torch.equal(p, backbone[n]) for n, p in bank.model.named_parameters() if "lora_" not in n)
    assert all(torch.equal(v, bank.head_state("helpful")[k]) for k, v in other.items())
    assert any(not torch.equal(v, bank.head_state("vowels")[k]) for k, v in before.items())
    assert not any(p.requires_grad for p in bank.model.parameters())


def test_loss_falls_and_metrics_land_in_the_head_config(tok, samples):
    bank = make_bank(tok, heads=("vowels",))
    metrics = train_head(bank, "vowels", samples, reward="vowels",
                         config=TrainConfig(epochs=6, batch_size=8, lam=0.9, progress=False))
    history = metrics["loss_history"]
    assert sum(history[-3:]) / 3 < sum(history[:3]) / 3
    config = bank.configs["vowels"]
    assert (config.lam, config.data_size, config.reward) == (0.9, len(samples), "vowels")
    assert config.metrics["steps"] == 6 * 3
    assert config.reward_std == pytest.approx(torch.tensor(samples["vowels"]).std(unbiased=False).item(), rel=1e-5)


def test_resume_gives_the_same_head_as_an_uninterrupted_run(tok, samples, tmp_path):
    def fresh():
        bank = make_bank(tok, heads=("vowels",))
        return bank

    full = fresh()
    train_head(full, "vowels", samples, "vowels", TrainConfig(epochs=2, batch_size=8, progress=False))
    interrupted = fresh()
    ckpt = str(tmp_path / "ckpt")
    train_head(interrupted, "vowels", samples, "vowels",
               TrainConfig(epochs=2, batch_size=8, progress=False, checkpoint_dir=ckpt, checkpoint_every=2,
                           max_steps=4))
    resumed = fresh()  # a new process: a fresh bank, weights only from the checkpoint
    train_head(resumed, "vowels", samples, "vowels",
               TrainConfig(epochs=2, batch_size=8, progress=False, checkpoint_dir=ckpt, resume=True))
    expected = full.head_state("vowels")
    got = resumed.head_state("vowels")
    assert all(torch.allclose(got[k], v, atol=1e-6) for k, v in expected.items())
    assert resumed.configs["vowels"].metrics["steps"] == 6
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def nan_at_row_3(samples):
    return samples.map(lambda row, i: {"vowels": float("nan") if i == 3 else row["vowels"]}, with_indices=True)


@pytest.mark.parametrize("case, error, message", [
    ("missing reward column", ValueError, r"no column\(s\) \['helpful'\]"),
    ("unknown head", KeyError, "Unknown head 'nope'"),
    ("NaN reward", ValueError, "Reward 'vowels' is not a finite number at row 3"),
    ("other tokenizer", ValueError, "The samples were tokenized with tokenizer"),
])
def test_bad_training_data_gets_a_clear_error(tok, samples, case, error, message):
    bank = make_bank(build_tokenizer(vocab_size=300) if case == "other tokenizer" else tok, heads=("vowels",))
    head, reward = {"unknown head": ("nope", "vowels"), "missing reward column": ("vowels", "helpful")}.get(
        case, ("vowels", "vowels"))
    with pytest.raises(error, match=message):
        train_head(bank, head, nan_at_row_3(samples) if case == "NaN reward" else samples, reward=reward)


@pytest.mark.parametrize("settings, message", [
    ({"lam": 1.5}, "lam must be in"),
    ({"resume": True}, "resume=True needs checkpoint_dir"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be at least 1"),
    ({"mixed_precision": "fp8"}, "mixed_precision must be 'no', 'bf16' or 'fp16' \\(got 'fp8'\\)"),
])
def test_bad_train_config_is_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)


@pytest.mark.parametrize("train_seed", [0, 1])
def test_a_trained_head_steers_its_reward_both_ways(tok, train_seed):
    """β > 0 raises the rule reward on held-out prompts, β < 0 lowers it, with a clear margin."""
    base = build_model("llama", len(tok), seed=0)
    prompts = ["hello world", "the cat sat", "a happy day", "one two three", "red green blue", "please write",
               "how are you", "i am fine"]
    data = vm.score(vm.sample_base(base, tok, prompts, n_per_prompt=32, max_new_tokens=10, seed=train_seed,
                                   progress=False), {"vowels": vowel_share}, progress=False)
    bank = vm.ValueBank(base, tok)
    bank.add_head("vowels")
    train_head(bank, "vowels", data, "vowels", TrainConfig(epochs=10, batch_size=32, seed=train_seed, progress=False))
    held_out = ["the dog ran", "yes no maybe", "good day", "seven eight"]

    def mean_reward(beta):
        mixer = vm.Mixer(bank, {"vowels": beta}, top_k=10)
        scores = [r for seed in range(3) for r in
                  vowel_share(held_out, vm.generate(base, tok, held_out, mixer, max_new_tokens=10, seed=seed).texts)]
        return sum(scores) / len(scores)

    low, neutral, high = mean_reward(-8.0), mean_reward(0.0), mean_reward(8.0)
    assert high > neutral + 0.03
    assert low < neutral - 0.03
