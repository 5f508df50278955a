"""Schedules measured on a card (``runtime.kernels.tuned``): the fastest checked row of a sweep
section becomes the launchers' default on that card and shape; failed rows, other shapes and
machines without the file keep the built-in defaults."""
import json

import pytest

from runtime.kernels import indexer as ik
from runtime.kernels import sparse_mla as sm
from runtime.kernels import tuned


def _sweep(tmp_path, rows):
    (tmp_path / "dsa_sweep_h100.json").write_text(json.dumps({"meta": {}, "rows": rows}))
    tuned.reload()
    return str(tmp_path)


MLA = dict(section="mla_prefill", H=128, dk=576, dv=512, splits=0, rel_err_ref=5e-3,
           rel_err_first=1e-3)


def mla_row(ms, **kw):
    sch = dict(block_h=kw.pop("block_h", 32), block_n=32, num_warps=8, num_stages=1, splits=0)
    return dict(MLA, ms=ms, schedule=sch, **kw)


@pytest.fixture
def on_h100(monkeypatch, tmp_path):
    monkeypatch.setattr(tuned, "card_of", lambda device: "h100")
    monkeypatch.setattr(sm, "sm_count", lambda device: 132)
    yield tmp_path
    tuned.reload()


def test_fastest_passing_row_wins(on_h100, monkeypatch):
    rows = [mla_row(30.0, block_h=32), mla_row(10.0, block_h=64),
            mla_row(5.0, block_h=16, rel_err_ref=0.5),           # fast but wrong
            mla_row(4.0, block_h=128, error="OutOfResources"),    # did not run
            dict(mla_row(3.0, block_h=16), dv=256)]               # another shape
    monkeypatch.setattr(tuned, "RESULTS", _sweep(on_h100, rows))
    assert tuned.best("mla_prefill", "cuda", dk=576, dv=512, H=128)["block_h"] == 64
    sch = sm.default_schedule(4096, 128, 576, 512, "cuda")
    assert (sch.block_h, sch.num_warps) == (64, 8)
    # decode-shaped calls (fewer rows than SMs) read the decode section: none measured here,
    # so the built-in Hopper default
    assert sm.default_schedule(8, 128, 576, 512, "cuda") == sm.MLASchedule(num_stages=2)
    # other widths: the built-in defaults
    assert sm.default_schedule(4096, 128, 192, 128, "cuda") == sm.MLASchedule(
        block_h=64, block_n=64, num_warps=8, num_stages=2)
    assert sm.default_schedule(4096, 16, 192, 128, "cpu") == sm.MLASchedule(block_h=16)


def test_decode_section_ignores_fixed_part_counts(on_h100, monkeypatch):
    dec = [dict(mla_row(0.05, block_h=16), section="mla_decode", splits=8),
           dict(mla_row(0.09, block_h=64), section="mla_decode")]     # parts left automatic
    monkeypatch.setattr(tuned, "RESULTS", _sweep(on_h100, dec))
    sch = sm.default_schedule(8, 128, 576, 512, "cuda")
    assert sch.block_h == 64 and sch.splits == 0


def test_indexer_rows_need_agreement_and_the_head_shape(on_h100, monkeypatch):
    base = dict(section="indexer_prefill", H_I=64, d_I=128)
    good = ik.IndexerSchedule(block_m=16, block_n=64, stream_queries=True, head_group=4,
                              num_stages=1)
    rows = [dict(base, ms=9.0, agreement=1.0, schedule=vars(good).copy()),
            dict(base, ms=1.0, agreement=0.5, schedule=vars(ik.IndexerSchedule()).copy())]
    monkeypatch.setattr(tuned, "RESULTS", _sweep(on_h100, rows))
    assert ik.default_schedule(64, 128, "cuda") == good
    assert ik.default_schedule(4, 64, "cuda") == ik.IndexerSchedule(
        block_m=64, block_n=32, num_warps=4, num_stages=2)


def test_no_file_or_no_gpu_keeps_the_defaults(tmp_path, monkeypatch):
    monkeypatch.setattr(tuned, "RESULTS", _sweep(tmp_path, []))
    assert tuned.best("mla_prefill", "cpu") is None
    (tmp_path / "dsa_sweep_h100.json").unlink()
    tuned.reload()
    monkeypatch.setattr(tuned, "card_of", lambda device: "h100")
    assert tuned.best("mla_prefill", "cuda") is None
    tuned.reload()


def test_the_committed_sweep_gives_valid_schedules(monkeypatch):
    """Every committed ``dsa_sweep_<card>.json`` yields schedules the launchers accept; the H200
    sweep's winners are the built-in Hopper defaults (they were copied from it)."""
    import glob
    import os
    files = glob.glob(os.path.join(tuned.RESULTS, "dsa_sweep_h*.json"))
    assert files, "no committed sweep"
    for card in sorted({os.path.basename(f)[len("dsa_sweep_"):][:4] for f in files}):
        monkeypatch.setattr(tuned, "card_of", lambda device, c=card: c)
        tuned.reload()
        pre = tuned.best("mla_prefill", "cuda", dk=576, dv=512, H=128)
        dec = tuned.best("mla_decode", "cuda", dk=576, dv=512, H=128, splits=0)
        idx = tuned.best("indexer_prefill", "cuda", H_I=64, d_I=128)
        got = sm.MLASchedule(**pre), sm.MLASchedule(**dec), ik.IndexerSchedule(**idx)
        if card == "h200":
            assert got == (sm.MLASchedule(block_h=64, block_n=64, num_warps=8, num_stages=2),
                           sm.MLASchedule(block_h=32, num_stages=2),
                           ik.IndexerSchedule(block_m=64, block_n=64, num_warps=4,
                                              num_stages=1, stream_queries=True))
    tuned.reload()
