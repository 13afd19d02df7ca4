"""The valuemix logits processor inside a real vLLM engine (SmolLM2-135M-Instruct on the CPU, the demo's heads)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest
import torch
import vllm
from conftest import free_port, serving
from gradio_client import Client
from gradio_client.exceptions import AppError

import valuemix as vm
from valuemix.compose.generate import step_kl
from valuemix.compose.mixer import DEFAULT_TOP_P
from valuemix.compose.remote import ServedModel
from valuemix.ui.logic import AppParts, RequestError, explain_step, run_mix_once, validate_request
from valuemix.compose.candidates import VALUE_ATOL
from valuemix.compose.vllm_processor import ENV_BACKBONE, ENV_HEADS, ENV_NUM_LAYERS, ValuemixLogitsProcessor
from valuemix.demo import BACKBONE_LAYERS, HEADS_DIR
from valuemix.demo.smollm import load_smollm2

PROMPTS = ["Tell me about your day.", "How do I boil an egg?", "What is the capital of France?",
           "Write a short poem about rain."]


def chat(tokenizer, request):
    return tokenizer.apply_chat_template([{"role": "user", "content": request}], tokenize=False,
                                         add_generation_prompt=True)


# CPU-sized: a fixed KV cache (256 MiB), not gpu_memory_utilization, which on a CPU is a share of the NUMA node's
# RAM minus the worker's own memory, and fails on a machine whose node reports little RAM (10 GiB: 0.1 is refused)
ENGINE = dict(dtype="float32", max_model_len=512, enforce_eager=True, kv_cache_memory_bytes=2**28)
HEADS = ("cheerful", "concise")
# vLLM's raw logits of one prefix computed in a decode step or in a prefill differ by float rounding; the values
# added on top agree within VALUE_ATOL, so the mixed logits agree within their sum.
LOGIT_ATOL = 1e-4 + VALUE_ATOL


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(SmolLM2 folder, tokenizer, the environment that points the processor at two demo heads)."""
    model, tokenizer = load_smollm2()
    folder = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    env = {ENV_BACKBONE: str(folder), ENV_HEADS: ",".join(str(HEADS_DIR / h) for h in HEADS),
           ENV_NUM_LAYERS: str(BACKBONE_LAYERS)}
    return str(folder), tokenizer, env


@pytest.fixture(scope="module")
def engine(served):
    """One vLLM engine for the module, with the processor and two demo heads."""
    folder, tokenizer, env = served
    mp = pytest.MonkeyPatch()
    for key, value in env.items():
        mp.setenv(key, value)
    llm = vllm.LLM(model=folder, logits_processors=[ValuemixLogitsProcessor], seed=0,
                   logprobs_mode="processed_logits", **ENGINE)  # logprobs report the logits after the processor
    yield llm, [chat(tokenizer, p) for p in PROMPTS]
    mp.undo()


def params(mix=None, seed=3, tokens=16, temperature=1.0, top_k=None, top_p=None, **kwargs):
    extra = None if mix is None else ({"valuemix": mix} | ({} if top_k is None else {"valuemix_top_k": top_k})
                                      | ({} if top_p is None else {"valuemix_top_p": top_p}))
    return vllm.SamplingParams(max_tokens=tokens, temperature=temperature, seed=seed, extra_args=extra, **kwargs)


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_zero_coefficients_give_exactly_what_vllm_gives_without_a_mix(engine):
    llm, prompts = engine
    plain = token_ids(llm.generate(prompts, params()))
    assert token_ids(llm.generate(prompts, params({"cheerful": 0.0, "concise": 0.0}))) == plain
    assert token_ids(llm.generate(prompts, params({}))) == plain


def test_a_mix_as_a_mapping_or_json_text_steers_the_same_way(engine):
    llm, prompts = engine
    plain = token_ids(llm.generate(prompts, params()))
    mapping = token_ids(llm.generate(prompts, params({"concise": 4.0})))
    assert token_ids(llm.generate(prompts, params(json.dumps({"concise": 4.0})))) == mapping
    assert mapping != plain
    assert sum(map(len, mapping)) <= sum(map(len, plain))  # concise: shorter or as long


