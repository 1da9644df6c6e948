"""An agent framework end to end: the openai Agents SDK, over strata's Responses API, calls a Python function
tool, gets its result back, and returns a typed (structured) final output."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import BaseModel


class Forecast(BaseModel):
    city: str
    sunny: bool


@pytest.mark.slow
def test_agents_sdk_tool_call_and_structured_output(server, model_name):
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)  # no traces sent anywhere
    asked: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        asked.append(city)
        return f"It is sunny and 18 degrees in {city}."

    async def run() -> tuple[object, object]:
        client = AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
        model = OpenAIResponsesModel(model=model_name, openai_client=client)
        settings = ModelSettings(temperature=0, max_tokens=80)
        # A tool call first (required); the SDK then resets tool_choice, so the agent can answer.
        caller = Agent(name="weather", instructions="Use the tools to answer.", tools=[get_weather], model=model,
                       model_settings=ModelSettings(temperature=0, max_tokens=80, tool_choice="required"))
        called = await Runner.run(caller, "What is the weather in Paris?", max_turns=4)
        typed = Agent(name="forecast", instructions="Answer with the forecast.", model=model,
                      model_settings=settings, output_type=Forecast)
        forecast = await Runner.run(typed, "Paris: sunny, 18 degrees.", max_turns=2)
        return called, forecast

    called, forecast = asyncio.run(run())
    assert len(asked) >= 1 and all(isinstance(c, str) and c for c in asked)
    assert isinstance(called.final_output, str) and called.final_output
    assert isinstance(forecast.final_output, Forecast) and forecast.final_output.city
