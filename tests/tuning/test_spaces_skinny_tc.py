"""The tensor-core spaces on decode GEMVs of 8 to 32 rows (skinny GEMMs, issue 11): no tile
decision may reach an internal check (``ICHECK``) of TVM's tensorization.

Decode at b >= 8 gets the mma.sync (``gemm_mma/*``) spaces beside the GEMV ones, in their skinny
form (M padded to 16 only, all rows in one block); the wmma space (``gemm_tc/*``), which pads M to
128, is no longer offered there but is still checked on these shapes below. MetaSchedule's evolutionary search replays every design space's trace with fresh
decisions; a decision whose replay fails with a ``ScheduleError`` is skipped as invalid, but any
other error (an ``ICHECK`` such as ``TensorizeComparator``'s
``comparator.rhs_buffer_map_.count(desc)``) aborts the whole search round
(``parallel_for_dynamic error``). The wmma space hit that on the lm_head (N = 50257, padded to
50304 = 393 x 128) whenever its N block tile was 256 (4 warps x 4 fragments), which does not divide
the padded N: ``tuning.spaces.gemm.pad_n`` now pads that N to 256.

CPU only: the replays run here, the builds target sm_90 (nothing runs).
"""

from __future__ import annotations

import itertools
import re

import pytest
import tvm
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms

from tuning import spaces
from tuning.builder import build_kernel
from tuning.spaces import gemm
from tuning.spaces import workloads as wl
from tuning.tasks import normalize
from tuning.targets import make_target

TARGET = make_target("sm_90")
ROWS = (16, 32)

#: The lm_head of decode (the fp32 cast of the model's kernel left out: same matmul): the only
#: GPT-2 GEMM whose N (50257) is not a multiple of 256.
LM_HEAD = dict(n=50257, k=768, bias=False)

#: Fresh-seed draws per tensor-core space and row count (as the search's initial population).
DRAWS = 6


def _lm_head(rows: int) -> tvm.IRModule:
    return normalize(tvm.IRModule({"main": wl.linear(rows, 1, LM_HEAD["n"], LM_HEAD["k"],
                                                     bias=LM_HEAD["bias"])}))


def _wmma(mod, variant: str) -> s_tir.Schedule:
    sch = s_tir.Schedule(mod, seed=1, debug_mask=0)
    gemm.schedule_gemm_tensorcore(sch, variant=variant)
    return sch


@pytest.fixture(scope="module")
def tc_spaces():
    """{rows: (mod, {space name: schedule})} with the tensor-core spaces of the decode lm_head: the
    mma.sync ones of the design spaces, the wmma ones applied directly."""
    out = {}
    for rows in ROWS:
        mod = _lm_head(rows)
        named = spaces.design_spaces(mod, target=TARGET, include_dlight=False)
        tc = {n: s for n, s in named if n.startswith(("gemm_tc/", "gemm_mma/"))}
        tc.update({f"gemm_tc/{v}": _wmma(mod, v) for v in gemm.GEMM_VARIANTS})
        out[rows] = (mod, tc)
    return out


def _replay(mod, trace, decisions=None, seed=1):
    """Replay ``trace`` with ``decisions`` (``{inst: int}``; missing ones re-sampled with
    ``seed``). Returns ``"ok"``, ``"schedule_error"`` or the message of any other error."""
    tr = s_tir.schedule.Trace(trace.insts, dict(decisions or {}))
    sch = s_tir.Schedule(mod, seed=seed, debug_mask=0)
    try:
        tr.apply_to_schedule(sch, remove_postproc=True)
    except s_tir.ScheduleError:
        return "schedule_error"
    except Exception as err:  # noqa: BLE001 - what MetaSchedule does not skip
        if "ScheduleError" in str(err):  # raised through another FFI error type
            return "schedule_error"
        lines = [ln for ln in str(err).splitlines() if ln.strip()]
        return f"{type(err).__name__}: {lines[-1] if lines else ''}"
    return "ok"


def _categoricals(trace):
    return [i for i in trace.insts if i.kind.name == "SampleCategorical"]


