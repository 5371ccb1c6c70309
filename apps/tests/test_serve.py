"""apps/serve.py through the real `openai` client, against a live server this test starts on a free loopback port:
each answer equals the one-at-a-time greedy answer of core's `generate` on the same model (the oracle, computed in
this process), alone, streamed, and under concurrent load; bad requests get OpenAI-shaped 4xx errors; a client that
goes away frees its KV blocks."""
import concurrent.futures as futures
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

APPS = Path(__file__).parents[1]
MODEL = "smollm2-135m-instruct"
QUESTIONS = ["What is the capital of France?", "Name a primary color.", "What is 2 + 2?", "Say hello.",
             "What do bees make?", "Which planet is red?", "What is ice made of?", "Name a fruit."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server():
    port = free_port()
    proc = subprocess.Popen([sys.executable, APPS / "serve.py", "--port", str(port), "--max-batch", "16",
                             "--kv-memory", "64", "--dtype", "float32"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                get(base + "/health")
                break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None:
                    raise RuntimeError(proc.stderr.read())
                time.sleep(0.5)
        else:
            raise RuntimeError("the server did not start in 120 s")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def oracle():
    """question -> the greedy answer of core's generate, one prompt at a time (text, token count)."""
    from minllama.core.chat_format import chat_format_for
    from minllama.core.checkpoint import load_pretrained
    from minllama.core.generate import generate

    model, tok = load_pretrained(MODEL)
    fmt = chat_format_for(tok)

    def answer(question, n, chat=True):
        prompt = (fmt.encode_dialog(tok, [{"role": "user", "content": question}]) if chat else tok.encode(question))
        ids = generate(model, [prompt], n, stop_ids=tok.stop_ids)[0]
        ids = [t for t in ids if t not in tok.stop_ids]
        return tok.decode(ids), len(prompt)
    return answer


def ask(client, question, n=12, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                          max_tokens=n, temperature=0, **kw)


def test_chat_completion_equals_generate_alone(client, oracle):
    reply = ask(client, QUESTIONS[0])
    text, prompt_len = oracle(QUESTIONS[0], 12)
    assert reply.choices[0].message.content == text and "Paris" in text
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.prompt_tokens == prompt_len
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streaming_gives_the_same_text_in_pieces(client, oracle):
    chunks = list(ask(client, QUESTIONS[1], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == oracle(QUESTIONS[1], 12)[0]
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]


def test_text_completions_streamed_and_not(client, oracle):
    prompt = "The capital of Italy is"
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    pieces = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True)
    streamed = "".join(c.choices[0].text for c in pieces if c.choices)
    assert whole.choices[0].text == streamed == oracle(prompt, 8, chat=False)[0]
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 8


def test_stop_strings_and_models(client, oracle, server):
    text = oracle(QUESTIONS[0], 12)[0]
    word = text.split()[2]
    reply = ask(client, QUESTIONS[0], stop=[word])
    assert reply.choices[0].message.content == text[:text.index(word)] and reply.choices[0].finish_reason == "stop"
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert get(server + "/health")["status"] == "ok"


def test_sixteen_concurrent_clients_each_get_their_own_answer(client, oracle):
    questions = QUESTIONS * 2
    with futures.ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda q: ask(client, q).choices[0].message.content, questions))
    assert replies == [oracle(q, 12)[0] for q in questions]


def test_a_client_that_goes_away_frees_its_blocks(client, server, oracle):
    stream = ask(client, "Tell me a very long story about the sea.", n=400, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()  # the client disconnects mid-answer
    assert ask(client, QUESTIONS[2]).choices[0].message.content == oracle(QUESTIONS[2], 12)[0]  # others go on
    for _ in range(100):
        health = get(server + "/health")
        if health["running"] == 0 and health["kv_blocks_in_use"] == 0:
            break
        time.sleep(0.1)
    assert health["running"] == 0 and health["kv_blocks_in_use"] == 0


def raw_post(server, path, data: bytes):
    req = urllib.request.Request(server + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_requests_get_openai_shaped_errors_and_the_server_lives(client, server):
    status, body = raw_post(server, "/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    for bad in ({"max_tokens": -1}, {"max_tokens": 10**9}, {"temperature": float("inf")}, {"temperature": 5},
                {"top_p": 0}, {"messages": []}):
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **bad}
        status, reply = raw_post(server, "/v1/chat/completions", json.dumps(body).encode())
        assert status == 400 and reply["error"]["message"], (bad, reply)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=MODEL, prompt="word " * 9000, max_tokens=4)
    assert get(server + "/health")["status"] == "ok"


def test_bounded_load_every_request_completes_correctly(client, server, oracle):
    expected = {q: oracle(q, 4)[0] for q in QUESTIONS}
    jobs = [QUESTIONS[i % len(QUESTIONS)] for i in range(200)]
    start = time.perf_counter()
    with futures.ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(lambda q: ask(client, q, n=4).choices[0].message.content, jobs))
    assert time.perf_counter() - start < 300
    assert replies == [expected[q] for q in jobs]
    health = get(server + "/health")
    assert health["running"] == 0 and health["waiting"] == 0 and health["kv_blocks_in_use"] == 0
