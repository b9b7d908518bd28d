"""``auto``: verified (self-check) and measured (timing cache) dispatch, on the CPU.

Fast backends are stood in for by fakes built on the reference (right, wrong forward, wrong
backward, slow), and made ``auto`` candidates on CPU tensors by patching the preference order, so
each test checks the dispatcher's logic in well under a second.
"""
import json
import os
import time
import warnings

import torch

if not torch.cuda.is_available():   # before triton is imported (see test_attention_triton.py)
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from randsac_fast import ops  # noqa: E402
from randsac_fast.ops import _dispatch, attention, autotune, cases, selfcheck, skip, targets  # noqa: E402

OP = "segment_attention"


@pytest.fixture(autouse=True)
def fresh_dispatch(monkeypatch):
    """Each test starts without verdicts, choices or winners, and leaves none behind."""
    for var in (selfcheck.ENV, autotune.ENV_ENABLE, autotune.ENV_CACHE):
        monkeypatch.delenv(var, raising=False)
    _dispatch.clear_choices()
    yield
    _dispatch.clear_choices()
    selfcheck.set_mode(None)
    autotune.set_cache_file(None)


@pytest.fixture
def fast_on_cpu(monkeypatch):
    """Make the fast backends ``auto`` candidates on CPU tensors too (the CUDA preference order)."""
    monkeypatch.setattr(_dispatch, "auto_order", lambda device, fast, fallback: fast + fallback)


def _sdpa(q, k, v, seg_q, seg_k, inclusive, scale):
    return attention._TABLE["sdpa"]()(q, k, v, seg_q, seg_k, inclusive, scale)


class _WrongBackward(torch.autograd.Function):
    """Identity forward; the gradient scaled by 1.5 (a kernel with a broken backward)."""
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return 1.5 * grad


def _install(monkeypatch, table, **impls):
    """Replace backends of an op's table by implementations (None: the backend is unavailable)."""
    for name, impl in impls.items():
        if impl is None:
            def unavailable(name=name):
                raise ops.BackendUnavailable(f"{name} is not here")
            monkeypatch.setitem(table, name, unavailable)
        else:
            monkeypatch.setitem(table, name, lambda impl=impl: impl)


def _inputs(seed=0, n=20):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, n, 16, generator=gen) for _ in range(3))
    seg = cases.sorted_segments(2, n, 4, gen)
    return q, k, v, seg


def _call(q, k, v, seg, inclusive=True):
    return ops.segment_attention(q, k, v, seg, seg, inclusive=inclusive)


def test_auto_on_cpu_is_sdpa_without_checks_or_timing():
    q, k, v, seg = _inputs()
    out = _call(q, k, v, seg)
    torch.testing.assert_close(out, ops.segment_attention(q, k, v, seg, seg, inclusive=True, backend="sdpa"),
                               rtol=0, atol=0)
    assert _dispatch.choose(OP, q.device, q.dtype, (16, True, "contiguous"), (2, 2, 20, 20),
                            _dispatch.registered()[OP].order(q.device)) == "sdpa"
    assert selfcheck.verdicts() == [] and autotune.entries() == {}
    for name, table, fallback in (("patch_loss", targets._LOSS, "reference"), ("skip_memory", skip._TABLE, "reference")):
        assert _dispatch.registered()[name].order(torch.device("cpu")) == (fallback,)


