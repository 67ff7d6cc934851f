"""The playground page in a real browser: Debian's chromium, headless, driven by Playwright, against
a real server on a free loopback port.

Greedy settings make the page's output checkable: what it inserts or shows must be exactly what the
server's own routes answer for the same request. With DISTILLERY_SCREENSHOTS=FOLDER the tests save a
picture of each view there (`DISTILLERY_SCREENSHOTS=docs` refreshes the README's).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
from conftest import copy_vocab, save_tiny_gpt2
from serving import live_server, serve_dirs, served, slowed  # noqa: F401 - fixtures

from distillery.serve import create_app, load_served_model

STATIC = Path(__file__).resolve().parents[2] / "distillery" / "serve" / "static"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1200, "height": 760}

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                                reason="chromium is not installed (apt-get install -y chromium); the playground's "
                                       "browser tests need it")


@pytest.fixture(scope="module")
def playground_models(serve_dirs, served, tmp_path_factory, shared_data) -> dict:  # noqa: F811
    """A teacher and a (one-layer) student GPT-2, and a RoBERTa masked LM."""
    student_dir = save_tiny_gpt2(tmp_path_factory.mktemp("student") / "student", vocab_size=50257, n_embd=16,
                                 n_head=2, n_layer=1, seed=1)
    copy_vocab(shared_data, "gpt2", student_dir)
    return {"teacher": load_served_model(f"teacher={serve_dirs['gpt2']}"),
            "student": load_served_model(f"student={student_dir}"), "mlm": served["mlm"]}


@pytest.fixture(scope="module")
def server_url(playground_models):
    with live_server(create_app(list(playground_models.values()))) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server_url):
    """The playground, loaded and ready; fails the test on any error in the page's JavaScript."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(server_url + "/")
    page.wait_for_selector("body[data-ready=true]")
    yield page
    context.close()
    assert not errors, errors


