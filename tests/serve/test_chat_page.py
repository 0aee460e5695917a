"""The chat page at ``/``, end to end in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

The gateway runs for real on a free loopback port: over the tiny random model for one real streamed answer,
and over a scripted engine (``FakeEngine`` answering a fixed text one token per step) where a test needs to
know what the answer says — the filter tests and the mid-stream growth check. The filters are a
``FilterChain`` of this file's own (a blocked input phrase, a blocked output phrase), built against the
filter contract, not against the safety issue's built-ins.

Screenshots go to ``$LLMFORGE_TEST_ARTIFACTS`` (default: the test's ``tmp_path``). Without Chromium or
Playwright the browser tests skip, unless ``LLMFORGE_REQUIRE_BROWSER=1`` (CI), where that is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import tomllib
from pathlib import Path

import httpx
import pytest

from llmforge.serve.chat_page import CSP, PAGE_ROUTES, asset
from llmforge.serve.filters import (
    ContentFiltered,
    FilterChain,
    FilterVerdict,
    OutputFilter,
    RequestContext,
)

from .conftest import client
from .fake_engine import FakeEngine

REPO = Path(__file__).resolve().parents[2]
KEY = "page-test-key"
REPLY = "Hello there! The sky is blue and the grass is green. "
SECRET_REPLY = "Sure. The secret word is red. "
MARKUP_REPLY = '<img src=x onerror="window.__xss=1"><b>bold</b> '
MAX_TOKENS = 16

# ------------------------------------------------------------------------------------------------ fixtures


class ScriptedEngine(FakeEngine):
    """The fake engine's contract (queueing, cancellation, finish reasons) with a known answer: REPLY, or
    SECRET_REPLY / MARKUP_REPLY when the last user turn mentions "secret" / "markup", one token per decode
    step, repeated until max_tokens."""

    def __init__(self, tokenizer, **kw):
        super().__init__(tokenizer, **kw)
        self._scripts: dict[tuple[int, ...], list[int]] = {}

    def _token(self, prompt, seed, temperature, k):
        key = tuple(prompt)
        if key not in self._scripts:
            last_user = self.tokenizer.decode(list(prompt)).rsplit("user", 1)[-1]
            reply = REPLY
            if "secret" in last_user.lower():
                reply = SECRET_REPLY
            elif "markup" in last_user.lower():
                reply = MARKUP_REPLY
            self._scripts[key] = self.tokenizer.encode(reply)
        ids = self._scripts[key]
        return ids[k % len(ids)]

    def answer(self, reply: str, n_tokens: int) -> str:
        """What the engine streams for ``reply`` in ``n_tokens`` tokens."""
        ids = self.tokenizer.encode(reply)
        return self.tokenizer.decode([ids[k % len(ids)] for k in range(n_tokens)])


class PhraseOutput(OutputFilter):
    """Blocks the output at ``phrase``; holds back just enough text that no part of it is ever released."""

    def __init__(self, phrase: str):
        self.phrase = phrase
        self.seen = ""
        self.sent = 0

    async def push(self, text: str) -> FilterVerdict:
        self.seen += text
        at = self.seen.find(self.phrase)
        if at >= 0:
            out, self.sent = self.seen[self.sent : at], at
            return FilterVerdict(out, blocked=True, reason=f"output contains {self.phrase!r}")
        safe = max(self.sent, len(self.seen) - len(self.phrase) + 1)
        out, self.sent = self.seen[self.sent : safe], safe
        return FilterVerdict(out)

    async def finish(self) -> FilterVerdict:
        out, self.sent = self.seen[self.sent :], len(self.seen)
        return FilterVerdict(out)


class PhraseFilters(FilterChain):
    """Prompts with "forbidden" are blocked; answers are cut at "secret". Built on the gateway's two calls
    (``check_input``, ``output``), not on the built-in filters: the page must show whatever any chain does."""

    @property
    def active(self) -> bool:
        return True

    async def check_input(self, ctx: RequestContext, texts: list[str]) -> list[str]:
        if any("forbidden" in t.lower() for t in texts):
            raise ContentFiltered("The prompt contains a blocked phrase ('forbidden').", "test-phrases")
        return texts

    def output(self, ctx: RequestContext, index: int) -> OutputFilter:
        return PhraseOutput("secret")


def _scripted_gateway(tokenizer, *, step_delay: float = 0.02, **settings):
    from llmforge.serve.gateway import create_app
    from llmforge.serve.server import BackgroundServer
    from llmforge.serve.settings import GatewaySettings

    engine = ScriptedEngine(tokenizer, model_name="scripted", step_delay=step_delay)
    app = create_app(engine, GatewaySettings(**settings), filters=PhraseFilters())
    return BackgroundServer(app).start()


@pytest.fixture(scope="module")
def scripted(tokenizer):
    srv = _scripted_gateway(tokenizer)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def keyed(tokenizer):
    srv = _scripted_gateway(tokenizer, api_key=KEY)
    yield srv
    srv.stop()


def _missing_browser(reason: str):
    if os.environ.get("LLMFORGE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"LLMFORGE_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(f"{reason} (CI sets LLMFORGE_REQUIRE_BROWSER=1 and installs it)")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing_browser("the Python package 'playwright' is not installed (pip install playwright)")
    exe = os.environ.get("LLMFORGE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(exe).exists():
        _missing_browser(f"no Chromium at {exe} (apt-get install -y chromium)")
    pw = sync_playwright().start()
    try:
        # Debian's browser, never a Playwright download (`playwright install` needs the internet)
        b = pw.chromium.launch(executable_path=exe, headless=True)
    except Exception:
        pw.stop()
        raise
    yield b
    b.close()
    pw.stop()


@pytest.fixture
def artifacts(tmp_path) -> Path:
    root = os.environ.get("LLMFORGE_TEST_ARTIFACTS")
    out = Path(root) / "chat-page" if root else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    return out


class Page:
    """One browser tab on a gateway, recording the chat requests it sends and any script error."""

    def __init__(self, browser, srv, *, width: int = 1100, height: int = 760):
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        self.srv = srv
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        self.errors: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.on("console", self._console)
        self.page.on("request", self._request)

    def _console(self, msg) -> None:
        # a refused request (401, 400) is logged by Chromium itself; it is what some tests provoke
        if msg.type == "error" and "Failed to load resource" not in msg.text:
            self.errors.append(msg.text)

    def _request(self, req) -> None:
        if req.url.endswith("/v1/chat/completions"):
            self.bodies.append(req.post_data_json)
            self.auth.append(req.headers.get("authorization"))

    def open(self) -> Page:
        self.page.goto(self.srv.url + "/")
        return self

    def loc(self, selector: str):
        return self.page.locator(selector)

    def send(self, text: str) -> None:
        self.page.fill("#input", text)
        self.page.press("#input", "Enter")

    def last_answer(self):
        return self.loc(".msg.assistant").last

    def wait_answer(self, timeout_ms: int = 30_000):
        """The last answer once it has finished (``data-finish`` is set when the stream ends)."""
        answer = self.last_answer()
        answer.and_(self.loc("[data-finish]")).wait_for(timeout=timeout_ms)
        return answer

    def shot(self, artifacts: Path, name: str) -> Path:
        path = artifacts / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 1000
        return path

    def close(self) -> None:
        self.context.close()
        assert not self.errors, f"the page logged errors: {self.errors}"


@pytest.fixture
def tab(browser):
    opened: list[Page] = []

    def make(srv, **kw) -> Page:
        p = Page(browser, srv, **kw)
        opened.append(p)
        return p.open()

    yield make
    for p in opened:
        p.close()


def _text(locator) -> str:
    return locator.locator(".text").text_content()


# ------------------------------------------------------------------------------------------------ serving


def test_page_and_assets_are_served_self_contained(scripted):
    """Everything the page needs comes from the gateway, under a CSP that allows nothing else."""
    with httpx.Client(base_url=scripted.url) as http:
        page = http.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        for route in PAGE_ROUTES:
            r = http.get(route)
            assert r.status_code == 200, route
            assert r.headers["content-security-policy"] == CSP
            assert r.headers["x-content-type-options"] == "nosniff"
            assert http.head(route).status_code == 200
            assert not re.search(r"https?://|//[a-z]", r.text.replace("http://www.w3.org", "")), route
        assert http.get("/chat.js").headers["content-type"].startswith("text/javascript")
        assert http.get("/chat.css").headers["content-type"].startswith("text/css")
        # a query string cannot make a route serve another file
        assert http.get("/", params={"name": "chat.js"}).text == page.text
    refs = re.findall(r'(?:src|href)="([^"]*)"', page.text)
    assert refs and all(r.startswith("/") or r.startswith("data:") for r in refs), refs
    assert set(re.findall(r'(?:src|href)="(/[^"]*)"', page.text)) <= set(PAGE_ROUTES)
    js = asset("chat.js").decode()
    for unsafe in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert unsafe not in js, f"chat.js uses {unsafe}: model text must only go through textContent"
    assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP
    assert "<script>" not in page.text  # the CSP forbids inline scripts; the page must not need one


def test_page_is_open_but_the_api_still_needs_the_key(keyed):
    with httpx.Client(base_url=keyed.url) as http:
        for route in PAGE_ROUTES:
            assert http.get(route).status_code == 200, route
        r = http.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert http.post("/", json={}).status_code == 401  # only GET/HEAD of the page's files are open
        metrics = http.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'llmforge_requests_total{route="/",status="200"}' in metrics
    assert 'llmforge_requests_total{route="/chat.js",status="200"}' in metrics


def test_page_files_are_package_data():
    """A wheel ships the page: pyproject's package-data patterns match every file the routes serve."""
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    root = REPO / "llmforge"
    shipped = {p for pat in patterns["llmforge"] for p in root.glob(pat)}
    page_dir = root / "serve" / "chat_page"
    files = [page_dir / name for name in ("index.html", "chat.js", "chat.css")]
    missing = [str(f.relative_to(root)) for f in files if f not in shipped]
    assert not missing, f"not in [tool.setuptools.package-data] llmforge: {missing}"


