"""HeadConfig: what a value head is, what it was trained for and on what (head_config.json)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from importlib.metadata import PackageNotFoundError, version

try:
    VALUEMIX_VERSION = version("valuemix")  # what every head records and the Hub is told
except PackageNotFoundError:  # run from a source tree that was never installed
    VALUEMIX_VERSION = "unknown"


@dataclass
class HeadConfig:
    """Metadata of one value head, saved as head_config.json beside its weights.

    Attributes:
        name: the head's name on a bank (e.g. "helpful").
        reward: what the head values, in words (a reward's description).
        backbone: id or path of the value backbone the adapter was trained on.
        backbone_revision: the backbone's Hub revision, when known.
        backbone_layers: the value backbone is the first `backbone_layers` decoder layers of `backbone`
            (`ValueBank(backbone, num_layers=...)`); None: all of them.
        backbone_probe: a few backbone weights, to refuse a head on another checkpoint.
        trunk_layers: the lower decoder layers without this head's LoRA, shared with every head that starts
            there (`add_head(..., layers=n)` gives num_layers − n); 0: LoRA on every layer.
        base_model: the base model whose samples trained the head.
        tokenizer_fingerprint: hash of the tokenizer's vocabulary (see `tokenizer_fingerprint`).
        base_tokenizer: fingerprint of the base's tokenizer when it is not the backbone's: the head was trained on
            that base's samples retokenized as text (`train_head(..., base_tokenizer=...)`), for cross-tokenizer
            mixing; None: made for bases with the backbone's own tokenizer.
        lam: the TD(λ) λ used in training (1.0 = Monte Carlo).
        data_size: number of (prompt, completion) samples trained on.
        reward_mean, reward_std: reward normalisation; values are in units of reward_std.
        beta_range: the coefficient range a mixer accepts for this head.
        metrics: training metrics (final loss, steps, seconds, …).
        evaluation: what `valuemix eval --record-in-heads` measured on held-out prompts: the β sweep
            (reward, KL), the working β range, and the evaluation's size (see `head_evaluation`).
        valuemix_version: the version that wrote the head.
    """

    name: str
    reward: str = ""
    backbone: str = ""
    backbone_revision: str | None = None
    backbone_layers: int | None = None
    backbone_probe: list[float] = field(default_factory=list)
    trunk_layers: int = 0
    base_model: str | None = None
    tokenizer_fingerprint: str = ""
    base_tokenizer: str | None = None
    lam: float | None = None
    data_size: int = 0
    reward_mean: float = 0.0
    reward_std: float = 1.0
    beta_range: tuple[float, float] = (-10.0, 10.0)
    metrics: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    valuemix_version: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "HeadConfig":
        known = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in data.items() if k in known})
        config.beta_range = tuple(config.beta_range)
        return config
