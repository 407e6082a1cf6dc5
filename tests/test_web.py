"""The web routes with a fake hub: pages served as static files with no data in them, chat streaming, the arena's
blind pairing and vote, the leaderboard, annotation uploads and saves, and the errors of each."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402
from web_helpers import INJECTION, FakeHub, web_app  # noqa: E402

from tristage.serve import web  # noqa: E402
from tristage.serve.votes import VoteStore, export_pairs  # noqa: E402


@pytest.fixture
def hub():
    return FakeHub(answers={"alpha": "first answer", "beta": "second answer", "gamma": "third answer"})


@pytest.fixture
def client(hub, tmp_path):
    return TestClient(web_app(hub, tmp_path / "votes.db"))


def ndjson(resp) -> tuple[str, list[dict]]:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(x) for x in resp.text.splitlines()]
    return "".join(x.get("delta", "") for x in lines), lines


# ----------------------------------------------------------------------------- pages and safety
@pytest.mark.parametrize("route, page", sorted(web.PAGES.items()))
def test_pages_are_the_static_files_with_a_strict_policy(client, route, page):
    r = client.get(route, params={"q": INJECTION})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.content == (web.STATIC / page).read_bytes()  # nothing interpolated, whatever the request carried
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"


def test_static_files_only_by_name(client):
    for f in web.STATIC.iterdir():
        r = client.get(f"/static/{f.name}")
        assert r.status_code == 200 and "content-security-policy" in r.headers, f.name
    for bad in ("nope.js", "..%2Fweb.py", "%2E%2E/votes.py"):
        assert client.get(f"/static/{bad}").status_code == 404


def test_page_sources_never_parse_data_as_html():
    """Text enters the pages by textContent / Text nodes only: no HTML sink in any script, no inline script or
    event-handler attribute in any page (the policy would block them, and they must not be needed)."""
    sinks = re.compile(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function|"
                       r"createContextualFragment|DOMParser|srcdoc")
    for f in web.STATIC.glob("*.js"):
        assert not sinks.search(f.read_text()), f.name
    for f in web.STATIC.glob("*.html"):
        html = f.read_text()
        assert all('src="/static/' in tag for tag in re.findall(r"<script[^>]*>", html)), f.name
        assert not re.search(r"<script[^>]*>\s*[^<\s]", html), f.name  # no inline code
        assert not re.search(r"\son[a-z]+\s*=", html), f.name


def test_injection_in_prompt_and_answer_stays_data(tmp_path):
    hub = FakeHub(names=["alpha", "beta"], answers={"alpha": INJECTION, "beta": INJECTION})
    c = TestClient(web_app(hub, tmp_path / "v.db"))
    text, _ = ndjson(c.post("/web/chat", json={"model": "alpha", "messages": INJECTION}))
    assert text == INJECTION and hub.calls[-1]["messages"] == [{"role": "user", "content": INJECTION}]
    bid = c.post("/web/arena/new", json={"messages": INJECTION}).json()["battle"]
    for side in "ab":
        assert ndjson(c.post(f"/web/arena/{bid}/answer/{side}", json={}))[0] == INJECTION
    assert c.post(f"/web/arena/{bid}/vote", json={"winner": "model_a"}).status_code == 200
    battle, = VoteStore(tmp_path / "v.db").battles()
    assert battle.prompt[0]["content"] == battle.answer_a == INJECTION  # stored as it was, as text


# ----------------------------------------------------------------------------- chat
def test_chat_streams_the_hubs_deltas(client, hub):
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
               {"role": "user", "content": "again"}]
    text, lines = ndjson(client.post("/web/chat", json={"model": "beta", "messages": history, "max_tokens": 9,
                                                        "temperature": 0, "top_p": 0.5, "seed": 3}))
    assert text == "second answer" and len(lines) == 5 and lines[-1] == {"done": True}
    assert hub.calls[-1] == {"model": "beta", "messages": history, "max_tokens": 9, "temperature": 0.0,
                             "top_p": 0.5, "seed": 3}


@pytest.mark.parametrize("body, status, match", [
    ({"model": "nope", "messages": "hi"}, 404, "unknown model 'nope'"),
    ({"messages": "hi"}, 400, "model"),
    ({"model": "alpha", "messages": "hi", "top_p": 7}, 400, r"top_p: must be in \(0, 1\]"),
    ({"model": "alpha", "messages": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "alpha", "messages": "hi", "max_tokens": 10**6}, 400, "max_tokens"),
    ({"model": "alpha", "messages": "hi", "temperature": "hot"}, 400, "temperature: expected a number"),
    ({"model": "alpha", "messages": "  "}, 400, "empty content"),
    ({"model": "alpha", "messages": [{"role": "assistant", "content": "x"}]}, 400, "user"),
    ({"model": "alpha", "messages": [{"role": "bot", "content": "x"}]}, 400, r"messages\[0\]\.role"),
])
def test_chat_refuses_bad_requests(client, body, status, match):
    r = client.post("/web/chat", json=body)
    assert r.status_code == status and re.search(match, r.json()["error"]), r.text


def test_chat_body_must_be_a_json_object(client):
    assert client.post("/web/chat", content=b"{not json").status_code == 400
    assert "nested too deeply" in client.post("/web/chat", content=b"[" * 100_000).json()["error"]
    assert "surrogate" in client.post("/web/chat", content=b'{"messages": "\\ud800"}').json()["error"]
    assert "UTF-8" in client.post("/web/chat", content=b'{"messages": "\xff"}').json()["error"]
    assert client.post("/web/chat", json=[1, 2]).json()["error"] == "the body must be a JSON object"


def test_a_prompt_the_hub_refuses_is_a_400_and_the_server_goes_on(tmp_path):
    hub = FakeHub(fail=ValueError("the prompt is 9000 tokens, over the model's 128"))
    c = TestClient(web_app(hub, tmp_path / "v.db"))
    r = c.post("/web/chat", json={"model": "alpha", "messages": "long"})
    assert r.status_code == 400 and "9000 tokens" in r.json()["error"]
    hub.fail = None
    assert ndjson(c.post("/web/chat", json={"model": "alpha", "messages": "short"}))[0]
    from tristage.serve.hub import HubError

    hub.fail = HubError(400, "the prompt leaves no room to answer", "messages", "context_length_exceeded")
    r = c.post("/web/chat", json={"model": "alpha", "messages": "long"})
    assert r.status_code == 400 and r.json() == {"error": "the prompt leaves no room to answer"}


# ----------------------------------------------------------------------------- arena
def _round(c, winner="model_a", prompt="which sound?"):
    bid = c.post("/web/arena/new", json={"messages": prompt}).json()["battle"]
    answers = [ndjson(c.post(f"/web/arena/{bid}/answer/{s}", json={}))[0] for s in "ab"]
    r = c.post(f"/web/arena/{bid}/vote", json={"winner": winner})
    assert r.status_code == 200, r.text
    return bid, answers, r.json()


def test_arena_hides_the_names_until_the_vote(client):
    r = client.post("/web/arena/new", json={"messages": "which sound?"})
    assert set(r.json()) == {"battle"}
    bid = r.json()["battle"]
    early = client.post(f"/web/arena/{bid}/vote", json={"winner": "model_a"})
    assert early.status_code == 409 and "both answers" in early.json()["error"]
    streams = [client.post(f"/web/arena/{bid}/answer/{s}", json={}).text for s in "ab"]
    for name in ("alpha", "beta", "gamma"):
        assert name not in r.text and all(name not in s for s in streams)
    assert client.post(f"/web/arena/{bid}/answer/a", json={}).status_code == 409  # once per side
    vote = client.post(f"/web/arena/{bid}/vote", json={"winner": "model_b"}).json()
    assert vote["model_a"] != vote["model_b"] and {vote["model_a"], vote["model_b"]} <= {"alpha", "beta", "gamma"}
    texts = ["".join(json.loads(x).get("delta", "") for x in s.splitlines()) for s in streams]
    names = {"alpha": "first answer", "beta": "second answer", "gamma": "third answer"}
    assert texts == [names[vote["model_a"]], names[vote["model_b"]]]  # A's stream was model_a's answer
    again = client.post(f"/web/arena/{bid}/vote", json={"winner": "model_a"})
    assert again.status_code == 409
    battle, = VoteStore(client.app.state.votes.path).battles()
    assert (battle.model_a, battle.model_b, battle.winner) == (vote["model_a"], vote["model_b"], "model_b")
    assert (battle.answer_a, battle.answer_b) == tuple(texts)


def test_arena_pairs_are_distinct_and_random(client):
    pending = client.app.state.web_arena.pending  # the secret pairs (the API never returns them before a vote)
    pairs = Counter()
    for _ in range(60):
        bid = client.post("/web/arena/new", json={"messages": "x"}).json()["battle"]
        a, b = pending[bid].models
        assert a != b
        pairs[(a, b)] += 1
    assert len(pairs) == 6  # every ordered pair of the three models shows up


def test_votes_move_the_leaderboard(client):
    assert client.get("/web/leaderboard").json()["rows"] == []
    for _ in range(4):
        _, _, vote = _round(client, "model_a")
    board = client.get("/web/leaderboard").json()
    assert board["battles"] == 4 and sum(r["battles"] for r in board["rows"]) == 8
    assert sum(r["wins"] for r in board["rows"]) == 4
    _round(client, "tie (bothbad)")
    board = client.get("/web/leaderboard").json()
    assert board["battles"] == 5 and sum(r["ties"] for r in board["rows"]) == 2


def test_arena_errors(tmp_path):
    c = TestClient(web_app(FakeHub(names=["solo"]), tmp_path / "v.db"))
    r = c.post("/web/arena/new", json={"messages": "x"})
    assert r.status_code == 409 and "two or more" in r.json()["error"]
    c = TestClient(web_app(FakeHub(), tmp_path / "w.db"))
    assert c.post("/web/arena/nope/vote", json={"winner": "model_a"}).status_code == 404
    assert c.post("/web/arena/nope/answer/a", json={}).status_code == 404
    bid = c.post("/web/arena/new", json={"messages": "x"}).json()["battle"]
    assert c.post(f"/web/arena/{bid}/answer/c", json={}).status_code == 404
    assert c.post(f"/web/arena/{bid}/vote", json={"winner": "A"}).status_code == 400


def test_an_arena_error_does_not_name_the_model(tmp_path):
    hub = FakeHub(names=["alpha", "beta"])
    c = TestClient(web_app(hub, tmp_path / "v.db"))
    bid = c.post("/web/arena/new", json={"messages": "x"}).json()["battle"]
    hub.fail = lambda model: ValueError(f"{model}: the prompt is too long for {model}")
    r = c.post(f"/web/arena/{bid}/answer/a", json={})
    assert r.status_code == 400 and r.json()["error"] == "model A: the prompt is too long for model A"


# ----------------------------------------------------------------------------- annotate
RATINGS = [{"helpfulness": 4, "honesty": 5, "harmlessness": 5, "instruction_following": 4},
           {"helpfulness": 2, "honesty": 3, "harmlessness": 5, "instruction_following": 2}]


def test_annotation_is_saved_and_exported(client):
    body = {"prompt": [{"role": "user", "content": "what does the cow say?"}],
            "answers": [{"text": "moo", "model": "alpha"}, {"text": "woof", "model": "beta"}], "best": 0,
            "attributes": list(RATINGS[0]), "ratings": RATINGS, "rationale": "cows moo"}
    r = client.post("/web/annotate", json=body)
    assert r.status_code == 200 and r.json()["counts"]["annotations"] == 1
    (pair,), _ = export_pairs(client.app.state.votes)
    assert (pair["chosen"], pair["rejected"], pair["rationale"]) == ("moo", "woof", "cows moo")
    assert pair["ratings"] == {"chosen": RATINGS[0], "rejected": RATINGS[1]}
    bad = client.post("/web/annotate", json={**body, "ratings": [RATINGS[0], {"helpfulness": 9}]})
    assert bad.status_code == 400 and "ratings[1]" in bad.json()["error"]
    assert client.post("/web/annotate", json={**body, "rationale": ""}).status_code == 400
    assert client.post("/web/annotate", json={**body, "prompt": []}).status_code == 400
    assert client.app.state.votes.counts()["annotations"] == 1


def test_upload_of_answers_records_and_arena_answer_files(client):
    answers = "\n".join(json.dumps(r) for r in [
        {"prompt": "p1", "answers": ["a", {"text": "b", "model": "m"}]},
        {"prompt": "Tell me a story about Tom.", "answers": ["x", "y"], "kind": "story"},
        {"messages": [{"role": "user", "content": "p3"}], "answers": ["u", "v", "w"], "attributes": ["wit"]},
        {"prompt": "p4", "answers": ["only one"]}])
    r = client.post("/web/annotate/parse", json={"files": [{"name": "items.jsonl", "text": answers}]}).json()
    assert r["fewer"] == 1 and [len(i["answers"]) for i in r["items"]] == [2, 2, 3]
    assert r["items"][0]["answers"][1] == {"text": "b", "model": "m"}
    assert [i["attribute_set"] for i in r["items"]] == ["default", "world", "custom"]
    assert r["items"][1]["attributes"] == web.attribute_sets()["world"] and r["items"][2]["attributes"] == ["wit"]
    # the arena's answer files, one per model: grouped by prompt, the model named by the file
    a = "\n".join(json.dumps({"question_id": i, "prompt": f"q{i}", "answer": f"A{i}"}) for i in range(3))
    b = "\n".join(json.dumps({"question_id": i, "prompt": f"q{i}", "response": f"B{i}"}) for i in (0, 1))
    r = client.post("/web/annotate/parse", json={"files": [{"name": "sft.jsonl", "text": a},
                                                           {"name": "dpo.jsonl", "text": b}]}).json()
    assert r["fewer"] == 1
    assert [[(x["text"], x["model"]) for x in i["answers"]] for i in r["items"]] == [
        [("A0", "sft"), ("B0", "dpo")], [("A1", "sft"), ("B1", "dpo")]]


@pytest.mark.parametrize("text, match", [
    ('{"prompt": "p", "answers": ["a", "b"]}\n{"prompt": "p", "answers": "ab"}', r"f\.jsonl:2: field 'answers'"),
    ('{"prompt": "p", "answers": ["a", ""]}', r"f\.jsonl:1: field 'answers\[1\]'"),
    ('{"answers": ["a", "b"]}', r"f\.jsonl:1: .*prompt"),
    ('{"prompt": "p"}', r"f\.jsonl:1: .*answers"),
    ('{"prompt": "p", "answers": ["a", "b"]}\nnot json', r"f\.jsonl:2"),
    ("", r"f\.jsonl: no records"),
    ('{"prompt": "p", "answers": ["a"]}', "no prompt with two or more answers"),
])
def test_upload_errors_name_file_and_line(client, text, match):
    r = client.post("/web/annotate/parse", json={"files": [{"name": "f.jsonl", "text": text}]})
    assert r.status_code == 400 and re.search(match, r.json()["error"]), r.text


def test_config_lists_models_and_attribute_sets(client):
    cfg = client.get("/web/config").json()
    assert cfg["models"] == ["alpha", "beta", "gamma"] and cfg["default_attributes"] == "default"
    assert cfg["attribute_sets"]["default"] == ["helpfulness", "honesty", "harmlessness", "instruction_following"]
    assert "plausibility" in cfg["attribute_sets"]["world"]


def test_a_client_that_leaves_mid_answer_ends_the_hubs_iteration(tmp_path):
    """Closing the stream (a page's Stop button, a closed tab) cancels the hub's iteration: its slot is freed."""
    import threading
    import time

    import httpx
    import uvicorn

    hub = FakeHub(names=["alpha", "beta"], answers={"alpha": "x" * 4000}, delay=0.01)  # ~10 s if read to the end
    srv = uvicorn.Server(uvicorn.Config(web_app(hub, tmp_path / "v.db"), host="127.0.0.1", port=0,
                                        log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.01)
    base = f"http://127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}"
    try:
        with httpx.stream("POST", base + "/web/chat", json={"model": "alpha", "messages": "hi"}) as r:
            lines = r.iter_lines()
            assert json.loads(next(lines)) == {"delta": "xxxx"}
        t0 = time.monotonic()
        while hub.cancelled == 0 and time.monotonic() - t0 < 5:
            time.sleep(0.02)
        assert hub.cancelled == 1, "the iteration went on"
        assert len(hub.calls) == 1 and time.monotonic() - t0 < 5
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


def test_upload_with_a_byte_order_mark(client):
    text = "\ufeff" + json.dumps({"prompt": "p", "answers": ["a", "b"]})
    r = client.post("/web/annotate/parse", json={"files": [{"name": "bom.jsonl", "text": text}]})
    assert r.status_code == 200 and len(r.json()["items"]) == 1
