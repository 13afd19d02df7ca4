"""The slider app end to end: served on 127.0.0.1, driven in headless Chromium and through its HTTP API.

The browser is Debian's Chromium (apt-get install chromium), driven by Playwright's sync API; the tests
never download a browser. The last test runs the demo world and writes docs/app.png for the README.
"""

import os
import shutil
import sys
import threading
from pathlib import Path

import pytest
from conftest import build_model, build_tokenizer, serving, tiny_app_parts

import gradio  # noqa: F401  (the ui extra; installed by the README and .ci/run)
from gradio_client import Client
from gradio_client.exceptions import AppError
from valuemix.ui import app as ui_app
from valuemix.ui.app import build_app
from valuemix.ui.logic import AppParts, run_mix_once, validate_request

from valuemix.cli import main as cli

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 30_000  # ms, for page expectations


@pytest.fixture(scope="module")
def parts():
    return tiny_app_parts(examples=["the cat sat", "hello world"])


@pytest.fixture(scope="module")
def url(parts):
    with serving(parts, concurrency_limit=8, max_new_tokens=24) as address:
        yield address


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip("no Chromium at /usr/bin/chromium: apt-get install chromium (never `playwright install`)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def release_slider(page, head: str, fraction: float) -> None:
    """Click the head's slider track at `fraction` of its width: the value moves and `.release` fires."""
    box = page.locator(f"#beta-{head} input[type=range]").bounding_box()
    page.mouse.click(box["x"] + box["width"] * fraction, box["y"] + box["height"] / 2)


def open_page(browser, address: str, query: str = "", **kwargs):
    """A new page on the app, once the page-load event has run (it fills the share box)."""
    from playwright.sync_api import expect

    page = browser.new_page(**kwargs)
    page.goto(address + query)
    expect(page.locator("#share textarea")).not_to_have_value("", timeout=TIMEOUT)
    return page


def toast(page, text: str):
    return page.locator(".toast-body", has_text=text)


def plot_points(page):
    return page.locator("#trade-off svg g.role-mark path")


# --- the page ---------------------------------------------------------------------------------------


def test_sliders_generate_score_and_plot_in_a_real_browser(url, parts, browser, tmp_path):
    from playwright.sync_api import expect

    page = open_page(browser, url, viewport={"width": 1400, "height": 1600})
    page.fill("#prompt textarea", "the cat sat")
    release_slider(page, "helpful", 0.8)  # the release regenerates: no click needed
    expect(page.locator("#status")).to_contain_text("1 mixes tried", timeout=TIMEOUT)
    helpful = float(page.input_value("#beta-helpful input[type=number]"))
    assert 5 < helpful < 7
    expect(page.locator("#status")).to_contain_text(f"helpful={helpful:g}")
    assert page.input_value("#base-output textarea") and page.input_value("#mixed-output textarea")
    expect(page.locator("#scores")).to_contain_text("reward: length")
    expect(page.locator("#scores")).to_contain_text("reward: vowels")
    expect(page.locator("#scores")).to_contain_text("KL from base (nats)")
    expect(page.locator("#share textarea")).to_have_value(f"{url}?helpful={helpful!r}")
    expect(plot_points(page)).to_have_count(2)  # the base and the current mix
    expect(page.locator("#why")).to_contain_text("→")  # the chosen token of the explained step

    release_slider(page, "concise", 0.2)
    expect(page.locator("#status")).to_contain_text("2 mixes tried", timeout=TIMEOUT)
    expect(plot_points(page)).to_have_count(3)  # updated in place: no page reload
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("3 mixes tried", timeout=TIMEOUT)
    expect(plot_points(page)).to_have_count(4)
    concise = float(page.input_value("#beta-concise input[type=number]"))
    outcome = run_mix_once(parts, validate_request(parts, "the cat sat", {"helpful": helpful, "concise": concise},
                                                   24, 0))
    assert page.input_value("#mixed-output textarea") == outcome.mixed.text  # the page shows this mix's reply
    shot = tmp_path / "app.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    page.close()


def test_a_shared_link_sets_the_sliders_and_errors_show_in_the_page(url, browser):
    from playwright.sync_api import expect

    page = open_page(browser, url, "?helpful=1.5&concise=-0.5")
    expect(page.locator("#beta-helpful input[type=number]")).to_have_value("1.5", timeout=TIMEOUT)
    expect(page.locator("#beta-concise input[type=number]")).to_have_value("-0.5")
    expect(page.locator("#share textarea")).to_have_value(url + "?helpful=1.5&concise=-0.5")
    page.click("#generate")  # no prompt yet
    expect(toast(page, "The prompt is empty")).to_be_visible(timeout=TIMEOUT)
    page.fill("#preset-name textarea", "mine")
    page.click("#save-preset")
    expect(toast(page, "Saved preset 'mine'")).to_be_visible(timeout=TIMEOUT)
    page.click("#reset")
    expect(page.locator("#beta-helpful input[type=number]")).to_have_value("0", timeout=TIMEOUT)
    page.click("#load-preset")
    expect(page.locator("#beta-helpful input[type=number]")).to_have_value("1.5", timeout=TIMEOUT)
    page.goto(url + "?helpful=99")
    expect(toast(page, "Ignored the mix in the link")).to_be_visible(timeout=TIMEOUT)
    expect(page.locator("#beta-helpful input[type=number]")).to_have_value("0")
    page.close()


# --- the HTTP API -----------------------------------------------------------------------------------


def test_the_http_api_returns_the_text_rewards_and_kl(url, parts):
    client = Client(url, verbose=False)
    text, result = client.predict("the cat sat", '{"helpful": 2.0}', 12, 4, api_name="/generate")
    expected = run_mix_once(parts, validate_request(parts, "the cat sat", {"helpful": 2.0}, 12, 4))
    assert text == expected.mixed.text
    assert result["rewards"] == expected.mixed.rewards and result["kl"] == pytest.approx(expected.mixed.kl)
    assert result["weights"] == {"helpful": 2.0, "concise": 0.0} and result["base"]["kl"] == 0.0
    same = client.predict(prompt="the cat sat", weights={"helpful": 2.0}, max_new_tokens=12, seed=4,
                          api_name="/generate")
    assert same[0] == text


def test_api_errors_are_messages_and_the_app_stays_up(url, parts):
    client = Client(url, verbose=False)
    with pytest.raises(AppError, match="Unknown head 'polite'. Heads in this app: helpful, concise."):
        client.predict("the cat sat", {"polite": 1.0}, 12, 0, api_name="/generate")
    with pytest.raises(AppError, match="max_new_tokens must be between 1 and 256"):
        client.predict("the cat sat", {}, 1000, 0, api_name="/generate")
    text, result = client.predict("the cat sat", {}, 4, 0, api_name="/generate")
    expected = run_mix_once(parts, validate_request(parts, "the cat sat", {}, 4, 0))
    assert text == expected.mixed.text and result["weights"] == {"helpful": 0.0, "concise": 0.0}


def test_concurrent_api_calls_each_get_their_own_mix(url, monkeypatch):
    mixes = [{"helpful": h, "concise": c} for h, c in [(0, 0), (3, 0), (-3, 0), (0, 3), (0, -3), (2, 2), (-2, 4),
                                                        (5, -5)]]
    running, overlap, lock = [0], [0], threading.Lock()

    def counted(parts, request):  # how many requests decode at the same time
        with lock:
            running[0] += 1
            overlap[0] = max(overlap[0], running[0])
        try:
            return run_mix_once(parts, request)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(ui_app, "run_mix_once", counted)
    client = Client(url, verbose=False)
    jobs = [client.submit("the cat sat", mix, 24, 11, api_name="/generate") for mix in mixes]
    together = [job.result(timeout=120) for job in jobs]
    alone = [client.predict("the cat sat", mix, 24, 11, api_name="/generate") for mix in mixes]
    assert overlap[0] > 1
    for mix, (text, result), (text_alone, result_alone) in zip(mixes, together, alone):
        assert result["weights"] == {k: float(v) for k, v in mix.items()}
        assert text == text_alone and result["kl"] == pytest.approx(result_alone["kl"])
    assert len({text for text, _ in alone}) >= 6  # the mixes really differ


# --- the command line -------------------------------------------------------------------------------


def test_valuemix_ui_loads_folders_and_serves_on_localhost(tmp_path, monkeypatch):
    from valuemix.heads.bank import ValueBank

    tok = build_tokenizer()
    for name, seed in (("base", 0), ("backbone", 1)):
        build_model("llama", len(tok), seed=seed).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    bank = ValueBank(str(tmp_path / "backbone"))
    bank.add_head("polite")
    bank.save_head("polite", tmp_path / "polite")
    served = {}
    monkeypatch.setattr("valuemix.ui_command.serve", lambda world, args, max_new_tokens, top_k, top_p: served.update(
                        world=world, args=args, max_new_tokens=max_new_tokens, top_k=top_k, top_p=top_p))
    assert cli(["ui", "--base", str(tmp_path / "base"), "--backbone", str(tmp_path / "backbone"), "--top-p", "0.8",
                "--heads", str(tmp_path / "polite"), "--reward", "short=brevity", "vowels=regex:[aeiou]:count"]) == 0
    world, args = served["world"], served["args"]
    assert world.bank.heads == ["polite"] and list(world.rewards) == ["short", "vowels"]
    assert (args.host, args.port, args.share) == ("127.0.0.1", 7860, False)
    assert (served["max_new_tokens"], served["top_k"], served["top_p"], world.top_p) == (64, 20, 0.8, 0.8)
    build_app(world).close()


def test_valuemix_demo_serves_the_app_by_default(monkeypatch):
    import valuemix.demo

    world = object()
    served = {}
    monkeypatch.setattr(valuemix.demo, "load_demo", lambda: world)
    monkeypatch.setattr("valuemix.ui_command.serve", lambda w, args, max_new_tokens, top_k, top_p: served.update(
                        world=w, args=args, max_new_tokens=max_new_tokens))
    assert cli(["demo", "--port", "7861", "--max-new-tokens", "32"]) == 0
    assert served["world"] is world
    assert (served["args"].host, served["args"].port, served["max_new_tokens"]) == ("127.0.0.1", 7861, 32)


def test_without_gradio_valuemix_demo_says_what_to_install(monkeypatch, capsys):
    import valuemix.demo

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    monkeypatch.setattr(valuemix.demo, "load_demo", lambda: pytest.fail("loaded the models before checking gradio"))
    assert cli(["demo"]) == 1
    assert "pip install 'valuemix[ui]'" in capsys.readouterr().err


# --- the demo world: docs/app.png -------------------------------------------------------------------


def test_the_demo_app_in_a_browser_writes_the_readme_screenshot(browser):
    from playwright.sync_api import expect

    from valuemix.demo import load_demo
    from valuemix.demo.prompts import HELD_OUT_GROUPS

    world = load_demo()
    with serving(world, max_new_tokens=40) as address:
        page = open_page(browser, address, "?cheerful=-3.0", viewport={"width": 1400, "height": 1500})
        expect(page.locator("#beta-cheerful input[type=number]")).to_have_value("-3")
        page.fill("#prompt textarea", HELD_OUT_GROUPS["mood"][2])  # "What's your favorite season and why?"
        page.click("#generate")
        expect(page.locator("#status")).to_contain_text("1 mixes tried", timeout=180_000)
        page.fill("#beta-cheerful input[type=number]", "3")  # typed: an exact value (a typed value does not
        page.press("#beta-cheerful input[type=number]", "Enter")  # fire .release, so Generate is clicked)
        page.click("#generate")
        expect(page.locator("#status")).to_contain_text("2 mixes tried", timeout=180_000)
        expect(page.locator("#status")).to_contain_text("cheerful=3 ")
        page.click("#y-axis input")
        page.locator("ul[role=listbox] li", has_text="reward: cheerful").first.click()
        expect(page.locator("#y-axis input")).to_have_value("reward: cheerful")
        expect(plot_points(page)).to_have_count(3)
        assert page.input_value("#mixed-output textarea") != page.input_value("#base-output textarea")
        for name in world.rewards:
            expect(page.locator("#scores")).to_contain_text(f"reward: {name}")
        (REPO / "docs").mkdir(exist_ok=True)
        page.screenshot(path=str(REPO / "docs" / "app.png"), full_page=True)
        page.close()
    assert (REPO / "docs" / "app.png").stat().st_size > 50_000
