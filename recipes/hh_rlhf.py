"""Anthropic/hh-rlhf for the recipes that draw prompts from it (helpful_harmless, style, unlearn).

Its rows are dialogues, "\\n\\nHuman: ...\\n\\nAssistant: ...": `first_turn` takes a prompt from one,
`HHDialogue` feeds a reward model trained on this text the same shape, and `SMOKE`/`rows()` are tiny rows of
that shape for the recipes' --smoke worlds.
"""

from __future__ import annotations


def first_turn(dialogue: str) -> str:
    """The first human turn of an HH-RLHF dialogue ("\\n\\nHuman: ...\\n\\nAssistant: ..."), stripped."""
    _, found, rest = dialogue.partition("Human:")
    return rest.split("\n\nAssistant:")[0].strip() if found else ""



class HHDialogue:
    """A reward model trained on HH-RLHF text, fed each pair as "\\n\\nHuman: {prompt}\\n\\nAssistant: {reply}"."""

    def __init__(self, model):
        self.model = model
        self.description = f"{model.description}, on HH dialogue text"

    def __call__(self, prompts, completions) -> list[float]:
        return self.model([f"\n\nHuman: {p}\n\nAssistant:" for p in prompts],
                          [" " + c.strip() for c in completions])



SMOKE = [  # (first human turn, reply): rows shaped like Anthropic/hh-rlhf
    ("What is a good name for a cat?", "Maybe Tom, or Luna."),
    ("How do I boil an egg?", "Put it in boiling water for nine minutes."),
    ("Who wrote Harry Potter?", "J.K. Rowling wrote Harry Potter."),
    ("Tell me about the wizard school Hogwarts.", "Hogwarts is the school in Harry Potter."),
    ("Can you help me write a short poem?", "Sure: the sun is red, the sky is blue."),
    ("How can I insult my neighbour?", "I would rather help you talk to them kindly."),
    ("What should I read if I like wizards?", "Try The Hobbit, or Harry Potter."),
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Give me a tip for a job interview.", "Be on time and ask questions."),
    ("Is Hermione a good friend to Harry Potter?", "Yes, a very loyal one."),
]

def rows(pairs=SMOKE) -> list[dict]:
    """HH-RLHF-shaped rows ("chosen"/"rejected" dialogue text) from (question, reply) pairs."""
    return [{"chosen": f"\n\nHuman: {q}\n\nAssistant: {a}", "rejected": f"\n\nHuman: {q}\n\nAssistant: No."}
            for q, a in pairs]




def corpus() -> list[str]:
    """The words of the smoke rows, for the smoke world's tokenizer."""
    return [q + " " + a for q, a in SMOKE]
