"""The web chat page in real headless Chromium (Debian's /usr/bin/chromium driven by Playwright), against a
live server with a tiny LLaVA (vision) and a tiny Qwen2 (text-only) model."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from PIL import Image

import pocketvlm
from pocketvlm.serve.app import ServerThread, create_app
from pocketvlm.serve.engine import Engine

sys.path.insert(0, str(Path(__file__).parent))
from serve_fixtures import make_tiny_llava, make_tiny_qwen2  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"{CHROMIUM} is missing (apt-get install -y chromium)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only contend on a shared machine
    models = {"tiny-text": pocketvlm.load(make_tiny_qwen2(tmp_path_factory.mktemp("text")))}
    models["tiny-vlm"] = pocketvlm.load(make_tiny_llava(tmp_path_factory.mktemp("vlm")))
    models["tiny-assistant"] = pocketvlm.Assistant(vision=models["tiny-vlm"], chat=models["tiny-text"],
                                                   context_template="Seen: {descriptions}",
                                                   vision_options={"max_tokens": 12})
    engine = Engine(models, slots=2, allow_local_images=False)
    with ServerThread(create_app(engine)) as s:
        yield s, models
    engine.close()
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 900, "height": 640})
        pg.set_default_timeout(60_000)
        pg.goto(server[0].url + "/")
        pg.fill("#max-tokens", "24")  # random-weight models rarely say EOS: keep answers short
        pg.fill("#temperature", "0")  # greedy: the same answers (and docs/webchat.png) on every run
        yield pg
        browser.close()


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    f = tmp_path_factory.mktemp("photo") / "sunset.png"
    img = Image.new("RGB", (96, 64))
    img.putdata([(255 - 2 * y, 80 + x, 40 + y) for y in range(64) for x in range(96)])
    img.save(f)
    return f


def count_text_updates(page):
    """Install a MutationObserver counting changes of the answer text: one per streamed delta shown (records,
    not callbacks, since a busy browser may handle several network reads in one task)."""
    page.evaluate("""() => {
        window.__updates = 0;
        new MutationObserver((records) => { window.__updates += records.length; })
            .observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
    }""")


def ask_about_image(page, photo):
    """Attach ``photo``, ask about it as the first question of the chat, and wait for the whole answer."""
    page.set_input_files("#file", str(photo))
    page.wait_for_selector("#pending img")
    page.fill("#input", "What is in this picture?")
    page.click("#send")
    page.wait_for_function("!document.querySelector('.msg.assistant.streaming') && "
                           "document.querySelectorAll('.msg.assistant').length === 1")
    assert page.is_hidden("#error"), page.inner_text("#error")


def test_models_listed(page, server):
    page.wait_for_function("document.querySelectorAll('#model option').length >= 1")
    values = page.eval_on_selector_all("#model option", "els => els.map(e => e.value)")
    assert sorted(values) == sorted(server[1])


def test_text_answer_streams_in(page):
    page.select_option("#model", "tiny-text")
    count_text_updates(page)
    page.fill("#input", "Hello! How are you today?")
    page.click("#send")
    page.wait_for_function("!document.querySelector('.msg.assistant.streaming') && "
                           "document.querySelectorAll('.msg.assistant').length === 1")
    answer = page.inner_text(".msg.assistant .text")
    assert answer.strip()
    assert page.evaluate("window.__updates") > 3  # the answer arrived in several pieces, not at once
    assert page.inner_text(".msg.user") == "Hello! How are you today?"
    assert page.is_hidden("#error")


def test_image_on_text_model_shows_clear_error(page, photo):
    page.click("#new-chat")
    assert page.eval_on_selector_all(".msg", "els => els.length") == 0
    page.select_option("#model", "tiny-text")
    page.set_input_files("#file", str(photo))
    page.wait_for_selector("#pending img")
    page.fill("#input", "What is in this picture?")
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])")
    msg = page.inner_text("#error")
    assert "400" in msg and "text-only" in msg
    # the failed turn is withdrawn and the question and image are given back to resend
    assert page.eval_on_selector_all(".msg", "els => els.length") == 0
    assert page.input_value("#input") == "What is in this picture?"
    assert page.eval_on_selector_all("#pending img", "els => els.length") == 1


def test_drop_and_paste_attach_images(page):
    page.click("#new-chat")
    assert page.eval_on_selector_all("#pending img", "els => els.length") == 0
    attach = """async (kind) => {
        const c = document.createElement('canvas'); c.width = 20; c.height = 20;
        const g = c.getContext('2d'); g.fillStyle = kind === 'drop' ? '#3a3' : '#33a'; g.fillRect(0, 0, 20, 20);
        const blob = await new Promise(r => c.toBlob(r, 'image/png'));
        const dt = new DataTransfer();
        dt.items.add(new File([blob], kind + '.png', {type: 'image/png'}));
        if (kind === 'drop') {
            document.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
        } else {
            document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt, bubbles: true, cancelable: true}));
        }
    }"""
    page.evaluate(attach, "drop")
    page.wait_for_function("document.querySelectorAll('#pending img').length === 1")
    page.evaluate(attach, "paste")
    page.wait_for_function("document.querySelectorAll('#pending img').length === 2")
    page.click("#pending .thumb button")  # remove one
    assert page.eval_on_selector_all("#pending img", "els => els.length") == 1
    page.click("#new-chat")
    assert page.eval_on_selector_all("#pending img", "els => els.length") == 0


def test_image_question_on_vlm_streams_answer_with_thumbnail(page, server, photo):
    assert "tiny-vlm" in server[1]
    page.click("#new-chat")
    page.select_option("#model", "tiny-vlm")
    count_text_updates(page)
    ask_about_image(page, photo)
    assert page.inner_text(".msg.assistant .text").strip()
    assert page.evaluate("window.__updates") > 3
    src = page.get_attribute(".msg.user img", "src")
    assert src.startswith("data:image/png;base64,")
    # a follow-up question in the same conversation (the image stays in the history sent to the server)
    page.fill("#input", "And the colors?")
    page.click("#send")
    page.wait_for_function("!document.querySelector('.msg.assistant.streaming') && "
                           "document.querySelectorAll('.msg.assistant').length === 2")
    assert page.is_hidden("#error"), page.inner_text("#error")
    out = ROOT / "artifacts" / "webchat.png"
    out.parent.mkdir(exist_ok=True)
    page.evaluate("document.activeElement && document.activeElement.blur()")  # no blinking caret in the image
    page.screenshot(path=str(out), caret="hide", animations="disabled")
    print("answers:", page.eval_on_selector_all(".msg.assistant .text", "els => els.map(e => e.textContent)"))
    assert out.stat().st_size > 5000


def test_assistant_answer_shows_what_the_vision_model_saw(page, photo):
    page.click("#new-chat")
    label = page.eval_on_selector("#model option[value=tiny-assistant]", "e => e.textContent")
    assert "looks" in label and "answers" in label
    page.select_option("#model", "tiny-assistant")
    ask_about_image(page, photo)
    box = page.inner_text(".msg.assistant details.description")  # folded: only the summary shows
    assert "What the vision model saw" in box
    page.click(".msg.assistant details.description summary")
    assert "Image 1:" in page.inner_text(".msg.assistant details.description")
    page.fill("#input", "And the colors?")  # a follow-up: the description is remembered, not made again
    page.click("#send")
    page.wait_for_function("!document.querySelector('.msg.assistant.streaming') && "
                           "document.querySelectorAll('.msg.assistant').length === 2")
    page.click(".msg.assistant:last-child details.description summary")
    assert "Image 1 (remembered):" in page.inner_text(".msg.assistant:last-child details.description")
