"""The web page end to end in headless Chromium (Playwright), against the real server (`create_app` with a vote
database) serving two tiny random models in-process: a streamed multi-turn chat, an arena vote that changes the
leaderboard, annotations (from the models and from a file) that appear in `tristage export-votes`, and
script-injection text in prompts and answers that stays text. Skipped where Chromium or Playwright is absent
(`make test` installs Chromium where apt-get can)."""

from __future__ import annotations

import json
import re
import shutil

import httpx
import pytest
import torch
from conftest import tiny_config
from web_helpers import INJECTION, FakeHub

pytestmark = pytest.mark.browser
sync_api = pytest.importorskip("playwright.sync_api")
uvicorn = pytest.importorskip("uvicorn")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no chromium on PATH (apt-get install chromium)", allow_module_level=True)

from tristage.cli import main as cli  # noqa: E402
from tristage.serve.hub import Hub  # noqa: E402
from tristage.serve.server import create_app, serve_in_thread  # noqa: E402

KEY = "sk-browser"
TIMEOUT = 20_000  # ms: a generous bound for any one wait on a loaded 2-core machine


def serve(app):
    """uvicorn in a thread on a free port -> (base url, stop function)."""
    return serve_in_thread(app)


@pytest.fixture(scope="module")
def served(tiny_shards, tmp_path_factory):
    """(base url, hub, db path, calls): models "red" and "blue" (tiny, random) behind the real server. `calls`
    records each chat_stream call's model and messages."""
    from tristage.model.gpt import build_model
    from tristage.model.hf import save_model
    from tristage.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("browser")
    tok = Tokenizer.load(tiny_shards / "tokenizer")
    letters = {i for c in "abcdefghijklmnopqrstuvwxyz ." for i in tok.encode(c)}
    silent = [i for i in range(tok.vocab_size) if i not in letters]
    for name, seed in (("red", 0), ("blue", 1)):
        model = build_model(tiny_config(tok, initializer_range=0.5, tie_word_embeddings=False), seed=seed)
        with torch.no_grad():  # logit 0 for all but letters: a letter (one delta each) wins, the turn never ends
            model.lm_head.weight[silent] = 0
        save_model(model, root / name, tok)
    hub = Hub.load([f"red={root / 'red'}", f"blue={root / 'blue'}"], max_batch=8)
    calls: list[dict] = []
    real = hub.chat_stream

    async def spy(model, messages, **kw):
        calls.append({"model": model, "messages": messages, **kw})
        async for delta in real(model, messages, **kw):
            yield delta

    hub.chat_stream = spy
    db = root / "votes.db"
    base, stop = serve(create_app(hub, api_key=KEY, db=str(db)))
    yield base, hub, db, calls
    stop()
    hub.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh page; dialogs (an injected alert would open one) and script errors are recorded, not fatal."""
    ctx = browser.new_context(viewport={"width": 1200, "height": 900})
    ctx.add_cookies([{"name": "tristage_key", "value": KEY, "url": "http://127.0.0.1"}])  # the server's --api-key
    pg = ctx.new_page()
    pg.set_default_timeout(TIMEOUT)
    pg.dialogs, pg.errors = [], []
    pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    yield pg
    ctx.close()


def test_streamed_multi_turn_chat(served, page):
    base, hub, _, calls = served
    page.goto(base + "/chat")
    page.select_option("#model", "blue")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "60")
    # count the updates of the answer's text as it streams in (one per delta)
    page.evaluate("""() => { window.updates = 0; new MutationObserver(r => { window.updates += r.length; })
        .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true}); }""")
    page.fill("#prompt", "the dog sat on the mat.")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant.done")
    first = page.locator(".msg.assistant .text").first.text_content()
    assert first and page.evaluate("window.updates") >= 5  # many deltas, not one block
    # the page's greedy answer is the API's for the same conversation
    api = httpx.post(base + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                     json={"model": "blue", "messages": [{"role": "user", "content": "the dog sat on the mat."}],
                           "max_tokens": 60, "temperature": 0}).json()
    assert first == api["choices"][0]["message"]["content"]
    # a second turn sends the whole history
    page.fill("#prompt", "and then?")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant.done >> nth=1")
    assert calls[-1]["model"] == "blue" and calls[-1]["messages"] == [
        {"role": "user", "content": "the dog sat on the mat."}, {"role": "assistant", "content": first},
        {"role": "user", "content": "and then?"}]
    assert calls[-1]["temperature"] == 0 and calls[-1]["max_tokens"] == 60
    assert not page.errors and not page.dialogs


def test_the_page_asks_for_the_api_key_once(served, browser):
    base = served[0]
    ctx = browser.new_context()  # no key cookie: the page's first call gets a 401 and asks
    pg = ctx.new_page()
    pg.set_default_timeout(TIMEOUT)
    asked = []
    pg.on("dialog", lambda d: (asked.append(d.type), d.accept(KEY)))
    pg.goto(base + "/chat")
    pg.select_option("#model", "blue")
    pg.fill("#prompt", "the dog sat on the mat.")
    pg.press("#prompt", "Enter")
    pg.wait_for_selector(".msg.assistant.done")
    assert asked == ["prompt"]  # once: the cookie serves every later call
    assert [c["value"] for c in ctx.cookies() if c["name"] == "tristage_key"] == [KEY]
    ctx.close()


def status_is(page, text: str, prefix: bool = False) -> None:
    """Wait until the page's status line reads `text` (or starts with it). Through a locator: the page's policy
    forbids the string evaluation that wait_for_function would need."""
    sync_api.expect(page.locator("#status")).to_have_text(re.compile("^" + re.escape(text) + ("" if prefix else "$")),
                                                          timeout=TIMEOUT)


def _board(page) -> list[list[str]]:
    return [[c.text_content() for c in row.locator("td").all()] for row in page.locator("table.board tbody tr").all()]


def test_arena_vote_changes_the_leaderboard(served, page):
    base, _, db, _ = served
    page.goto(base + "/leaderboard")
    page.wait_for_selector("#board p, #board table")
    before = _board(page)
    page.goto(base + "/arena")
    page.fill("#prompt", "tell me a story about a cat.")
    page.click("#go")
    page.wait_for_selector("#vote button:not([disabled])")
    assert page.text_content("#name-a") == "Model A" and page.text_content("#name-b") == "Model B"
    assert page.text_content("#reveal") == ""  # no name before the vote
    answers = [page.text_content("#answer-a"), page.text_content("#answer-b")]
    assert all(answers)
    page.click("#vote button[data-winner=model_b]")
    page.wait_for_selector("#board-wrap:not([hidden]) table.board")
    a = page.text_content("#name-a").removeprefix("Model A: ")
    b = page.text_content("#name-b").removeprefix("Model B: ")
    assert {a, b} == {"red", "blue"}
    assert f"A was {a}, B was {b}" in page.text_content("#reveal")
    page.goto(base + "/leaderboard")
    page.wait_for_selector("table.board")
    after = _board(page)
    assert after != before
    won = {row[1]: row for row in after}
    assert int(won[b][4]) == int(won[a][4]) == (int(before[0][4]) + 1 if before else 1)  # battles
    assert won[b][5].split(" / ")[0] >= "1" and float(won[b][2]) > float(won[a][2])  # the winner rates higher
    from tristage.serve.votes import VoteStore

    last = VoteStore(db).battles()[-1]
    assert (last.model_a, last.model_b, last.winner) == (a, b, "model_b")
    assert [last.answer_a, last.answer_b] == answers
    assert not page.errors and not page.dialogs


def _rate_all(page, n_answers: int, attributes: list[str], best: int) -> None:
    for i in range(n_answers):
        for k, attr in enumerate(attributes):
            page.check(f'input[name="r-{i}-{attr}"][value="{5 - (i + k) % 3}"]')
    page.check(f'input[name=best][value="{best}"]')


def test_annotations_appear_in_the_export(served, page, tmp_path):
    base, _, db, _ = served
    page.goto(base + "/annotate")
    # from the served models: one answer each
    page.fill("#prompt", "write a short story about a duck.")
    page.click("#ask")
    status_is(page, "All answers are in.")
    answers = [t.text_content() for t in page.locator("#answers .answer").all()]
    assert len(answers) == 2 and all(answers)
    default = ["helpfulness", "honesty", "harmlessness", "instruction_following"]
    save = page.locator("#save")
    save.click()
    assert "Pick the best answer" in page.text_content("#status")  # incomplete: nothing saved
    _rate_all(page, 2, default, best=1)
    save.click()
    assert "Write a short reason" in page.text_content("#status")
    page.fill("#rationale", "the second one tells a story")
    save.click()
    status_is(page, "Saved annotation", prefix=True)
    # from a file: a demo-world prompt gets the world's attributes
    from tristage.world.gold import ATTRIBUTES

    upload = tmp_path / "items.jsonl"
    upload.write_text(json.dumps({"prompt": "Tell me a story about Tom.", "kind": "story",
                                  "answers": ["Tom went to the lake.", "Tom sat on the cactus."]}) + "\n")
    page.set_input_files("#file", str(upload))
    page.click("#load")
    status_is(page, "Loaded 1 prompts", prefix=True)
    assert page.locator("#attr-set").input_value() == "world"
    _rate_all(page, 2, list(ATTRIBUTES), best=0)
    page.fill("#rationale", "sitting on a cactus hurts")
    save.click()
    status_is(page, "Saved annotation", prefix=True)
    assert page.locator("#item").is_hidden()  # the queue is done

    out = tmp_path / "pairs.jsonl"
    assert cli(["export-votes", str(db), str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    ours = [r for r in rows if r["source"] == "annotation"]
    assert [(r["prompt"], r["chosen"], r["rejected"], r["rationale"]) for r in ours[-2:]] == [
        ("write a short story about a duck.", answers[1].strip(), answers[0].strip(), "the second one tells a story"),
        ("Tell me a story about Tom.", "Tom went to the lake.", "Tom sat on the cactus.", "sitting on a cactus hurts")]
    assert set(ours[-2]["ratings"]["chosen"]) == set(default) and set(ours[-1]["ratings"]["chosen"]) == set(ATTRIBUTES)
    assert ours[-1]["ratings"]["chosen"]["instruction_following"] == 5  # (0 + 0) % 3 -> 5
    assert ours[-2]["models"] == {"chosen": "blue", "rejected": "red"}
    assert not page.errors and not page.dialogs


def test_injection_text_is_shown_as_text(page, tmp_path):
    """A prompt, model answers and model names holding <script> and <img onerror>: shown as the same text, no
    element made of them, no dialog."""
    names = ["alpha", INJECTION]
    hub = FakeHub(names=names, answers={n: INJECTION for n in names}, delay=0.001)
    base, stop = serve(create_app(hub, api_key=None, db=str(tmp_path / "v.db")))
    injected = "#messages img, #messages script, #messages b, .sides img, .sides script, .sides b, #board img, " \
               "#board b, #answers img, #answers b, #item-prompt img, #item-prompt b, select option b"
    try:
        page.goto(base + "/chat")
        page.select_option("#model", INJECTION)
        page.fill("#prompt", INJECTION)
        page.press("#prompt", "Enter")
        page.wait_for_selector(".msg.assistant.done")
        assert [t.text_content() for t in page.locator(".msg .text").all()] == [INJECTION, INJECTION]
        assert page.locator(injected).count() == 0

        page.goto(base + "/arena")
        page.fill("#prompt", INJECTION)
        page.click("#go")
        page.wait_for_selector("#vote button:not([disabled])")
        assert page.text_content("#answer-a") == page.text_content("#answer-b") == INJECTION
        page.click("#vote button[data-winner=model_a]")
        page.wait_for_selector("#board-wrap:not([hidden]) table.board")
        assert INJECTION in page.text_content("#reveal") and INJECTION in page.text_content("#board")
        assert page.locator(injected).count() == 0

        upload = tmp_path / "x.jsonl"
        upload.write_text(json.dumps({"prompt": INJECTION, "answers": [INJECTION, INJECTION + "!"]}) + "\n")
        page.goto(base + "/annotate")
        page.set_input_files("#file", str(upload))
        page.click("#load")
        page.wait_for_selector("#item:not([hidden])")
        assert page.text_content("#item-prompt .text") == INJECTION
        assert page.locator(injected).count() == 0
        assert page.evaluate("document.querySelectorAll('img, script:not([src])').length") == 0
        assert not page.dialogs and not page.errors
    finally:
        stop()