def test_broken_forward_is_caught_warned_once_and_fallen_back_from(fast_on_cpu, monkeypatch):
    calls = []

    def broken(*args):
        calls.append(1)
        return _sdpa(*args) * 1.01
    _install(monkeypatch, attention._TABLE, triton=broken, cuda=None)
    q, k, v, seg = _inputs()
    with pytest.warns(RuntimeWarning, match=r"self-check of segment_attention backend 'triton' failed on "
                                            r"\(cpu, float32, 16, True, contiguous\): out error .* vs bound") as rec:
        out = _call(q, k, v, seg)
    assert len([w for w in rec if "self-check" in str(w.message)]) == 1
    assert "falling back to the next backend" in str(rec[0].message)
    torch.testing.assert_close(out, _sdpa(q, k, v, seg, seg, True, 16 ** -0.5), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # once: no second warning, no second check
        _call(q, k, v, seg)
    assert len(calls) == 1
    (verdict,) = selfcheck.verdicts()
    assert verdict.status == "mismatch" and not verdict.errors["out"]["ok"]
    assert verdict.errors["out"]["fast"] > 1e-3 > verdict.errors["out"]["bound"]


def test_broken_backward_is_caught(fast_on_cpu, monkeypatch):
    _install(monkeypatch, attention._TABLE, triton=lambda *a: _WrongBackward.apply(_sdpa(*a)), cuda=None)
    q, k, v, seg = _inputs()
    with pytest.warns(RuntimeWarning, match=r"dq error .* dk error .* dv error"):
        _call(q, k, v, seg, inclusive=False)
    (verdict,) = selfcheck.verdicts()
    assert verdict.errors["out"]["ok"] and not verdict.errors["dv"]["ok"]


def test_a_correct_fast_backend_is_verified_and_used(fast_on_cpu, monkeypatch):
    used = []

    def good(*args):
        used.append(1)
        return attention._reference(*args)
    _install(monkeypatch, attention._TABLE, triton=good, cuda=None)
    q, k, v, seg = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _call(q, k, v, seg)
    (verdict,) = selfcheck.verdicts()
    assert verdict.status == "ok" and verdict.seconds > 0
    assert len(used) == 2                         # the check, then the call itself


def test_a_strided_call_is_checked_on_a_strided_problem(fast_on_cpu, monkeypatch):
    seen = []

    def good(q, *rest):
        seen.append(q.is_contiguous())
        return attention._reference(q, *rest)
    _install(monkeypatch, attention._TABLE, triton=good, cuda=None)
    q, k, v, seg = _inputs()
    _call(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, seg)
    assert selfcheck.verdicts()[0].key[-1] == "strided" and seen[0] is False


def test_error_mode_raises(fast_on_cpu, monkeypatch):
    monkeypatch.setenv(selfcheck.ENV, "error")
    _install(monkeypatch, attention._TABLE, triton=lambda *a: _sdpa(*a) + 0.1, cuda=None)
    q, k, v, seg = _inputs()
    with pytest.raises(selfcheck.SelfCheckFailed, match="self-check of segment_attention backend 'triton' failed"):
        _call(q, k, v, seg)


def test_off_mode_skips_the_check(fast_on_cpu, monkeypatch):
    monkeypatch.setenv(selfcheck.ENV, "off")
    _install(monkeypatch, attention._TABLE, triton=lambda *a: _sdpa(*a) + 0.1, cuda=None)
    q, k, v, seg = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = _call(q, k, v, seg)
    torch.testing.assert_close(out, _sdpa(q, k, v, seg, seg, True, 0.25) + 0.1)   # trusted, unchecked
    assert selfcheck.verdicts() == []


def test_bad_mode_names_the_value(monkeypatch):
    monkeypatch.setenv(selfcheck.ENV, "loud")
    with pytest.raises(ValueError, match=r"RANDSAC_FAST_SELFCHECK='loud' is not a self-check mode; use one of "
                                         r"warn, error, off"):
        selfcheck.mode()


def test_a_declining_backend_is_skipped_silently(fast_on_cpu, monkeypatch):
    def declines(q, *rest):
        raise TypeError("backend 'triton' takes fp16 or bf16")
    _install(monkeypatch, attention._TABLE, triton=declines, cuda=None)
    q, k, v, seg = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _call(q, k, v, seg)
    assert selfcheck.verdicts()[0].status == "unsupported"


def test_patch_loss_and_skip_memory_are_checked_too(fast_on_cpu, monkeypatch):
    loss_ref, skip_ref = targets._LOSS["reference"](), skip._TABLE["reference"]()
    _install(monkeypatch, targets._LOSS, triton=lambda pred, *rest: loss_ref(_WrongBackward.apply(pred), *rest))
    _install(monkeypatch, skip._TABLE, triton=lambda hidden, weight: skip_ref(hidden, weight) * 1.001)
    gen = torch.Generator().manual_seed(3)
    images, perm = torch.randn(2, 3, 8, 8, generator=gen), torch.stack([torch.randperm(4, generator=gen)] * 2)
    pred = torch.randn(2, 4, 48, generator=gen)
    with pytest.warns(RuntimeWarning, match="patch_loss backend 'triton' failed .* dpred error"):
        loss = ops.patch_loss(pred, images, 4, perm)
    torch.testing.assert_close(loss, ops.patch_loss(pred, images, 4, perm, backend="reference"), rtol=0, atol=0)
    hidden, weight = torch.randn(3, 2, 5, 8, generator=gen), torch.randn(2, 3, generator=gen)
    with pytest.warns(RuntimeWarning, match="skip_memory backend 'triton' failed .* memory error"):
        ops.skip_memory(hidden, weight)


def test_the_check_leaves_the_global_rng_alone(fast_on_cpu, monkeypatch):
    _install(monkeypatch, attention._TABLE, triton=attention._reference, cuda=None)
    q, k, v, seg = _inputs()
    state = torch.get_rng_state()
    _call(q, k, v, seg)
    assert torch.equal(state, torch.get_rng_state())


def test_compile_fullgraph_runs_the_check_at_trace_time_not_in_the_graph(fast_on_cpu, monkeypatch):
    calls = []

    def broken(*args):
        calls.append(torch.compiler.is_compiling())
        return _sdpa(*args) * 1.01
    _install(monkeypatch, attention._TABLE, triton=broken, cuda=None)
    q, k, v, seg = _inputs()

    def f(q, k, v):
        return ops.segment_attention(q, k, v, seg, seg, inclusive=True, check_sorted=False)

    torch._dynamo.reset()
    with pytest.warns(RuntimeWarning, match="self-check of segment_attention"):
        out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    assert calls == [True]                        # once, while dynamo traced; the graph holds sdpa
    torch.testing.assert_close(out, _sdpa(q, k, v, seg, seg, True, 0.25))
    assert choose_is_a_trace_time_constant()


def choose_is_a_trace_time_constant() -> bool:
    """The flag set on ``choose`` is the one torch._dynamo.assume_constant_result sets."""
    def probe():
        pass
    return vars(torch._dynamo.assume_constant_result(probe)).keys() <= vars(_dispatch.choose).keys()


def _costly(ms, log, spent, name):
    """A correct fake backend that declares what one call costs (added to ``spent``)."""
    def impl(*args):
        log.append(name)
        spent[0] += ms
        return attention._reference(*args)
    return impl


@pytest.fixture
def declared_time(monkeypatch):
    """Timing by the fakes' declared costs: the wall clock of a shared CPU is too noisy to rank
    fakes by (``test_time_ms_measures_wall_time`` checks the real clock)."""
    spent = [0.0]

    def time_ms(step, device, warmup=autotune.WARMUP, reps=autotune.REPS):
        before = spent[0]
        step()
        return spent[0] - before
    monkeypatch.setattr(autotune, "time_ms", time_ms)
    return spent


def test_timing_picks_the_faster_of_two_and_persists(fast_on_cpu, monkeypatch, tmp_path, declared_time):
    monkeypatch.setenv(autotune.ENV_ENABLE, "all")            # time on the CPU too (asked for)
    cache = tmp_path / "autotune.json"
    monkeypatch.setenv(autotune.ENV_CACHE, str(cache))
    log = []
    _install(monkeypatch, attention._TABLE, triton=_costly(5.0, log, declared_time, "triton"),
             cuda=_costly(2.0, log, declared_time, "cuda"), sdpa=_costly(9.0, log, declared_time, "sdpa"))
    q, k, v, seg = _inputs()
    _call(q, k, v, seg)
    assert log[-1] == "cuda", (log, autotune.entries())   # the call itself ran the winner
    (entry,) = json.loads(cache.read_text())["entries"].values()
    assert entry == {"winner": "cuda", "ms": {"triton": 5.0, "cuda": 2.0, "sdpa": 9.0}}

    _dispatch.clear_choices()                     # a new process: verdicts and winners forgotten ...
    log.clear()
    _call(q, k, v, seg)                           # ... the winner comes back from the file, untimed
    assert log == ["triton", "cuda", "cuda"]      # two self-checks (per process), then the call
    assert autotune.load(cache) == 1


def test_a_winner_from_the_file_must_pass_this_process_check(fast_on_cpu, monkeypatch, tmp_path, declared_time):
    monkeypatch.setenv(autotune.ENV_ENABLE, "all")
    log = []
    _install(monkeypatch, attention._TABLE, triton=_costly(5.0, log, declared_time, "triton"),
             cuda=_costly(2.0, log, declared_time, "cuda"))
    q, k, v, seg = _inputs()
    _call(q, k, v, seg)
    autotune.save(tmp_path / "winners.json")
    _dispatch.clear_choices()
    autotune.load(tmp_path / "winners.json")
    _install(monkeypatch, attention._TABLE, cuda=lambda *a: _sdpa(*a) * 2)         # the winner broke here
    with pytest.warns(RuntimeWarning, match="backend 'cuda' failed"):
        _call(q, k, v, seg)
    assert log[-1] == "triton"


def test_time_ms_measures_wall_time():
    assert autotune.time_ms(lambda: time.sleep(0.02), torch.device("cpu"), warmup=0, reps=3) >= 20.0


def test_timing_off_takes_the_first_verified(fast_on_cpu, monkeypatch):
    monkeypatch.setenv(autotune.ENV_ENABLE, "0")
    log, spent = [], [0.0]
    _install(monkeypatch, attention._TABLE, triton=_costly(5.0, log, spent, "triton"), cuda=_costly(1.0, log, spent, "cuda"))
    q, k, v, seg = _inputs()
    _call(q, k, v, seg)
    assert log == ["triton", "triton"] and autotune.entries() == {}


def test_bad_autotune_values_name_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv(autotune.ENV_ENABLE, "yes")
    with pytest.raises(ValueError, match="RANDSAC_FAST_AUTOTUNE='yes' is not understood; use 1"):
        autotune.enabled(torch.device("cpu"))
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="is not a randsac_fast autotune cache"):
        autotune.load(bad)


def test_the_tolerance_rule():
    ref = torch.linspace(-1, 1, 50, dtype=torch.float64)
    plain = ref.float() + 1e-4
    assert selfcheck.close_by_rule(ref.float() + 2e-4, plain, ref)[0]
    assert not selfcheck.close_by_rule(ref.float() + 1e-3, plain, ref)[0]
    assert not selfcheck.close_by_rule(torch.full_like(plain, float("nan")), plain, ref)[0]


def test_the_real_triton_kernels_pass_under_the_interpreter():
    """The real check on the real kernels (CPU: interpreter, fp32): the check itself is not a fake."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    verdict = _dispatch.verify(OP, "triton", device, torch.float32, (32, False, "strided"))
    assert verdict.status == "ok", verdict.summary()


def test_set_mode_forgets_the_choices_made_under_the_old_mode(fast_on_cpu, monkeypatch):
    _install(monkeypatch, attention._TABLE, triton=lambda *a: _sdpa(*a) + 0.1, cuda=None)
    q, k, v, seg = _inputs()
    with pytest.warns(RuntimeWarning, match="self-check"):
        fallback = _call(q, k, v, seg)
    selfcheck.set_mode("off")
    torch.testing.assert_close(_call(q, k, v, seg), fallback + 0.1)
