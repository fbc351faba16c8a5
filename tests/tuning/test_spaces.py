"""The tunable design spaces: classification, sampling, postprocessing, builds, trace replay.

CPU only: kernels are built for ``cuda``/``sm_90`` (NVRTC or nvcc compile here without a GPU),
never run. Numerical checks of the spaces live in ``bench/device/spaces_check.py`` and in the
``gpu``-marked test at the end.
"""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms
from tvm.support import nvcc

from tuning import spaces
from tuning.spaces import workloads as wl
from tuning.targets import make_target
from tuning.untuned import untuned_schedule

TARGET = make_target("sm_90")
NVCC = shutil.which("nvcc") is not None

# GPT-2-small shapes: decode GEMVs (qkv, fc1 with gelu, lm_head), a q4f16_1 GEMV, prefill GEMMs
# (qkv, lm_head with odd N), a layer norm, a softmax over the vocabulary, an elementwise op.
KERNELS = {
    "gemv_b8_qkv": lambda: wl.linear(8, 1, 2304, 768),
    "gemv_b1_fc2_residual": lambda: wl.linear(1, 1, 768, 3072, epilogue="residual"),
    "gemv_b32_fc1_gelu": lambda: wl.linear(32, 1, 3072, 768, epilogue="gelu"),
    "gemv_b8_lm_head": lambda: wl.linear(8, 1, 50257, 768, bias=False),
    "q4_gemv_b8": lambda: wl.q4_linear(8, 1, 2304, 768),
    "gemm_s1024_qkv": lambda: wl.linear(1, 1024, 2304, 768),
    "gemm_s128_lm_head": lambda: wl.linear(1, 128, 50257, 768, bias=False),
    "layer_norm_s1024": lambda: wl.layer_norm(1, 1024, 768),
    "layer_norm_b1": lambda: wl.layer_norm(1, 1, 768),
    "softmax_vocab": lambda: wl.softmax(1, 8, 50257),
    "gelu_s1024": lambda: wl.gelu(1, 1024, 3072),
}

EXPECTED_CLASS = {
    "gemv_b8_qkv": "gemv",
    "gemv_b1_fc2_residual": "gemv",
    "gemv_b32_fc1_gelu": "gemv",
    "gemv_b8_lm_head": "gemv",
    "q4_gemv_b8": "gemv",
    "gemm_s1024_qkv": "gemm",
    "gemm_s128_lm_head": "gemm",
    "layer_norm_s1024": "reduction",
    "layer_norm_b1": "reduction",
    "softmax_vocab": "reduction",
    "gelu_s1024": "elementwise",
}

TUNABLE_SPACES = {
    "gemv": {"gemv/x_global", "gemv/x_shared"},
    "gemm": {"gemm_tc/pipelined", "gemm_tc/plain"},
    "reduction": {"row_reduction"},
    "elementwise": {"elementwise"},
}

NUM_SAMPLES = 12


@pytest.fixture(scope="module")
def funcs():
    return {name: make() for name, make in KERNELS.items()}


@pytest.fixture(scope="module")
def samples(funcs):
    """12 valid candidates (dlight + 11 re-sampled draws) per kernel, with their stats."""
    out = {}
    for name, func in funcs.items():
        cands, stats = spaces.sample_candidates(func, target=TARGET, num=NUM_SAMPLES, seed=1)
        out[name] = (cands, stats)
    return out


def _postprocs(mod):
    ctx = ms.TuneContext(
        mod=mod,
        target=TARGET,
        space_generator=ms.space_generator.ScheduleFn(
            lambda s: None, sch_rules=[], postprocs=spaces.postprocs_for(TARGET), mutator_probs={}
        ),
        task_name="t",
        num_threads=1,
    )
    return ctx.space_generator.postprocs


