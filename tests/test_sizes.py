"""hisa.utils.sizes.next_pow2 replaces triton.next_power_of_2 on the launch paths (a constexpr
function in Triton 3.6, ~30x the host cost): it must give the same padding everywhere."""
import pytest

from hisa.utils.sizes import next_pow2

triton = pytest.importorskip("triton")


def test_next_pow2_equals_tritons():
    for n in [*range(0, 4200), 2**20 - 1, 2**20, 2**20 + 1, 2**31 - 1, 2**31, 2**40 + 1]:
        assert next_pow2(n) == triton.next_power_of_2(n), n


def test_no_launch_path_calls_tritons_host_helper():
    # A reintroduced triton.next_power_of_2 on a launch path costs every call its host time.
    import pathlib
    root = pathlib.Path(__file__).resolve().parent.parent / "hisa"
    users = [str(p.relative_to(root)) for p in root.rglob("*.py")
             if "triton.next_power_of_2(" in p.read_text()]
    assert users == [], users