@pytest.mark.parametrize("rows", (1, 8, 32))
def test_skinny_rows_get_the_mma_space_not_wmma(rows):
    """b8 and b32 decode GEMMs: GEMV and mma.sync spaces (the search decides); b1: GEMV only."""
    mod = normalize(tvm.IRModule({"main": wl.linear(rows, 1, 2304, 768)}))
    names = [n for n, _ in spaces.design_spaces(mod, target=TARGET, include_dlight=False)]
    assert any(n.startswith("gemv/") for n in names)
    assert not any(n.startswith("gemm_tc/") for n in names)
    assert any(n.startswith("gemm_mma/") for n in names) == (rows >= spaces.SKINNY_GEMM_MIN_ROWS)


SKINNY_SHAPES = {"qkv": (2304, 768, True), "fc2": (768, 3072, True), "lm_head": (50257, 768, False)}


@pytest.mark.parametrize("rows", (8, 32))
@pytest.mark.parametrize("shape", sorted(SKINNY_SHAPES))
def test_skinny_mma_every_decision_replays(rows, shape):
    """The skinny mma.sync space: M padded to a multiple of 16 only (not 128), one block row (all
    rows in each block, so the weights are streamed once), and every decision of two structural
    variants replays (the 512-wide N tile that would not divide 2304 or the padded lm_head is not
    offered)."""
    n, k, bias = SKINNY_SHAPES[shape]
    mod = normalize(tvm.IRModule({"main": wl.linear(rows, 1, n, k, bias=bias)}))
    named = dict(spaces.design_spaces(mod, target=TARGET, include_dlight=False))
    for name in ("gemm_mma/s3_swizzle", "gemm_mma/s2_pad"):
        trace = named[name].trace
        pads = [tuple(int(p) for p in i.attrs[0]) for i in trace.insts if i.kind.name == "PadEinsum"]
        assert pads == [(1, 16, 256 if n > 1024 else 128, 128)]
        cats = _categoricals(trace)
        assert [len(c.attrs[0]) for c in cats] == [4, 2, 3, 2]  # warps N, frags N, K chunk, vector
        results = [_replay(mod, trace, dict(zip(cats, dec)))
                   for dec in itertools.product(*[range(len(c.attrs[0])) for c in cats])]
        assert results == ["ok"] * 48, [r for r in results if r != "ok"][:3]
        rows_grid = re.findall(r'thread_binding\((?:T\.int64\()?(\d+)\)?, thread="blockIdx.y"\)', named[name].mod.script())
        assert rows_grid == ["1"], rows_grid


def test_lm_head_n_padding():
    """N is padded to 256 only where 128 leaves an odd number of 128-wide tiles: the prefill
    GEMMs (N = 768, 2304, 3072) keep dlight's 128 (unchanged traces, committed records)."""
    assert gemm.pad_n(50257) == 256
    assert [gemm.pad_n(n) for n in (768, 2304, 3072, 256, 100)] == [128, 128, 128, 128, 256]
    assert gemm.pad_n(tvm.tirx.Var("n", "int64")) == 128
    for n, want in ((50257, 256), (2304, 128)):
        sch = s_tir.Schedule(normalize(tvm.IRModule({"main": wl.linear(32, 1, n, 768)})), seed=1)
        gemm.schedule_gemm_tensorcore(sch, variant="plain")
        pads = [tuple(int(p) for p in i.attrs[0]) for i in sch.trace.insts if i.kind.name == "PadEinsum"]
        assert pads == [(1, 128, want, 64)]


@pytest.mark.parametrize("rows", ROWS)
def test_wmma_every_block_tile_replays_or_is_a_schedule_error(tc_spaces, rows):
    """Every (warps, fragments) x (M, N) decision of the wmma space on the decode lm_head: the
    replay succeeds or fails with a ScheduleError (what the search skips), never an ICHECK."""
    mod, named = tc_spaces[rows]
    trace = named["gemm_tc/plain"].trace
    cats = _categoricals(trace)
    assert len(cats) == 6  # warps_i, warps_j, tiles_i, tiles_j, k_chunk, vec
    bad, ok = [], 0
    for dec in itertools.product(range(3), repeat=4):
        # k chunk and vector width vary with the tile decisions (they do not change tensorize)
        rest = (sum(dec) % 3, (dec[0] + dec[3]) % 3)
        got = _replay(mod, trace, dict(zip(cats, dec + rest)))
        if got == "ok":
            ok += 1
        elif got != "schedule_error":
            bad.append((dec + rest, got))
    assert not bad, f"{len(bad)} decisions fail with non-ScheduleErrors, e.g. {bad[:3]}"
    # the 256-wide N block tile (4 warps x 4 fragments) is among the valid ones
    n256 = dict(zip(cats, (0, 2, 0, 2, 0, 2)))
    assert ok > 0 and _replay(mod, trace, n256) == "ok"


