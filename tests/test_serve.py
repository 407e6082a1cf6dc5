"""`tristage serve`: the OpenAI-compatible API tested with the official `openai` client against two tiny random
models served in-process (uvicorn in a thread): models, chat and text completions, streaming and not, n, stop,
seed, usage, logprobs, the API key, every kind of bad request (the right 4xx, an OpenAI error body, the server up
afterwards), concurrent requests equal to each alone (greedy), and a client that goes away freeing its rows."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
import torch
from conftest import tiny_config

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from tristage.cli import main as cli_main  # noqa: E402
from tristage.rollout import load_chat_model  # noqa: E402
from tristage.serve.detok import response_text  # noqa: E402
from tristage.serve.engine import Engine, Request, SamplingParams  # noqa: E402
from tristage.serve.hub import Hub, HubError, StopMatcher  # noqa: E402
from tristage.serve.server import create_app, serve_in_thread  # noqa: E402

KEY = "sk-test"
CONTEXT = 4096  # long enough that a request of 4000 tokens is still running when its client leaves
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def folders(tiny_shards, tmp_path_factory):
    from tristage.model.gpt import build_model
    from tristage.model.hf import save_model
    from tristage.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("serve")
    tok = Tokenizer.load(tiny_shards / "tokenizer")
    for name, seed in (("a", 0), ("b", 1)):  # a large init: varied greedy answers (a small one repeats a token)
        cfg = tiny_config(tok, max_position_embeddings=CONTEXT, initializer_range=0.5, tie_word_embeddings=False)
        model = build_model(cfg, seed=seed)
        # logits 0 (below the greedy pick) for the end-of-turn tokens, so greedy answers run to max_tokens, and for
        # the bytes that are not ASCII, so answers are UTF-8 text (that a stream shows as it comes)
        high_bytes = [tok.token_to_id(f"<0x{b:02X}>") for b in range(0x80, 0x100)]
        with torch.no_grad():
            model.lm_head.weight[tok.stop_ids + [i for i in high_bytes if i is not None]] = 0
        save_model(model, root / name / "model", tok)
    return root


@pytest.fixture(scope="module", params=[(0, 1), (1, 1), (0, 2)],
                ids=["in-process-prefill", "prefill-process", "two-replicas"])
def server(folders, request):
    """(base_url, hub): both models served, "a" by its folder's name (runs/a/model -> a), "b" as NAME=PATH; the
    prompts prefilled in the engine process, or in a prefill process beside it (`--prefill-process on`), or two
    engine processes per model (`tristage serve`'s default on a CPU with 2 cores or more)."""
    prefill_threads, replicas = request.param
    hub = Hub.load([str(folders / "a" / "model"), f"b={folders / 'b' / 'model'}"], max_batch=8,
                   prefill_threads=prefill_threads, replicas=replicas)
    url, stop = serve_in_thread(create_app(hub, api_key=KEY))
    yield url, hub
    stop()
    hub.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def alone(folders):
    """The reference: the request alone through the batch engine (`Engine.generate`), greedy."""
    chat = load_chat_model(folders / "a" / "model")

    def run(messages, max_tokens):
        ids = chat.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        out = Engine(chat.model).generate([ids], SamplingParams(max_new_tokens=max_tokens, temperature=0,
                                                                 stop_ids=chat.stop_ids, logprobs=True))[0]
        return ids, out, response_text(chat.tokenizer, out.tokens, out.finish_reason)

    return run


def chat(client, **kw):
    return client.chat.completions.create(**{"model": "a", "messages": HI, "max_tokens": 24, **kw})


# ----------------------------------------------------------------------------- the API
def test_models_by_name(client):
    assert [m.id for m in client.models.list()] == ["a", "b"]
    assert client.models.retrieve("b").id == "b"


def test_greedy_chat_equals_the_engine_alone_with_usage_and_logprobs(client, alone):
    ids, out, text = alone(HI, 24)
    r = chat(client, temperature=0, logprobs=True, top_logprobs=3)
    c = r.choices[0]
    assert c.message.content == text and c.message.role == "assistant" and c.finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(out.tokens) == 24
    assert r.usage.total_tokens == len(ids) + 24
    lps = c.logprobs.content
    assert [x.logprob for x in lps] == pytest.approx(out.logprobs, abs=1e-4)
    for x in lps:  # greedy: the chosen token is the most likely one
        assert len(x.top_logprobs) == 3 and x.top_logprobs[0].logprob == pytest.approx(x.logprob)
        assert x.top_logprobs[0].logprob >= x.top_logprobs[1].logprob >= x.top_logprobs[2].logprob


def test_streaming_equals_the_whole_answer(client, server):
    whole = chat(client, temperature=0).choices[0].message.content
    chunks = list(chat(client, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == whole
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    # the wire format: `data: {json}` events, the last one `data: [DONE]`
    body = {"model": "a", "messages": HI, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[1][6:])["object"] == "chat.completion.chunk"


def test_n_choices_and_seed_reproducibility(client):
    r = chat(client, n=3, temperature=1.0, seed=5, logprobs=True)
    texts = [c.message.content for c in r.choices]
    assert [c.index for c in r.choices] == [0, 1, 2] and len(set(texts)) == 3
    # every generated token counts, the end-of-turn token too (it has no logprobs entry: it is not in the text)
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) + (c.finish_reason == "stop") for c in r.choices)
    assert [c.message.content for c in chat(client, n=3, temperature=1.0, seed=5).choices] == texts
    assert chat(client, temperature=1.0, seed=5).choices[0].message.content == texts[0]  # choice i: seed + i
    assert chat(client, temperature=1.0, seed=6).choices[0].message.content != texts[0]
    streamed = ["", "", ""]
    for ch in chat(client, n=3, temperature=1.0, seed=5, stream=True):
        for c in ch.choices:
            streamed[c.index] += c.delta.content or ""
    assert streamed == texts


def test_stop_strings_cut_the_answer_streaming_or_not(client):
    whole = chat(client, temperature=0, max_tokens=40).choices[0].message.content
    stop = whole[10:13]
    want = whole[: whole.find(stop)]
    assert len(want) <= 10
    for stops in (stop, ["never there", stop]):
        r = chat(client, temperature=0, max_tokens=40, stop=stops)
        assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens < 40
        chunks = list(chat(client, temperature=0, max_tokens=40, stop=stops, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_text_completions(client, folders):
    tok = load_chat_model(folders / "a" / "model").tokenizer
    r = client.completions.create(model="a", prompt="the dog", max_tokens=6, temperature=0, logprobs=2)
    c = r.choices[0]
    assert r.object == "text_completion" and c.finish_reason == "length" and r.usage.completion_tokens == 6
    assert r.usage.prompt_tokens == len(tok.encode("the dog", add_special_tokens=True))
    assert len(c.logprobs.tokens) == 6 and all(len(t) <= 2 for t in c.logprobs.top_logprobs)
    assert c.logprobs.text_offset[0] == 0
    many = client.completions.create(model="b", prompt=["the dog", "a cat sat"], max_tokens=4, n=2, temperature=0)
    assert [c.index for c in many.choices] == [0, 1, 2, 3] and many.choices[0].text == many.choices[1].text
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model="a", prompt="the dog", max_tokens=6, temperature=0, stream=True))
    assert streamed == c.text


# ----------------------------------------------------------------------------- keys and mistakes
def test_the_api_key_guards_the_api(server):
    url = server[0]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(url + "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 401  # the key is checked first
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(url + "/", headers={}).status_code != 401  # the page files hold no data


def test_with_a_db_the_page_routes_take_the_key_as_a_header_or_a_cookie(server, tmp_path):
    pytest.importorskip("tristage.serve.web")
    app = create_app(server[1], api_key=KEY, db=str(tmp_path / "votes.sqlite"))
    assert app.state.hub is server[1]

    async def get(path: str, **headers: str) -> int:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return (await c.get(path, headers=headers)).status_code

    assert asyncio.run(get("/")) == 200 and asyncio.run(get("/static/common.js")) == 200  # the page files
    assert asyncio.run(get("/v1/models")) == 401 and asyncio.run(get("/web/config")) == 401
    assert asyncio.run(get("/web/config", cookie="tristage_key=wrong")) == 401
    assert asyncio.run(get("/web/config", cookie="a=b; tristage_key=" + KEY)) == 200
    assert asyncio.run(get("/web/config", authorization="Bearer " + KEY)) == 200
    assert asyncio.run(get("/v1/models", cookie="tristage_key=" + KEY)) == 401  # the API takes the header only
    assert asyncio.run(get("/web/config", cookie="bad cookie \x7f;;=")) == 401


BAD = [  # (body or raw bytes, status, param)
    (b"{not json", 400, None),
    ({"model": "nope", "messages": HI}, 404, "model"),
    ({"model": "a", "messages": [{"role": "user", "content": "x" * CONTEXT}]}, 400, "messages"),
    ({"model": "a", "messages": HI, "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "a", "messages": HI, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ({"model": "a", "messages": HI, "top_p": 7}, 400, "top_p"),
    ({"model": "a", "messages": HI, "n": 10 ** 6}, 400, "n"),
    ({"model": "a", "messages": HI, "temperature": -1}, 400, "temperature"),
    ({"model": "a", "messages": HI, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
    ({"model": "a", "messages": HI, "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": "a"}, 400, "messages"),
    ({"model": "a", "messages": "hi"}, 400, "messages"),
    ({"model": "a", "messages": []}, 400, "messages"),
    ({"model": "a", "messages": [{"content": "no role"}]}, 400, "messages.0.role"),
    ({"model": "a", "messages": HI, "presence_penalty": 1.0}, 400, "presence_penalty"),
    ({"model": "a", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages.0.content"),
    ([1, 2], 400, None),
]


@pytest.mark.parametrize("body, status, param", BAD, ids=[f"{s}-{p}" for _, s, p in BAD])
def test_bad_requests_get_4xx_with_an_openai_error_body(server, body, status, param):
    url, headers = server[0] + "/v1/chat/completions", {"Authorization": f"Bearer {KEY}"}
    if isinstance(body, bytes):
        r = httpx.post(url, content=body, headers={**headers, "Content-Type": "application/json"})
    else:
        r = httpx.post(url, json=body, headers=headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["param"] == param
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_bad_text_completions_and_the_server_stays_up(server, client):
    for kw, param in (({"prompt": "hi", "echo": True}, "echo"), ({"prompt": "hi", "logprobs": 9}, "logprobs"),
                      ({"prompt": [], "max_tokens": 2}, "prompt"), ({"prompt": [10 ** 9]}, "prompt"),
                      ({"prompt": [5] * CONTEXT}, "prompt")):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="a", **kw)
        assert e.value.body["param"] == param  # the openai client hands over the "error" object
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="zzz", prompt="hi")
    r = httpx.post(server[0] + "/v1/nowhere", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and "error" in r.json()
    assert chat(client, max_tokens=2).usage.completion_tokens == 2  # still serving


def break_engine(hub: Hub, name: str) -> object:
    """Send the engine a request the hub would refuse (a token id past the vocabulary): its prefill raises inside a
    step, in the engine process, which fails every request then in the batch; or in the prefill process, which
    fails that request only. -> what that request got."""
    engines = getattr(hub.batchers[name], "batchers", [hub.batchers[name]])  # with replicas: the one decoding
    engine = max(engines, key=lambda b: b.running)

    async def go():
        sink = engine.submit([Request(("bad", time.monotonic()), [10 ** 6], SamplingParams(2))])
        return await asyncio.wait_for(sink.get(), 30)

    return asyncio.run(go())


def wait_running(hub: Hub, name: str, rows: int, timeout: float = 10.0) -> None:
    start = time.monotonic()
    while hub.batchers[name].running != rows:
        assert time.monotonic() - start < timeout, f"{name} never had {rows} rows running"
        time.sleep(0.005)


def test_an_engine_failure_fails_its_requests_only(server, client):
    url, hub = server
    long = {"model": "b", "messages": HI, "max_tokens": CONTEXT - 100, "temperature": 0}
    failed: list = []

    def whole() -> None:
        try:
            client.chat.completions.create(**long)
        except openai.InternalServerError as e:
            failed.append(e.body["type"])

    prefilling = hub.batchers["b"].prefiller is not None  # a bad prompt never reaches the engine's batch
    t = threading.Thread(target=whole)
    t.start()
    wait_running(hub, "b", 1)
    assert isinstance(break_engine(hub, "b"), IndexError)
    t.join(timeout=30)
    assert failed == ([] if prefilling else ["server_error"])
    with httpx.stream("POST", url + "/v1/chat/completions", json={**long, "stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}) as resp:
        lines = resp.iter_lines()
        events = [next(x for x in lines if x)]  # the stream has begun (its role chunk)
        wait_running(hub, "b", 1)  # and its row decodes
        assert isinstance(break_engine(hub, "b"), IndexError)
        events += [line for line in lines if line]
    assert resp.status_code == 200
    if prefilling:
        assert events[-1] == "data: [DONE]"
    else:
        assert json.loads(events[-1][6:])["error"]["type"] == "server_error"
    assert client.chat.completions.create(model="b", messages=HI, max_tokens=5).usage.completion_tokens == 5


# ----------------------------------------------------------------------------- continuous batching
def test_concurrent_requests_equal_each_alone(server, client, alone):
    """Requests of different lengths and max_tokens, sent at different times, each equal to itself alone."""
    asks = [([{"role": "user", "content": "hi " * k}], m) for k, m in ((1, 30), (9, 7), (3, 50), (20, 12), (5, 25),
                                                                        (2, 40))]
    got: dict[int, str] = {}

    def ask(i: int) -> None:
        time.sleep(0.003 * i)  # staggered: later requests join a batch that is already decoding
        got[i] = chat(client, messages=asks[i][0], max_tokens=asks[i][1], temperature=0,
                      stream=i % 2 == 1).choices[0].message.content if i % 2 == 0 else "".join(
            c.choices[0].delta.content or "" for c in chat(client, messages=asks[i][0], max_tokens=asks[i][1],
                                                           temperature=0, stream=True))

    server[1].batchers["a"].peak = 0
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engines = getattr(server[1].batchers["a"], "batchers", [server[1].batchers["a"]])
    need = 3 if len(engines) == 1 else 2  # they did share the batch (each replica's: both got requests)
    assert all(b.peak >= need for b in engines), [b.peak for b in engines]
    for i, (messages, m) in enumerate(asks):
        assert got[i] == alone(messages, m)[2], i


def wait_idle(hub: Hub, name: str, cancelled: int, timeout: float = 10.0) -> float:
    start = time.monotonic()
    while hub.batchers[name].running or hub.batchers[name].cancelled < cancelled:
        assert time.monotonic() - start < timeout, "the request's rows were not freed"
        time.sleep(0.01)
    return time.monotonic() - start


def test_a_client_that_leaves_frees_its_rows(server, client):
    url, hub = server
    before = hub.batchers["a"].cancelled
    stream = chat(client, max_tokens=CONTEXT - 100, temperature=0, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert hub.batchers["a"].running == 1
    stream.close()  # the connection closes mid-stream
    wait_idle(hub, "a", before + 1)
    # a non-streaming request whose client gives up waiting
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json={"model": "a", "messages": HI, "max_tokens": CONTEXT - 100,
                                                             "temperature": 0},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=0.3)
    wait_idle(hub, "a", before + 2)
    assert chat(client, max_tokens=3).choices[0].finish_reason == "length"


def test_hub_chat_stream_and_leaving_early(server, alone):
    _, hub = server

    async def go():
        text = "".join([t async for t in hub.chat_stream("a", HI, max_tokens=24, temperature=0)])
        before = hub.batchers["a"].cancelled
        gen = hub.chat_stream("a", HI, max_tokens=CONTEXT - 100, temperature=0)
        async for _ in gen:
            break
        await gen.aclose()  # a consumer that stops iterating frees the row
        with pytest.raises(HubError) as e:
            async for _ in hub.chat_stream("nope", HI):
                pass
        return text, before, e.value.status

    text, before, status = asyncio.run(go())
    assert text == alone(HI, 24)[2] and status == 404
    wait_idle(hub, "a", before + 1)


def test_stop_matcher_holds_back_what_may_start_a_stop_string():
    m = StopMatcher(["END", "xy"])
    assert m.push("abcE") == ("abc", False)
    assert m.push("N") == ("", False)
    assert m.push("Dzz") == ("", True)  # "EN" + "D": the stop string, split over three pushes, never shown
    m = StopMatcher(["END"])
    assert m.push("aEN") == ("a", False) and m.push("x") == ("ENx", False) and m.flush() == ""
    assert StopMatcher([]).push("END") == ("END", False)


# ----------------------------------------------------------------------------- the command
def test_serve_command_refuses_bad_input_in_one_line(folders, tmp_path, capsys):
    assert cli_main(["serve", str(tmp_path / "missing")]) == 2
    assert "no such model folder" in capsys.readouterr().err
    assert cli_main(["serve", str(tmp_path)]) == 2  # a folder, not a model folder
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json" in err
    a = folders / "a" / "model"
    assert cli_main(["serve", f"x={a}", f"x={folders / 'b' / 'model'}"]) == 2
    assert "two models named 'x'" in capsys.readouterr().err
    assert cli_main(["serve", str(a), "--port", "70000"]) == 2
    assert cli_main(["serve", str(a), "--db", str(tmp_path / "no" / "votes.sqlite")]) == 2
    assert "--db" in capsys.readouterr().err
    import socket

    with socket.create_server(("127.0.0.1", 0)) as s:
        assert cli_main(["serve", str(a), "--port", str(s.getsockname()[1])]) == 2
        assert "cannot listen there" in capsys.readouterr().err
    assert torch.get_num_threads() >= 1


async def collect(sinks: list[asyncio.Queue]) -> list:
    """Each sink's tokens until its request finishes, or the name of the exception it got instead."""
    got = []
    for sink in sinks:
        toks: list | str = []
        while True:
            t = await asyncio.wait_for(sink.get(), 30)
            if isinstance(t, Exception):
                toks = type(t).__name__
                break
            toks.append(t.token)
            if t.finish_reason is not None:
                break
        got.append(toks)
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_prefill_process_gives_what_the_engine_gives(folders, dtype):
    """A model's prompts prefilled in a process of their own (keys and values through a pipe, in the model's dtype,
    bfloat16 too) give the same greedy tokens as prefilled by the engine; a too long prompt fails alone."""
    from tristage.model.hf import load_model
    from tristage.serve.batcher import Batcher

    model = load_model(folders / "a" / "model", dtype=dtype).eval()
    prompts = [[5, 9, 14, 3], list(range(3, 40)), [7]]

    async def ask(b: Batcher) -> list:
        sinks = [b.submit([Request((i, time.monotonic()), p, SamplingParams(max_new_tokens=12, temperature=0))])
                 for i, p in enumerate([*prompts, [1] * CONTEXT])]
        return await collect(sinks)

    results = []
    for threads in (0, 1):
        b = Batcher(model, max_rows=4, name="a", threads=1, prefill_threads=threads)
        try:
            results.append(asyncio.run(ask(b)))
        finally:
            b.close()
    assert results[0] == results[1]
    assert results[0][-1] == "ValueError" and all(len(t) == 12 for t in results[0][:-1])


def test_replicas_spread_requests_and_route_around_a_dead_engine(folders):
    """Two engine processes for one model: concurrent requests go to both and each gets the engine's greedy tokens;
    after one engine process is killed, its request fails with EngineGone and new requests go to the living one."""
    from tristage.model.hf import load_model
    from tristage.serve.batcher import EngineGone, Replicas

    model = load_model(folders / "a" / "model").eval()
    want = Engine(model).generate([[5, 9, 14, 3]], SamplingParams(max_new_tokens=12, temperature=0))[0].tokens

    async def ask(r: Replicas, n: int, max_new: int = 12) -> list:
        sinks = [r.submit([Request((i, time.monotonic()), [5, 9, 14, 3], SamplingParams(max_new, temperature=0))])
                 for i in range(n)]
        return await collect(sinks)

    r = Replicas(model, 2, max_rows=4, name="a", threads=1)
    try:
        r.wait_ready()
        assert asyncio.run(ask(r, 4)) == [want] * 4
        assert all(b.peak >= 2 for b in r.batchers)  # both engines decoded

        async def one_dies() -> list:
            sink = r.batchers[0].submit([Request(("long", 0), [5, 9], SamplingParams(CONTEXT - 10, temperature=0))])
            await asyncio.wait_for(sink.get(), 30)  # it decodes
            r.batchers[0].proc.kill()
            while not isinstance(t := await asyncio.wait_for(sink.get(), 30), Exception):
                pass
            return [type(t).__name__, *await ask(r, 3)]

        got = asyncio.run(one_dies())
        assert got[0] == EngineGone.__name__
        assert got[1:] == [want] * 3
    finally:
        r.close()
