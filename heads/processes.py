"""The processes of `accelerate launch` (or the one process of a plain run), without fixing mixed precision.

`accelerate.Accelerator()` pins the process's mixed precision on first use; sampling and the command
line only need to know which process they are, so they use this, and `train_head` is free to choose.
"""

from __future__ import annotations

from accelerate import PartialState
from accelerate.utils import parse_flag_from_env


def process_state() -> PartialState:
    """accelerate's PartialState, on the CPU when launched with `accelerate launch --cpu` (as Accelerator does)."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def resolve_device(device: str) -> str:
    """"auto" → accelerate's device for this process (its own GPU under `accelerate launch`); others unchanged."""
    return str(process_state().device) if device == "auto" else device


def is_main_process() -> bool:
    """False on the other processes of `accelerate launch` (they compute but do not write)."""
    return process_state().is_main_process
