"""Ours: evaluation through a served model (vLLM, SGLang, any OpenAI-compatible completions endpoint).

The prompts go to the COMPLETIONS endpoint as token ids (the OpenAI API's `prompt` takes lists of token ids), built by
the project exactly as for in-process generation: the project's chat template, the shortened inputs, the special
tokens. Why not the chat endpoint: the server would render its own template (SmolLM2's adds a default system
message, Qwen3's a thinking block depending on server flags), and a long input could not be shortened the project's
way, so the prompts would differ from the in-process rows of R. Why not raw text: decoding the prompt and letting
the server re-tokenize it can merge tokens differently at the boundaries of the template's special tokens and of a
shortened input; ids reach the model unchanged.

Greedy is asked for (temperature 0, top_p 1, n 1) and CHECKED: every request asks for the top-1 logprob of each
generated token, and a token whose logprob is below the top one means the server sampled (one clear line). Stops: the
same stop token ids (`stop_token_ids`, a vLLM/SGLang extension) and their strings (`stop`, the standard field), the
same max new tokens. Errors (bad URL, refused connection, timeout, HTTP error, malformed answer, non-greedy server)
are one SapoError line; the caller writes nothing before every task has its answers.
"""
from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tasks.errors import SapoError

PROMPTS_PER_REQUEST = 16
REQUESTS_IN_FLIGHT = 8  # the server batches across requests (continuous batching)
GREEDY_TOLERANCE = 1e-3  # logprob units: the chosen token's logprob may sit this far below the top one (rounding)


@dataclass(frozen=True)
class ServedEngine:
    api_base: str  # e.g. http://127.0.0.1:8000/v1
    model: str  # the served model (or LoRA adapter) name
    stop_strings: tuple[str, ...] = ()
    timeout_s: float = 600.0
    stop_ids: tuple[int, ...] = ()  # the in-process stop tokens (evaluate.stop_token_ids with the generation config)

    def __post_init__(self):
        from urllib.parse import urlparse

        parts = urlparse(self.api_base)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise SapoError(f"--api-base {self.api_base!r} is not a usable URL: expected http(s)://HOST:PORT/v1")

    @property
    def url(self) -> str:
        return self.api_base.rstrip("/") + "/completions"

    def _post(self, body: dict) -> dict:
        data = json.dumps(body).encode()
        request = urllib.request.Request(self.url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace").strip().splitlines()
            raise SapoError(f"the server at {self.url} answered HTTP {e.code}: {(detail or [e.reason])[0][:200]}") \
                from None
        except (TimeoutError, socket.timeout):
            raise SapoError(f"the server at {self.url} did not answer within {self.timeout_s:g} s "
                            "(--api-timeout)") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise SapoError(f"the server at {self.url} did not answer within {self.timeout_s:g} s "
                                "(--api-timeout)") from None
            raise SapoError(f"cannot reach the server at {self.url}: {e.reason}") from None
        except ValueError as e:  # "unknown url type" and the like
            raise SapoError(f"--api-base {self.api_base!r} is not a usable URL: {e}") from None
        except OSError as e:  # connection reset mid-answer
            raise SapoError(f"the connection to {self.url} failed: {e}") from None
        try:
            answer = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SapoError(f"the server at {self.url} did not answer with JSON: {raw[:120]!r}") from None
        if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list):
            raise SapoError(f"the server at {self.url} answered without \"choices\": {str(answer)[:200]}")
        return answer

    def _request(self, prompts: list[list[int]], stops: list[int], max_new_tokens: int, what: str) -> list[str]:
        body = {"model": self.model, "prompt": prompts, "max_tokens": max_new_tokens, "temperature": 0.0,
                "top_p": 1.0, "n": 1, "logprobs": 1, "echo": False, "stop": list(self.stop_strings) or None,
                "stop_token_ids": list(stops), "skip_special_tokens": True}
        choices = self._post(body)["choices"]
        by_index = {c.get("index"): c for c in choices if isinstance(c, dict)}
        if sorted(by_index) != list(range(len(prompts))):
            raise SapoError(f"the server at {self.url} returned {len(choices)} answers for {len(prompts)} prompts "
                            f"({what})")
        texts = []
        for i in range(len(prompts)):
            choice = by_index[i]
            text, logprobs = choice.get("text"), choice.get("logprobs")
            if not isinstance(text, str):
                raise SapoError(f"the server at {self.url} returned an answer without text ({what})")
            self._check_greedy(logprobs, max_new_tokens, what)
            for s in self.stop_strings:  # a server that returns the stop string with the text
                text = text.split(s)[0] if s else text
            texts.append(text.strip())
        return texts

    def _check_greedy(self, logprobs, max_new_tokens: int, what: str):
        if not isinstance(logprobs, dict) or not isinstance(logprobs.get("token_logprobs"), list) \
                or not isinstance(logprobs.get("top_logprobs"), list):
            raise SapoError(f"the server at {self.url} returned no logprobs, so greedy decoding cannot be checked "
                            f"({what}); serve with logprobs enabled (vLLM: --max-logprobs >= 1)")
        chosen, tops = logprobs["token_logprobs"], logprobs["top_logprobs"]
        if len(chosen) > max_new_tokens:
            raise SapoError(f"the server at {self.url} generated {len(chosen)} tokens, more than max_tokens "
                            f"{max_new_tokens} ({what})")
        for step, (lp, top) in enumerate(zip(chosen, tops)):
            if lp is None or not isinstance(top, dict) or not top:
                continue
            best = max(top.values())
            if lp < best - GREEDY_TOLERANCE:
                raise SapoError(f"the server at {self.url} did not decode greedily ({what}, token {step + 1}: logprob "
                                f"{lp:.4f} below the top token's {best:.4f}); it ignores temperature=0")

    def check(self, probe: list[int], stops: list[int]):
        """One short request before any work: a bad URL, a wrong model name or a sampling server fails here."""
        self._request([probe], stops, 4, "probe request")

    def generate(self, prompts: list[list[int]], stops: list[int], max_new_tokens: int, what: str = "") -> list[str]:
        """The served model's greedy answers to `prompts` (token ids), stop strings removed, stripped."""
        chunks = [prompts[k:k + PROMPTS_PER_REQUEST] for k in range(0, len(prompts), PROMPTS_PER_REQUEST)]
        with ThreadPoolExecutor(REQUESTS_IN_FLIGHT) as pool:
            answers = list(pool.map(lambda chunk: self._request(chunk, stops, max_new_tokens, what), chunks))
        return [text for chunk in answers for text in chunk]
