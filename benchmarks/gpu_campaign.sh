#!/usr/bin/env bash
# The GPU benchmark campaign, for one call on the device machine (one H100; 10 minutes a command).
#
#   QWENJAX_COMMIT=<sha> bash benchmarks/gpu_campaign.sh [STAGE ...]
#
# Stages (default: tests 0.5b 7b; the whole list rarely fits one 10-minute call, so split it, see README.md):
#   tests            JAX_PLATFORMS=cpu pytest tests, the whole CPU suite (time-boxed; -n 12 with pytest-xdist)
#   tests-bg         the same in the background, beside the stages after it (waited for at the end)
#   0.5b | 7b        latency (+ profile) and throughput-fixed for qwen2-0.5b-instruct / qwen2-7b-instruct
#                    (0.5b: throughput profiled for device_busy; 7b: also when PROFILE_7B=1)
#   bench-MODEL      the same for any --model name (e.g. bench-tiny with CAMPAIGN_EXTRA_ARGS for a CPU dry run)
#   latency-M        latency alone, profiled (device_busy and the top kernels)
#   startup-M        startup.py: process start to first token, cold and with a warm compilation cache
#   warmup-M         warmup_breakdown.py: each bucket's trace / lower / compile, cold then with a warm cache
#   structured-M     structured.py: 64 requests under a JSON schema against the same unconstrained, and batch 1
#   spec-M           spec_decode.py (verify vs decode step, draft step, acceptance, speedup table), then latency.py
#                    with n-gram speculation (k = 4)
#   spec-nomatch-M   spec_decode.py's generation alone: speculation off against n-gram that never matches, medians
#                    of 5 repeats (no step timings, no draft): the no-match slowdown and its noise
#   lora-M           lora.py: throughput-fixed with 8 adapters against the base model, batch-1 latency with one
#                    (CAMPAIGN_EXTRA_ARGS=--profile: both throughput runs and a batch-1 request of each traced too;
#                    LORA_ARGS go to it, e.g. "--latency-only --tag fuse" for one kernel variant's batch-1 figures)
#   lora-kernel      lora_kernel.py --sweep: the LoRA matmuls of a 7B layer (decode / grouped / dense) at 1..256
#                    rows, then the decode kernel's tilings (LORA_KERNEL_ARGS go to it)
#   multistep-M      dispatch.py, latency and throughput-fixed with --num-scheduler-steps MULTI_STEPS (default 8)
#   dispatch-M       dispatch.py (a batch-1 decode step's host time, part by part) under the XLA_FLAGS variants
#                    DISPATCH_VARIANTS (default, cmdbuf-off, cmdbuf-all), then latency under DISPATCH_LATENCY ones
#                    (DISPATCH_ARGS go to dispatch.py, e.g. "--kernels 20 --num-scheduler-steps 8": the device's kernels
#                    of the decode program, each with its time a token and its source line)
#   attn-decode      attention_decode.py --check: the decode kernel against jax's paged_attention (attention-decode,
#                    attention-decode-fp8) and against the reference over the GQA / head-dim / page / dtype grid
#   prefill-M        prefill (8 x 2048) with the dense-forward comparison      (M: 0.5b, 7b or a model name)
#   prefill-triton-M the same with --prefill-kernel triton (no Hopper kernel: the before of a prefill-M run)
#   random-M         throughput-random (1000 requests)
#   peer-M           transformers continuous batching on throughput-fixed (7b: ~6-7 minutes: a call of its own)
#   peer-latency-M   transformers generate on the latency workload
#   sim-M            step_profile.py (fits the simulator's step-time model) then sim_validate.py with that model
#   attnref-M        latency and throughput-fixed with the jnp reference attention (the kernels' end-to-end effect)
#   fp8-M            latency and throughput-fixed with kv_cache_dtype=fp8_e5m2
#   fp8w-M           FP8 weights (quantization="fp8") against bf16: fp8_matmul.py, then latency, prefill and
#                    throughput-fixed bf16 then fp8 (FP8W_PARTS: a subset of "matmul latency prefill throughput";
#                    FP8W_VARIANTS: more fp8 runs under other settings, e.g. "act:QWENJAX_FP8_ACT_KERNEL=1")
#   prefix-M         prefix-caching: 200 requests (1024 shared + 64 own tokens) at 8 req/s, without then with caching
#                    (PREFIX_ARGS, e.g. --sync-run)
#   serve-M          serve.py --compare-offline: the OpenAI server at max concurrency 512 against the offline engine
#   serve-gc-M       the same with the serving process's gen-0 GC threshold at SERVE_GC_THRESHOLD (default 700)
#   chunked-M        chunked-prefill: 32 streams decoding while 8k prompts arrive, without then with chunked prefill
#   long-M           long_context.py: one prompt of 8k / 32k / 128k tokens with YaRN x4 (prefill against the dense
#                    cuDNN forward up to 32k, the attention kernel against cuDNN, decode MBU); LONG_ARGS go to it
#   attn-prefill     attention_prefill.py --sweep: the paged prefill kernels (Triton, Hopper) against cuDNN and
#                    attention_mgpu; attn-prefill-nosweep without the Triton kernel's sweep
#   attn-prefill-ablate  attention_prefill.py --ablate: the Hopper kernel with its exponentials as multiplies
#   attn-packed      attention_packed.py --sweep: packed prefill steps (8 x 2048, one row of 4k / 8k / 32k, mixed rows,
#                    32 x 256) through the routed path (long rows on the Hopper kernel) against the Triton kernel
#                    alone, the Hopper kernel alone on aligned rows, and cuDNN; attn-packed-nosweep without the sweep
#   attn-decode-fp8  attention_decode.py --fp8-only --sweep: bf16 / fp8_e5m2 KV at context 8192, launch settings too
#   kernel-isa       kernel_isa.py: wgmma or mma.sync in the prefill / decode kernels' compiled code (XLA dump)
#   gputests         pytest tests/gpu --gpu: kernels in every compiled bucket, kernel grids on the GPU, GPU = CPU tokens
#                    (one step per file: gputests-prefill_kernel, -quant_gemv, -moe, -engine run one of them)
#   moe-57b          qwen2-57b-a14b-instruct on one H200 (141 GB): moe_layer.py (the MoE block's MBU), latency,
#                    throughput-fixed with the KV cache sized from free memory (--num-kv-pages 0); moe-57b-layer,
#                    moe-57b-latency, moe-57b-throughput run one of the three
#   quant-7b         latency + throughput-fixed of qwen2-7b-instruct-awq and qwen2-7b-instruct-gptq-int4 (random
#                    packed weights; models: QUANT_7B_MODELS)
#   quant-72b        quant-72b-latency then quant-72b-throughput: qwen2-72b-instruct-awq on one 80 GB H100 (QUANT_72B_MODEL;
#                    throughput-fixed with the KV cache sized from free memory, QUANT_72B_ARGS); if the call runs short,
#                    run the two halves in two calls (the second finds the first's compiled init in .jaxcache)
#   quant-matmul     benchmarks/quant_matmul.py: the low-bit matmul paths at 7B layer shapes (QUANT_MATMUL_ARGS)
#   fp8-sweep        benchmarks/fp8_skinny_sweep.py: the FP8 skinny kernel's settings searched at the 7B's fused
#                    products (FP8_SWEEP_ARGS, e.g. "--rows 1 --budget-s 200")
#   ncu-probe        Nsight Compute over benchmarks/ncu_probe.py (the int4 GEMV, lop3 and FP8 skinny kernels at the
#                    7B's widest shapes; NCU_PROBE_ARGS go to it): ncu-probe.ncu-rep, its details page and its SASS
#
# Everything lands in $OUT (at most 8 files): the result JSONs, summary.txt, logs.tar.gz. Results are also kept
# in build/bench-results/ (ignored by git, kept while the machine stays warm), where a peer run finds the main
# result of the same workload and merges into it, and the other way round. A JAX persistent compilation cache lives
# in .jaxcache/ (also ignored) for the same reason. Each step gets `timeout` with what is left of the call's budget
# (CAMPAIGN_BUDGET_S, default 560 s), and a step that needs more than is left is skipped, so the call always ends
# with its table and its files.
set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)
START=$(date +%s)
BUDGET=${CAMPAIGN_BUDGET_S:-560}
OUT=${OUT:-$REPO/build/campaign-out}
LOGS=$(mktemp -d /tmp/qwenjax-campaign-XXXX)
RESULTS=$REPO/build/bench-results
mkdir -p "$OUT" "$RESULTS"
export PYTHONUNBUFFERED=1
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export QWENJAX_COMPILATION_CACHE=${QWENJAX_COMPILATION_CACHE:-$REPO/.jaxcache}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}
PY=${PYTHON:-python3}
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(tests 0.5b 7b)
STATUS=()