def test_concurrent_requests_with_different_mixes_each_equal_the_request_alone(engine):
    assert_together_equals_alone(*engine)


def assert_together_equals_alone(llm, prompts):
    mixes = [None, {"cheerful": 3.0}, {"concise": 4.0}, {"cheerful": 2.0, "concise": -2.0}] * 2
    top_ks = [None] * 6 + [5, 40]  # two requests with their own candidate counts beside the default 20
    top_ps = [None] * 4 + [0.7, 0.5, None, 0.9]  # and three with adaptive sets (steps where some value nothing)
    together = token_ids(llm.generate(prompts * 2, [params(m, seed=10 + i, top_k=k, top_p=q)
                                                    for i, (m, k, q) in enumerate(zip(mixes, top_ks, top_ps))]))
    alone = [token_ids(llm.generate([p], params(m, seed=10 + i, top_k=k, top_p=q)))[0]
             for i, (p, m, k, q) in enumerate(zip(prompts * 2, mixes, top_ks, top_ps))]
    assert together == alone


@pytest.mark.parametrize("top_p", [None, 0.8])
def test_the_added_logits_equal_the_mixers_cold_call_on_the_same_prefixes(engine, served, top_p):
    """Each step's logits after the processor equal `Mixer` called cold on that prefix and vLLM's plain logits;
    with top_p, on their nucleus (normalised over the whole vocabulary by the same model run here)."""
    llm, prompts = engine
    folder, _, _ = served
    bank = vm.ValueBank(folder, num_layers=BACKBONE_LAYERS)
    bank.load_head([str(HEADS_DIR / h) for h in HEADS])
    sizes, _ = assert_steps_equal_cold_mixer(llm, prompts[:2], bank, {"cheerful": 2.0, "concise": -1.5}, top_p,
                                             tokens=5)
    assert top_p is None or min(sizes) < 20 and max(sizes) > 1  # the sets did adapt


def assert_steps_equal_cold_mixer(llm, prompts, bank, weights, top_p, tokens, tokenizer=None):
    """Greedy steps of each prompt: the processed logits equal a cold `Mixer(bank, weights, tokenizer=tokenizer)` on
    vLLM's plain logits of that prefix, on its top-20 or nucleus; returns (the candidate set sizes, vLLM's output)."""
    out = llm.generate(prompts, params(weights, tokens=tokens, temperature=0.0, logprobs=20, top_p=top_p))
    base, base_tokenizer = load_smollm2()
    sizes = []
    for request in out:
        prompt, steps = list(request.prompt_token_ids), request.outputs[0]
        for t, mixed in enumerate(steps.logprobs):
            prefix = prompt + list(steps.token_ids[:t])
            plain = llm.generate({"prompt_token_ids": prefix}, params(tokens=1, temperature=0.0, logprobs=20))
            raw = plain[0].outputs[0].logprobs[0]
            ranked = sorted(raw, key=lambda token: -raw[token].logprob)[:20]  # processed_logits: these are logits
            kept, nucleus = ranked, DEFAULT_TOP_P if top_p is None else top_p  # None: the server's default
            if nucleus < 1:
                with torch.inference_mode():
                    normaliser = torch.logsumexp(base(torch.tensor([prefix])).logits[0, -1].float(), -1)
                mass = (torch.tensor([raw[token].logprob for token in ranked]) - normaliser).exp().cumsum(0)
                kept = ranked[:1 + int((mass[:-1] < nucleus).sum())]  # the nucleus: the mass before < top_p
            sizes.append(len(kept))
            scores = torch.full((1, len(base_tokenizer)), -torch.inf)
            scores[0, kept] = torch.tensor([raw[token].logprob for token in kept])
            mixer = vm.Mixer(bank, weights, top_k=len(kept), top_p=1.0,  # the set is given: value all of it
                             tokenizer=tokenizer)
            expected = mixer(torch.tensor([prefix]), scores)[0]
            finite = {token for token, p in mixed.items() if math.isfinite(p.logprob)}
            assert finite == set(kept), f"step {t}: another candidate set"
            got = torch.tensor([mixed[token].logprob for token in kept])
            torch.testing.assert_close(got, expected[kept], atol=LOGIT_ATOL, rtol=0)
    return sizes, out