# ------------------------------------------------------------------------------------------------ browser


def test_real_model_answer_streams_into_the_page(tab, real_server, artifacts):
    """The tiny model's answer arrives in several chunks and reads exactly as the API's own answer."""
    t = tab(real_server)
    t.loc("#model").filter(has_text="tiny").wait_for()
    t.page.fill("#system", "You are terse.")
    t.page.fill("#temperature", "0")
    t.page.fill("#max-tokens", "24")
    t.send("hello world, name three colours")
    answer = t.wait_answer()
    assert int(answer.get_attribute("data-chunks")) >= 2
    assert t.bodies[-1] == {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "hello world, name three colours"},
        ],
        "stream": True,
        "model": "tiny",
        "temperature": 0,
        "max_tokens": 24,
    }
    expected = client(real_server).chat.completions.create(
        model="tiny", messages=t.bodies[-1]["messages"], temperature=0, max_tokens=24
    )
    text = _text(answer)
    assert text and text == expected.choices[0].message.content
    assert answer.get_attribute("data-finish") == expected.choices[0].finish_reason
    assert t.loc("#error").is_hidden() and t.loc("#notice").is_hidden()
    t.shot(artifacts, "real-model-answer")


# records the answer's text length each time the page changes it, from outside the page's own code
_GROWTH = """
window.__lengths = [];
new MutationObserver(() => {
  const t = document.querySelector('.msg.assistant:last-child .text');
  if (t) window.__lengths.push([performance.now(), t.textContent.length]);
}).observe(document.documentElement, {subtree: true, childList: true, characterData: true});
"""