BG_PIDS=()

finish() {
    # A background stage (tests-bg) is waited for; its own timeout bounds the wait.
    for pid in ${BG_PIDS[@]+"${BG_PIDS[@]}"}; do wait "$pid"; done
    if [ -f "$LOGS/tests.status" ]; then
        STATUS+=("$(cat "$LOGS/tests.status")"); tail -n 15 "$LOGS/tests.log"
    fi
    tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
    {
        echo "campaign: ${STAGES[*]}  ($(( $(date +%s) - START )) s, commit ${QWENJAX_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)})"
        printf '  %s\n' "${STATUS[@]}"
        "$PY" - "$OUT" <<'EOF'
import glob, json, os, sys
rows = []
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    try:
        r = json.load(open(f))
    except Exception:
        continue
    if not isinstance(r, dict) or "model" not in r:  # not a benchmark result (e.g. kernel-isa.json)
        continue
    m, c = r.get("metrics", {}), r.get("ceilings", {})
    keys = [k for k in ("ms_per_token", "tok_s", "mbu", "output_tok_s", "total_tok_s", "wall_s", "mfu",
                        "speedup_vs_dense_forward", "speedup_vs_transformers", "ttft_ms_p50_uncached",
                        "ttft_ms_p50_cached", "speedup_vs_no_prefix_caching", "speedup_vs_offline", "itl_ms_p99_unchunked", "itl_ms_p99_chunked", "speedup_vs_no_chunked_prefill", "prefill_tok_s_128k", "prefill_speedup_vs_dense_32k", "attention_speedup_vs_cudnn_8k", "attention_speedup_vs_cudnn_32k", "decode_mbu_128k", "device_busy") if m.get(k) is not None]
    fig = "  ".join(f"{k}={m[k]:.4g}" for k in keys)
    peer = r.get("config", {}).get("peer")
    rows.append(f"{r['benchmark'] + (' [peer ' + peer + ']' if peer else ''):34s} {r['model']:22s} {fig}  "
                f"(copy {c.get('copy_tbps')} TB/s, mm {c.get('matmul_tflops')} TF/s)")
print("\n".join(rows) if rows else "no result files")
EOF
    } | tee "$OUT/summary.txt"
}
trap finish EXIT

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# step NAME MIN_SECONDS CAP_SECONDS command...: runs under `timeout` (what is left of the budget, at most CAP when
# CAP > 0); skipped when less than MIN_SECONDS is left.
step() {
    local name=$1 need=$2 cap=$3; shift 3
    local rem; rem=$(left)
    if [ "$rem" -lt "$need" ]; then
        STATUS+=("$name: skipped (${rem}s left, needs ~${need}s)"); echo "== $name: skipped, ${rem}s left"; return
    fi
    [ "$cap" -gt 0 ] && [ "$cap" -lt "$rem" ] && rem=$cap
    echo "== $name (limit ${rem}s): $*"
    local t0; t0=$(date +%s)
    timeout --kill-after=10 "$rem" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    local dt=$(( $(date +%s) - t0 ))
    if [ $rc -eq 0 ]; then STATUS+=("$name: ok (${dt}s)"); else STATUS+=("$name: FAILED rc=$rc (${dt}s)"); fi
    # The script's own table (or the failure) goes to the call's output; the whole log goes into logs.tar.gz.
    if [ $rc -eq 0 ] && grep -q '^== ' "$LOGS/$name.log"; then
        sed -n '/^== /,$p' "$LOGS/$name.log" | tail -n 25
    else
        tail -n 30 "$LOGS/$name.log"
    fi
}