def finished_tokens(llm, requests: dict, join: dict, abort: set, join_at: int = 3) -> dict:
    """Token ids of each request that finishes, when `join` requests are added and `abort` ones aborted mid-flight."""
    engine, done, steps = llm.llm_engine, {}, 0
    for request_id, (prompt, p) in requests.items():
        engine.add_request(request_id, prompt, p)
    while engine.has_unfinished_requests():
        steps += 1
        if steps == join_at:
            engine.abort_request(list(abort))
            for request_id, (prompt, p) in join.items():
                engine.add_request(request_id, prompt, p)
        for output in engine.step():
            if output.finished:
                done[output.request_id] = list(output.outputs[0].token_ids)
    return done


def test_a_request_aborted_or_added_mid_flight_leaves_the_others_unchanged(engine):
    assert_mid_flight_changes_leave_the_others_unchanged(*engine)


def assert_mid_flight_changes_leave_the_others_unchanged(llm, prompts):
    mixes = {"a": {"cheerful": 3.0}, "b": {"concise": 4.0, "cheerful": -1.0}, "gone": {"concise": 2.0},
             "late": {"cheerful": -2.0, "concise": 1.0}, "plain": None}
    request = {name: (prompts[i % len(prompts)], params(mix, seed=20 + i, tokens=12))
               for i, (name, mix) in enumerate(mixes.items())}
    done = finished_tokens(llm, {n: request[n] for n in ("a", "gone", "b", "plain")}, {"late": request["late"]},
                           abort={"gone"})
    assert "gone" not in done and set(done) == {"a", "b", "late", "plain"}
    for name, tokens in done.items():
        prompt, p = request[name]
        assert tokens == token_ids(llm.generate([prompt], p))[0], name


@pytest.mark.parametrize("argv, message", [
    ([], "valuemix serve needs --base (the model to serve) and --heads"),
    (["--base", "m", "--heads", "/no/such/head"], "/no/such/head"),
])
def test_valuemix_serve_refuses_missing_models_before_starting_vllm(argv, message):
    from valuemix.serve_command import serve_main

    with pytest.raises((ValueError, OSError)) as refused:
        serve_main(argv)
    assert message in str(refused.value)


@pytest.mark.parametrize("mix, top_p, message", [
    ({"nope": 1.0}, None, "Unknown head 'nope'. Heads on this server: cheerful, concise."),
    ({"cheerful": float("nan")}, None, "Coefficient for head 'cheerful' must be a finite number, got nan."),
    ({"cheerful": 50.0}, None, "Coefficient 50.0 for head 'cheerful' is outside its range"),
    ("{not json", None, '"valuemix" is not valid JSON'),
    ([1, 2], None, '"valuemix" must be an object of head -> coefficient, got list'),
    ({"cheerful": 1.0}, 1.5, '"valuemix_top_p": top_p must be a number in (0, 1] (got 1.5)'),
])
def test_a_bad_mix_is_refused_with_the_mixers_message_and_the_engine_keeps_serving(engine, mix, top_p, message):
    llm, prompts = engine
    with pytest.raises(Exception) as refused:  # vLLM's VLLMValidationError (HTTP 400 from the server)
        llm.generate(prompts[:1], params(mix, top_p=top_p))
    assert message in str(refused.value)
    assert token_ids(llm.generate(prompts[:1], params())) == token_ids(llm.generate(prompts[:1], params()))


def listening_addresses(port: int) -> set[str]:
    """The IPv4 addresses a socket listens on at `port` (from /proc/net/tcp: this machine is Linux)."""
    addresses = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            addresses.add(".".join(str(b) for b in bytes.fromhex(address)[::-1]))
    return addresses


