"""The valuemix logits processor inside a real vLLM engine (SmolLM2-135M-Instruct on the CPU, the demo's heads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import openai
import pytest
import vllm
from conftest import free_port

from valuemix.compose.vllm_processor import ENV_BACKBONE, ENV_HEADS, ENV_NUM_LAYERS, ValuemixLogitsProcessor
from valuemix.demo import BACKBONE_LAYERS, HEADS_DIR
from valuemix.demo.smollm import load_smollm2

PROMPTS = ["Tell me about your day.", "How do I boil an egg?", "What is the capital of France?",
           "Write a short poem about rain."]


def chat(tokenizer, request):
    return tokenizer.apply_chat_template([{"role": "user", "content": request}], tokenize=False,
                                         add_generation_prompt=True)


ENGINE = dict(dtype="float32", max_model_len=512, enforce_eager=True, gpu_memory_utilization=0.15)  # CPU-sized


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(SmolLM2 folder, tokenizer, the environment that points the processor at two demo heads)."""
    model, tokenizer = load_smollm2()
    folder = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    env = {ENV_BACKBONE: str(folder), ENV_HEADS: f"{HEADS_DIR / 'cheerful'},{HEADS_DIR / 'concise'}",
           ENV_NUM_LAYERS: str(BACKBONE_LAYERS)}
    return str(folder), tokenizer, env


@pytest.fixture(scope="module")
def engine(served):
    """One vLLM engine for the module, with the processor and two demo heads."""
    folder, tokenizer, env = served
    mp = pytest.MonkeyPatch()
    for key, value in env.items():
        mp.setenv(key, value)
    llm = vllm.LLM(model=folder, logits_processors=[ValuemixLogitsProcessor], seed=0, **ENGINE)
    yield llm, [chat(tokenizer, p) for p in PROMPTS]
    mp.undo()


def params(mix=None, seed=3, tokens=16):
    extra = None if mix is None else {"valuemix": mix}
    return vllm.SamplingParams(max_tokens=tokens, temperature=1.0, seed=seed, extra_args=extra)


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
    llm, prompts = engine
    mixes = [None, {"cheerful": 3.0}, {"concise": 4.0}, {"cheerful": 2.0, "concise": -2.0}] * 2
    together = token_ids(llm.generate(prompts * 2, [params(m, seed=10 + i) for i, m in enumerate(mixes)]))
    alone = [token_ids(llm.generate([p], params(m, seed=10 + i)))[0]
             for i, (p, m) in enumerate(zip(prompts * 2, mixes))]
    assert together == alone


@pytest.mark.parametrize("mix, message", [
    ({"nope": 1.0}, "Unknown head 'nope'. Heads on this server: cheerful, concise."),
    ({"cheerful": float("nan")}, "Coefficient for head 'cheerful' must be a finite number, got nan."),
    ({"cheerful": 50.0}, "Coefficient 50.0 for head 'cheerful' is outside its range"),
    ("{not json", '"valuemix" is not valid JSON'),
    ([1, 2], '"valuemix" must be an object of head -> coefficient, got list'),
])
def test_a_bad_mix_is_refused_with_the_mixers_message_and_the_engine_keeps_serving(engine, mix, message):
    llm, prompts = engine
    with pytest.raises(Exception) as refused:  # vLLM's VLLMValidationError (HTTP 400 from the server)
        llm.generate(prompts[:1], params(mix))
    assert message in str(refused.value)
    assert token_ids(llm.generate(prompts[:1], params())) == token_ids(llm.generate(prompts[:1], params()))


def test_the_openai_server_answers_a_bad_mix_with_http_400_and_keeps_serving(served, tmp_path):
    """`vllm serve` with the processor: the OpenAI client gets a 400 naming the head, then its next request works."""
    folder, _, env = served
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--host", "127.0.0.1",
               "--port", str(port), "--dtype", ENGINE["dtype"], "--max-model-len", str(ENGINE["max_model_len"]),
               "--enforce-eager", "--gpu-memory-utilization", str(ENGINE["gpu_memory_utilization"]),
               "--logits-processors", "valuemix.compose.vllm_processor:ValuemixLogitsProcessor"]
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen(command, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600  # the first engine start takes a minute or two on a CPU
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model=folder, prompt="Hello", max_tokens=4,
                                      extra_body={"vllm_xargs": {"valuemix": json.dumps({"nope": 1.0})}})
        assert refused.value.status_code == 400 and "Unknown head 'nope'" in str(refused.value)
        reply = client.completions.create(model=folder, prompt="Hello", max_tokens=4, seed=0,
                                          extra_body={"vllm_xargs": {"valuemix": json.dumps({"concise": 2.0})}})
        assert reply.choices[0].text and reply.usage.completion_tokens >= 1
    finally:
        server.terminate()
        server.wait(timeout=60)