def _decisions(trace) -> tuple:
    out = []
    for inst, dec in trace.decisions.items():
        if inst.kind.name in ("SampleCategorical", "SamplePerfectTile"):
            out.append(tuple(int(d) for d in dec) if inst.kind.name == "SamplePerfectTile" else int(dec))
    return tuple(out)


# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(KERNELS))
def test_classify(funcs, name):
    assert spaces.classify(funcs[name]) == EXPECTED_CLASS[name]


def test_classify_matches_partition_of_real_model():
    """The real fused kernels of a tiny GPT-2 (fp16 and q4f16_1) are classified like
    ``tuning.partition`` does (its ``gather`` kernels are elementwise here)."""
    from gpt2_model.config import get_config
    from tuning.partition import partition

    for quant in ("q0f16", "q4f16_1"):
        tasks = partition(get_config("tiny"), quantization=quant, target=TARGET,
                          buckets={"prefill": [128], "decode": [8]})
        kinds = Counter()
        for task in tasks:
            expected = "elementwise" if task.kind == "gather" else task.kind
            assert spaces.classify(task.func) == expected, task.name
            kinds[expected] += 1
            # every task gets its class's tunable spaces (and the dlight one)
            names = {n for n, _ in spaces.design_spaces(task.func, target=TARGET)}
            assert "dlight" in names, task.name
            if expected in ("gemv", "gemm"):
                assert TUNABLE_SPACES[expected] <= names, (task.name, names)
        assert kinds["gemv"] >= 4 and kinds["gemm"] >= 4, kinds


@pytest.mark.slow  # builds every sampled kernel for CUDA and runs nvcc (no GPU needed): 12-33 s each, loaded 2-core machine
@pytest.mark.parametrize("name", list(KERNELS))
def test_samples_postprocess_and_build(samples, name):
    """Every draw that passes the postprocessors (VerifyGPUCode included) builds for sm_90;
    each tunable space yields valid samples; most draws are valid."""
    cands, stats = samples[name]
    assert len(cands) == NUM_SAMPLES, stats
    assert stats["invalid"] <= stats["attempts"] // 2, stats
    assert stats["by_space"].get("dlight") == 1
    assert TUNABLE_SPACES[EXPECTED_CLASS[name]] <= set(stats["by_space"]), stats
    compiled = set()
    for cand in cands:
        ex = tvm.compile(cand.sch.mod, target=TARGET)
        source = ex.mod.imports[0].inspect_source()
        assert "__global__" in source, cand.space
        # tvm.compile keeps CUDA *source* (compiled when loaded on a GPU); compile one kernel
        # of every space with nvcc for sm_90 so a bad kernel fails here, not on the GPU box
        if NVCC and cand.space not in compiled:
            with TARGET:
                cubin = nvcc.compile_cuda(source, target_format="cubin", compiler="nvcc")
            assert len(cubin) > 0
            compiled.add(cand.space)


@pytest.mark.parametrize("name", ["gemv_b8_qkv", "q4_gemv_b8", "gemm_s128_lm_head", "layer_norm_s1024"])
def test_trace_roundtrips_through_json_database(tmp_path, funcs, samples, name):
    """Candidates stored in a MetaSchedule JSON database (files on disk, as the team's database
    is) load back, replay on a fresh schedule, and postprocess to the very same modules."""
    mod = tvm.IRModule({"main": funcs[name]})
    postprocs = _postprocs(mod)
    paths = (str(tmp_path / "workloads.json"), str(tmp_path / "records.json"))
    db = ms.database.JSONDatabase(*paths, allow_missing=True)
    workload = db.commit_workload(mod)
    cands = samples[name][0]
    for i, cand in enumerate(cands):  # distinct run times tell the records apart when loaded
        db.commit_tuning_record(
            ms.database.TuningRecord(cand.trace, workload, run_secs=[(i + 1) * 1e-6], target=TARGET))
    loaded = ms.database.JSONDatabase(*paths, allow_missing=False).get_all_tuning_records()
    assert len(loaded) == len(cands)
    for rec in loaded:
        cand = cands[round(float(rec.run_secs[0]) * 1e6) - 1]
        sch = s_tir.Schedule(mod)
        rec.trace.apply_to_schedule(sch, remove_postproc=True)
        sch.enter_postproc()
        assert all(p.apply(sch) for p in postprocs), cand.space
        assert tvm_ffi.structural_equal(sch.mod, cand.sch.mod), cand.space


