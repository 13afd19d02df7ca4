"""Tests for valuemix.heads.hub (push_head / push_folder), against a local stand-in for the Hub.

huggingface_hub's own code runs up to its HTTP boundary: `FakeHub` is an http.server on 127.0.0.1
that answers the endpoints `HfApi.create_repo` + `HfApi.upload_folder` call (huggingface_hub 2.4):
    POST /api/repos/create                                  create the repo (409 if it exists)
    POST /api/validate-yaml                                 check the README's metadata
    POST /api/models/{repo}/preupload/{revision}            upload mode per file ("regular" here)
    POST /api/models/{repo}/commit/{revision}               one NDJSON commit with the files, base64
(and GET /api/agent-harnesses, huggingface_hub's best-effort telemetry, answered 404).
The real Hub answers "lfs" for weights, which then go through hf_xet; "regular" keeps the test offline.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from huggingface_hub import ModelCard, constants

import valuemix as vm
from valuemix.heads import files, hub
from valuemix.heads.files import MODEL_CARD, REQUIRED_FILES

TOKEN = "hf_valuemix_test_token"
REPO = "alice/vm-helpful"
HEAD_FILES = sorted([*REQUIRED_FILES, MODEL_CARD])


class FakeHub:
    """A minimal Hub: records every request, each created repo and each commit's files (path -> bytes)."""

    def __init__(self, token: str = TOKEN):
        self.token = token
        self.requests: list[tuple[str, str]] = []
        self.created: list[dict] = []
        self.commits: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                fake.handle(self, "GET")

            def do_POST(self):
                fake.handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    @property
    def calls(self) -> list[tuple[str, str]]:
        """(method, path) of every request but huggingface_hub's telemetry."""
        return [r for r in self.requests if r[1] != "/api/agent-harnesses"]

    def handle(self, request, method):
        body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        path = request.path.split("?")[0]
        self.requests.append((method, path))

        def reply(status, payload):
            data = json.dumps(payload).encode()
            request.send_response(status)
            request.send_header("Content-Type", "application/json")
            request.send_header("Content-Length", str(len(data)))
            request.end_headers()
            request.wfile.write(data)

        if path == "/api/agent-harnesses":
            return reply(404, {"error": "not here"})
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return reply(401, {"error": "Invalid username or password."})
        if method == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            repo = f"{payload['organization']}/{payload['name']}"
            if any(f"{c['organization']}/{c['name']}" == repo for c in self.created):
                return reply(409, {"error": "You already created this model repo", "url": f"{self.url}/{repo}"})
            self.created.append(payload)
            return reply(200, {"url": f"{self.url}/{repo}"})
        if method == "POST" and path == "/api/validate-yaml":
            return reply(200, {"warnings": []})
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", path):
            names = [f["path"] for f in json.loads(body)["files"]]
            return reply(200, {"files": [{"path": n, "uploadMode": "regular", "shouldIgnore": False} for n in names]})
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path):
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = next(line["value"] for line in lines if line["key"] == "header")
            uploaded = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
                        for line in lines if line["key"] == "file"}
            oid = hashlib.sha1(str(len(self.commits)).encode() + body).hexdigest()  # a new commit each time
            self.commits.append({"repo": match.group(1), "revision": match.group(2), "oid": oid,
                                 "summary": header["summary"], "description": header.get("description", ""),
                                 "files": uploaded, "other": [line["key"] for line in lines
                                                              if line["key"] not in ("header", "file")]})
            return reply(200, {"commitUrl": f"{self.url}/{match.group(1)}/commit/{oid}", "commitOid": oid})
        return reply(404, {"error": f"FakeHub does not know {method} {path}"})


