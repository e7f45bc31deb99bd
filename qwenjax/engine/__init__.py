"""The engine and what serves it: LLMEngine (the step loop over the core and the worker), the engine process and its
client, the async engine behind the server, and the offline `LLM`."""
