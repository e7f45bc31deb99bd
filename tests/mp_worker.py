"""One process of a two-process jax.distributed run on CPU (2 local devices each, mesh of 4)."""

from __future__ import annotations

import json
import sys


def main(ckpt: str, coordinator: str, pid: int, out: str) -> None:
    from qwenjax import LLM, SamplingParams
    from tests.conftest import SMALL_ENGINE

    llm = LLM(ckpt, **SMALL_ENGINE, tensor_parallel_size=4, distributed_coordinator=coordinator, num_processes=2,
              process_id=pid)
    import jax

    assert jax.device_count() == 2 * jax.local_device_count(), (jax.device_count(), jax.local_device_count())
    if pid == 0:
        from tests.test_multiprocess import PARAMS, PROMPTS

        outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=PARAMS, use_tqdm=False)
        llm.shutdown()
        result = {"tokens": [o.outputs[0].token_ids for o in outs], "devices": jax.device_count()}
    else:
        result = {"followed": True, "devices": jax.device_count()}
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