@pytest.mark.parametrize("name", ["gemv_b8_qkv", "q4_gemv_b8", "gemm_s1024_qkv", "softmax_vocab"])
def test_knobs_vary_across_seeds(samples, name):
    """Different seeds give different decisions and different kernels."""
    tunable = [c for c in samples[name][0] if c.space != "dlight"]
    decisions = {(c.space, _decisions(c.trace)) for c in tunable}
    hashes = {tvm_ffi.structural_hash(c.sch.mod) for c in tunable}
    assert len(decisions) >= len(tunable) // 2, decisions
    assert len(hashes) >= len(tunable) // 2


def test_gemv_tile_knobs_reach_the_kernel(funcs):
    """The sampled threads-per-row / rows-per-block values are the kernel's launch shape."""
    func = funcs["gemv_b8_qkv"]
    cands, _ = spaces.sample_candidates(func, target=TARGET, num=8, seed=11, include_dlight=False)
    launch = set()
    for cand in cands:
        extents = {}

        def visit(node):
            if isinstance(node, tvm.tirx.For) and node.thread_binding is not None:
                extents[str(node.thread_binding.thread_tag)] = int(node.extent)

        tvm_ffi.structural_walk(cand.sch.mod["main"].body, (tvm.tirx.For, visit), order="post")
        assert extents["threadIdx.x"] * extents.get("threadIdx.y", 1) <= 1024
        launch.add((extents["threadIdx.x"], extents.get("threadIdx.y", 1), extents["blockIdx.x"]))
    assert len(launch) >= 4, launch


def test_dlight_schedule_replays(funcs):
    for name in ("gemv_b8_qkv", "gemm_s1024_qkv", "layer_norm_s1024"):
        mod = tvm.IRModule({"main": funcs[name]})
        sch = untuned_schedule(funcs[name], target=TARGET)
        assert sch is not None
        fresh = s_tir.Schedule(mod)
        sch.trace.apply_to_schedule(fresh, remove_postproc=False)
        assert tvm_ffi.structural_equal(fresh.mod, sch.mod), name


def test_optin_verifier_accepts_dlight_tensorcore_gemm(funcs):
    """dlight's tensor-core GEMM stages ~70 KB in dynamic shared memory: MetaSchedule's
    VerifyGPUCode rejects it against the target's 48 KiB, the opt-in verifier accepts it."""
    func = funcs["gemm_s1024_qkv"]
    mod = tvm.IRModule({"main": func})
    ours = [p for p in _postprocs(mod) if type(p).__name__ == "_PyPostproc"]
    assert len(ours) == 1
    stock = ms.postproc.VerifyGPUCode()
    stock._initialize_with_tune_context(ms.TuneContext(mod=mod, target=TARGET, num_threads=1))  # noqa: SLF001

    def fresh():
        sch = s_tir.Schedule(mod)
        untuned_schedule(func, target=TARGET).trace.apply_to_schedule(sch, remove_postproc=False)
        sch.enter_postproc()
        return sch

    assert not stock.apply(fresh())
    assert ours[0].apply(fresh())


