"""qwenjax: vLLM's offline and serving API for Qwen2, in JAX."""

from qwenjax import logger as _logger

_logger.quiet_import_noise()  # before anything imports transformers
_logger.configure()

from qwenjax.config import EngineArgs  # noqa: E402
from qwenjax.engine.llm import LLM
from qwenjax.lora.request import LoRARequest
from qwenjax.outputs import CompletionOutput, Logprob, RequestOutput
from qwenjax.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "EngineArgs", "LoRARequest",
           "__version__"]
