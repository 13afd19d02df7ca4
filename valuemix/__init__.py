"""valuemix: steer a frozen language model at decode time by mixing learned value heads.

    import valuemix as vm
    samples = vm.score(vm.sample_base(base, tokenizer, prompts), {"helpful": reward_fn})
    bank = vm.ValueBank(backbone); bank.add_head("helpful")
    vm.train_head(bank, "helpful", samples, reward="helpful")
    out = base.generate(**enc, logits_processor=[vm.Mixer(bank, {"helpful": 1.5})], do_sample=True)
"""

__version__ = "0.1.0"

from .compose.candidates import CandidateScorer
from .compose.generate import Generation, Stream, TextPiece, generate
from .compose.mixer import Mixer
from .heads import rewards
from .heads.bank import ValueBank
from .heads.fingerprint import tokenizer_fingerprint
from .heads.head_config import HeadConfig
from .heads.sampling import sample_base, score
from .heads.training import TrainConfig, td_targets, train_head

__all__ = [
    "CandidateScorer", "Generation", "HeadConfig", "Mixer", "Stream", "TextPiece", "ValueBank", "generate",
    "TrainConfig", "rewards", "sample_base", "score", "td_targets", "tokenizer_fingerprint", "train_head",
]
