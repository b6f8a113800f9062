"""The OpenAI-compatible API on real weights (slow; the optional Qwen2.5-Coder 1.5B Instruct GGUF): a
forced tool call names the city the user asked about, and a JSON-schema answer is valid and on topic.
(Asked with tool_choice "auto", this 1.5B coder model answers in a ```json block instead of the
template's <tool_call> tags, so "auto" is shown on the tiny models' parser tests only.)"""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from service_fixtures import start_process

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}]


@pytest.fixture(scope="module")
def client(qwen25_coder_gguf):
    process, _, base = start_process(str(qwen25_coder_gguf), "--max-seq-len", "2048", "--kv-budget-mb", "512",
                                     "--served-model-name", "qwen2.5-coder", cwd=REPO, timeout=900)
    yield openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=900)
    process.terminate()
    process.wait(timeout=60)


def test_a_forced_tool_call_names_the_city(client):
    reply = client.chat.completions.create(model="qwen2.5-coder", tools=WEATHER, tool_choice="required",
                                           max_tokens=60, temperature=0, messages=[
                                               {"role": "user", "content": "What's the weather like in Paris today?"}])
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and "Paris" in json.loads(call.function.arguments)["city"]
    assert reply.choices[0].finish_reason == "tool_calls"


def test_a_json_schema_answer_is_valid_and_on_topic(client):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "population_millions": {"type": "number"}},
              "required": ["name", "population_millions"], "additionalProperties": False}
    reply = client.chat.completions.create(
        model="qwen2.5-coder", max_tokens=60, temperature=0,
        messages=[{"role": "user", "content": "Give the capital of France and its population."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    city = json.loads(reply.choices[0].message.content)
    assert city["name"] == "Paris" and 1 < city["population_millions"] < 15