def test_text_grows_while_the_answer_streams(tab, scripted, artifacts):
    t = tab(scripted)
    t.page.evaluate(_GROWTH)
    t.loc("#model").filter(has_text="scripted").wait_for()
    t.page.fill("#max-tokens", str(MAX_TOKENS))
    t.send("say hello")
    streaming = t.loc(".msg.assistant.streaming")
    streaming.wait_for()
    t.shot(artifacts, "streaming")  # mid-answer: the cursor and a partial text
    answer = t.wait_answer()
    engine: ScriptedEngine = scripted.gateway.engine
    assert _text(answer) == engine.answer(REPLY, MAX_TOKENS)
    seen = [(ms, n) for ms, n in t.page.evaluate("window.__lengths") if n > 0]
    lengths = [n for _, n in seen]
    assert len(set(lengths)) >= 3, f"the answer did not grow over several chunks: {lengths}"
    assert lengths == sorted(lengths), f"the answer's text shrank while streaming: {lengths}"
    # shown as it was generated, not all at once at the end: the engine takes MAX_TOKENS * 20 ms, and the
    # text was visible for most of that time before it was complete
    first_ms = seen[0][0]
    full_ms = next(ms for ms, n in seen if n == len(_text(answer)))
    assert full_ms - first_ms >= 0.5 * MAX_TOKENS * 20, f"the text appeared in one burst: {seen}"
    assert int(answer.get_attribute("data-chunks")) >= 3
    assert answer.get_attribute("data-finish") == "length"
    assert "max tokens" in answer.locator(".meta").text_content()
    assert t.loc(".msg.assistant.streaming").count() == 0
    t.shot(artifacts, "streamed-answer")


