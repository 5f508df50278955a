"""The whole-call check (``runtime.guard``): after a warm-up call, one call as planned and one
with every site dense are timed, and the faster variant serves that shape from then on; the
calls are the user's own (each computes what its variant computes), inference only, and
``planner.inspect`` says what was measured."""
import pytest
import torch

import planner
from planner.models import TinyGPT
from runtime import guard, plan


@pytest.fixture
def checked_cpu(monkeypatch):
    """Calls on the CPU are checked, every site planned sparse, and the two timed calls take
    the times the test queues (plan first, then dense)."""
    monkeypatch.setattr(guard, "DEVICES", ("cpu",))
    monkeypatch.setattr(plan, "_choose", lambda *a, **k: plan.Decision("policy"))
    times = []

    def fake_timed(run, device):
        return run(), times.pop(0)
    monkeypatch.setattr(guard, "_timed", fake_timed)
    return times


def _model_and_input(seed=0, n=128):
    torch.manual_seed(seed)
    m = TinyGPT().eval()
    return m, torch.randint(0, 256, (1, n))


def _sparse_policy():
    return planner.policy("block_topk", block=16, topk=2)


def _close(a, b):
    return bool((a - b).abs().max() < 1e-4)


def test_dense_wins_the_check_and_serves_later_calls(checked_cpu):
    m, x = _model_and_input()
    cm = planner.compile(m, policy=_sparse_policy(), dynamic=True, cost_model="auto")
    checked_cpu += [10.0, 5.0]                      # planned 10 ms, dense 5 ms
    with torch.no_grad():
        ref = m(x)
        first = cm(x)                               # warm-up, as planned (sparse)
        assert not _close(first, ref), "the test needs a policy that changes the output"
        assert _close(cm(x), first)                 # timed, as planned
        assert _close(cm(x), ref)                   # timed, every site dense: exact
        later = [cm(x) for _ in range(2)]           # dense from now on
    assert all(_close(o, ref) for o in later)
    assert not checked_cpu                          # exactly two calls were timed
    notes = [n for n in planner.inspect(cm).notes if n.startswith("call check")]
    assert len(notes) == 1 and "10.00 ms as planned vs 5.00 ms" in notes[0]
    assert notes[0].endswith("runs every site dense")


def test_plan_kept_when_faster(checked_cpu):
    m, x = _model_and_input(1)
    cm = planner.compile(m, policy=_sparse_policy(), dynamic=True, cost_model="auto")
    checked_cpu += [4.0, 9.0]
    with torch.no_grad():
        sparse = cm(x)
        cm(x)
        cm(x)
        assert _close(cm(x), sparse)                # the plan serves later calls
    assert any(n.endswith("runs as planned") for n in planner.inspect(cm).notes)


def test_keys_are_bucketed_shapes_and_training_is_not_checked(checked_cpu):
    m, _ = _model_and_input(2)
    cm = planner.compile(m, policy=_sparse_policy(), dynamic=True, cost_model="auto")
    checked_cpu += [7.0]
    with torch.no_grad():
        cm(torch.randint(0, 256, (1, 100)))         # warm-up of the key (1, 128)
        cm(torch.randint(0, 256, (1, 120)))         # same key (120 rounds up to 128): timed
    assert not checked_cpu
    (key, st), = _backend(cm).call_check.keys.items()
    assert key == ("cpu", ((0, (1, 128)),)) and st.plan_ms == 7.0 and st.choice is None
    assert guard.shape_key((torch.zeros(1, 129, dtype=torch.long),), {}) != key
    assert guard.shape_key((torch.zeros(1, 64, dtype=torch.long),), {})[1] == ((0, (1, 64)),)
    out = cm(torch.randint(0, 256, (1, 128)))       # autograd on: not checked, not counted
    out.sum().backward()
    assert st.calls == 2 and st.dense_ms is None


def test_sites_that_ran_dense_are_not_measured(monkeypatch):
    monkeypatch.setattr(guard, "DEVICES", ("cpu",))
    monkeypatch.setattr(plan, "_choose", lambda *a, **k: plan.Decision("dense"))
    monkeypatch.setattr(guard, "_timed", lambda run, device: pytest.fail("timed a call"))
    m, x = _model_and_input(3)
    cm = planner.compile(m, policy=_sparse_policy(), dynamic=True, cost_model="auto")
    with torch.no_grad():
        for _ in range(4):
            assert _close(cm(x), m(x))


def test_no_check_for_dense_policies_or_cost_model_off():
    m, _ = _model_and_input(4)
    assert _backend(planner.compile(m, policy=_sparse_policy(), cost_model="auto")).call_check
    for kw in (dict(policy="dense", cost_model="auto"),
               dict(policy=_sparse_policy(), cost_model="off")):
        be = planner.compile(m, **kw)
        assert planner.inspect(be) is not None
        assert _backend(be).call_check is None and not _backend(be).checks