def test_space_for_generates_named_spaces(funcs):
    mod = tvm.IRModule({"main": funcs["gemv_b8_qkv"]})
    gen = spaces.space_for(funcs["gemv_b8_qkv"], target=TARGET)
    ctx = ms.TuneContext(mod=mod, target=TARGET, space_generator=gen, task_name="t", num_threads=1)
    design = ctx.generate_design_space()
    assert len(design) == 3 + 5  # two tunable structures + dlight + the skinny mma.sync spaces (b8)
    kinds = [Counter(i.kind.name for i in s.trace.insts) for s in design]
    # fp16: vector, rows per block, rows per thread, unroll, K threads, batch split (all categorical)
    assert kinds[0]["SampleCategorical"] >= 6
    assert kinds[-1]["SampleCategorical"] == 0  # the dlight space has no knobs

    mod = tvm.IRModule({"main": funcs["gemm_s1024_qkv"]})
    gen = spaces.space_for(funcs["gemm_s1024_qkv"], target=TARGET, include_generic=True)
    ctx = ms.TuneContext(mod=mod, target=TARGET, space_generator=gen, task_name="t", num_threads=1)
    assert len(ctx.generate_design_space()) == 10  # 2 wmma + 5 mma (sm_80+) + dlight + 2 generic


def test_generic_space_failure_is_contained():
    """MetaSchedule's MultiLevelTilingTensorCore raises while generating the space of the
    prefill lm_head GEMV (M = 1, fp32 cast epilogue); with include_generic the task still gets
    the tunable spaces and dlight."""
    func = wl.linear(1, 1, 50257, 768, bias=False)
    mod = tvm.IRModule({"main": func})
    generic = ms.TuneContext(mod=mod, target=TARGET, task_name="g", num_threads=1,
                             space_generator=ms.space_generator.PostOrderApply(
                                 sch_rules="cuda-tensorcore", postprocs=[], mutator_probs={}))
    with pytest.raises(Exception):  # noqa: B017 - upstream raises a bare RuntimeError/ValueError
        generic.generate_design_space()
    names = [n for n, _ in spaces.design_spaces(func, target=TARGET, include_generic=True)]
    assert names[:3] == ["gemv/x_global", "gemv/x_shared", "dlight"], names


def test_bad_input():
    with pytest.raises(TypeError):
        spaces.classify("not a function")
    func = wl.linear(8, 1, 64, 64)
    with pytest.raises(ValueError, match="CUDA"):
        spaces.space_for(func, target=tvm.target.Target({"kind": "llvm"}))
    with pytest.raises(TypeError):
        spaces.space_for(func, target="cuda")
    with pytest.raises(ValueError):
        spaces.sample_candidates(func, target=TARGET, num=1, seed=0)