@pytest.fixture(scope="module")
def server(served, tmp_path_factory):
    """`valuemix serve` on the SmolLM2 folder with two demo heads, at a free port; yields its URL."""
    folder, _, _ = served
    port = free_port()
    command = [sys.executable, "-m", "valuemix.cli", "serve", "--base", folder,
               "--heads", *(str(HEADS_DIR / h) for h in HEADS), "--num-layers", str(BACKBONE_LAYERS),
               "--port", str(port), "--", "--dtype", ENGINE["dtype"], "--max-model-len", str(ENGINE["max_model_len"]),
               "--enforce-eager", "--kv-cache-memory-bytes", str(ENGINE["kv_cache_memory_bytes"])]
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600  # the first engine start takes a minute or two on a CPU
        while True:
            assert process.poll() is None, log_path.read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(2)
        yield f"http://127.0.0.1:{port}", port
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_valuemix_serve_answers_a_bad_mix_with_http_400_and_keeps_serving(served, server):
    """`valuemix serve` (vLLM's OpenAI server): the client gets a 400 naming the head, then its next request works."""
    folder, _, _ = served
    url, port = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=folder, prompt="Hello", max_tokens=4,
                                  extra_body={"vllm_xargs": {"valuemix": json.dumps({"nope": 1.0})}})
    assert refused.value.status_code == 400 and "Unknown head 'nope'" in str(refused.value)
    reply = client.completions.create(model=folder, prompt="Hello", max_tokens=4, seed=0,
                                      extra_body={"vllm_xargs": {"valuemix": json.dumps({"concise": 2.0})}})
    assert reply.choices[0].text and reply.usage.completion_tokens >= 1
    assert listening_addresses(port) == {"127.0.0.1"}


@pytest.fixture(scope="module")
def served_model(served, server):
    _, tokenizer, _ = served
    return ServedModel(server[0], [str(HEADS_DIR / h) for h in HEADS], tokenizer)


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_a_served_mix_reports_the_exact_kl_from_the_base_along_its_reply(served, served_model, top_p):
    """ServedModel's KL equals Σ_t KL(Mixer ‖ base top-k, or its nucleus), computed here with the same model."""
    folder, tokenizer, _ = served
    weights = {"cheerful": 3.0, "concise": -2.0}
    out = served_model.generate([PROMPTS[0]], weights, max_new_tokens=12, seed=5, chat_template=True, top_p=top_p)
    plain = served_model.generate([PROMPTS[0]], {"cheerful": 0.0}, max_new_tokens=12, seed=5, chat_template=True,
                                  top_p=top_p)
    assert plain.kl == [0.0] and out.texts[0] and out.texts[0] != plain.texts[0]
    base, _ = load_smollm2()
    bank = vm.ValueBank(folder, num_layers=BACKBONE_LAYERS)
    bank.load_head([str(HEADS_DIR / h) for h in HEADS])
    mixer = vm.Mixer(bank, weights, top_k=20, top_p=top_p)
    prompt = tokenizer(chat(tokenizer, PROMPTS[0]), add_special_tokens=False).input_ids
    expected = 0.0
    with torch.inference_mode():
        for t in range(len(out.token_ids[0])):
            prefix = torch.tensor([prompt + out.token_ids[0][:t]])
            scores = base(prefix).logits[:, -1].float()
            expected += float(step_kl(mixer(prefix, scores), mixer.reference(scores))[0])
    assert out.kl[0] == pytest.approx(expected, abs=1e-3, rel=1e-3)
    assert tokenizer.decode(out.token_ids[0], skip_special_tokens=True) == out.texts[0]


