"""The offline demo world: SmolLM2-135M-Instruct steered by five value heads shipped with valuemix.

    world = load_demo()
    mixer = vm.Mixer(world.bank, {"cheerful": 2.0, "unlearn": 4.0}, tokenizer=world.tokenizer)
    print(vm.generate(world.base, world.tokenizer, world.prompts[:2], mixer, chat_template=True).texts)

The heads were trained by `recipes/demo.py` with valuemix's own sample_base / score / train_head
on base samples of this project's prompts, each on one offline reward (see `.rewards`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from valuemix.compose.mixer import DEFAULT_TOP_P
from valuemix.heads.bank import ValueBank
from valuemix.demo.prompts import HELD_OUT_PROMPTS
from valuemix.demo.rewards import demo_rewards
from valuemix.demo.smollm import MODEL_ID, load_smollm2

HEAD_NAMES = ("helpful", "harmless", "cheerful", "concise", "unlearn")
BACKBONE_LAYERS = 12  # the value backbone: SmolLM2's first 12 of 30 layers (decodes ~1.8x faster than all 30)
HEADS_DIR = Path(__file__).parent / "heads"


@dataclass
class DemoWorld:
    """Everything the demo needs: the base, its tokenizer, the bank of heads, their rewards, prompts.

    Attributes:
        base: SmolLM2-135M-Instruct (a LlamaForCausalLM).
        tokenizer: its tokenizer, with its chat template.
        bank: the value bank with the demo heads loaded.
        rewards: head name -> the reward callable the head was trained on.
        prompts: the held-out requests, plain text: generate them with `chat_template=True`.
    """

    base: object
    tokenizer: object
    bank: ValueBank
    rewards: dict
    prompts: list[str]

    def app_parts(self, top_k: int = 20, top_p: float = DEFAULT_TOP_P):
        """What the slider app steers: this world, with the plain held-out requests as examples."""
        from valuemix.ui.logic import AppParts

        return AppParts(self.base, self.tokenizer, self.bank, dict(self.rewards), examples=list(self.prompts),
                        chat_template=True, top_k=top_k, top_p=top_p)


def demo_backbone(base, tokenizer, n_layers: int = BACKBONE_LAYERS) -> ValueBank:
    """An empty value bank on the demo backbone (the base's first `n_layers` layers)."""
    return ValueBank(base, tokenizer, num_layers=n_layers)


def load_demo(heads=HEAD_NAMES, heads_dir: Path | str = HEADS_DIR) -> DemoWorld:
    """Load the demo world offline: the base, the bank with the shipped heads, rewards and prompts."""
    base, tokenizer = load_smollm2()
    bank = demo_backbone(base, tokenizer)
    for name in heads:
        bank.load_head(Path(heads_dir) / name)
    return DemoWorld(base, tokenizer, bank, demo_rewards(), list(HELD_OUT_PROMPTS))


__all__ = ["BACKBONE_LAYERS", "DemoWorld", "HEAD_NAMES", "MODEL_ID", "demo_backbone", "load_demo"]