def test_blocked_prompt_shows_the_filter_notice(tab, scripted, artifacts):
    t = tab(scripted)
    t.loc("#model").filter(has_text="scripted").wait_for()
    t.page.fill("#max-tokens", str(MAX_TOKENS))
    t.send("tell me something forbidden")
    notice = t.loc("[data-testid=filter-notice]")
    notice.wait_for()
    assert "blocked" in notice.text_content() and "forbidden" in notice.text_content()
    assert t.loc("#error").is_hidden()  # a filter decision is not shown as a failure
    assert t.loc(".msg.assistant").count() == 0
    user = t.loc(".msg.user").last
    assert "failed" in user.get_attribute("class") and user.locator(".meta").text_content() == "not sent"
    assert t.page.input_value("#input") == "tell me something forbidden"  # given back to edit
    t.shot(artifacts, "blocked-prompt")
    # the blocked turn is not part of the conversation: the next message goes alone and clears the notice
    t.page.fill("#input", "")
    t.send("say hello")
    t.wait_answer()
    assert notice.is_hidden()
    assert [m["content"] for m in t.bodies[-1]["messages"]] == ["say hello"]


def test_filtered_answer_shows_the_filter_notice(tab, scripted, artifacts):
    t = tab(scripted)
    t.loc("#model").filter(has_text="scripted").wait_for()
    t.page.fill("#max-tokens", str(MAX_TOKENS))
    t.send("what is the secret word?")
    answer = t.wait_answer()
    assert answer.get_attribute("data-finish") == "content_filter"
    text = _text(answer)
    assert text == SECRET_REPLY[: SECRET_REPLY.index("secret")] and "secret" not in text
    assert "cut" in answer.get_attribute("class")
    notice = t.loc("[data-testid=filter-notice]")
    assert notice.is_visible() and "content filter" in notice.text_content()
    assert t.loc("#error").is_hidden()
    t.shot(artifacts, "filtered-answer")


def test_markup_in_an_answer_is_shown_as_text(tab, scripted, artifacts):
    t = tab(scripted)
    t.loc("#model").filter(has_text="scripted").wait_for()
    t.page.fill("#max-tokens", str(MAX_TOKENS))
    t.send("answer with markup")
    answer = t.wait_answer()
    assert _text(answer) == scripted.gateway.engine.answer(MARKUP_REPLY, MAX_TOKENS)
    assert "<img" in _text(answer)
    assert t.loc("#log img, #log b").count() == 0
    assert t.page.evaluate("window.__xss") is None
    t.shot(artifacts, "markup-as-text")


