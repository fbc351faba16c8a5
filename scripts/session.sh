#!/usr/bin/env bash
# Steps run on the GPU machine (device tool), each with its own time limit; results under $OUT.
#   bash scripts/session.sh STEP [STEP ...]
# Steps: libs env load-profile prebuild-pdl prebuild-untuned prebuild-new wait decode-attn attn-fa host-profile rpc-gpu gputests gputests-extra gputests-new gputests-graph gputests-norm decode-check mma-check peer-diag bench-decode bench-prefill bench-kernels tune restore profile ncu hidden-host wgmma-check wgmma-model
# (settings through environment variables)
# Plan a session's device time (30 min, start-ups included; lessons of 2026-12-02):
#  - build the TVM libraries here first, after the last code change (the cache key hashes the
#    source): `python scripts/prebuild_libs.py --cache-dir .devlibs`, carry `.devlibs` with p2
#    (~12 MB beside p2's 48 MB) and start with the `libs` step; a bench call without them spends
#    ~4 minutes building the untuned and tuned libraries on the device.
#  - `tune` verifies and commits only after its search: bound the search with SEARCH_MIN (tune
#    --search-minutes) and give TUNE_LIMIT a minute or two beyond it (a b32 search that ended 9 s
#    before an outside limit stored nothing).
#  - bench decode + prefill with four variants took ~12 device minutes with builds; keep one run
#    per table and ask for the variants the table needs.
#  - carry limit 64 MiB per call (tree ~6.5 MB): pack.sh's p2 (48 MB) leaves room for one ~6 MB
#    library only if p1 is re-split smaller (2026-12-02): cat .devwheels/p1/tvm.part.* .devwheels/p2/tvm.part.* > /tmp/t.whl;
#    rm .devwheels/p[12]/tvm.part.*; split -b 54m -d /tmp/t.whl .devwheels/p1/tvm.part.; mv .devwheels/p1/tvm.part.01 .devwheels/p2/
#  - first GPU check of a hand-written kernel: its search (tune --kinds attention ...) before the
#    benches, so a rejected candidate costs a minute and not a bench table.
#  - never issue call 2 in the same batch as call 1: when call 1 finds no machine, call 2 still
#    starts one (without p1, so its install fails) and its start-up is charged (2026-12-02: ~3.5 min).
#  - the machine goes back ~30 s after a call ends (status: idle_release_s): prepare the next call
#    before sending this one; a call sent later starts a fresh machine (call 1 again, ~1 min charged).
#  - 2026-12-07: a machine start that finds no machine costs up to 3 device minutes; with less
#    than ~5 minutes left none starts.
#  - NEXT SESSION (fifteenth; the fourteenth got no machine: 4 failed starts, then loans paused): nothing has benched
#    database 9fec1bb114c9 yet. Prebuild HERE (PDL off): `python scripts/prebuild_libs.py --variants tuned --cache-dir .devlibs`
#    (~52 s with ~17 s of nvcc since the template kernels are parsed once per build; since 092e559 a library carries its CUDA precompiled in lib.so.cubin/, which the
#    `libs` step copies with it; check the bench log's "CUDA sources: 1 precompiled, 0 compiled at load" and
#    load_parts.module_s, 34 s before), split p1 as below (call 1 p1; call 2 p1b + .devlibs; call 3 p2, starting with
#    `rm -rf .devwheels/p1 .devwheels/p1b`). Then, in this order:
#    1. `VARIANTS=tuned,torch-compile,torch-eager BP_LIMIT=240 bench-prefill` (README's prefill table);
#    2. `VARIANTS=tuned,torch-compile BATCH_LIST=1,8,32 BD_LIMIT=240 bench-decode` (README's decode table);
#    3. `PHASES=decode BATCHES=1,8,16,32 KINDS=norm-gemv,attention TUNE_LIMIT=420 tune`: the norm + GEMV "wide"
#       forms (117 candidates, 16-byte weight loads) and the decode attention "wide" / "prefetch" forms (35) were
#       written after the last search (15:34 on 2026-12-07) and have never run on a card (candidates are now
#       parsed in worker processes: compare "built N/N in S s" with 158 s); then `bench-decode` (tuned,
#       torch-compile) in the same call: the device builds the new library (~1-2 min now, 215+ s before the
#       template kernels were parsed once per build); unpack $OUT/db-q0f16.tgz here afterwards;
#    4. attn-fa (AF_LIMIT=150): the wgmma flash-attention prefill template has never run on a card; if it passes and
#       beats the stored mma.sync kernel (37.2 us at 1024), `PHASES=prefill CHUNKS=128,512,1024 KINDS=attention
#       ATT_TEMPLATES=tc,mma,fa tune` stores it (prefill 1024's attention is ~450 of its ~1300 us);
#    5. ncu of the b32 decode kernels (NCU_BENCH="decode --batch 32 --gen-len 8" NCU_FILTER="gemv_b32|norm_gemv_b32|
#       batch_decode_paged_kv" NCU_SKIP=61 NCU_COUNT=61): why ~650 GB/s.
#  - 2026-12-07 (thirteenth session): the same-card PDL A/B is done (late: b8 -3%, b32 +19%; PDL stays off).
#  - 2026-12-07 (thirteenth session): the tree (9.5 MB) + pack.sh's p1 (60.8 MB) passed 64 MiB: split p1's part in two
#    (`split -b 52m -d tvm.part.00 tvm.sub.` -> p1/tvm.part.00 + p1b/tvm.part.01) and carry p1b with .devlibs in
#    call 2 (`cp .devwheels/p1b/* /root/keep/p1/`): install.sh joins /root/keep/p1/tvm.part.* then p2's part.
#  - NEXT SESSION (thirteenth): the same-card PDL A/B first. Build both libraries HERE (no GPU needed, ~3 min
#    each on 2 cores, in parallel): `GPT2K_PDL=0 python scripts/prebuild_libs.py --variants tuned --cache-dir .devlibs`
#    and the same with GPT2K_PDL=late (after the last code change: the key hashes the source). Carry them in their own
#    call (p1 + tree leave no room in call 1; p2 + tree leave 3.8 MB in the install call):
#    call 1: p1 copy; call 2 (carry .devlibs): `mkdir -p /root/keep/libs && cp -r .devlibs/. /root/keep/libs/`;
#    call 3 (carry p2): `bash .devwheels/p2/install.sh && export PYTHONPATH=/opt/devsite:$PWD && for m in late 0 late 0;
#             do GPT2K_PDL=$m TAG=_pdl${m}_$RANDOM VARIANTS=tuned BENCH_ARGS=--no-anatomy BD_LIMIT=110
#             bash scripts/session.sh bench-decode; done`  (a process's first library load took 43 s, the second 37 s:
#             give each bench 110 s; two of each mode, alternating). Then bench prefill the same way (tuned, both modes).
#    If late wins at b8 and loses at b32 again: find why (bench --graph-kernels under late: which kernels grow).
#    Then: attn-fa (AF_LIMIT=120), `PHASES=decode BATCHES=1,8,32 KINDS=norm-gemv,attention tune` (cold timing, wide /
#    prefetch / l2 forms), the README tables (tuned,torch-compile) with the better mode.
#  - 2026-12-07 (twelfth session): ELEVEN machine starts failed (~23 device minutes); one machine at 19:23 was taken
#    back mid-call ("for other work") before its first real call finished; the last came at 19:45 with 3 minutes left.
#    Prebuilt libraries carried from here made a 2-bench call fit in 145 s.
#  - 2026-12-07 (eleventh session): 6 starts failed (~8 device minutes) before one came at 15:29; the tune of
#    norm-gemv + decode attention at 4 batches took 3m51s (498 + 49 candidates); prebuild of one library ~2 min.
#    A second machine later that day: its start cost 87 s, and the first nvcc builds on a fresh machine are
#    slow (69 decode attention kernels in 83 s, 49 in 48 s on a warm one): a 105 s tune limit cut the
#    search before it measured anything. Give a fresh machine's first search 2-3 minutes.
#  - 2026-12-07 (tenth session): 8 machine starts failed (15.5 device minutes) before one came at 12:13;
#    a bench decode with the torch-compile peer at 3 batches needs more than 120 s (the peer compiles per batch).
#  - 2026-12-07 (ninth session): 4 of 5 machine starts found none (~8 device minutes); a `pgrep -f`
#    wait matched its own call and spun out a 600 s call; a cache hit re-exported gpt2 (~60 s) before
#    c38c5f0 (now it opens from the recorded export metadata).
#  - `tune` writes the database of the device's tree, which the next call's copy of the tree
#    replaces: unpack $OUT/db-*.tgz here (drop .tune.lock), or start the next call with `restore`.
set -uo pipefail
export PYTHONPATH=/opt/devsite:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export GPT2K_CACHE_DIR=/root/keep/libs
log() { echo "== $(date +%T) $*"; }
pb_marker() { case $1 in 1) echo pdl ;; 0) echo nopdl ;; *) echo ${1}pdl ;; esac; }
for step in "$@"; do
  case $step in
    libs)
      # libraries built off the device (scripts/prebuild_libs.py --cache-dir .devlibs, carried): into the cache bench reads
      mkdir -p "$GPT2K_CACHE_DIR"; if [ -d .devlibs ]; then cp -r .devlibs/. "$GPT2K_CACHE_DIR/"; ls "$GPT2K_CACHE_DIR"; else echo "no .devlibs carried"; fi ;;
    env)
      nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active --format=csv | tee "$OUT/env.txt"
      python -c "import tvm; d=tvm.cuda(0); print('tvm', tvm.__version__, d.exist, d.compute_version)" | tee -a "$OUT/env.txt" ;;
    gputests)
      log gputests; timeout 420 python -m pytest -m gpu -q -x -p no:cacheprovider tests/test_gpu_model.py -s 2>&1 | grep -v Warning | tail -25 | tee "$OUT/gputests.txt" ;;
    gputests-extra)
      log gputests-extra; timeout 400 python -m pytest -m gpu -q -p no:cacheprovider tests/tuning/test_attention.py tests/bench/test_gpu.py 2>&1 | tail -6 | tee "$OUT/gputests_extra.txt" ;;
    gputests-new)
      log gputests-new; timeout ${GT_LIMIT:-400} python -m pytest -m gpu -q -p no:cacheprovider tests/gpt2_model/test_decode_loop.py tests/tuning/test_attention_tc.py tests/bench/test_gpu.py tests/bench/test_gptfast.py 2>&1 | grep -v Warning | tail -25 | tee "$OUT/gputests_new.txt" ;;
    gputests-graph)
      log gputests-graph; timeout ${GT_LIMIT:-400} python -m pytest -m gpu -q -x -p no:cacheprovider tests/gpt2_model/test_decode_loop.py -k cuda 2>&1 | grep -v Warning | tail -30 | tee "$OUT/gputests_graph.txt" ;;
    gputests-norm)
      # the fused layer norm + decode GEMV: its search on the card (tests/tuning/test_norm_gemv.py)
      log gputests-norm; timeout ${GT_LIMIT:-300} python -m pytest -m gpu -q -p no:cacheprovider tests/tuning/test_norm_gemv.py 2>&1 | grep -v Warning | tail -15 | tee "$OUT/gputests_norm.txt" ;;
    decode-check)
      log decode-check; timeout ${DC_LIMIT:-300} python scripts/decode_check.py --out "$OUT/decode_check.json" 2>&1 | grep -v Warning | tail -40 | tee "$OUT/decode_check.txt" ;;
    mma-check)
      log mma-check; timeout ${MC_LIMIT:-200} python scripts/mma_check.py --out "$OUT" ${MC_ARGS:-} 2>&1 | grep -v Warning | tail -40 | tee "$OUT/mma_check.txt" ;;
    peer-diag)
      log peer-diag; timeout ${PD_LIMIT:-150} python scripts/peer_diag.py --out "$OUT/peer_diag.json" 2>&1 | tail -30 | tee "$OUT/peer_diag.txt" ;;
    bench-decode)
      log bench decode; timeout ${BD_LIMIT:-480} python -m bench.cli decode ${DB:+--database $DB} --batch ${BATCH_LIST:-1,8,32} --variants ${VARIANTS:-untuned,tuned,torch-compile,torch-eager} ${BENCH_ARGS:-} --json "$OUT/decode${TAG:-}.json" 2>&1 | tail -30 | tee "$OUT/decode${TAG:-}.txt" ;;
    bench-prefill)
      log bench prefill; timeout ${BP_LIMIT:-420} python -m bench.cli prefill ${DB:+--database $DB} --seq-len 128,512,1024 --variants ${VARIANTS:-untuned,tuned,torch-compile,torch-eager} ${BENCH_ARGS:-} --json "$OUT/prefill${TAG:-}.json" 2>&1 | tail -30 | tee "$OUT/prefill${TAG:-}.txt" ;;
    bench-kernels)
      log bench kernels; timeout ${BK_LIMIT:-420} python -m bench.cli kernels ${DB:+--database $DB} --phase ${KPHASE:-decode} --batch ${KBATCH:-8} --seq-len ${KSEQ:-1024} --json "$OUT/kernels_${KPHASE:-decode}${TAG:-}.json" 2>&1 | tail -40 | tee "$OUT/kernels_${KPHASE:-decode}${TAG:-}.txt" ;;
    host-profile)
      # where a graph-mode step's host time goes (scripts/step_profile.py --host), tuned library
      log host-profile; timeout ${HP_LIMIT:-240} python scripts/step_profile.py --host --out "$OUT" --variants tuned ${DB:+--database $DB} --prefill 128,512,1024 --decode 1,8,32 --steps 32 2>&1 | grep -v "^USDT\|Warning" | tail -60 ;;
    prebuild-pdl)
      # the tuned library of the database as carried (copied to /root/keep/dbold: later steps may change
      # the tree's), built with and without PDL (GPT2K_PDL=0), in the background; `wait` (same call or a
      # later one) waits for their marker files. Bench them with DB=/root/keep/dbold/sm_90/gpt2-q0f16
      # and GPT2K_PDL=1 / GPT2K_PDL=0 (PDL is off by default).
      rm -rf /root/keep/dbold /root/keep/prebuild.*.done && mkdir -p /root/keep/dbold/sm_90 && cp -r databases/sm_90/gpt2-q0f16 /root/keep/dbold/sm_90/
      log prebuild-pdl; mkdir -p "$GPT2K_CACHE_DIR"
      # PB_MODES: the GPT2K_PDL values to build (default "1 0"); markers pdl (1), nopdl (0), waitpdl (wait)
      for m in ${PB_MODES:-1 0}; do mk=$(pb_marker $m)
        (GPT2K_PDL=$m python scripts/prebuild_libs.py --variants tuned --database-dir /root/keep/dbold --cache-dir "$GPT2K_CACHE_DIR" > /root/keep/prebuild_$mk.log 2>&1; echo "$mk rc $?" > /root/keep/prebuild.$mk.done) &
      done ;;
    prebuild-untuned)
      # the untuned library (no database), in the background; marker prebuild.untuned.done
      rm -f /root/keep/prebuild.untuned.done; mkdir -p "$GPT2K_CACHE_DIR"; log prebuild-untuned
      (python scripts/prebuild_libs.py --variants untuned --cache-dir "$GPT2K_CACHE_DIR" > /root/keep/prebuild_untuned.log 2>&1; echo "untuned rc $?" > /root/keep/prebuild.untuned.done) & ;;
    prebuild-new)
      # the tree's database as it is now (after `restore`: what this machine tuned), copied to /root/keep/dbnew,
      # its tuned library built with and without PDL in the background; markers prebuild.newpdl/newnopdl.done.
      # Bench with DB=/root/keep/dbnew/sm_90/gpt2-q0f16.
      rm -rf /root/keep/dbnew /root/keep/prebuild.new*.done && mkdir -p /root/keep/dbnew/sm_90 && cp -r databases/sm_90/gpt2-q0f16 /root/keep/dbnew/sm_90/
      log prebuild-new; mkdir -p "$GPT2K_CACHE_DIR"
      for m in ${PB_MODES:-1 0}; do mk=new$(pb_marker $m)
        (GPT2K_PDL=$m python scripts/prebuild_libs.py --variants tuned --database-dir /root/keep/dbnew --cache-dir "$GPT2K_CACHE_DIR" > /root/keep/prebuild_$mk.log 2>&1; echo "$mk rc $?" > /root/keep/prebuild.$mk.done) &
      done ;;
    wait)
      # waits for the marker files named in WAIT_FOR (default: the two prebuild-pdl builds).
      # never `pgrep -f NAME` here: it matches the device call's own command line (2026-12-07: 10 minutes lost)
      log wait ${WAIT_FOR:=pdl nopdl}; for i in $(seq 1 ${WAIT_S:-300}); do
        all=1; for m in $WAIT_FOR; do [ -f /root/keep/prebuild.$m.done ] || all=0; done; [ $all = 1 ] && break; sleep 1; done
      cat /root/keep/prebuild.*.done 2>/dev/null; cp /root/keep/prebuild_*.log "$OUT"/ 2>/dev/null; log waited ;;
    decode-attn)
      # the decode attention template's candidates (split ones included) vs TVM's kernel (scripts/decode_attn_check.py)
      log decode-attn; timeout ${DA_LIMIT:-200} python scripts/decode_attn_check.py --out "$OUT" 2>&1 | grep -v Warning | tail -${DA_TAIL:-25} ;;
    attn-fa)
      # the wgmma flash-attention prefill candidates vs the stored tc kernel and torch SDPA (scripts/attn_fa_check.py)
      log attn-fa; timeout ${AF_LIMIT:-200} python scripts/attn_fa_check.py --out "$OUT" 2>&1 | grep -v Warning | tail -30 ;;
    wgmma-check)
      # the wgmma GEMM alone vs cuBLAS (scripts/wgmma_check.py; WC_ARGS e.g. --shapes 1024x2304x768 --configs ...)
      log wgmma-check; timeout ${WC_LIMIT:-200} python scripts/wgmma_check.py --out "$OUT" ${WC_ARGS:-} 2>&1 | grep -v Warning | tail -25 ;;
    load-profile)
      # where tvm.runtime.load_module of a cached library spends its 34 s (2026-12-07, H100): cProfile of the load,
      # then the first function lookup; LIB defaults to the first library in the cache
      log load-profile; lib=${LIB:-$(ls -d $GPT2K_CACHE_DIR/*/lib.so | head -1)}; ls -la "$lib"
      timeout ${LP_LIMIT:-120} python -c "import cProfile, pstats, sys, time, tvm; t = time.perf_counter(); pr = cProfile.Profile(); pr.enable(); m = tvm.runtime.load_module(sys.argv[1]); pr.disable(); print('load_module', round(time.perf_counter() - t, 2), 's'); pstats.Stats(pr).sort_stats('cumulative').print_stats(12); t = time.perf_counter(); d = tvm.cuda(0); print('imports', [getattr(i, 'kind', type(i).__name__) for i in getattr(m, 'imports', [])]); print('after', round(time.perf_counter() - t, 2), 's')" "$lib" 2>&1 | grep -v Warning | tail -40 | tee "$OUT/load_profile.txt" ;;
    wgmma-model)
      # a tiny model with wgmma prefill GEMMs vs without, built and run on the card (scripts/wgmma_model_check.py)
      log wgmma-model; timeout ${WM_LIMIT:-180} python scripts/wgmma_model_check.py --out "$OUT" 2>&1 | grep -v Warning | tail -6 ;;
    hidden-host)
      # is the wall - graph gap of a graph-mode step host work or GPU work? (scripts/step_profile.py --hidden-host)
      log hidden-host; timeout ${HP_LIMIT:-240} python scripts/step_profile.py --hidden-host --out "$OUT" --variants tuned ${DB:+--database $DB} --prefill 128,512,1024 --decode ${HH_DECODE:-1,8} --steps 16 2>&1 | grep -v "^USDT\|Warning" | tail -20 ;;
    rpc-gpu)
      # issue 16 on one GPU: a tracker and two --no-fork servers sharing the card, a server killed mid-run
      log rpc-gpu; timeout ${RPC_LIMIT:-300} python -m pytest -m gpu -q -s -p no:cacheprovider tests/tuning/test_rpc_gpu.py > "$OUT/rpc_gpu.txt" 2>&1; grep -v Warning "$OUT/rpc_gpu.txt" | tail -30 ;;
    tune)
      # PHASES, BATCHES, CHUNKS, TRIALS, KINDS, SPACE, QUANT, SEARCH_MIN, ATT_TEMPLATES select the run; the committed database comes back in $OUT/db-QUANT.tgz
      q=${QUANT:-q0f16}
      log tune $q; timeout ${TUNE_LIMIT:-540} python -m tuning.cli --arch sm_90 --quantization $q --phases ${PHASES:-decode} --batch-buckets ${BATCHES:-8} --prefill-buckets ${CHUNKS:-1024} --trials-per-task ${TRIALS:-32} --space ${SPACE:-llm} ${KINDS:+--kinds $KINDS} ${SEARCH_MIN:+--search-minutes $SEARCH_MIN} ${ATT_TEMPLATES:+--attention-templates $ATT_TEMPLATES} --work-dir /root/keep/work-$q > "$OUT/tune_$q.log" 2>&1; grep -v "Warning: Fast" "$OUT/tune_$q.log" | grep -v "^\[round" | tail -40
      mkdir -p /root/keep/db-$q; cp databases/sm_90/gpt2-$q/* /root/keep/db-$q/; tar czf "$OUT/db-$q.tgz" -C databases/sm_90 gpt2-$q; ls -la databases/sm_90/gpt2-$q ;;
    restore)
      # later calls start from the working tree's copy: put back what this machine tuned so far
      for q in q0f16 q4f16_1; do if [ -d /root/keep/db-$q ]; then cp /root/keep/db-$q/* databases/sm_90/gpt2-$q/ && echo "restored db-$q"; fi; done ;;
    profile)
      log profile; timeout ${PROFILE_LIMIT:-400} python scripts/step_profile.py --out "$OUT" --variants ${PVARIANTS:-untuned,tuned} ${DB:+--database $DB} ${PROFILE_ARGS:-} 2>&1 | grep -v "^USDT\|Warning" | tail -80 ;;
    ncu)
      # Nsight Compute metrics of the tuned library's kernels during a short bench run (no clocks changed:
      # --clock-control none). NCU_BENCH: bench arguments; NCU_FILTER: kernel-name regex; NCU_SKIP/NCU_COUNT.
      log ncu; timeout ${NCU_LIMIT:-240} ncu --clock-control none --target-processes all -k "regex:${NCU_FILTER:-batch_decode_paged_kv}" \
        --launch-skip ${NCU_SKIP:-24} --launch-count ${NCU_COUNT:-4} --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section WarpStateStats --section Occupancy --section LaunchStats --section SchedulerStats --csv --page details \
        python -m bench.cli ${NCU_BENCH:-decode --batch 1 --gen-len 16} ${DB:+--database $DB} --variants tuned --no-check --no-anatomy --repeats 1 --warmup 0 \
        > "$OUT/ncu${TAG:-}.csv" 2> "$OUT/ncu${TAG:-}.err"; echo "ncu rc $?"; tail -3 "$OUT/ncu${TAG:-}.err"; wc -l "$OUT/ncu${TAG:-}.csv" ;;
    *) echo "unknown step $step" ;;
  esac
done
