"""Each number format's round trip stays within its theoretical error bound (derived in numerics.py)."""
import pytest
import torch

from minllama.quant import numerics
from quant_helpers import heavy_tailed_weight

W = heavy_tailed_weight(96, 200)  # 200 is no multiple of 64 or 128: exercises the padded last group
REL = 1 + 1e-5  # fp32 arithmetic slack on top of the exact bound


def test_int8_error_at_most_half_a_step():
    q = numerics.quantize_int8(W)
    err = (numerics.dequantize_int8(**q) - W).abs()
    assert (err <= q["scales"][:, None] / 2 * REL).all()
    assert q["qweight"].abs().max() == 127  # the largest weight of each row lands on the top code
    assert err.max() > 0.3 * q["scales"].min()  # and the rounding is real (the bound is not vacuous)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_error_at_most_half_a_step_per_group(group):
    q = numerics.quantize_int4(W, group)
    deq = numerics.dequantize_int4(q["qweight"], q["scales"], q["mins"], W.shape[1])
    step = q["scales"].float().repeat_interleave(group, dim=1)[:, : W.shape[1]]
    assert deq.shape == W.shape
    assert ((deq - W).abs() <= step / 2 * REL + 1e-7).all()
    # the stored grid covers each group's range: min >= m and max <= m + 15 s
    groups = numerics.pad_columns(W, group).view(W.shape[0], -1, group)
    assert (q["mins"].float() <= groups.amin(-1)).all()
    assert (q["mins"].float() + 15 * q["scales"].float() + 1e-7 >= groups.amax(-1)).all()


def test_smaller_groups_are_more_accurate():
    errs = [(numerics.dequantize_int4(**{k: v for k, v in numerics.quantize_int4(W, g).items()},
                                      in_features=W.shape[1]) - W).pow(2).mean() for g in (32, 64, 128)]
    assert errs[0] < errs[1] < errs[2]


def test_nibble_packing_round_trips():
    codes = torch.randint(0, 16, (5, 12), dtype=torch.uint8)
    packed = numerics.pack_nibbles(codes)
    assert packed.shape == (5, 6) and torch.equal(packed[:, 0], codes[:, 0] | codes[:, 1] << 4)
    assert torch.equal(numerics.unpack_nibbles(packed), codes)


def test_nf4_levels_match_qlora_table():
    # the NF4 table printed in the QLoRA paper (Dettmers et al. 2023, appendix E)
    published = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]
    torch.testing.assert_close(numerics.nf4_levels(), torch.tensor(published), atol=1e-6, rtol=0)


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_error_within_half_the_widest_gap(double_quant):
    q = numerics.quantize_nf4(W, double_quant)
    absmax_true = numerics.pad_columns(W, 64).view(W.shape[0], -1, 64).abs().amax(-1)
    absmax = numerics.nf4_absmax(q["absmax_q"], q["absmax_scale"], q["absmax_mean"]) if double_quant \
        else q["absmax"]
    deq = numerics.dequantize_nf4(q["qweight"], absmax, W.shape[1])
    half_gap = (numerics.NF4_LEVELS[1:] - numerics.NF4_LEVELS[:-1]).max() / 2
    bound = absmax_true.repeat_interleave(64, 1)[:, : W.shape[1]] * half_gap
    if double_quant:  # plus the error of the absmax itself (<= half its int8 step) times |level| <= 1
        bound = bound + q["absmax_scale"].max() / 2
        assert ((absmax - absmax_true).abs() <= q["absmax_scale"].max() / 2 * REL).all()
    assert ((deq - W).abs() <= bound * REL + 1e-7).all()


def test_double_quant_saves_bits():
    plain, dq = numerics.quantize_nf4(W), numerics.quantize_nf4(W, double_quant=True)
    assert sum(t.nbytes for t in dq.values()) < sum(t.nbytes for t in plain.values())


def test_fp8_error_within_e4m3_rounding():
    q = numerics.quantize_fp8(W)
    deq = numerics.dequantize_fp8(**q)
    assert ((deq - W).abs() <= numerics.fp8_error_bound(W, q["scales"]) * REL + 1e-9).all()
    # every stored value is a genuine e4m3 number and the row maximum is 448
    assert torch.equal(q["qweight"].float().to(torch.float8_e4m3fn).float(), q["qweight"].float())
    torch.testing.assert_close(q["qweight"].float().abs().amax(1), torch.full((W.shape[0],), 448.0))


def test_rows_quantized_a_block_at_a_time_give_the_whole_matrix_numbers(monkeypatch):
    """numerics.by_rows: a 1000 x 96 matrix in blocks of 10 rows (the embedding of a real model is quantized a few
    MB at a time) against the same matrix in one piece, for every scheme; int8 also against its formula."""
    from minllama.quant import SCHEMES

    w = heavy_tailed_weight(1000, 96)
    whole = {s: cls.quantize_weight(w, **opts) for s, (cls, opts) in SCHEMES.items()}
    whole["nf4-dq"] = SCHEMES["nf4"][0].quantize_weight(w, double_quant=True)
    monkeypatch.setattr(numerics, "ROWS_CHUNK", 960)
    for s, (cls, opts) in SCHEMES.items():
        blocks = cls.quantize_weight(w, **opts)
        assert blocks.keys() == whole[s].keys()
        for k in blocks:
            assert blocks[k].dtype == whole[s][k].dtype and torch.equal(blocks[k], whole[s][k]), (s, k)
    dq = SCHEMES["nf4"][0].quantize_weight(w, double_quant=True)
    assert all(torch.equal(dq[k], whole["nf4-dq"][k]) for k in whole["nf4-dq"])
    scales = w.abs().amax(dim=1) / 127
    assert torch.equal(whole["int8"]["scales"], scales)
    assert torch.equal(whole["int8"]["qweight"], torch.round(w / scales[:, None]).to(torch.int8))