def test_api_key_from_the_page(tab, keyed, artifacts):
    t = tab(keyed)
    error = t.loc("[data-testid=error]")
    error.wait_for()  # GET /v1/models was refused
    assert "API key" in error.text_content()
    assert t.loc("#model").text_content() == "API key needed"
    t.page.fill("#max-tokens", str(MAX_TOKENS))
    t.send("say hello")
    t.loc(".msg.user.failed").wait_for()
    assert "Incorrect or missing API key" in error.text_content() and t.auth[-1] is None
    t.shot(artifacts, "api-key-missing")

    t.page.fill("#api-key", "wrong")
    t.page.press("#api-key", "Tab")  # a change event: stored and the model list retried
    t.page.fill("#input", "")
    t.send("say hello")
    t.loc(".msg.user.failed").nth(1).wait_for()
    assert t.auth[-1] == "Bearer wrong"

    t.page.fill("#api-key", KEY)
    t.page.press("#api-key", "Tab")
    t.loc("#model").filter(has_text="scripted").wait_for()
    assert error.is_hidden()
    t.page.fill("#input", "")
    t.send("say hello")
    answer = t.wait_answer()
    assert _text(answer) == keyed.gateway.engine.answer(REPLY, MAX_TOKENS)
    assert t.auth[-1] == f"Bearer {KEY}"
    assert t.page.evaluate("sessionStorage.getItem('llmforge.apiKey')") == KEY
    assert t.page.evaluate("localStorage.length") == 0  # the key never outlives the tab
    t.shot(artifacts, "api-key-accepted")

    t.page.reload()  # same tab: the key is still there, so the page works straight away
    t.loc("#model").filter(has_text="scripted").wait_for()
    assert t.page.input_value("#api-key") == KEY


def test_stop_then_reset(tab, tokenizer, artifacts):
    srv = _scripted_gateway(tokenizer, step_delay=0.05)
    try:
        engine: ScriptedEngine = srv.gateway.engine
        t = tab(srv)
        t.loc("#model").filter(has_text="scripted").wait_for()
        t.page.fill("#system", "Be brief.")
        t.page.fill("#max-tokens", "200")  # 10 s of tokens: only Stop ends it in time
        t.send("say hello")
        t.page.wait_for_function(
            "() => Number(document.querySelector('.msg.assistant')?.dataset.chunks) >= 3"
        )
        t.page.click("[data-testid=stop]")
        answer = t.wait_answer(timeout_ms=5_000)
        assert answer.get_attribute("data-finish") == "stopped"
        partial = _text(answer)
        assert partial and REPLY.startswith(partial[: len(REPLY)])
        deadline = time.monotonic() + 5
        while not engine.cancelled and time.monotonic() < deadline:  # the abort reached the engine
            time.sleep(0.05)
        assert engine.cancelled and not engine.active

        # the stopped answer stays in the conversation, as the user saw it
        t.page.fill("#max-tokens", "4")
        t.send("and again")
        t.wait_answer()
        assert t.bodies[-1]["messages"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "say hello"},
            {"role": "assistant", "content": partial},
            {"role": "user", "content": "and again"},
        ]
        t.shot(artifacts, "before-reset")

        t.page.click("[data-testid=reset]")
        assert t.loc(".msg").count() == 0
        t.send("fresh start")
        t.wait_answer()
        assert t.bodies[-1]["messages"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "fresh start"},
        ]
        assert t.loc(".msg").count() == 2
        t.shot(artifacts, "after-reset")
    finally:
        srv.stop()


def test_narrow_screen(tab, scripted, artifacts):
    t = tab(scripted, width=380, height=740)
    t.loc("#model").filter(has_text="scripted").wait_for()
    assert t.page.evaluate("document.getElementById('settings').open") is False  # folded out of the way
    t.page.click("#settings summary")
    t.page.fill("#max-tokens", str(MAX_TOKENS))
    t.page.click("#settings summary")
    t.send("a" * 120)  # one unbreakable word must wrap, not widen the page
    t.wait_answer()
    overflow = t.page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a 380px screen"
    for sel in ("#send", "#input", "[data-testid=reset]"):
        box = t.loc(sel).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 380, sel
    t.shot(artifacts, "narrow-screen")