def _backend(cm):
    from planner import api
    return getattr(cm, api._ATTR)


def test_all_dense_block_overrides_the_plan_only_inside():
    class Spec:
        schedule = "auto"
    with plan.all_dense():
        assert plan.choose(Spec(), None, None) == "dense"
    Spec.schedule = "off"
    with plan.all_dense():
        assert plan.choose(Spec(), None, None) == "policy"


def test_a_call_that_raises_leaves_its_measurement_to_the_next(monkeypatch):
    g = guard.CallGuard()
    monkeypatch.setattr(guard, "DEVICES", ("cpu",))
    monkeypatch.setattr(torch, "is_grad_enabled", lambda: False)
    x = (torch.zeros(1, 8),)

    def sparse_call():
        plan.note_sparse_run()
        return "out"

    def failing():
        raise RuntimeError("out of memory")
    times = [3.0, 2.0]
    monkeypatch.setattr(guard, "_timed", lambda run, device: (run(), times.pop(0)))
    assert g(sparse_call, x, {}) == "out"                  # warm-up: a site ran sparse
    with pytest.raises(RuntimeError):
        g(failing, x, {})                                  # the plan's timed call fails
    assert g(sparse_call, x, {}) == "out"                  # timed as planned: 3 ms
    assert g(sparse_call, x, {}) == "out"                  # timed dense: 2 ms
    (st,) = g.keys.values()
    assert (st.plan_ms, st.dense_ms, st.choice) == (3.0, 2.0, "dense")


def test_generate_runs_through_the_check(checked_cpu):
    """generate() on a Hugging Face model: the prefill and the decode steps are keys of their
    own (a step's mask length rounds up, so the steps of one bucket share a key); the check's
    dense trial of a step attends over the same cache; the tokens match dense greedy decoding
    once every site is dense."""
    pytest.importorskip("transformers")
    from conftest import tiny_llama
    torch.manual_seed(0)
    m = tiny_llama("sdpa")
    ids = torch.randint(0, 128, (1, 90))
    cm = planner.compile(m, policy=planner.policy("block_topk", block=16, topk=1),
                         dynamic=True, cost_model="auto")
    checked_cpu += [5.0, 1.0] * 8                   # dense measured faster for every key
    with torch.no_grad():
        runs = [cm.generate(ids, max_new_tokens=12, do_sample=False) for _ in range(3)]
        want = m.generate(ids, max_new_tokens=12, do_sample=False)
    keys = _backend(cm).call_check.keys
    assert len(keys) >= 2, keys                     # the prefill and the decode steps
    assert all(st.choice == "dense" for st in keys.values()), keys
    assert all(r.shape == want.shape for r in runs)
    # the third prefill is its key's dense trial and every step's key was decided dense
    assert torch.equal(runs[2], want)


def test_backend_objects_check_each_graph(checked_cpu):
    """``torch.compile(model, backend=planner.backend(...))`` has no call wrapper: each captured
    graph's calls go through a check of their own, keyed without the parameters."""
    m, x = _model_and_input(5)
    be = planner.backend(policy=_sparse_policy(), cost_model="auto")
    tm = torch.compile(m, backend=be, dynamic=True)
    checked_cpu += [10.0, 5.0]
    with torch.no_grad():
        ref = m(x)
        outs = [tm(x) for _ in range(4)]
    assert not _close(outs[0], ref) and _close(outs[2], ref) and _close(outs[3], ref)
    (g,) = be.checks
    (key,) = g.keys
    assert key[1][0] == (0, (1, 128))                # the ids key it, no parameter does
    assert len(key[1]) < len(list(m.parameters()))
    assert any(n.startswith("call check") for n in planner.inspect(tm).notes)


def test_a_cuda_graph_capture_runs_the_decided_variant_untimed(monkeypatch):
    """Inside a CUDA graph capture nothing is timed or counted (a synchronisation there would
    fail): the capture records the key's decided variant, or the plan before a decision."""
    g = guard.CallGuard()
    monkeypatch.setattr(guard, "DEVICES", ("cpu",))
    monkeypatch.setattr(torch, "is_grad_enabled", lambda: False)
    monkeypatch.setattr(guard, "_timed", lambda run, device: pytest.fail("timed a capture"))
    x = (torch.zeros(1, 8),)
    seen = []

    def call():
        seen.append(plan._ALL_DENSE.get())
        return "out"
    monkeypatch.setattr(guard, "_capturing", lambda: True)
    assert g(call, x, {}) == "out" and seen == [False] and not g.keys   # undecided: the plan
    g.keys[guard.shape_key(x, {})] = guard.KeyState(calls=3, choice="dense")
    assert g(call, x, {}) == "out" and seen == [False, True]          # decided: dense
    assert g.keys[guard.shape_key(x, {})].calls == 3