def test_the_slider_app_generates_on_a_served_model(served, served_model):
    """The app with a ServedModel for its bank: its API replies are the server's, with KL; 'why' says it cannot."""
    _, tokenizer, _ = served
    parts = AppParts(None, tokenizer, served_model, {"short": lambda prompts, texts: [-len(t) for t in texts]},
                     chat_template=True)
    with serving(parts) as url:
        client = Client(url, verbose=False)
        text, result = client.predict(PROMPTS[1], '{"concise": 3.0}', 10, 2, api_name="/generate")
        with pytest.raises(AppError, match="Unknown head 'polite'. Heads in this app: cheerful, concise."):
            client.predict(PROMPTS[1], {"polite": 1.0}, 10, 2, api_name="/generate")
    direct = served_model.generate([PROMPTS[1]], {"concise": 3.0}, max_new_tokens=10, seed=2, chat_template=True)
    assert text == direct.texts[0] and result["kl"] == pytest.approx(direct.kl[0], abs=1e-3)
    assert result["rewards"] == {"short": -len(text)} and result["base"]["kl"] == 0.0
    outcome = run_mix_once(parts, validate_request(parts, PROMPTS[1], {"concise": 3.0}, 10, 2))
    with pytest.raises(RequestError, match="'Why this token' needs the heads in this process"):
        explain_step(parts, outcome, 0)


def test_the_app_names_a_server_that_does_not_answer(served):
    from valuemix.ui_command import ui_main

    folder, _, _ = served
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectionError, match=f"No server answers at {dead}/v1"):
        ui_main(["--server", dead, "--base", folder, "--heads", str(HEADS_DIR / "concise")])


# ------------------------------------------------- an API base: the server samples nothing, the mix runs here
@pytest.fixture(scope="module")
def api(served, server):
    """The served SmolLM2 as an API base (heads.api), and the demo world whose heads steer it."""
    from valuemix.heads.api import APIBase
    from valuemix.demo import load_demo

    folder, tokenizer, _ = served
    return APIBase(server[0], folder, tokenizer, backoff=0.0), load_demo(heads=("cheerful", "unlearn"))


def test_beta_zero_on_an_api_base_is_the_servers_own_top_k_sampling_distribution(served, api):
    """The raw top-k log-probabilities, truncated by a head-less Mixer, equal the distribution the server samples
    from with top_k=k (its processed logprobs)."""
    folder, tokenizer, _ = served
    api_base, world = api
    mixer = vm.Mixer(world.bank, {}, top_k=20, top_p=1.0, tokenizer=tokenizer)
    for request in PROMPTS[:2]:
        ids = tokenizer(chat(tokenizer, request), add_special_tokens=False).input_ids
        top, logprobs = api_base.top_logprobs(ids, 20)
        scores = torch.full((1, len(tokenizer)), -math.inf)
        scores[0, top] = torch.tensor(logprobs)
        ours = torch.log_softmax(mixer(torch.tensor([ids]), scores), -1)[0, top]
        reply = api_base.client.completions.create(model=folder, prompt=ids, max_tokens=1, temperature=1.0,
                                                   logprobs=20, extra_body={"top_k": 20,
                                                                            "return_tokens_as_token_ids": True})
        theirs = {int(k.removeprefix("token_id:")): v for k, v in reply.choices[0].logprobs.top_logprobs[0].items()}
        assert set(theirs) == set(top)
        torch.testing.assert_close(ours, torch.tensor([theirs[t] for t in top]), atol=1e-4, rtol=0)


