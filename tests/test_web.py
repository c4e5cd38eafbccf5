"""The web chat page in a real browser (Debian's chromium via Playwright) against a live Threadline
server with the OpenAI-compatible engine double behind it. Screenshots go to tests/artifacts/web/."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.doubles.images import png_bytes
from tests.doubles.live import LiveServer
from threadline.config import Settings
from threadline.server.app import create_app
from threadline.server.keys import create_key

CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parent / "artifacts" / "web"
USER = "web-tester"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not shutil.which("chromium") and not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is required for the web page tests: apt-get install -y chromium")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield b
        b.close()


def _settings(url: str, db: str) -> Settings:
    return Settings.build(
        database_url=db,
        engines={
            "acc": {"kind": "openai", "base_url": f"{url}/v1", "api_key": "sk-test-double-key", "model": "m",
                    "max_retries": 0, "price_input_per_mtok": 1.0, "price_output_per_mtok": 2.0},
            "alt": {"kind": "openai", "base_url": f"{url}/v1", "api_key": "sk-test-double-key", "model": "m-alt",
                    "max_retries": 0},
        },
        apps={"demo": {"engine": "acc", "system": ["You are terse."]}},
        include_presets=False,
    )


@pytest.fixture
def server(oai, tmp_path):
    d, url = oai
    settings = _settings(url, f"sqlite+aiosqlite:///{tmp_path}/web.db")
    # Playwright's sync API keeps an event loop on this thread, so the key is made on another one.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        key = pool.submit(asyncio.run, create_key(settings, "demo")).result()
    srv = LiveServer(create_app(settings)).start()
    yield srv.url, key, d
    srv.stop()


@pytest.fixture
def page(browser: Browser, server) -> Iterator[Page]:
    # bypass_csp: the tests evaluate their own JavaScript, and the XSS check must hold on sanitising
    # alone. The phone and open-mode tests run under the page's real policy.
    ctx = browser.new_context(viewport={"width": 1280, "height": 860}, bypass_csp=True)
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.errors = errors  # type: ignore[attr-defined]
    yield pg
    ctx.close()


def sign_in(page: Page, base: str, key: str) -> None:
    page.goto(base + "/")
    expect(page.locator("#signin")).to_be_visible()
    page.fill("#signin-key", key)
    page.fill("#signin-user", USER)
    page.click("#signin-form button[type=submit]")
    expect(page.locator("#shell")).to_be_visible()


def send(page: Page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_idle(page: Page, timeout: float = 15_000) -> None:
    expect(page.locator("#send")).to_be_visible(timeout=timeout)


def api(base: str, key: str, path: str) -> dict:
    r = httpx.get(base + path, headers={"Authorization": f"Bearer {key}"}, timeout=10)
    r.raise_for_status()
    return r.json()


def test_chat_streams_reload_continue_and_the_engine_sees_history(page: Page, server) -> None:
    base, key, d = server
    d.reset(reply="Hello **there**, here is code:\n\n```python\nprint('hi')\n```\nDone streaming now.", slow=0.08,
            chunk_size=6)
    sign_in(page, base, key)
    page.screenshot(path=str(SHOTS / "desktop-empty.png"))

    # Shift+Enter is a newline, not a send.
    page.fill("#input", "What is 2+2?")
    page.press("#input", "Shift+Enter")
    page.type("#input", "Be brief.")
    assert page.input_value("#input") == "What is 2+2?\nBe brief."
    assert not page.locator(".msg.user").count()
    page.press("#input", "Enter")

    answer = page.locator(".msg.assistant .answer").last
    # Streaming: part of the answer is on screen while the stop button is still showing.
    expect(page.locator("#stop")).to_be_visible()
    page.wait_for_function("document.querySelector('.msg.assistant .answer').textContent.length > 0")
    partial = answer.text_content() or ""
    assert "Done streaming now." not in partial
    page.screenshot(path=str(SHOTS / "desktop-streaming.png"))
    wait_idle(page)
    expect(answer).to_contain_text("Done streaming now.")
    expect(answer.locator("strong")).to_have_text("there")
    expect(answer.locator("pre code.hljs")).to_have_count(1)  # highlighted by highlight.js
    meta = page.locator(".msg.assistant .meta").last
    expect(meta).to_contain_text("acc")
    expect(meta).to_contain_text("tokens")
    expect(meta).to_contain_text("USD")
    page.screenshot(path=str(SHOTS / "desktop-answer.png"))

    # Reload: still signed in (the key stays in the browser), the conversation is in the list.
    page.reload()
    expect(page.locator("#shell")).to_be_visible()
    item = page.locator("#conv-list li").first
    expect(item).to_contain_text("What is 2+2?")
    item.locator("button").click()
    expect(page.locator(".msg.user").first).to_contain_text("Be brief.")
    expect(page.locator(".msg.assistant .answer").first).to_contain_text("Done streaming now.")

    d.reset(reply="Six.")
    send(page, "And 3+3?")
    wait_idle(page)
    expect(page.locator(".msg.assistant .answer").last).to_have_text("Six.")
    sent = d.requests[-1]["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
    assert "What is 2+2?" in sent[1]["content"] and "Done streaming now." in sent[2]["content"]
    assert sent[3]["content"] == "And 3+3?"
    assert len(api(base, key, f"/v1/conversations?user={USER}")["data"]) == 1
    assert not page.errors  # type: ignore[attr-defined]


def test_stop_keeps_the_partial_answer_on_screen_and_in_history(page: Page, server) -> None:
    base, key, d = server
    full = " ".join(f"word{i}" for i in range(200))
    d.reset(reply=full, slow=0.1, chunk_size=4)
    sign_in(page, base, key)
    send(page, "Tell me a long story")
    page.wait_for_function("document.querySelector('.msg.assistant .answer').textContent.includes('word3')")
    page.click("#stop")
    wait_idle(page, 5_000)
    shown = (page.locator(".msg.assistant .answer").last.text_content() or "").strip()
    assert shown.startswith("word0 word1") and len(shown) < len(full)
    expect(page.locator(".msg.assistant .meta .badge.stopped")).to_be_visible()
    page.screenshot(path=str(SHOTS / "desktop-stopped.png"))
    cid = api(base, key, f"/v1/conversations?user={USER}")["data"][0]["id"]
    msgs = api(base, key, f"/v1/messages?user={USER}&conversation_id={cid}")["data"]
    assert msgs[-1]["threadline_status"] == "stopped"
    assert msgs[-1]["answer"].strip() == shown


def test_answer_markup_cannot_run_script(page: Page, server) -> None:
    base, key, d = server
    d.reset(reply='Look: <img src=x onerror="window.__xss=1;alert(1)"> and [click me](javascript:window.__xss=2) '
                  '<script>window.__xss=3</script> <a href="javascript:alert(4)">raw</a> done.')
    dialogs: list[str] = []
    page.on("dialog", lambda dlg: (dialogs.append(dlg.message), dlg.dismiss()))
    sign_in(page, base, key)
    send(page, "Show me something dangerous")
    wait_idle(page)
    answer = page.locator(".msg.assistant .answer").last
    expect(answer).to_contain_text("done.")
    html = answer.inner_html()
    assert "onerror" not in html and "<script" not in html and "javascript:" not in html
    for link in answer.locator("a").all():
        link.click()
    page.wait_for_timeout(300)
    assert page.evaluate("window.__xss") is None
    assert dialogs == []
    # Stored as sent: sanitising is the page's job, the history keeps the model's text.
    cid = api(base, key, f"/v1/conversations?user={USER}")["data"][0]["id"]
    assert "onerror" in api(base, key, f"/v1/messages?user={USER}&conversation_id={cid}")["data"][0]["answer"]


def test_images_by_url_and_by_drag_and_drop_upload_reach_the_engine(page: Page, server, image_host) -> None:
    base, key, d = server
    d.reset(reply="Two images.")
    sign_in(page, base, key)
    url = f"{image_host}/img/blue.png"
    page.click("#attach-url")
    page.fill("#image-url", url)
    page.click("#image-url-add")
    png = base64.b64encode(png_bytes()).decode()
    page.evaluate("""async (b64) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
        document.dispatchEvent(new DragEvent('dragenter', {dataTransfer: dt, bubbles: true}));
        document.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));
    }""", png)
    expect(page.locator("#attachments .chip")).to_have_count(2)
    send(page, "What are these?")
    wait_idle(page)
    expect(page.locator(".msg.user .images img")).to_have_count(2)
    content = d.requests[-1]["messages"][-1]["content"]
    urls = [p["image_url"]["url"] for p in content if p["type"] == "image_url"]
    assert url in urls
    assert any(u.startswith("data:image/png;base64,") for u in urls)
    # After a reload the turn still shows both images: the upload through its signed URL, which the
    # <img> loads by itself (no app key, which an <img> cannot send), the other from its own URL.
    signed: list[dict[str, str]] = []
    page.on("request", lambda r: signed.append(r.headers) if "/file-preview?" in r.url else None)
    page.reload()
    page.locator("#conv-list li button").first.click()
    expect(page.locator(".msg.user .images img")).to_have_count(2)
    page.wait_for_function("[...document.querySelectorAll('.msg.user .images img')].every(i => i.complete && i.naturalWidth > 0)")
    srcs = page.eval_on_selector_all(".msg.user .images img", "els => els.map(e => e.src)")
    assert url in srcs
    upload_src = next(s for s in srcs if s != url)
    assert upload_src.startswith(f"{base}/files/") and "/file-preview?timestamp=" in upload_src and "&sign=" in upload_src
    assert signed and all("authorization" not in h for h in signed)


def test_engine_switch_mid_conversation_is_marked_and_kept(page: Page, server) -> None:
    base, key, d = server
    d.reset(reply="From acc.")
    sign_in(page, base, key)
    send(page, "First on the default engine")
    wait_idle(page)
    page.select_option("#engine", "alt")
    d.reset(reply="From alt.")
    send(page, "Now on alt")
    wait_idle(page)
    expect(page.locator(".engine-switch")).to_have_text("engine changed: acc → alt")
    assert d.requests[-1]["model"] == "m-alt"
    assert [m["content"] for m in d.requests[-1]["messages"] if m["role"] == "assistant"] == ["From acc."]
    page.reload()
    page.locator("#conv-list li button").first.click()
    expect(page.locator(".engine-switch")).to_have_text("engine changed: acc → alt")
    expect(page.locator("#engine")).to_have_value("alt")


def test_upstream_failure_is_shown_without_secrets(page: Page, server) -> None:
    base, key, d = server
    d.reset(rate_limit=5)
    sign_in(page, base, key)
    send(page, "Will this fail?")
    wait_idle(page)
    err = page.locator(".turn-error")
    expect(err).to_be_visible()
    text = err.text_content() or ""
    assert "rate" in text.lower() and "sk-test-double-key" not in page.content()
    # The question was kept, so the conversation is listed and can be retried.
    expect(page.locator("#conv-list li")).to_have_count(1)
    expect(page.locator("#conv-list li").first).to_contain_text("Will this fail?")
    page.screenshot(path=str(SHOTS / "desktop-error.png"))


def test_rename_delete_and_paging(page: Page, server) -> None:
    base, key, d = server
    d.reset(reply="ok")
    h = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=base, headers=h, timeout=10) as c:
        ids = []
        for i in range(23):
            r = c.post("/v1/chat-messages", json={"inputs": {}, "query": f"conversation {i}", "user": USER,
                                                  "response_mode": "blocking"})
            ids.append(r.json()["conversation_id"])
        for i in range(24):  # one long conversation: 25 turns
            c.post("/v1/chat-messages", json={"inputs": {}, "query": f"turn {i + 1}", "user": USER,
                                              "conversation_id": ids[-1], "response_mode": "blocking"})
    sign_in(page, base, key)
    expect(page.locator("#conv-list li")).to_have_count(20)
    page.click("#conv-more")
    expect(page.locator("#conv-list li")).to_have_count(23)

    # Newest first: the long conversation; its newest 20 turns load, scrolling up loads the rest.
    page.locator("#conv-list li button").first.click()
    expect(page.locator(".msg.user")).to_have_count(20)
    expect(page.locator(".msg.user").last).to_have_text("turn 24")
    page.locator("#thread").evaluate("t => { t.scrollTop = 0; t.dispatchEvent(new Event('scroll')); }")
    expect(page.locator(".msg.user")).to_have_count(25)
    expect(page.locator(".msg.user").first).to_have_text("conversation 22")

    page.once("dialog", lambda dlg: dlg.accept("Renamed thread"))
    page.click("#rename")
    expect(page.locator("#conv-title")).to_have_text("Renamed thread")
    expect(page.locator("#conv-list li").first).to_have_text("Renamed thread")
    assert api(base, key, f"/v1/conversations?user={USER}&limit=1")["data"][0]["name"] == "Renamed thread"

    page.once("dialog", lambda dlg: dlg.accept())
    page.click("#delete")
    expect(page.locator("#conv-list li")).to_have_count(22)
    expect(page.locator("#conv-title")).to_have_text("New chat")
    assert ids[-1] not in [c["id"] for c in api(base, key, f"/v1/conversations?user={USER}&limit=100")["data"]]


def test_phone_width(browser: Browser, server) -> None:
    base, key, d = server
    d.reset(reply="Small screens work too.")
    ctx = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = ctx.new_page()
    try:
        sign_in(page, base, key)
        expect(page.locator("#sidebar")).not_to_be_in_viewport()
        send(page, "Hello from a phone")
        wait_idle(page)
        expect(page.locator(".msg.assistant .answer").last).to_have_text("Small screens work too.")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"page scrolls sideways on a phone ({width}px)"
        page.screenshot(path=str(SHOTS / "phone-chat.png"))
        page.click("#open-sidebar")
        expect(page.locator("#conv-list li")).to_have_count(1)
        expect(page.locator("#sidebar")).to_be_in_viewport()
        page.screenshot(path=str(SHOTS / "phone-list.png"))
    finally:
        ctx.close()


def test_open_mode_needs_no_sign_in(browser: Browser, oai, tmp_path) -> None:
    d, url = oai
    d.reset(reply="No key needed.")
    srv = LiveServer(create_app(_settings(url, f"sqlite+aiosqlite:///{tmp_path}/open.db"), open_access=True)).start()
    ctx = browser.new_context()
    page = ctx.new_page()
    try:
        page.goto(srv.url + "/")
        expect(page.locator("#shell")).to_be_visible()
        expect(page.locator("#signin")).to_be_hidden()
        send(page, "hi")
        wait_idle(page)
        expect(page.locator(".msg.assistant .answer").last).to_have_text("No key needed.")
    finally:
        ctx.close()
        srv.stop()


def test_page_is_served_with_a_strict_content_security_policy(server) -> None:
    base, _key, _d = server
    r = httpx.get(base + "/")
    assert r.status_code == 200 and "script-src 'self'" in r.headers["content-security-policy"]
    assert httpx.get(base + "/static/vendor/purify.min.js").status_code == 200


def test_a_responses_conversation_is_listed_with_its_tool_items(page: Page, server) -> None:
    """A conversation an OpenAI client made (Responses API, function tools) belongs to user
    openai-user: signed in as that user, the page lists it and shows its calls and outputs."""
    import openai

    base, key, d = server
    d.reset()
    c = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
    tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}
    r1 = c.responses.create(model="demo", input="weather in Rome?", tools=[tool])
    [call] = [o for o in r1.output if o.type == "function_call"]
    c.responses.create(model="demo", previous_response_id=r1.id, tools=[tool],
                       input=[{"type": "function_call_output", "call_id": call.call_id, "output": "warm"}])
    page.goto(base + "/")
    page.fill("#signin-key", key)
    page.fill("#signin-user", "openai-user")
    page.click("#signin-form button[type=submit]")
    expect(page.locator("#conv-list li")).to_have_count(1)
    page.locator("#conv-list li button").first.click()
    expect(page.locator(".msg.user")).to_have_count(1)
    expect(page.locator(".msg.user").first).to_have_text("weather in Rome?")
    expect(page.locator(".tool-call")).to_have_text(f"get_weather({call.arguments})")
    expect(page.locator(".tool-result")).to_have_text("get_weather → warm")
    expect(page.locator(".msg.assistant .answer").last).to_have_text("Tool said: warm")
    assert page.errors == []  # type: ignore[attr-defined]
