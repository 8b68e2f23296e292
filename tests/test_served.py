"""Served-model evaluation (--engine openai, tasks/served.py) against a real HTTP server on 127.0.0.1 started here,
which answers OpenAI completions requests with the project's own tiny model (HF generate, greedy, batch 1): the same
predictions and scores as in-process; a bad URL, a refused connection, a timeout and a sampling server are one line
each, with nothing written."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import evaluate
from tasks.errors import SapoError
from tasks.models import load_model, load_tokenizer
from test_evaluate import free_port, write_data_dir
from tiny import save_tiny_model_dir


class CompletionsServer:
    """POST /v1/completions: `prompt` as token id lists, greedy up to max_tokens or a stop_token_ids token (excluded
    from the text), top-1 logprobs per token. mode "sample": the second-best token at every step; "slow": sleeps."""

    def __init__(self, model_dir):
        self.model = load_model(model_dir)
        self.tokenizer = load_tokenizer(model_dir)
        self.mode = "greedy"
        self.requests = []
        self.lock = threading.Lock()  # one generate at a time (torch modules are not re-entrant across threads)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                if server.mode == "slow":
                    time.sleep(2.0)
                if self.path != "/v1/completions":
                    self.send_response(404)
                    self.end_headers()
                    self.wfile.write(b'{"error": "not found"}')
                    return
                prompts = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
                with server.lock:
                    choices = [server.complete(i, p, body) for i, p in enumerate(prompts)]
                data = json.dumps({"object": "text_completion", "choices": choices}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except BrokenPipeError:  # the client gave up (the timeout case)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @torch.no_grad()
    def complete(self, index, prompt, body):
        stops, ids, chosen, tops = set(body["stop_token_ids"]), list(prompt), [], []
        for _ in range(body["max_tokens"]):
            logprobs = torch.log_softmax(self.model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
            ranked = logprobs.argsort(descending=True).tolist()
            token = ranked[1] if self.mode == "sample" else ranked[0]
            chosen.append(float(logprobs[token]))
            tops.append({self.tokenizer.decode([ranked[0]]): float(logprobs[ranked[0]])})
            if token in stops:
                break
            ids.append(token)
        generated = ids[len(prompt):]
        return {"index": index, "text": self.tokenizer.decode(generated, skip_special_tokens=True),
                "logprobs": {"token_logprobs": chosen, "top_logprobs": tops}, "finish_reason": "stop"}

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(tmp_path):
    model_dir = save_tiny_model_dir(tmp_path / "model")
    server = CompletionsServer(model_dir)
    yield model_dir, server
    server.close()


def test_served_answers_equal_in_process(tmp_path, served, one_thread):
    model_dir, server = served
    data = write_data_dir(tmp_path / "data", n_test=9)
    args = ["--model", model_dir, "--tasks", "alpha_task,beta_task", "--data-dir", str(data), "--max-new-tokens", "6",
            "--no-progress"]
    evaluate.main([*args, "--output-dir", str(tmp_path / "local")])
    evaluate.main([*args, "--output-dir", str(tmp_path / "served"), "--engine", "openai", "--api-base", server.url,
                   "--served-model", "sapo"])
    for task in ("alpha_task", "beta_task"):
        local = (tmp_path / "local" / "predictions" / f"{task}.jsonl").read_text(encoding="utf-8")
        assert local == (tmp_path / "served" / "predictions" / f"{task}.jsonl").read_text(encoding="utf-8")
        assert any(json.loads(line)["prediction"] for line in local.splitlines())
    local, remote = (json.loads((tmp_path / d / "scores.json").read_text()) for d in ("local", "served"))
    assert remote["engine"] == "openai" and remote["results"] == local["results"]
    sent = server.requests[-1]  # greedy asked for, the project's stops and max new tokens
    tokenizer = load_tokenizer(model_dir)
    assert sent["temperature"] == 0 and sent["max_tokens"] == 6 and sent["model"] == "sapo"
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in sent["stop_token_ids"]
    assert all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in sent["prompt"])


@pytest.mark.parametrize("case", ["sample", "slow", "closed_port", "not_a_url", "wrong_path"])
def test_served_failures_are_one_line_and_write_nothing(tmp_path, served, case, one_thread, capsys):
    model_dir, server = served
    data = write_data_dir(tmp_path / "data", n_test=3)
    url = {"closed_port": f"http://127.0.0.1:{free_port()}/v1", "not_a_url": "127.0.0.1:8000",
           "wrong_path": server.url.replace("/v1", "/v2")}.get(case, server.url)
    server.mode = case if case in ("sample", "slow") else "greedy"
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--model", model_dir, "--tasks", "alpha_task", "--data-dir", str(data), "--no-progress",
                       "--output-dir", str(out), "--engine", "openai", "--api-base", url, "--served-model", "sapo",
                       "--api-timeout", "0.5"])
    assert e.value.code == 2
    assert not out.exists() or not any(out.rglob("*"))
    err = capsys.readouterr().err.strip().splitlines()
    expected = {"sample": "did not decode greedily", "slow": "did not answer within 0.5 s",
                "closed_port": "cannot reach the server", "not_a_url": "is not a usable URL",
                "wrong_path": "answered HTTP 404"}[case]
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


def test_served_errors_are_sapo_errors(served):
    from tasks.served import ServedEngine

    _, server = served
    server.mode = "sample"
    with pytest.raises(SapoError, match="did not decode greedily") as e:
        ServedEngine(server.url, "sapo").check([5, 6, 7], [2])
    assert "\n" not in str(e.value)