def test_the_demo_heads_steer_an_api_base_as_they_steer_the_local_base(api):
    """cheerful (β 8) and unlearn (β 4) raise their rewards on the API path, and the API path's mean reward is
    within two standard errors of the local path's with the same mixer settings (measured: see the issue note)."""
    from valuemix.compose.api_generate import api_generate

    api_base, world = api
    prompts = world.prompts[:8]
    for head, beta in (("cheerful", 8.0), ("unlearn", 4.0)):
        reward = world.rewards[head]
        means = {}
        for b in (0.0, beta):
            mixer = vm.Mixer(world.bank, {head: b}, top_k=20, top_p=1.0, tokenizer=world.tokenizer)
            out = api_generate(api_base, prompts, mixer, max_new_tokens=16, seed=0, chat_template=True)
            assert out.cost.calls == sum(len(t) for t in out.token_ids) and out.cost.retries == 0
            means[b] = torch.tensor(reward(prompts, out.texts), dtype=torch.float64)
        local = vm.generate(world.base, world.tokenizer, prompts,
                            vm.Mixer(world.bank, {head: beta}, top_k=20, top_p=1.0, tokenizer=world.tokenizer),
                            max_new_tokens=16, seed=0, chat_template=True)
        local_rewards = torch.tensor(reward(prompts, local.texts), dtype=torch.float64)
        steered = means[beta]
        assert steered.mean() >= means[0.0].mean() + (0.05 if head == "cheerful" else 0.0), (head, means)
        error = (steered.var() / len(steered) + local_rewards.var() / len(local_rewards)).sqrt()
        assert (steered.mean() - local_rewards.mean()).abs() <= 2 * error + 1e-9, (head, steered, local_rewards)


def test_an_api_generation_reports_its_cost_and_resumes_from_its_text(api):
    from valuemix.compose.api_generate import api_generate

    api_base, world = api
    mixer = vm.Mixer(world.bank, {"cheerful": 4.0}, top_k=10, tokenizer=world.tokenizer)
    first = api_generate(api_base, PROMPTS[:2], mixer, max_new_tokens=4, chat_template=True)
    cost = first.cost.per_token()
    assert cost["calls"] == 1.0 and cost["prompt_tokens"] > 10 and cost["seconds"] > 0
    more = api_generate(api_base, PROMPTS[:2], mixer, max_new_tokens=3, chat_template=True, resume=first.texts)
    eos = world.tokenizer.eos_token_id
    for before, after, text, ids in zip(first.texts, more.texts, first.token_ids, more.token_ids):
        assert after.startswith(before)
        resumed = len(world.tokenizer(before, add_special_tokens=False).input_ids)
        assert len(ids) - resumed == 3 or (ids[-1] == eos and len(ids) > resumed) or text[-1] == eos


def test_an_api_base_explains_server_errors_and_the_server_keeps_serving(served, api):
    from valuemix.compose.api_generate import api_generate
    from valuemix.heads.api import APIBase

    folder, tokenizer, _ = served
    api_base, world = api
    with pytest.raises(ConnectionError, match=r"did not answer after 2 attempts .*check that it runs"):
        APIBase(f"http://127.0.0.1:{free_port()}", folder, tokenizer, max_retries=1, backoff=0.0, timeout=5)
    with pytest.raises(ValueError, match=r"serves .*, not 'no-such-model': pass one of those as model"):
        APIBase(api_base.base_url, "no-such-model", tokenizer)
    too_many = vm.Mixer(world.bank, {"cheerful": 1.0}, top_k=50, tokenizer=world.tokenizer)
    with pytest.raises(ValueError, match=r"refused the request \(HTTP 400\): .*logprobs"):
        api_generate(api_base, PROMPTS[:1], too_many, max_new_tokens=2, chat_template=True)
    ok = api_generate(api_base, PROMPTS[:1], vm.Mixer(world.bank, {}, tokenizer=world.tokenizer), max_new_tokens=2)
    assert len(ok.token_ids[0]) == 2


def test_sample_base_on_an_api_base_gives_training_samples(served, api):
    """`sample_base` on an API base: the same columns as from a local base, one request per prompt, reproducible."""
    _, tokenizer, _ = served
    api_base, _ = api
    calls = api_base.cost.calls
    samples = vm.sample_base(api_base, tokenizer, PROMPTS[:2], n_per_prompt=3, max_new_tokens=8, seed=0,
                             chat_template=True, progress=False)
    assert api_base.cost.calls - calls == 2 and len(samples) == 6 and samples["prompt_index"] == [0, 0, 0, 1, 1, 1]
    eos = tokenizer.eos_token_id
    for row in samples:
        assert 1 <= len(row["completion_ids"]) <= 8 + row["finished"]
        assert row["finished"] == (row["completion_ids"][-1] == eos) and eos not in row["completion_ids"][:-1]
        assert row["completion"] == tokenizer.decode(row["completion_ids"], skip_special_tokens=True)
        assert row["prompt_ids"] == tokenizer(chat(tokenizer, PROMPTS[row["prompt_index"]]),
                                              add_special_tokens=False).input_ids
    assert len({tuple(r["completion_ids"]) for r in samples}) > 2  # the repeats differ
    again = vm.sample_base(api_base, tokenizer, PROMPTS[:2], n_per_prompt=3, max_new_tokens=8, seed=0,
                           chat_template=True, progress=False)
    assert again["completion_ids"] == samples["completion_ids"]