def screenshot(page, name: str) -> None:
    folder = os.environ.get("DISTILLERY_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"playground-{name}.png"))


def set_value(page, testid: str, value) -> None:
    """Set an input (a range slider too, which the keyboard cannot set exactly) as a user's change would."""
    page.get_by_test_id(testid).evaluate(
        "(element, value) => { element.value = value; element.dispatchEvent(new Event('input', {bubbles: true}));"
        " element.dispatchEvent(new Event('change', {bubbles: true})); }", str(value))


def generated_text(url: str, model: str, prompt: str, max_new_tokens: int) -> str:
    answer = httpx.post(f"{url}/generate", json={"model": model, "inputs": prompt,
                                                "parameters": {"max_new_tokens": max_new_tokens}}, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()["generated_text"]


def wait_for_suggestions(page, timeout: float = 20_000) -> list[str]:
    page.wait_for_selector("[data-testid=suggestion]:not([data-done=true])", state="detached", timeout=timeout)
    return page.get_by_test_id("suggestion").all_text_contents()


# ----------------------------------------------------------------------------------------------


def test_page_and_files_come_from_the_package_alone(server_url):
    page = httpx.get(server_url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for name in ("playground.js", "playground.css"):
        assert f"/static/{name}" in page.text
        assert httpx.get(f"{server_url}/static/{name}").status_code == 200
    # Nothing fetched from elsewhere: no CDN, no web font, no absolute URL in any file.
    for file in STATIC.iterdir():
        assert not re.search(r"https?://|@import|//cdn", file.read_text(encoding="utf-8")), file.name


def test_model_lists_follow_the_tasks(page):
    options = lambda testid: page.get_by_test_id(testid).locator("option").all_text_contents()  # noqa: E731
    assert options("write-model") == ["teacher", "student"]
    assert options("fill-model") == ["mlm"]
    assert page.get_by_test_id("teacher-model").input_value() == "teacher"
    assert page.get_by_test_id("student-model").input_value() == "student"


def test_tab_streams_three_suggestions_and_enter_inserts_the_chosen(page):
    editor = page.get_by_test_id("editor")
    set_value(page, "write-max-tokens", 5)
    editor.fill("")
    editor.type("The history of")
    editor.press("Tab")
    suggestions = wait_for_suggestions(page)
    assert len(suggestions) == 3 and all(suggestions)  # sampled at temperature 1
    editor.press("ArrowDown")
    editor.press("ArrowDown")
    assert page.locator("[data-testid=suggestion][aria-selected=true]").text_content() == suggestions[2]
    screenshot(page, "write")
    editor.press("Enter")
    assert editor.input_value() == "The history of" + suggestions[2]
    assert page.get_by_test_id("suggestions").is_hidden()
    assert editor.evaluate("e => e === document.activeElement")  # typing goes on where it was


def test_a_greedy_suggestion_is_the_servers_and_a_click_inserts_it_at_the_cursor(page, server_url):
    editor = page.get_by_test_id("editor")
    set_value(page, "write-temperature", 0)  # greedy: one suggestion, checkable
    set_value(page, "write-max-tokens", 3)
    set_value(page, "write-model", "student")
    editor.fill("One day. The end.")
    editor.evaluate("e => e.setSelectionRange(8, 8)")  # after "One day."
    editor.press("Tab")
    expected = generated_text(server_url, "student", "One day.", 3)
    assert wait_for_suggestions(page) == [expected] and expected
    page.get_by_test_id("suggestion").click()
    assert editor.input_value() == "One day." + expected + " The end."


def test_escape_and_typing_dismiss_the_suggestions(page):
    editor = page.get_by_test_id("editor")
    editor.fill("Once upon a time")
    editor.press("Tab")
    assert page.get_by_test_id("suggestion").count() == 3
    editor.press("Escape")
    assert page.get_by_test_id("suggestions").is_hidden()
    assert editor.input_value() == "Once upon a time"
    editor.press("Tab")
    page.wait_for_selector("[data-testid=suggestion]")
    editor.type("!")
    assert page.get_by_test_id("suggestions").is_hidden()
    assert editor.input_value() == "Once upon a time!"


def test_suggestions_stream_in_token_by_token(page, playground_models):
    # Every forward pass sleeps, so that a suggestion can be seen half written before it is done.
    restore = slowed(playground_models["teacher"], 0.05)
    try:
        set_value(page, "write-max-tokens", 10)
        editor = page.get_by_test_id("editor")
        editor.fill("It was")
        editor.press("Tab")
        page.wait_for_function("""() => [...document.querySelectorAll('[data-testid=suggestion]')]
            .some(e => e.classList.contains('streaming') && e.textContent.length > 0)""", timeout=20_000)
        assert wait_for_suggestions(page)
    finally:
        restore()


def test_maximum_time_ends_the_suggestions(page, playground_models):
    restore = slowed(playground_models["teacher"], 0.1)
    try:
        set_value(page, "write-max-tokens", 128)  # 13 s at least without the time limit
        set_value(page, "write-max-time", 1)
        editor = page.get_by_test_id("editor")
        editor.fill("It was")
        editor.press("Tab")
        wait_for_suggestions(page, timeout=6_000)
        editor.press("Enter")  # what came in time is kept
        assert editor.input_value().startswith("It was")
    finally:
        restore()


def test_fill_mask_shows_the_top_k_with_scores_as_bars(page, server_url):
    page.get_by_test_id("tab-fill-mask").click()
    text = page.get_by_test_id("fill-text")
    assert "<mask>" in text.input_value()  # the served model's own mask token
    text.fill("Paris is the <mask> of France.")
    set_value(page, "fill-top-k", 4)
    page.get_by_test_id("fill-run").click()
    page.wait_for_selector("[data-testid=fill-row]")
    answer = httpx.post(f"{server_url}/models/mlm", json={"inputs": "Paris is the <mask> of France.",
                                                          "parameters": {"top_k": 4}}).json()
    rows = page.get_by_test_id("fill-row")
    assert rows.count() == 4
    shown = [(r.locator(".token").text_content(), float(r.locator(".score").text_content())) for r in rows.all()]
    assert [token for token, _ in shown] == [a["token_str"] for a in answer]
    assert [score for _, score in shown] == pytest.approx([a["score"] for a in answer], rel=0.01, abs=1e-4)
    widths = [r.locator(".bar-fill").evaluate("e => e.getBoundingClientRect().width") for r in rows.all()]
    assert widths == sorted(widths, reverse=True) and widths[0] > 0
    assert widths[-1] / widths[0] == pytest.approx(answer[-1]["score"] / answer[0]["score"], rel=0.02, abs=0.01)
    screenshot(page, "fill-mask")


def test_fill_mask_asks_for_the_mask_token_and_shows_the_servers_errors(page):
    page.get_by_test_id("tab-fill-mask").click()
    text = page.get_by_test_id("fill-text")
    text.fill("No mask here.")
    page.get_by_test_id("fill-run").click()
    assert page.get_by_test_id("fill-hint").text_content() == "Put <mask> where a word is missing."
    assert page.get_by_test_id("fill-table").count() == 0
    text.fill("<mask> " * 80)  # longer than the model's positions: the server's one sentence is shown
    page.get_by_test_id("fill-run").click()
    error = page.get_by_test_id("fill-error")
    error.wait_for()
    assert "token" in error.text_content()


def test_side_by_side_streams_teacher_and_student_with_their_speed(page, server_url):
    page.get_by_test_id("tab-side-by-side").click()
    prompt = "The history of the city"
    page.get_by_test_id("compare-prompt").fill(prompt)
    set_value(page, "compare-max-tokens", 12)
    set_value(page, "compare-temperature", 0)
    page.get_by_test_id("compare-run").click()
    for role in ("teacher", "student"):
        page.wait_for_selector(f"[data-testid={role}-stats][data-done=true]", timeout=20_000)
    for role in ("teacher", "student"):
        expected = generated_text(server_url, role, prompt, 12)
        assert page.get_by_test_id(f"{role}-text").text_content() == prompt + expected
        stats = page.get_by_test_id(f"{role}-stats").text_content()
        assert re.fullmatch(r"\d+ tokens · [\d.]+ tokens/s · first token \d+ ms", stats), stats
    assert re.fullmatch(r"The student decodes [\d.]+× as many tokens per second as the teacher\.",
                        page.get_by_test_id("compare-summary").text_content())
    screenshot(page, "side-by-side")


def test_side_by_side_one_at_a_time_and_a_refused_prompt(page):
    page.get_by_test_id("tab-side-by-side").click()
    page.get_by_test_id("compare-one-at-a-time").check()
    page.get_by_test_id("compare-prompt").fill("word " * 100)  # past the tiny models' 64 positions
    page.get_by_test_id("compare-run").click()
    for role in ("teacher", "student"):
        stats = page.get_by_test_id(f"{role}-stats")
        page.wait_for_selector(f"[data-testid={role}-stats][data-done=true]", timeout=20_000)
        assert "error" in stats.get_attribute("class") and "token" in stats.text_content()
    assert page.get_by_test_id("compare-summary").text_content() == ""
