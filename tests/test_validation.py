"""Every bad input raises ValueError/TypeError naming the argument (contract section 6)."""
import pytest
import torch

import hisa
from hisa.testing.inputs import make_indexer_inputs


@pytest.fixture
def inp():
    return make_indexer_inputs([20, 12], heads=2, head_dim=16, dtype=torch.float8_e4m3fn)


OPS = [
    lambda *a, **kw: hisa.dsa_index(*a, topk=kw.pop("topk", 4), backend="torch", **kw),
    lambda *a, **kw: hisa.hisa_index(*a, topk=kw.pop("topk", 4), block_size=8, block_topk=2,
                                     backend="torch", **kw),
]


@pytest.mark.parametrize("op", OPS, ids=["dsa", "hisa"])
@pytest.mark.parametrize("mutate,exc,pattern", [
    (lambda a: a.update(q=a["q"][0]), ValueError, r"q: expected a 3-D tensor"),
    (lambda a: a.update(q=a["q"].to(torch.int8)), TypeError, r"q: expected dtype"),
    (lambda a: a.update(k=a["k"][:, :8]), ValueError, r"k: expected shape \[\*, 16\]"),
    (lambda a: a.update(weights=a["weights"].double()), TypeError, r"weights: expected dtype float32"),
    (lambda a: a.update(weights=a["weights"][:, :1]), ValueError, r"weights: expected shape \[32, 2\]"),
    (lambda a: a.update(ks=a["ks"].long()), TypeError, r"ks: expected dtype int32"),
    (lambda a: a.update(ke=a["ke"][:5]), ValueError, r"ke: expected shape \[32\]"),
    (lambda a: a.update(k_scale=None), ValueError, r"k_scale: expected a float32 \[S\]"),
    (lambda a: a.update(k_scale=a["k_scale"][:3]), ValueError, r"k_scale: expected shape \[32\]"),
    (lambda a: a.update(ks=a["ke"] + 1), ValueError, r"ks/ke: expected ks\[t\] <= ke\[t\]"),
    (lambda a: a.update(ke=a["ke"] + 1, ks=a["ks"]), ValueError, r"ke: expected values <= the number of keys in k \(32\), got max\(ke\) = 33"),
    (lambda a: a.update(ks=a["ks"] - 1), ValueError, r"ks: expected values >= 0"),
    (lambda a: a.update(topk=0), ValueError, r"topk: expected an int >= 1"),
    (lambda a: a.update(out=torch.zeros(32, 4)), TypeError, r"out: expected dtype int32"),
    (lambda a: a.update(out=torch.zeros(32, 5, dtype=torch.int32)), ValueError, r"out: expected shape \[32, 4\]"),
    (lambda a: a.update(backend="cuda"), ValueError, r"backend: expected one of"),
])
def test_bad_inputs(op, inp, mutate, exc, pattern):
    args = dict(q=inp.q, k=inp.k, weights=inp.weights, ks=inp.ks, ke=inp.ke, k_scale=inp.k_scale)
    mutate(args)
    kw = {k: args.pop(k) for k in list(args) if k not in ("q", "k", "weights", "ks", "ke")}
    with pytest.raises(exc, match=pattern):
        if "backend" in kw:
            b = kw.pop("backend")
            fn = hisa.dsa_index if op is OPS[0] else hisa.hisa_index
            fn(*args.values(), backend=b, **kw)
        else:
            op(*args.values(), **kw)


@pytest.mark.parametrize("kw,pattern", [
    (dict(topk=64, block_size=8, block_topk=4), r"block_topk \* block_size must be >= topk"),
    (dict(topk=4, block_size=0, block_topk=4), r"block_size: expected an int >= 1"),
    (dict(topk=4, block_size=8, block_topk=1), r"block_topk: expected an int >= 2"),
    (dict(topk=4.0, block_size=8, block_topk=4), r"topk: expected an int"),
])
def test_bad_hisa_parameters(inp, kw, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        hisa.hisa_index(*inp.args(), k_scale=inp.k_scale, backend="torch", **kw)


def test_not_a_tensor(inp):
    with pytest.raises(TypeError, match="q: expected a torch.Tensor, got list"):
        hisa.dsa_index([1, 2], inp.k, inp.weights, inp.ks, inp.ke, k_scale=inp.k_scale)


def test_triton_backend_on_cpu_is_refused(inp, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend: 'triton' (needs CUDA|requested)"):
        hisa.dsa_index(*inp.args(), k_scale=inp.k_scale, topk=4, backend="triton")


def test_auto_falls_back_to_the_reference_for_shapes_the_kernels_do_not_support(monkeypatch):
    # Pretend to be on CUDA: "auto" consults the kernels' shape check and, for a head count
    # the kernels reject (8: not in [16, 128]), picks the torch reference instead.
    from hisa.utils import backend as be
    from hisa.ops.dsa.prefill import check_kernel_shapes
    monkeypatch.setattr(be, "triton_installed", lambda: True)
    cuda = torch.device("cuda")
    q8, k = torch.zeros(4, 8, 128), torch.zeros(4, 128)
    assert be.resolve_backend("auto", cuda, lambda: check_kernel_shapes(q8, k)) == "torch"
    q64 = torch.zeros(4, 64, 128)
    assert be.resolve_backend("auto", cuda, lambda: check_kernel_shapes(q64, k)) == "triton"
    with pytest.raises(ValueError, match="q: expected a power-of-two head count"):
        check_kernel_shapes(q8, k)  # what an explicit backend="triton" call reports