def test_the_slider_app_steers_an_api_base(served, server, api):
    """`valuemix ui --api-base`: the app's replies come from api_generate with the local heads; 'why this token'
    explains a step from the server's top-k log-probabilities."""
    from valuemix.compose.api_generate import api_generate
    from valuemix.ui_command import ui_main

    folder, tokenizer, _ = served
    api_base, world = api
    parts = AppParts(api_base, tokenizer, world.bank, {"cheerful": world.rewards["cheerful"]}, chat_template=True)
    with serving(parts) as url:
        text, result = Client(url, verbose=False).predict(PROMPTS[0], '{"cheerful": 8.0}', 8, 1, api_name="/generate")
    mixer = vm.Mixer(world.bank, {"cheerful": 8.0}, tokenizer=tokenizer)
    direct = api_generate(api_base, [PROMPTS[0]], mixer, max_new_tokens=8, seed=1, chat_template=True)
    assert text == direct.texts[0] and result["kl"] == pytest.approx(direct.kl[0], abs=1e-3)
    outcome = run_mix_once(parts, validate_request(parts, PROMPTS[0], {"cheerful": 8.0}, 8, 1))
    rows = explain_step(parts, outcome, 0)
    assert sum(r["chosen"] for r in rows) == 1 and 2 <= len(rows) <= 20  # the set: the nucleus of the top-20
    kept = [r for r in rows if math.isfinite(r["final_logit"])]
    assert kept and all(r["final_logit"] == pytest.approx(r["base_logit"] + r["contributions"]["cheerful"], abs=1e-3)
                        for r in kept)
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectionError, match=f"The server at {dead}/v1 did not answer after 4 attempts"):
        ui_main(["--api-base", dead, "--base", folder, "--backbone", folder, "--heads", str(HEADS_DIR / "cheerful")])


# --- a value backbone with another tokenizer than the served model's ----------------------------------------------
# SmolLM2 spells these words and numbers in pieces, which the backbone's BPE merges otherwise as the text grows
CROSS_PROMPTS = ["Repeat this word three times: supercalifragilisticexpialidocious",
                 "Write the number 1234567890 twice.", *PROMPTS[:2]]


@pytest.fixture(scope="module")
def cross_heads(served, tmp_path_factory):
    """(backbone folder, head folders, a head made for the backbone's own tokenizer): a tiny GPT-2 with a byte-level
    BPE tokenizer of its own, two random cross-tokenizer heads for SmolLM2 (one shared-trunk)."""
    from conftest import build_model, build_tokenizer, randomize_heads

    from valuemix.heads.fingerprint import tokenizer_fingerprint
    from valuemix.tiny import CORPUS

    _, smollm_tokenizer, _ = served
    folder = tmp_path_factory.mktemp("cross")
    tokenizer = build_tokenizer(vocab_size=400, kind="bpe", corpus=CORPUS + CROSS_PROMPTS * 3)
    build_model("gpt2", len(tokenizer), seed=1, layers=2).save_pretrained(folder / "backbone")
    tokenizer.save_pretrained(folder / "backbone")
    bank = vm.ValueBank(str(folder / "backbone"))
    for head, layers in zip(HEADS, (None, 1)):
        bank.add_head(head, layers=layers)
    bank.add_head("own")
    randomize_heads(bank, seed=1)
    for head in HEADS:  # as train_head(..., base_tokenizer=SmolLM2's) records it
        bank.configs[head].base_tokenizer = tokenizer_fingerprint(smollm_tokenizer)
    return (str(folder / "backbone"), [bank.save_head(h, folder / h) for h in HEADS],
            bank.save_head("own", folder / "own"))


