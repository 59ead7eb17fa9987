"""The judge client against a real OpenAI-style chat-completions server on loopback."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from evaluation.judge import JudgeClient, JudgeConfig, JudgeError, load_prompts, parse_rating
from evaluation.sources import DataSourceError

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "evaluation"


class ChatServer:
    """Answers POST /v1/chat/completions with scripted (status, content) pairs, then ``default``."""

    def __init__(self, script=(), default="Fine answer. Rating: [[7]]"):
        self.script = list(script)
        self.default = default
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                status, content = outer.script.pop(0) if outer.script else (200, outer.default)
                if callable(content):
                    content = content(body)
                payload = (
                    {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
                    if status == 200
                    else {"error": {"message": content}}
                )
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    servers = []

    def make(*args, **kwargs):
        servers.append(ChatServer(*args, **kwargs))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def client(url, tmp_path, **kw):
    return JudgeClient(
        JudgeConfig(url, "judge-model", "FEDLLM_TEST_JUDGE_KEY", str(tmp_path / "cache"), backoff=0, **kw),
        load_prompts(FIXTURES),
    )


@pytest.mark.parametrize(
    ("text", "score"),
    [
        ("Good. [[8]]", 8.0),
        ("Rating: [[ 9.5 ]]", 9.5),
        ("[[7/10]]", 7.0),
        ("first [[3]] then corrected [[6]]", 6.0),
        ("Rating: [5]", 5.0),
        ("[[11]]", None),
        ("[[0]]", None),
        ("I would give it an eight.", None),
        ("", None),
        # the rating the judgement ends with, not a [[x]] it quotes
        ('The answer grades itself "[[10]]", which it is not. Rating: [3]', 3.0),
        ("Explanation of the verdict. Rating: 4", 4.0),
        ("rating the response on a scale of 1 to 10 is hard", None),
    ],
)
def test_parse_rating(text, score):
    assert parse_rating(text) == score


def test_grade_sends_chat_completions_with_the_key_and_parses(server, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLLM_TEST_JUDGE_KEY", "sk-test")
    s = server()
    score, text = client(s.url, tmp_path).grade("What is 2+2?", "4", reference="4")
    assert score == 7.0 and "[[7]]" in text
    (req,) = s.requests
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    body = req["body"]
    assert body["model"] == "judge-model"
    assert body["messages"][0] == {"role": "system", "content": "FIXTURE single-math-v1 system."}
    user = body["messages"][1]["content"]
    assert user.startswith("[Instruction]\nFIXTURE single-math-v1:") and "[Reference]\n4\n" in user
    assert "[Question]\nWhat is 2+2?" in user and "[Answer]\n4\n" in user


def test_the_judge_prompts_are_read_from_the_given_file_and_must_hold_the_single_prompts(tmp_path):
    prompts = load_prompts(FIXTURES)
    assert {"single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn"} <= set(prompts)
    assert "{question_2}" in prompts["single-v1-multi-turn"]["prompt_template"]
    (tmp_path / "judge_prompts.jsonl").write_text((FIXTURES / "judge_prompts.jsonl").read_text().splitlines()[0] + "\n")
    with pytest.raises(DataSourceError, match=r"lack \['single-v1'.*judge_prompts\.jsonl"):
        load_prompts(tmp_path)


def test_a_500_is_retried_then_succeeds(server, tmp_path, monkeypatch):
    monkeypatch.delenv("FEDLLM_TEST_JUDGE_KEY", raising=False)
    s = server(script=[(500, "overloaded"), (503, "busy"), (200, "ok [[9]]")])
    score, _ = client(s.url, tmp_path).grade("q", "a")
    assert score == 9.0 and len(s.requests) == 3 and s.requests[0]["auth"] is None


def test_failures_past_the_retries_or_a_400_raise(server, tmp_path):
    s = server(script=[(500, "down")] * 3)
    with pytest.raises(JudgeError, match="failed 3 times; last error: HTTP 500"):
        client(s.url, tmp_path, retries=2).grade("q", "a")
    s400 = server(script=[(400, "bad model")])
    with pytest.raises(JudgeError, match="refused the request: HTTP 400"):
        client(s400.url, tmp_path).grade("q", "a")
    assert len(s400.requests) == 1


def test_a_reply_without_rating_is_malformed_not_zero(server, tmp_path):
    s = server(default="The answer is decent but I will not give a number.")
    score, text = client(s.url, tmp_path).grade("q", "a")
    assert score is None and "decent" in text


def test_a_rerun_is_answered_from_the_disk_cache(server, tmp_path):
    s = server()
    first = client(s.url, tmp_path)
    assert first.grade("q", "a")[0] == 7.0 and len(s.requests) == 1
    rerun = client(s.url, tmp_path)  # a new process would build a new client on the same cache folder
    assert rerun.grade("q", "a")[0] == 7.0
    assert len(s.requests) == 1 and rerun.cache_hits == 1 and rerun.requests_sent == 0
    rerun.grade("q", "another answer")
    assert len(s.requests) == 2


@pytest.mark.slow
def test_mt_bench_two_turns_judged_end_to_end(server, tmp_path, gen, rows):
    from evaluation.open_ended import evaluate

    def judge(body):
        prompt = body["messages"][1]["content"]
        if "<|Conversation|>" in prompt:
            return "second turn ok [[4]]"
        return "no score here" if "made-up city" in prompt else "first turn [[8]]"

    s = server(default=judge)
    m = evaluate(gen, "mt_bench", rows("mt_bench"), client(s.url, tmp_path), tmp_path / "eval", max_new_tokens=16)
    assert len(s.requests) == 4  # 2 questions x 2 turns
    second = [r["body"]["messages"] for r in s.requests if "<|Conversation|>" in r["body"]["messages"][1]["content"]]
    (math,) = [m for m in second if "Now divide that result by 4." in m[1]["content"]]  # requests run concurrently
    assert len(second) == 2 and math[0]["content"].startswith("FIXTURE single-math-v1-multi-turn")
    assert "### Reference:\n36\n" in math[1]["content"] and "### Reference:\n9\n" in math[1]["content"]
    (poem,) = [m for m in second if m is not math]
    assert poem[0]["content"].startswith("FIXTURE single-v1-multi-turn")
    assert m["malformed"] == 1 and m["malformed_judgements"][0]["turn"] == 1
    assert m["score_turn1"] == 8.0 and m["score_turn2"] == 4.0 and m["score"] == pytest.approx(16 / 3)
    assert m["score/math"] == 6.0 and m["judged"] == 3
    saved = [json.loads(x) for x in (tmp_path / "eval" / "mt_bench_answers.jsonl").read_text().splitlines()]
    assert [len(r["answers"]) for r in saved] == [2, 2] and saved[0]["scores"][0] is None


def test_mt_bench_references_stay_aligned_with_their_turns():
    from evaluation.open_ended import to_item

    item = to_item("mt_bench", {"prompt": ["a", "b"], "prompt_id": 1, "category": "math", "reference": ["", "9"]})
    assert item["reference"] == ["", "9"]
    assert to_item("mt_bench", {"prompt": ["a", "b"], "category": "writing", "reference": []})["reference"] is None