def test_errors_mid_stream_and_reset_while_streaming(tab, tokenizer, artifacts):
    """An error event after the 200 keeps the partial answer and says why; "New chat" during a stream
    drops that answer and its turn."""
    srv = _scripted_gateway(tokenizer, step_delay=0.05)
    try:
        t = tab(srv)
        t.loc("#model").filter(has_text="scripted").wait_for()
        t.page.fill("#max-tokens", "200")
        t.send("say hello")
        t.page.wait_for_function(
            "() => Number(document.querySelector('.msg.assistant')?.dataset.chunks) >= 2"
        )
        srv.gateway.cancel_all()  # what a shutdown's drain deadline does: the stream ends with an error event
        error = t.loc("[data-testid=error]")
        error.wait_for()
        assert "cancelled" in error.text_content()
        answer = t.last_answer()
        assert (
            "failed" in answer.get_attribute("class")
            and answer.locator(".meta").text_content() == "interrupted"
        )
        assert _text(answer) and t.loc("#notice").is_hidden()
        t.shot(artifacts, "error-mid-stream")

        t.page.fill("#temperature", "5")  # refused by the page itself: nothing is sent
        sent = len(t.bodies)
        t.send("too hot")
        assert "Temperature" in error.text_content() and len(t.bodies) == sent
        assert t.page.input_value("#input") == "too hot"
        t.page.fill("#temperature", "0.7")

        t.page.fill("#input", "")
        t.send("a long one")
        t.page.wait_for_function(
            "() => Number(document.querySelector('.msg.assistant:last-child')?.dataset.chunks) >= 2"
        )
        t.page.click("[data-testid=reset]")
        assert t.loc(".msg").count() == 0
        assert t.loc("#send").is_enabled() and t.loc("#stop").is_hidden()  # free at once, not at the abort
        t.page.fill("#max-tokens", "8")
        t.send("fresh")  # while the aborted request may still be winding down
        t.loc(".msg.assistant.streaming").wait_for()
        assert t.loc("#stop").is_visible() and not t.loc("#send").is_enabled()
        answer = t.wait_answer()
        assert answer.get_attribute("data-finish") == "length"
        assert t.loc(".msg").count() == 2  # the aborted answer did not come back into the new chat
        assert t.loc("#stop").is_hidden() and t.loc("#send").is_enabled()
        assert [m["content"] for m in t.bodies[-1]["messages"]] == ["fresh"]
    finally:
        srv.stop()


def _sse(*events: dict) -> str:
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events)


def test_a_cut_connection_and_an_unreachable_server(tab, scripted, artifacts):
    """What no healthy gateway sends, played by the browser itself (``page.route``): a stream that stops
    before any finish reason is an interrupted answer, not a finished one; a request that never reaches the
    server gives the turn back."""
    t = tab(scripted)
    t.loc("#model").filter(has_text="scripted").wait_for()
    chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "Half an "}}]}
    rest = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "answer"}}]}
    t.page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(status=200, content_type="text/event-stream", body=_sse(chunk, rest)),
    )
    t.send("say hello")
    error = t.loc("[data-testid=error]")
    error.wait_for()
    assert "closed before the answer was finished" in error.text_content()
    answer = t.last_answer()
    assert _text(answer) == "Half an answer" and answer.locator(".meta").text_content() == "interrupted"
    assert answer.get_attribute("data-finish") is None and t.loc("#notice").is_hidden()
    t.shot(artifacts, "cut-connection")

    t.page.unroute("**/v1/chat/completions")
    t.page.route("**/v1/chat/completions", lambda route: route.abort("connectionrefused"))
    t.send("are you there?")
    t.loc(".msg.user.failed").wait_for()
    assert error.text_content().startswith("Cannot reach the server")
    assert t.page.input_value("#input") == "are you there?"
    assert t.loc("#send").is_enabled() and t.loc("#stop").is_hidden()
    # the interrupted answer stays in the conversation as shown; the unsent turn does not
    t.page.unroute("**/v1/chat/completions")
    t.page.fill("#max-tokens", "4")
    t.page.fill("#input", "")
    t.send("again")
    t.wait_answer()
    assert [m["content"] for m in t.bodies[-1]["messages"]] == ["say hello", "Half an answer", "again"]
