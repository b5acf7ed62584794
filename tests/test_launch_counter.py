"""The host-work counter (hisa.testing.launches): each kind of host read counts once, where it
is made; reads of host copies do not count; device work counts as aten ops."""
from __future__ import annotations

import pytest
import torch

from hisa.testing.launches import count_host_work
from hisa.utils.validate import check_windows


def _t(values):
    return torch.tensor(values, dtype=torch.int32)


@pytest.mark.parametrize("read", [
    lambda t: t.item(), lambda t: t.tolist(), lambda t: bool(t), lambda t: int(t),
    lambda t: float(t), lambda t: range(10)[t], lambda t: t.nonzero(),
    lambda t: torch.unique(t), lambda t: f"{t}", lambda t: t.cpu(),
    lambda t: t.to("cpu"), lambda t: t.reshape(1)[t.reshape(1) > 0],
    lambda t: torch.equal(t, t),
], ids=["item", "tolist", "bool", "int", "float", "index", "nonzero", "unique", "format",
        "cpu", "to_cpu", "bool_mask", "equal"])
def test_each_host_read_counts_once(read):
    t = _t(3).reshape(())
    with count_host_work() as work:
        read(t)
    assert work.num_syncs == 1, work.report()


def test_reads_of_a_host_copy_are_not_syncs():
    t = _t([1, 2, 3])
    with count_host_work() as work:
        host = t.cpu()
        host.numpy()
        host.tolist()
        int(host[0])
        (host + 1).max().item()
    assert work.num_syncs == 1 and work.syncs[0].what == "cpu", work.report()
    with count_host_work() as work:
        t.cpu().numpy()
    assert work.num_syncs == 1, work.report()


def test_device_work_is_not_a_sync_and_counts_as_aten_ops():
    t = _t([4, 1, 3])
    with count_host_work() as work:
        u = (t * 2 + 1).max()       # mul, add, max: device work, no read
        v = t[1:]                   # a view
    assert work.num_syncs == 0 and work.num_launches == 0
    assert work.by_what("aten_kernels") == {"aten::mul": 1, "aten::add": 1, "aten::max": 1}
    assert work.by_what("aten_views") == {"aten::slice": 1}
    assert u.item() == 9 and v.tolist() == [1, 3]


def test_events_name_the_package_function_that_made_them():
    with count_host_work() as work:
        check_windows(_t([0, 1]), _t([1, 2]), 4)
    assert work.num_syncs == 1
    assert work.syncs[0].site.startswith("hisa.utils.validate.check_windows:"), work.report()
    assert "syncs 1" in work.report()
