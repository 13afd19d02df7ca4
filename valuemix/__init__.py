"""valuemix: steer a frozen language model at decode time by mixing learned value heads.

    import valuemix as vm
    samples = vm.score(vm.sample_base(base, tokenizer, prompts), {"helpful": reward_fn})
    bank = vm.ValueBank(backbone); bank.add_head("helpful")
    vm.train_head(bank, "helpful", samples, reward="helpful")
    out = base.generate(**enc, logits_processor=[vm.Mixer(bank, {"helpful": 1.5})], do_sample=True)
"""

from valuemix.compose.candidates import CandidateScorer
from valuemix.compose.generate import Generation, Stream, TextPiece, generate
from valuemix.compose.mixer import Mixer
from valuemix.compose.remote import ServedModel
from valuemix.heads import rewards
from valuemix.heads.bank import ValueBank
from valuemix.heads.fingerprint import tokenizer_fingerprint
from valuemix.heads.head_config import VALUEMIX_VERSION as __version__
from valuemix.heads.head_config import HeadConfig
from valuemix.heads.sampling import sample_base, score
from valuemix.heads.training import TrainConfig, td_targets, train_head

__all__ = [
    "CandidateScorer", "Generation", "HeadConfig", "Mixer", "ServedModel", "Stream", "TextPiece", "ValueBank",
    "generate", "TrainConfig", "rewards", "sample_base", "score", "td_targets", "tokenizer_fingerprint", "train_head",
]
