"""A kill -9 at any moment of save_head over an existing head leaves a folder that loads as the old or the new head."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import torch
from conftest import make_bank
from safetensors.torch import load_file

from valuemix.heads.atomic import atomic_directory

# The writer: two versions of one head ("old" and "new"), saved once each as references, then saved over
# the target folder again and again, alternating, until it is killed.
WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from conftest import build_tokenizer, make_bank, randomize_heads
    tokenizer = build_tokenizer()
    versions = {{"old": make_bank(tokenizer, heads=("helpful",)), "new": make_bank(tokenizer, heads=("helpful",))}}
    randomize_heads(versions["new"], seed=2)
    for label, bank in versions.items():
        bank.save_head("helpful", f"{{sys.argv[1]}}/{{label}}")
    versions["old"].save_head("helpful", f"{{sys.argv[1]}}/target")
    print("saving", flush=True)
    while True:
        for bank in (versions["new"], versions["old"]):
            bank.save_head("helpful", f"{{sys.argv[1]}}/target")
""")
DELAYS = (0.0, 0.017, 0.06, 0.3)  # seconds after the writer starts saving in its loop


def head_files(folder):
    return {name: load_file(os.path.join(folder, name)) for name in ("adapter_model.safetensors",
                                                                      "value_head.safetensors")}


def same(a, b):
    return a.keys() == b.keys() and all(a[f].keys() == b[f].keys() and all(torch.equal(a[f][k], b[f][k])
                                                                             for k in a[f]) for f in a)


def test_kill_during_save_leaves_the_old_or_the_new_head(tmp_path, tokenizer):
    script = WRITER.format(tests=os.path.dirname(os.path.dirname(__file__)))
    writers = []
    for i, _ in enumerate(DELAYS):  # all writers start together: imports dominate, so they overlap
        (tmp_path / str(i)).mkdir()
        writers.append(subprocess.Popen([sys.executable, "-c", script, str(tmp_path / str(i))],
                                        stdout=subprocess.PIPE, text=True))
    for writer, delay in zip(writers, DELAYS):
        assert writer.stdout.readline() == "saving\n"
        time.sleep(delay)
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)
    for i, _ in enumerate(DELAYS):
        folder = tmp_path / str(i)
        loaded = head_files(folder / "target")
        assert same(loaded, head_files(folder / "old")) or same(loaded, head_files(folder / "new"))
        bank = make_bank(tokenizer, heads=())
        assert bank.load_head(folder / "target") == "helpful"


def test_the_next_save_removes_what_a_killed_writer_left(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    leftover = tmp_path / f".head.tmp-{dead.stdout.strip()}-0123abcd"
    leftover.mkdir()
    (tmp_path / "head").mkdir()
    with atomic_directory(tmp_path / "head") as tmp:
        (tmp_path / tmp / "new.txt").write_text("new")
    assert sorted(os.listdir(tmp_path)) == ["head"]
    assert os.listdir(tmp_path / "head") == ["new.txt"]