@pytest.fixture
def isolated_hf(tmp_path, monkeypatch):
    """No saved token, no HF_TOKEN, online, and huggingface_hub's files kept inside tmp_path."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def fake_hub(isolated_hf, monkeypatch):
    server = FakeHub()
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    yield server
    server.close()


@pytest.fixture
def backbone_dir(tiny_folder):
    return tiny_folder


@pytest.fixture
def bank(backbone_dir):
    """A bank on the saved backbone with one trained-looking head 'helpful'."""
    bank = vm.ValueBank(backbone_dir)
    bank.add_head("helpful", reward="keywords present: ['please']", base_model=backbone_dir, lam=0.95,
                  data_size=128, metrics={"final_loss": 0.125, "steps": 32})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in bank.head_parameters("helpful").values():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return bank


def python_block(card_text: str) -> str:
    return re.search(r"```python\n(.*?)```", card_text, re.S).group(1)


# --- pushing ----------------------------------------------------------------------------------------


def test_push_head_commits_exactly_the_head_files_once(bank, fake_hub, tmp_path):
    url = bank.push_head("helpful", REPO, token=TOKEN)
    [commit] = fake_hub.commits
    assert url == f"{fake_hub.url}/{REPO}/commit/{commit['oid']}"
    assert (commit["repo"], commit["revision"], commit["other"]) == (REPO, "main", [])
    assert sorted(commit["files"]) == HEAD_FILES
    expected = files.save_head(bank, "helpful", tmp_path / "expected", repo_id=REPO)
    for name in HEAD_FILES:
        with open(os.path.join(expected, name), "rb") as f:
            assert commit["files"][name] == f.read(), name


def test_push_uses_create_repo_then_one_upload(bank, fake_hub):
    bank.push_head("helpful", REPO, token=TOKEN)
    assert fake_hub.calls == [("POST", "/api/repos/create"), ("POST", "/api/validate-yaml"),
                              ("POST", f"/api/models/{REPO}/preupload/main"), ("POST", f"/api/models/{REPO}/commit/main")]
    assert fake_hub.created == [{"name": "vm-helpful", "organization": "alice", "visibility": "public",
                                 "type": "model"}]


def test_private_repo(bank, fake_hub):
    bank.push_head("helpful", REPO, token=TOKEN, private=True)
    assert fake_hub.created[0]["visibility"] == "private"


def test_commit_message(bank, fake_hub):
    bank.push_head("helpful", REPO, token=TOKEN)
    bank.push_head("helpful", REPO, token=TOKEN, commit_message="Retrain on 128 samples")
    assert [c["summary"] for c in fake_hub.commits] == ["Upload valuemix head 'helpful'", "Retrain on 128 samples"]
    assert "keywords present: ['please']" in fake_hub.commits[0]["description"]


def test_pushing_to_an_existing_repo_adds_a_commit(bank, fake_hub):
    first = bank.push_head("helpful", REPO, token=TOKEN)
    second = bank.push_head("helpful", REPO, token=TOKEN)
    assert len(fake_hub.created) == 1 and len(fake_hub.commits) == 2 and first != second


def test_pushed_card_names_the_repo_and_the_backbone(bank, fake_hub, backbone_dir):
    bank.push_head("helpful", REPO, token=TOKEN)
    card = ModelCard(fake_hub.commits[0]["files"][MODEL_CARD].decode())
    assert card.data.library_name == "valuemix"
    assert card.data.tags == ["valuemix", "value-head", "vas", "helpful"]
    assert card.data.license == "apache-2.0"
    for text in [f"bank.load_head({REPO!r})", f"vm.ValueBank({backbone_dir!r})", "keywords present: ['please']",
                 "128 sampled completions", "λ = 0.95", "| final_loss | 0.125 |", "-10 to 10"]:
        assert text in card.text, text


def test_push_folder_uploads_only_head_files_and_points_the_card_at_the_repo(bank, fake_hub, tmp_path):
    folder = tmp_path / "helpful"
    bank.save_head("helpful", folder)
    (folder / "notes.txt").write_text("local notes")
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    hub.push_folder(folder, REPO, token=TOKEN)
    uploaded = fake_hub.commits[0]["files"]
    assert sorted(uploaded) == HEAD_FILES
    card = uploaded[MODEL_CARD].decode()
    assert f"bank.load_head({REPO!r})" in card and str(folder) not in card
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before  # the folder is untouched


def test_push_folder_without_a_card_writes_one(bank, fake_hub, tmp_path):
    folder = tmp_path / "helpful"
    bank.save_head("helpful", folder)
    os.remove(folder / MODEL_CARD)
    hub.push_folder(folder, REPO, token=TOKEN)
    assert f"bank.load_head({REPO!r})" in fake_hub.commits[0]["files"][MODEL_CARD].decode()


def test_pushed_head_loads_by_id_and_its_card_snippet_runs(bank, fake_hub, tmp_path, request, capsys,
                                                          backbone_dir):
    bank.push_head("helpful", REPO, token=TOKEN)
    received = tmp_path / "received"
    received.mkdir()
    for name, data in fake_hub.commits[0]["files"].items():
        (received / name).write_bytes(data)
    request.getfixturevalue("hub_cache")(received, REPO)  # what snapshot_download would find, offline
    fresh = vm.ValueBank(backbone_dir)
    assert fresh.load_head(REPO) == "helpful"
    ids = fresh.tokenizer(["please say hello"], return_tensors="pt")["input_ids"]
    assert torch.equal(fresh.values(ids), bank.values(ids))
    snippet = python_block((received / MODEL_CARD).read_text())
    capsys.readouterr()
    exec(compile(snippet, "README.md", "exec"), {})  # as written: names the repo, the backbone and the base
    assert capsys.readouterr().out.strip()


# --- errors -----------------------------------------------------------------------------------------


def test_folder_that_is_not_a_head(fake_hub, tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(FileNotFoundError, match="is not a valuemix head"):
        hub.push_folder(tmp_path, REPO, token=TOKEN)
    assert fake_hub.calls == []


def test_head_folder_missing_a_file(bank, fake_hub, tmp_path):
    bank.save_head("helpful", tmp_path / "helpful")
    os.remove(tmp_path / "helpful" / "value_head.safetensors")
    with pytest.raises(FileNotFoundError, match="missing value_head.safetensors"):
        hub.push_folder(tmp_path / "helpful", REPO, token=TOKEN)
    assert fake_hub.calls == []


def test_no_folder(fake_hub, tmp_path):
    with pytest.raises(FileNotFoundError, match="No head folder"):
        hub.push_folder(tmp_path / "nothing", REPO, token=TOKEN)


def test_not_a_repo_id(bank, fake_hub):
    with pytest.raises(ValueError, match="not a Hub repo id"):
        bank.push_head("helpful", "just-a-name", token=TOKEN)


def test_unknown_head(bank, fake_hub):
    with pytest.raises(KeyError, match="Unknown head 'polite'"):
        bank.push_head("polite", REPO, token=TOKEN)


def test_rejected_token_says_how_to_log_in(bank, fake_hub):
    with pytest.raises(PermissionError, match=r"401 Unauthorized.*log in with `hf auth login` or pass token="):
        bank.push_head("helpful", REPO, token="hf_wrong")
    assert fake_hub.commits == []


def test_no_token_at_all_says_how_to_log_in(bank, fake_hub):
    with pytest.raises(PermissionError, match="No Hugging Face token.*hf auth login"):
        bank.push_head("helpful", REPO)
    assert fake_hub.calls == []


def test_token_from_the_environment(bank, fake_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert bank.push_head("helpful", REPO).startswith(f"{fake_hub.url}/{REPO}/commit/")


def test_hub_unreachable(bank, isolated_hf, monkeypatch):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(ConnectionError, match="The Hugging Face Hub cannot be reached: "):
        bank.push_head("helpful", REPO, token=TOKEN)


def test_offline_mode(bank, fake_hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="cannot be reached: offline mode is on"):
        bank.push_head("helpful", REPO, token=TOKEN)
    assert fake_hub.calls == []