def test_tune_tasks_with_spaces_end_to_end(tmp_path, funcs):
    """The team's driver runs MetaSchedule's evolutionary search over these spaces (builder and
    runner faked: nothing runs) and every stored record replays."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.runner import PyRunner, RunnerFuture, RunnerResult

    from tuning.tune import TuneTask, tune_tasks

    rng = np.random.default_rng(0)
    made = iter(range(10**6))

    @derived_object
    class FakeBuilder(PyBuilder):
        def build(self, build_inputs):
            out = []
            for _ in build_inputs:  # MetaSchedule deletes each artifact's folder after measuring
                folder = tmp_path / "artifacts" / str(next(made))
                folder.mkdir(parents=True)
                (folder / "a.so").write_bytes(b"")
                out.append(BuilderResult(str(folder / "a.so"), None))
            return out

    @derived_object
    class FakeRunner(PyRunner):
        def run(self, runner_inputs):
            return [RunnerFuture(lambda: True, lambda t=float(rng.uniform(1e-6, 1e-5)): RunnerResult([t], None))
                    for _ in runner_inputs]

    func = funcs["gemv_b8_qkv"]
    task = TuneTask(name="gemv", mod=tvm.IRModule({"main": func}))
    db = tune_tasks(
        [task], target=TARGET, work_dir=tmp_path / "db", max_trials_global=8, max_trials_per_task=8,
        num_trials_per_iter=8, builder=FakeBuilder(), runner=FakeRunner(),
        space=lambda t: spaces.space_for(t.mod["main"], target=TARGET), cost_model="random",
        strategy_options={"population_size": 16, "init_min_unmeasured": 8, "genetic_num_iters": 1},
        measure_untuned=False, num_tuning_cores=1,
    )
    records = db.get_all_tuning_records()
    assert len(records) >= 4
    mod = tvm.IRModule({"main": func})
    for rec in records:
        sch = s_tir.Schedule(mod)
        rec.trace.apply_to_schedule(sch, remove_postproc=False)
        tvm.compile(sch.mod, target=TARGET)
    assert any(
        any(i.kind.name == "SampleCategorical" for i in rec.trace.insts) for rec in records
    ), "no record came from a tunable space"


@pytest.mark.gpu
def test_gemv_candidates_match_numpy_on_gpu(funcs):
    """On a GPU: sampled GEMV candidates compute x @ W^T + b (fp16, accumulation tolerance)."""
    func = funcs["gemv_b8_qkv"]
    cands, _ = spaces.sample_candidates(func, target=TARGET, num=6, seed=3)
    dev = tvm.cuda(0)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (8, 1, 768)).astype("float16")
    w = rng.uniform(-1, 1, (2304, 768)).astype("float16")
    b = rng.uniform(-1, 1, (2304,)).astype("float16")
    ref = (x.astype("float32") @ w.astype("float32").T + b).reshape(8, 1, 2304)
    for cand in cands:
        f = tvm.compile(cand.sch.mod, target=TARGET)
        args = [tvm.runtime.tensor(a, dev) for a in (x, w, b)]
        out = tvm.runtime.tensor(np.zeros((8, 1, 2304), "float16"), dev)
        f(*args, out)
        np.testing.assert_allclose(out.numpy().astype("float32"), ref, atol=0.25, rtol=0.02,
                                   err_msg=cand.space)


def test_decode_from_b8_also_gets_the_tensor_core_spaces():
    """Issue 11: decode at b8-b64 is a skinny GEMM. Its matmuls stay GEMV-class (the GEMV spaces
    and dlight) and also get the (skinny) mma.sync spaces; below b8 only the GEMV spaces. Before
    sm_80 (no mma.sync) the wmma spaces stand in from b16."""
    names = lambda b, arch="sm_90": [n for n, _ in spaces.design_spaces(wl.linear(b, 1, 2304, 768),  # noqa: E731
                                                                      target=make_target(arch))]
    assert all(spaces.classify(wl.linear(b, 1, 2304, 768)) == "gemv" for b in (4, 8, 16, 32))
    assert names(4) == ["gemv/x_global", "gemv/x_shared", "dlight"]
    for b in (8, 16, 32):
        got = names(b)
        assert got[:2] == ["gemv/x_global", "gemv/x_shared"] and got[-1] == "dlight"
        assert any(n.startswith("gemm_mma/") for n in got) and not any(n.startswith("gemm_tc/") for n in got), got
    volta = names(32, "sm_70")
    assert any(n.startswith("gemm_tc/") for n in volta) and not any(n.startswith("gemm_mma/") for n in volta)
    assert names(8, "sm_70") == ["gemv/x_global", "gemv/x_shared", "dlight"]


@pytest.mark.slow  # sampling and building three tensor-core candidates
def test_decode_b32_tensor_core_candidates_build():
    from tuning.builder import build_kernel  # pylint: disable=import-outside-toplevel

    func = wl.linear(32, 1, 768, 3072)
    cands, stats = spaces.sample_candidates(func, target=TARGET, num=3, seed=1, include_dlight=False,
                                            only=("gemm_mma/", "gemm_tc/"), max_attempts=24)
    assert len(cands) == 3, stats
    for cand in cands:
        src = build_kernel(cand.sch.mod, TARGET).mod.imports[0].inspect_source()
        assert ("mma.sync.aligned.m16n8k16" in src) if cand.space.startswith("gemm_mma/") else ("wmma" in src)