model_of() { case $1 in 0.5b) echo qwen2-0.5b-instruct ;; 7b) echo qwen2-7b-instruct ;; *) echo "$1" ;; esac; }
# XLA_FLAGS of a named variant (dispatch-M): command buffers (CUDA graphs) as XLA's default puts them, off, or for
# every kind of thunk that can go into one, even runs of a single kernel.
xla_variant() {
    case $1 in
        default) echo "" ;;
        cmdbuf-off) echo "--xla_gpu_enable_command_buffer=" ;;
        cmdbuf-all) echo "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,CONDITIONAL,WHILE --xla_gpu_graph_min_graph_size=1" ;;
        *) echo "unknown XLA variant $1" >&2; echo "" ;;
    esac
}

{
    nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.mem,driver_version --format=csv 2>&1
    "$PY" -c "import jax, sys; print(sys.version); print(jax.__version__, jax.devices())" 2>&1
    "$PY" -c "import transformers, torch; print('transformers', transformers.__version__, 'torch', torch.__version__)" 2>&1
} >"$LOGS/env.log"
head -n 3 "$LOGS/env.log"

# CAMPAIGN_EXTRA_ARGS go to every benchmark command (e.g. "--scale 0.02 --ceilings small" for a CPU dry run).
read -r -a EXTRA <<<"${CAMPAIGN_EXTRA_ARGS:-}"
COMMON=(--results-dir "$RESULTS" --out "$OUT" ${EXTRA[@]+"${EXTRA[@]}"})
for s in "${STAGES[@]}"; do
    case $s in
        tests|tests-bg)
            # The whole CPU suite (the only place the image's JAX version runs it), spread over the host's cores
            # with pytest-xdist when it is installed (a file's tests stay on one worker: the guide's blocks share
            # a session). Left out, for the machine and not the code: the notebooks (no Jupyter kernel in the
            # image) and the guide's `pip install` block (no package index), which the guide's block count sees.
            # tests-bg runs it in the background beside the next stages (put it before stages whose timing does
            # not matter, e.g. gputests): the host has 16 cores, the GPU stages use few of them.
            par=(); "$PY" -c "import xdist" 2>/dev/null && par=(-n "${TESTS_WORKERS:-12}" --dist loadfile)
            # TESTS_EXTRA_ARGS: e.g. --ignore for test files whose extra packages were not carried as wheels
            read -r -a textra <<<"${TESTS_EXTRA_ARGS:-}"
            cmd=(env JAX_PLATFORMS=cpu "$PY" -m pytest -q -ra tests --durations=10 --timeout=400 \
                -p no:cacheprovider ${par[@]+"${par[@]}"} --ignore=tests/test_notebooks.py \
                -k "not bash-line23 and not test_every_block_ran" ${textra[@]+"${textra[@]}"})
            if [ "$s" = tests ]; then
                step tests 60 "${TESTS_TIMEOUT_S:-420}" "${cmd[@]}"
            else
                lim=$(left); [ "$lim" -gt "${TESTS_TIMEOUT_S:-420}" ] && lim=${TESTS_TIMEOUT_S:-420}
                echo "== tests (background, limit ${lim}s)"
                (
                    t0=$(date +%s)
                    timeout --kill-after=10 "$lim" "${cmd[@]}" >"$LOGS/tests.log" 2>&1
                    rc=$?
                    r="ok"; [ $rc -ne 0 ] && r="FAILED rc=$rc"
                    echo "tests (background): $r ($(( $(date +%s) - t0 ))s)" >"$LOGS/tests.status"
                ) &
                BG_PIDS+=($!)
            fi
            ;;
        dispatch-*)
            # Where a batch-1 decode step's host time goes (dispatch.py), under each XLA_FLAGS variant of
            # DISPATCH_VARIANTS (default: all of xla_variant's), then latency profiled under DISPATCH_LATENCY ones.
            m=$(model_of "${s#dispatch-}")
            for v in ${DISPATCH_VARIANTS:-default cmdbuf-off cmdbuf-all}; do
                xf=$(echo ${XLA_FLAGS:-} $(xla_variant "$v"))
                read -r -a DARGS <<<"${DISPATCH_ARGS:-}"
                step "dispatch-$v-$m" 60 200 env ${xf:+"XLA_FLAGS=$xf"} "$PY" \
                    benchmarks/dispatch.py --model "$m" --tag "$v" ${DARGS[@]+"${DARGS[@]}"} "${COMMON[@]}"
            done
            for v in ${DISPATCH_LATENCY:-}; do
                xf=$(echo ${XLA_FLAGS:-} $(xla_variant "$v"))
                step "latency-$v-$m" 60 0 env ${xf:+"XLA_FLAGS=$xf"} "$PY" \
                    benchmarks/latency.py --model "$m" --profile --tag "$v" "${COMMON[@]}"
            done
            ;;
        multistep-*)
            # Multi-step decode (--num-scheduler-steps, MULTI_STEPS, default 8): dispatch.py, latency (profiled) and
            # throughput-fixed; result files get a -steps<K> suffix. Compare with the same call's 0.5b / 7b stages.
            m=$(model_of "${s#multistep-}")
            ms=(--num-scheduler-steps "${MULTI_STEPS:-8}")
            read -r -a DARGS <<<"${DISPATCH_ARGS:-}"
            step "dispatch-steps-$m" 60 200 "$PY" benchmarks/dispatch.py --model "$m" "${ms[@]}" \
                ${DARGS[@]+"${DARGS[@]}"} "${COMMON[@]}"
            step "latency-steps-$m" 60 0 "$PY" benchmarks/latency.py --model "$m" --profile "${ms[@]}" "${COMMON[@]}"
            need=90; [ "$s" = multistep-7b ] && need=240
            step "throughput-fixed-steps-$m" $need 0 "$PY" benchmarks/throughput.py --workload fixed --model "$m" \
                --profile "${ms[@]}" "${COMMON[@]}"
            ;;
        startup-*)
            # benchmarks/startup.py: `python` to the first token, a cold and a warm compilation cache (own temp dir)
            m=$(model_of "${s#startup-}")
            read -r -a sargs <<<"${STARTUP_ARGS:-}"  # e.g. --no-cache
            step "$s" 120 0 "$PY" benchmarks/startup.py --model "$m" --results-dir "$RESULTS" --out "$OUT" \
                ${sargs[@]+"${sargs[@]}"}
            ;;
        warmup-*)
            m=$(model_of "${s#warmup-}")
            step "$s" 150 0 "$PY" benchmarks/warmup_breakdown.py --model "$m" --results-dir "$RESULTS" --out "$OUT"
            ;;
        spec-nomatch-*)
            m=$(model_of "${s#spec-nomatch-}")
            step "$s" 150 0 "$PY" benchmarks/spec_decode.py --model "$m" --runs off,nomatch --repeats 5 \
                --skip-step-costs --draft-model none "${COMMON[@]}"
            ;;
        spec-*)
            # spec_decode.py: verify steps at k = 1, 2, 4, 8 against a decode step (batch 1 and 32), the draft's step
            # (default draft qwen2-0.5b-instruct), measured acceptance and tok/s; then latency with n-gram k = 4.
            m=$(model_of "${s#spec-}")
            step "$s" 240 0 "$PY" benchmarks/spec_decode.py --model "$m" "${COMMON[@]}"
            step "latency-ngram-$m" 60 0 "$PY" benchmarks/latency.py --model "$m" \
                --speculative-config '{"method": "ngram", "num_speculative_tokens": 4}' "${COMMON[@]}"
            ;;
        lora-kernel)
            # lora_kernel.py: the four LoRA matmuls of a qwen2-7b layer per implementation and row count, then the
            # decode kernel's tiling sweep (LORA_KERNEL_ARGS, e.g. "--rows 1,256" or "--sweep-configs 6").
            read -r -a LKARGS <<<"${LORA_KERNEL_ARGS:-}"
            step "$s" 120 0 "$PY" benchmarks/lora_kernel.py --model qwen2-7b-instruct --sweep \
                ${LKARGS[@]+"${LKARGS[@]}"} --results-dir "$RESULTS" --out "$OUT"
            ;;
        lora-*)
            # lora.py: throughput-fixed with 8 rank-16 adapters on all seven projections against the base model, and
            # batch-1 latency with one adapter, in one run.
            m=$(model_of "${s#lora-}")
            read -r -a LORA_EXTRA <<<"${LORA_ARGS:-}"
            need=240; [[ " ${LORA_ARGS:-} " == *" --latency-only "* ]] && need=60
            step "$s" $need 0 "$PY" benchmarks/lora.py --model "$m" ${LORA_EXTRA[@]+"${LORA_EXTRA[@]}"} "${COMMON[@]}"
            ;;
        structured-*)
            m=$(model_of "${s#structured-}")
            step "$s" 150 0 "$PY" benchmarks/structured.py --model "$m" "${COMMON[@]}"
            ;;
        latency-*)
            m=$(model_of "${s#latency-}")
            step "$s" 60 0 "$PY" benchmarks/latency.py --model "$m" --profile "${COMMON[@]}"
            ;;
        0.5b|7b|bench-*)
            m=$(model_of "${s#bench-}")
            step "latency-$s" 60 0 "$PY" benchmarks/latency.py --model "$m" --profile "${COMMON[@]}"
            prof=(); { [ "$s" != 7b ] || [ "${PROFILE_7B:-0}" = 1 ]; } && prof=(--profile)
            need=90; [ "$s" = 7b ] && need=240
            step "throughput-fixed-$s" $need 0 "$PY" benchmarks/throughput.py --workload fixed --model "$m" \
                ${prof[@]+"${prof[@]}"} "${COMMON[@]}"
            ;;
        prefill-triton-*)
            # The prefill workload with every prefill shape on the Triton kernel (the path before packed steps took
            # the Hopper kernel): run beside prefill-M for the end-to-end before / after.
            m=$(model_of "${s#prefill-triton-}")
            step "$s" 90 0 "$PY" benchmarks/prefill.py --model "$m" --prefill-kernel triton "${COMMON[@]}"
            ;;
        prefill-*)
            m=$(model_of "${s#prefill-}")
            step "$s" 90 0 "$PY" benchmarks/prefill.py --model "$m" "${COMMON[@]}"
            ;;
        random-*)
            m=$(model_of "${s#random-}")
            step "$s" 150 0 "$PY" benchmarks/throughput.py --workload random --model "$m" "${COMMON[@]}"
            ;;
        sim-*)
            # The simulator's step-time model, then its validation on a trace the fit never saw (same engine shape).
            m=$(model_of "${s#sim-}")
            step "step-profile-$m" 150 300 "$PY" benchmarks/step_profile.py --model "$m" "${COMMON[@]}"
            prof=$(ls -t "$RESULTS"/step-profile-*.json 2>/dev/null | head -n 1)
            step "sim-validate-$m" 90 0 "$PY" benchmarks/sim_validate.py --model "$m" ${prof:+--step-model "$prof"} \
                "${COMMON[@]}"
            ;;
        fp8-sweep)  # before fp8-M, which the name would match
            read -r -a FS_ARGS <<<"${FP8_SWEEP_ARGS:---budget-s 200}"
            step fp8-sweep 90 420 "$PY" benchmarks/fp8_skinny_sweep.py "${FS_ARGS[@]}" --results-dir "$RESULTS" \
                --out "$OUT"
            ;;
        fp8-*)
            # latency and throughput-fixed with the fp8_e5m2 KV cache (result files get a -kvfp8_e5m2 suffix)
            m=$(model_of "${s#fp8-}")
            step "latency-fp8-$m" 60 0 "$PY" benchmarks/latency.py --model "$m" --kv-cache-dtype fp8_e5m2 "${COMMON[@]}"
            step "throughput-fixed-fp8-$m" 150 0 "$PY" benchmarks/throughput.py --workload fixed --model "$m" \
                --kv-cache-dtype fp8_e5m2 "${COMMON[@]}"
            ;;
        fp8w-*)
            # FP8 weights (quantization="fp8", issue 30) against bf16 in one call: the matmul forms (fp8_matmul.py),
            # then latency, prefill and throughput-fixed, each bf16 first then FP8 (result names gain -fp8).
            # FP8W_PARTS picks a subset (default: matmul latency prefill throughput).
            m=$(model_of "${s#fp8w-}")
            # FP8W_QUANTS: which engines run, of "bf16 fp8" (default both, bf16 first). FP8W_VARIANTS: more FP8 runs
            # after them, each "TAG:VAR=VALUE[,VAR=VALUE]" (e.g. "act:QWENJAX_FP8_ACT_KERNEL=1"), run with those
            # variables set and --tag TAG, so a switch's before and after come from one call
            for part in ${FP8W_PARTS:-matmul latency prefill throughput}; do
                case $part in
                    # FP8_MATMUL_ARGS go to fp8_matmul.py (e.g. "--rows 256,4096 --forms fp8_dot,fp8_tn")
                    matmul) read -r -a FMA <<<"${FP8_MATMUL_ARGS:-}"
                            step "fp8-matmul" 60 200 "$PY" benchmarks/fp8_matmul.py ${FMA[@]+"${FMA[@]}"} \
                                --results-dir "$RESULTS" --out "$OUT" ;;
                    latency|prefill)
                        for e in ${FP8W_QUANTS:-bf16 fp8}; do q=${e#bf16}
                            step "$part-${q:-bf16}-$m" 60 0 "$PY" benchmarks/$part.py --model "$m" \
                                ${q:+--quantization "$q"} "${COMMON[@]}"
                        done
                        for v in ${FP8W_VARIANTS:-}; do
                            step "$part-fp8-${v%%:*}-$m" 60 0 env $(tr , " " <<<"${v#*:}") "$PY" benchmarks/$part.py --model "$m" \
                                --quantization fp8 --tag "${v%%:*}" "${COMMON[@]}"
                        done ;;
                    throughput)
                        for e in ${FP8W_QUANTS:-bf16 fp8}; do q=${e#bf16}
                            step "throughput-fixed-${q:-bf16}-$m" 150 0 "$PY" benchmarks/throughput.py --workload fixed \
                                --model "$m" ${q:+--quantization "$q"} "${COMMON[@]}"
                        done
                        for v in ${FP8W_VARIANTS:-}; do
                            step "throughput-fixed-fp8-${v%%:*}-$m" 150 0 env $(tr , " " <<<"${v#*:}") "$PY" benchmarks/throughput.py \
                                --workload fixed --model "$m" --quantization fp8 --tag "${v%%:*}" "${COMMON[@]}"
                        done ;;
                esac
            done
            ;;
        attnref-*)
            # latency and throughput-fixed with the jnp reference attention instead of the Pallas kernels (the
            # kernels' end-to-end effect; result files get an -attnref suffix): compare with the same call's 7b stage.
            m=$(model_of "${s#attnref-}")
            step "latency-attnref-$m" 60 0 "$PY" benchmarks/latency.py --model "$m" --attention-backend reference \
                "${COMMON[@]}"
            step "throughput-fixed-attnref-$m" 150 0 "$PY" benchmarks/throughput.py --workload fixed --model "$m" \
                --attention-backend reference "${COMMON[@]}"
            ;;
        prefix-*)
            # Two engines one after the other (uncached, cached); the second finds the first's programs in .jaxcache.
            m=$(model_of "${s#prefix-}")
            need=90; [ "$s" = prefix-7b ] && need=240
            read -r -a PREFIX_EXTRA <<<"${PREFIX_ARGS:-}"
            step "$s" $need 0 "$PY" benchmarks/prefix_caching.py --model "$m" ${PREFIX_EXTRA[@]+"${PREFIX_EXTRA[@]}"} \
                "${COMMON[@]}"
            ;;
        chunked-*)
            m=$(model_of "${s#chunked-}")
            need=90; [ "$s" = chunked-7b ] && need=240
            step "$s" $need 0 "$PY" benchmarks/chunked_prefill.py --model "$m" "${COMMON[@]}"
            ;;
        long-*)
            # One engine at max_model_len 131072 (YaRN x4): 7B weights 15.2 GB + KV 7.5 GB; ~5 minutes on an H100.
            m=$(model_of "${s#long-}")
            need=90; [ "$s" = long-7b ] && need=300
            read -r -a LONG_EXTRA <<<"${LONG_ARGS:-}"
            step "$s" $need 0 "$PY" benchmarks/long_context.py --model "$m" ${LONG_EXTRA[@]+"${LONG_EXTRA[@]}"} \
                "${COMMON[@]}"
            ;;
        attn-decode)
            step attn-decode 120 300 "$PY" benchmarks/attention_decode.py --check --check-deadline-s 150 --out "$OUT"
            ;;
        attn-prefill)
            step attn-prefill 60 240 "$PY" benchmarks/attention_prefill.py --sweep --out "$OUT"
            ;;
        attn-prefill-nosweep)
            step attn-prefill 60 200 "$PY" benchmarks/attention_prefill.py --out "$OUT"
            ;;
        attn-prefill-ablate)
            step attn-prefill-ablate 60 200 "$PY" benchmarks/attention_prefill.py --ablate --out "$OUT"
            ;;
        attn-packed)
            step attn-packed 60 300 "$PY" benchmarks/attention_packed.py --sweep --out "$OUT"
            ;;
        attn-packed-nosweep)
            step attn-packed 60 200 "$PY" benchmarks/attention_packed.py --out "$OUT"
            ;;
        attn-decode-fp8)
            step attn-decode-fp8 60 200 "$PY" benchmarks/attention_decode.py --fp8-only --sweep --budget-s 120 \
                --out "$OUT"
            ;;
        kernel-isa)
            step kernel-isa 60 200 "$PY" benchmarks/kernel_isa.py --out "$OUT"
            ;;
        gputests|gputests-*)
            # One step per test file, each with its own limit, so a slow file cannot eat the others' time; the kernel
            # grids first, the engines (which compile float32 steps on the GPU and the CPU) last. A per-test timeout
            # shows a stuck test with its traceback; the log has each test's time as it ends (conftest.py).
            files=(prefill_kernel quant_gemv moe engine); [ "$s" != gputests ] && files=("${s#gputests-}")
            # Compilation (host) dominates: the prefill kernel grid and the engine tests run on 4 xdist workers.
            for f in "${files[@]}"; do
                par=(); tmo=${GPU_TEST_TIMEOUT_S:-240}
                case $f in
                    # the LoRA engine fixture compiles every bucket with and without the adapter stacks: at d8ecee9
                    # on an H100 it passed 240 s per test (4 workers compiling at once), so one worker, more time
                    lora) cap=540; tmo=${GPU_TEST_TIMEOUT_S:-500} ;;
                    prefill_kernel) cap=200; par=(-n 4) ;;
                    prefill_hopper) cap=450 ;;
                    quant_gemv) cap=360; par=(-n 4) ;;  # the GEMV and skinny grids, 7B shapes up to 64 rows
                    moe) cap=200 ;;
                    *) cap=${GPU_TESTS_TIMEOUT_S:-300}; par=(-n 4) ;;
                esac
                "$PY" -c "import xdist" 2>/dev/null || par=()
                # GPU_TESTS_K: a pytest -k expression, to run part of a file (e.g. "decode_add or mixed_batch")
                kx=(); [ -n "${GPU_TESTS_K:-}" ] && kx=(-k "$GPU_TESTS_K")
                step "gputests-$f" 60 "$cap" "$PY" -m pytest -q -ra --gpu -p no:cacheprovider ${par[@]+"${par[@]}"} \
                    ${kx[@]+"${kx[@]}"} --timeout="$tmo" --durations=10 "tests/gpu/test_${f}_gpu.py"
            done
            ;;
        serve-gc-*)
            # The same with another gen-0 GC threshold in the serving process (SERVE_GC_THRESHOLD, default Python's
            # 700; python -m server sets 50000).
            m=$(model_of "${s#serve-gc-}")
            step "$s" 200 0 "$PY" benchmarks/serve.py --model "$m" --compare-offline \
                --frontend-gc-threshold "${SERVE_GC_THRESHOLD:-700}" "${COMMON[@]}"
            ;;
        serve-*)
            m=$(model_of "${s#serve-}")
            need=120; [ "$s" = serve-7b ] && need=200
            step "$s" $need 0 "$PY" benchmarks/serve.py --model "$m" --compare-offline "${COMMON[@]}"
            ;;
        peer-latency-*)
            m=$(model_of "${s#peer-latency-}")
            step "$s" 60 0 "$PY" benchmarks/latency.py --model "$m" --peer transformers "${COMMON[@]}"
            ;;
        peer-*)
            m=$(model_of "${s#peer-}")
            need=120; [ "$s" = peer-7b ] && need=450
            step "$s" $need 0 "$PY" benchmarks/throughput.py --workload fixed --model "$m" --peer transformers \
                "${COMMON[@]}"
            ;;
        moe-57b|moe-57b-layer|moe-57b-latency|moe-57b-throughput)
            # Qwen2-57B-A14B in bf16 on ONE H200 (107 GiB of random weights made on the device at start-up, one
            # parameter at a time): the MoE block alone (moe-layer: its own MBU against the activated experts'
            # bytes), then latency, then throughput-fixed with the KV cache sized from free memory (512 x 768 tokens
            # cannot fit beside the weights; the scheduler caps concurrency and preempts). moe-57b runs all three;
            # -layer / -latency / -throughput one each, for when the 57B's compilation leaves too little of one call.
            # MOE_EXTRA_ARGS go to latency and throughput.
            m=qwen2-57b-a14b-instruct
            part=${s#moe-57b}; part=${part#-}
            read -r -a MOE_EXTRA <<<"${MOE_EXTRA_ARGS:-}"
            if [ -z "$part" ] || [ "$part" = layer ]; then
                step "moe-layer-$m" 60 150 "$PY" benchmarks/moe_layer.py --model "$m" "${COMMON[@]}"
            fi
            if [ -z "$part" ] || [ "$part" = latency ]; then
                cap=0; [ -z "$part" ] && cap=300
                step "latency-$m" 150 $cap "$PY" benchmarks/latency.py --model "$m" \
                    ${MOE_EXTRA[@]+"${MOE_EXTRA[@]}"} "${COMMON[@]}"
            fi
            if [ -z "$part" ] || [ "$part" = throughput ]; then
                step "throughput-fixed-$m" 200 0 "$PY" benchmarks/throughput.py --workload fixed --model "$m" \
                    --num-kv-pages 0 ${MOE_EXTRA[@]+"${MOE_EXTRA[@]}"} "${COMMON[@]}"
            fi
            ;;
        quant-matmul)
            read -r -a QM_ARGS <<<"${QUANT_MATMUL_ARGS:---budget-s 400}"
            step quant-matmul 120 480 "$PY" benchmarks/quant_matmul.py "${QM_ARGS[@]}" "${COMMON[@]}"
            ;;
        ncu-probe)
            ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
            read -r -a NP_ARGS <<<"${NCU_PROBE_ARGS:-}"
            # --clock-control none: the clocks stay as the machine sets them (the device README's METHOD.md)
            step ncu-probe 120 420 env XLA_PYTHON_CLIENT_PREALLOCATE=false "$ncu" --clock-control none --kernel-name regex:qwenjax_ --set full \
                --import-source no -f -o "$OUT/ncu-probe" "$PY" benchmarks/ncu_probe.py ${NP_ARGS[@]+"${NP_ARGS[@]}"}
            if [ -f "$OUT/ncu-probe.ncu-rep" ]; then
                "$ncu" -i "$OUT/ncu-probe.ncu-rep" --page details > "$OUT/ncu-probe-details.txt" 2>&1
                "$ncu" -i "$OUT/ncu-probe.ncu-rep" --page source --print-source sass --csv \
                    > "$LOGS/ncu-probe-sass.csv" 2>&1
                grep -E "^  [a-z_]+ *\(|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Theoretical Occ|Block Limit|Grid Size|Waves Per" \
                    "$OUT/ncu-probe-details.txt" | head -n 200
            fi
            ;;
        quant-7b)
            # Random packed 4-bit weights in the published checkpoints' layouts, through the whole engine.
            # Both latencies (profiled: the top kernels) first, then both throughputs.
            for m in ${QUANT_7B_MODELS:-qwen2-7b-instruct-awq qwen2-7b-instruct-gptq-int4}; do
                step "latency-$m" 90 0 "$PY" benchmarks/latency.py --model "$m" --profile "${COMMON[@]}"
            done
            for m in ${QUANT_7B_MODELS:-qwen2-7b-instruct-awq qwen2-7b-instruct-gptq-int4}; do
                step "throughput-fixed-$m" 150 0 "$PY" benchmarks/throughput.py --workload fixed --model "$m" \
                    "${COMMON[@]}"
            done
            ;;
        quant-72b|quant-72b-latency|quant-72b-throughput)
            # Qwen2-72B in AWQ on one 80 GB H100 (~41 GB of packed weights); throughput with the KV cache sized
            # from free memory.
            m=${QUANT_72B_MODEL:-qwen2-72b-instruct-awq}
            part=${s#quant-72b}; part=${part#-}
            read -r -a Q72_EXTRA <<<"${QUANT_72B_ARGS:-}"
            if [ -z "$part" ] || [ "$part" = latency ]; then
                step "latency-$m" 150 0 "$PY" benchmarks/latency.py --model "$m" \
                    ${Q72_EXTRA[@]+"${Q72_EXTRA[@]}"} "${COMMON[@]}"
            fi
            if [ -z "$part" ] || [ "$part" = throughput ]; then
                step "throughput-fixed-$m" 200 0 "$PY" benchmarks/throughput.py --workload fixed --model "$m" \
                    --num-kv-pages 0 ${Q72_EXTRA[@]+"${Q72_EXTRA[@]}"} "${COMMON[@]}"
            fi
            ;;
        *)
            echo "unknown stage $s"; STATUS+=("$s: unknown stage")
            ;;
    esac
done
