"""`python -m qwenjax`: offline batched generation from the command line (the guide's section 2, as a script).

With no --model it runs the built-in default model (random weights, real Qwen2 tokenizer: the text is gibberish).
"""

from __future__ import annotations

import argparse
import time

from qwenjax import LLM, SamplingParams


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m qwenjax", description=__doc__)
    ap.add_argument("--model", default=None, help="local checkpoint directory or cached hub id (default: built-in)")
    ap.add_argument("--prompt", action="append", help="a user message (repeatable); default: the guide's")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.8)
    ap.add_argument("--repetition-penalty", type=float, default=1.05)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tensor-parallel-size", "--mesh", type=int, default=1, dest="tensor_parallel_size")
    args = ap.parse_args(argv)

    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              tensor_parallel_size=args.tensor_parallel_size)
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty, max_tokens=args.max_tokens)
    prompts = []
    for p in args.prompt or ["Tell me something about large language models."]:
        messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": p}]
        prompts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    for out in outputs:
        print(f"Prompt: {out.prompt!r}, Generated text: {out.outputs[0].text!r}")
    n = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"{len(outputs)} requests, {n} tokens in {dt:.2f} s ({n / dt:.1f} tok/s)")


if __name__ == "__main__":
    main()