@pytest.mark.parametrize("rows", ROWS)
def test_tensor_core_draws_never_hit_an_icheck(tc_spaces, rows):
    """Fresh-seed draws of every wmma and mma.sync space (the search's initial population)."""
    mod, named = tc_spaces[rows]
    assert {"gemm_tc/plain", "gemm_tc/pipelined"} <= set(named)
    assert any(n.startswith("gemm_mma/") for n in named)
    bad = {}
    for name, sch in named.items():
        for seed in range(1, DRAWS + 1):
            got = _replay(mod, sch.trace, seed=seed * 7 + rows)
            if got not in ("ok", "schedule_error"):
                bad.setdefault(name, []).append((seed, got))
    assert not bad, bad


def test_wide_n_tile_candidates_build_for_sm90(tc_spaces):
    """The formerly fatal decision (a 256-wide N block tile on the lm_head) postprocesses and
    builds for sm_90, as does a draw of an mma.sync space."""
    mod, named = tc_spaces[32]
    postprocs = ms.TuneContext(
        mod=mod, target=TARGET, task_name="t", num_threads=1,
        space_generator=ms.space_generator.ScheduleFn(
            lambda s: None, sch_rules=[], postprocs=spaces.postprocs_for(TARGET), mutator_probs={}),
    ).space_generator.postprocs
    wmma = named["gemm_tc/plain"].trace
    built = []
    picks = [("gemm_tc/plain", dict(zip(_categoricals(wmma), (0, 2, 1, 2, 1, 2))))]
    picks.append((sorted(n for n in named if n.startswith("gemm_mma/"))[0], None))
    for name, decisions in picks:
        for seed in range(1, 9):
            tr = s_tir.schedule.Trace(named[name].trace.insts, dict(decisions or {}))
            sch = s_tir.Schedule(mod, seed=seed, debug_mask=0)
            try:
                tr.apply_to_schedule(sch, remove_postproc=True)
            except s_tir.ScheduleError:
                continue
            sch.enter_postproc()
            if all(p.apply(sch) for p in postprocs):
                break
        else:
            pytest.fail(f"no valid draw of {name}")
        src = build_kernel(sch.mod, TARGET).mod.imports[0].inspect_source()
        assert ("wmma" in src) if name.startswith("gemm_tc/") else ("mma.sync.aligned.m16n8k16" in src)
        built.append(name)
    assert len(built) == 2


@pytest.mark.slow  # ~10 s on 2 cores: MetaSchedule's own initial population on one space
def test_evolutionary_search_samples_wmma_space_of_decode_lm_head():
    """The failing path itself: EvolutionarySearch's initial population from the wmma space of
    the b32 lm_head (there the ICHECK raised ``parallel_for_dynamic error`` and killed the round)."""
    mod = _lm_head(32)

    def wmma_plain(sch):  # the wmma space itself (decode no longer gets it on sm_80+: see above)
        gemm.schedule_gemm_tensorcore(sch, variant="plain")
        return [sch]

    gen = ms.space_generator.ScheduleFn(
        wmma_plain,
        sch_rules=[], postprocs=spaces.postprocs_for(TARGET), mutator_probs="cuda-tensorcore")
    ctx = ms.TuneContext(
        mod=mod, target=TARGET, space_generator=gen, task_name="lm_head_b32", num_threads=2,
        rand_state=1,
        search_strategy=ms.search_strategy.EvolutionarySearch(
            population_size=48, init_min_unmeasured=48, genetic_num_iters=1))
    design = ctx.generate_design_space()
    assert len(design) == 1
    ctx.search_strategy.pre_tuning(8, 8, design, ms.database.MemoryDatabase(),
                                   ms.cost_model.RandomModel())
    cands = ctx.search_strategy.generate_measure_candidates()
    assert cands is not None and len(cands) > 0