@pytest.fixture(scope="module")
def cross_engine(served, cross_heads):
    """A vLLM engine serving SmolLM2 whose processor values text on the BPE backbone."""
    folder, tokenizer, _ = served
    backbone, heads, _ = cross_heads
    mp = pytest.MonkeyPatch()
    mp.setenv(ENV_BACKBONE, backbone)
    mp.setenv(ENV_HEADS, ",".join(heads))
    mp.delenv(ENV_NUM_LAYERS, raising=False)
    llm = vllm.LLM(model=folder, logits_processors=[ValuemixLogitsProcessor], seed=0,
                   logprobs_mode="processed_logits", **ENGINE)
    yield llm, [chat(tokenizer, p) for p in CROSS_PROMPTS]
    mp.undo()


@pytest.mark.parametrize("top_p", [1.0, None])
def test_a_backbone_of_another_tokenizer_values_text_as_the_cross_tokenizer_mixer(served, cross_heads, cross_engine,
                                                                                 top_p):
    """The processed logits equal a cold cross-tokenizer `Mixer` at every step, steps that retokenize the text's
    last backbone tokens included."""
    from valuemix.heads.tokens import retokenize

    _, tokenizer, _ = served
    backbone, heads, _ = cross_heads
    llm, prompts = cross_engine
    bank = vm.ValueBank(backbone)
    bank.load_head(heads)
    assert not bank.same_tokenizer(tokenizer)
    # small βs: these random heads' values are of order 1, and the replies should keep SmolLM2's spelling in pieces
    _, reply = assert_steps_equal_cold_mixer(llm, prompts[:2], bank, {"cheerful": 0.2, "concise": -0.1}, top_p,
                                             tokens=10, tokenizer=tokenizer)
    taken_back = 0  # steps whose text's backbone tokens do not extend the previous step's
    for request in reply:
        ids = list(request.prompt_token_ids) + list(request.outputs[0].token_ids)
        texts = tokenizer.batch_decode([ids[:n] for n in range(len(request.prompt_token_ids), len(ids) + 1)])
        backbone_ids, real = retokenize(bank.tokenizer, texts)
        rows = [row[mask.bool()].tolist() for row, mask in zip(backbone_ids, real)]
        taken_back += sum(later[:len(earlier)] != earlier for earlier, later in zip(rows, rows[1:]))
    assert taken_back > 0


def test_cross_tokenizer_requests_together_and_mid_flight_equal_each_alone(cross_engine):
    llm, prompts = cross_engine
    plain = token_ids(llm.generate(prompts, params()))
    assert token_ids(llm.generate(prompts, params({"cheerful": 0.0, "concise": 0.0}))) == plain
    assert token_ids(llm.generate(prompts, params({"cheerful": 4.0}))) != plain
    assert_together_equals_alone(llm, prompts)
    assert_mid_flight_changes_leave_the_others_unchanged(llm, prompts)


def test_valuemix_serve_takes_only_cross_tokenizer_heads_for_a_backbone_of_another_tokenizer(served, cross_heads):
    from valuemix.serve_command import ServedModels, ServerAddress, vllm_command

    folder, _, _ = served
    backbone, heads, own = cross_heads
    _, env = vllm_command(ServedModels(base=folder, backbone=backbone, heads=heads), ServerAddress(), [])
    assert env[ENV_BACKBONE] == backbone and env[ENV_HEADS] == ",".join(heads)
    with pytest.raises(ValueError, match=r"Head 'own' was made for bases with the backbone's own tokenizer, not for "
                                         r".*: train a cross-tokenizer head on this base's samples"):
        vllm_command(ServedModels(base=folder, backbone=backbone, heads=[*heads, own]), ServerAddress(), [])
