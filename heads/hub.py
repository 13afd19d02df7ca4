"""Publish value heads to the Hugging Face Hub: one head folder = one model repo, pushed in one commit.

    url = push_head(bank, "helpful", "user/vm-helpful")        # save + push; returns the commit URL
    url = push_folder("out/helpful", "user/vm-helpful")        # push a folder written by save_head
    bank.load_head("user/vm-helpful")                           # anyone, anywhere (see files.load_head)

Everything that talks to the Hub is huggingface_hub's (`HfApi.create_repo`, `HfApi.upload_folder`);
valuemix only decides what is uploaded: exactly the head files (files.REQUIRED_FILES) and the model
card, whose usage snippet names the repo. Tokens come from `token=`, HF_TOKEN or `hf auth login`.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError

from valuemix.heads import files
from valuemix.heads.head_config import VALUEMIX_VERSION


def push_head(bank, name: str, repo_id: str, private: bool = False, token: str | bool | None = None,
              commit_message: str | None = None, revision: str | None = None) -> str:
    """Save head `name` of `bank` and push it to the Hub repo `repo_id` (created if needed); returns the commit URL.

    The card's usage snippet loads the head by `repo_id`. See `push_folder` for the other arguments.
    """
    bank.check_heads([name])
    _check_repo_id(repo_id)
    with tempfile.TemporaryDirectory(prefix="valuemix-push-") as tmp:
        folder = files.save_head(bank, name, os.path.join(tmp, name), repo_id=repo_id)
        return push_folder(folder, repo_id, private=private, token=token, commit_message=commit_message,
                           revision=revision)


def push_folder(directory: str | os.PathLike, repo_id: str, private: bool = False, token: str | bool | None = None,
                commit_message: str | None = None, revision: str | None = None) -> str:
    """Push a head folder (written by `save_head`) to the Hub repo `repo_id` in one commit; returns the commit URL.

    Only the head files and README.md are uploaded (anything else in the folder stays local). The card's
    `bank.load_head(...)` line is pointed at `repo_id`; a folder without a card gets one from its
    head_config.json. The repo is created when missing (`private` applies only then; an existing repo
    keeps its visibility). `token`: a Hub token with write access; default HF_TOKEN or the token saved
    by `hf auth login` (`False` sends none). `revision`: the branch to commit to (default: main).

    Raises FileNotFoundError / ValueError (the folder is not a valid head), PermissionError (no token,
    or the Hub refused it) and ConnectionError (the Hub cannot be reached).
    """
    directory = os.path.abspath(os.fspath(directory))
    config = check_head_folder(directory)
    _check_repo_id(repo_id)
    if token is None and get_token() is None:
        raise PermissionError(f"No Hugging Face token to push head '{config.name}' to {repo_id}: log in with "
                              "`hf auth login`, set HF_TOKEN, or pass token=<a token with write access> (--token "
                              "for `valuemix push`).")
    message = commit_message or f"Upload valuemix head '{config.name}'"
    description = (f"{config.name}: values {config.reward or 'an unrecorded reward'}; trained on "
                   f"{config.data_size} samples with valuemix {config.valuemix_version or '(unknown version)'}.")
    api = HfApi(token=token, library_name="valuemix", library_version=VALUEMIX_VERSION)
    with tempfile.TemporaryDirectory(prefix="valuemix-push-") as tmp:
        staged = _stage(directory, config, repo_id, Path(tmp) / config.name)
        with _hub_errors(repo_id, api.endpoint):
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            info = api.upload_folder(repo_id=repo_id, folder_path=staged, commit_message=message,
                                     commit_description=description, revision=revision, repo_type="model")
    return str(info.commit_url)


def check_head_folder(directory: str | os.PathLike):
    """Refuse a folder that is not a complete, readable valuemix head; returns its HeadConfig."""
    directory = os.fspath(directory)
    label = f"folder {directory}"
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"No head folder at {directory}: pass the folder given to bank.save_head(name, "
                                "folder), or push a head of a bank with bank.push_head(name, repo_id).")
    return files.read_head_folder(directory, label)[0]


# ------------------------------------------------------------------------------------------ helpers
_LOAD_HEAD = re.compile(r"""(\.load_head\()(['"])(?:\\.|(?!\2).)*\2(\))""")


def _stage(directory: str, config, repo_id: str, staged: Path) -> str:
    """Copy the head files to `staged`, with a card whose usage snippet loads `repo_id`."""
    staged.mkdir(parents=True)
    for name in files.REQUIRED_FILES:
        shutil.copyfile(os.path.join(directory, name), staged / name)
    card_path = os.path.join(directory, files.MODEL_CARD)
    if os.path.isfile(card_path):
        text = Path(card_path).read_text(encoding="utf-8")
        text = _LOAD_HEAD.sub(lambda m: f"{m.group(1)}{repo_id!r}{m.group(3)}", text, count=1)
        (staged / files.MODEL_CARD).write_text(text, encoding="utf-8")
    else:
        files.head_card(config, source=repo_id).save(str(staged / files.MODEL_CARD))
    return str(staged)


def _check_repo_id(repo_id: str) -> None:
    if not isinstance(repo_id, str) or not files.looks_like_repo_id(repo_id):
        raise ValueError(f"{repo_id!r} is not a Hub repo id: use 'user/name' or 'org/name' (letters, digits, '-', "
                         "'_', '.'), e.g. 'alice/vm-helpful'.")


@contextmanager
def _hub_errors(repo_id: str, endpoint: str):
    """Turn huggingface_hub's HTTP and network errors into errors that say what to do."""
    try:
        yield
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        if status == 401:
            raise PermissionError(f"The Hugging Face Hub refused the token (401 Unauthorized) while pushing to "
                                  f"{repo_id}: log in with `hf auth login` or pass token=<a token with write "
                                  "access> (--token for `valuemix push`).") from err
        if status == 403:
            raise PermissionError(f"The token cannot write to {repo_id} (403 Forbidden): use a token with write "
                                  "access to that user or organisation (`hf auth login`, or pass token=...).") from err
        raise
    except _NETWORK_ERRORS as err:
        if constants.is_offline_mode():
            raise ConnectionError("The Hugging Face Hub cannot be reached: offline mode is on (HF_HUB_OFFLINE=1). "
                                  f"Unset HF_HUB_OFFLINE to push to {repo_id}.") from err
        raise ConnectionError(f"The Hugging Face Hub cannot be reached: {err} ({endpoint}). Check the network or "
                              f"proxy and push again; nothing was committed to {repo_id}.") from err


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection and timeout errors of the HTTP client huggingface_hub uses (httpx2, httpx or requests)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests", ("ConnectionError", "Timeout"))):
        try:
            imported = __import__(module)
        except ImportError:
            continue
        errors += [getattr(imported, n) for n in names if hasattr(imported, n)]
    return tuple(errors)


_NETWORK_ERRORS = _network_errors()
