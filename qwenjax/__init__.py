"""qwenjax: vLLM's offline and serving API for Qwen2, in JAX."""

from qwenjax.config import EngineArgs
from qwenjax.engine.llm import LLM
from qwenjax.outputs import CompletionOutput, Logprob, RequestOutput
from qwenjax.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "EngineArgs", "__version__"]
