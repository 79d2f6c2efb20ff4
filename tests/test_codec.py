"""Tests for safepoint.codec and safepoint.tensors: lossless, pickle-free state encoding.

Every round trip goes the way a checkpoint does: ``Encoder.encode`` -> ``json.dumps`` (with
``allow_nan=False``, as the writer uses) -> ``json.loads`` -> ``decode``, with the tensors through
a real safetensors file written by ``write_tensors`` and read by ``read_tensors``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open

from safepoint.codec import Encoder, decode, tensor_refs
from safepoint.tensors import write_tensors, read_tensors


def round_trip(obj: Any, tmp_path: Path, entry: str = "x") -> Any:
    enc = Encoder(entry)
    encoded = enc.encode(obj)
    text = json.dumps(encoded, allow_nan=False)  # must be strict JSON: no NaN/Infinity literals
    tensors: dict[str, torch.Tensor] = {}
    if enc.tensors:
        path = tmp_path / f"{entry}.safetensors"
        if path.exists():
            path.unlink()
        write_tensors(path, enc.tensors)
        tensors = read_tensors(path)
        assert set(tensors) == set(enc.tensors)
    assert sorted(tensor_refs(json.loads(text))) == sorted(enc.tensors)
    return decode(json.loads(text), tensors)


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same(a: Any, b: Any, where: str = "obj") -> None:
    """Deep equality that also checks types (tuple vs list, numpy dtype, tensor bits)."""
    assert type(a) is type(b), f"{where}: {type(a)} vs {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert raw_bytes(a) == raw_bytes(b), f"{where}: tensor bytes differ"
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
        assert a.tobytes() == b.tobytes(), f"{where}: array bytes differ"
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype, f"{where}: {a.dtype} vs {b.dtype}"
        assert a.tobytes() == b.tobytes(), f"{where}: scalar bytes differ"
    elif isinstance(a, float):
        if math.isnan(a):
            assert math.isnan(b), f"{where}: {a} vs {b}"
        else:
            assert a == b and math.copysign(1, a) == math.copysign(1, b), f"{where}: {a!r} vs {b!r}"
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), f"{where}: keys {list(a)} vs {list(b)}"
        for k in a:
            assert type(k) is type(next(kk for kk in b if kk == k)), f"{where}: key type of {k!r}"
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


# --------------------------------------------------------------------------- plain structures

@pytest.mark.parametrize("obj", [
    {"a": 1, "b": "s", "c": None, "d": True, "e": False, "f": 1.25, "g": -0.0, "h": 2 ** 80},
    {0: "zero", 1: "one", -5: "neg"},
    {"mixed": {1: "int", "1": "str"}},
    {None: 1, True: 2, 2.5: 3, b"k": 4},
    {(1, 2): "tuple key", (1, (2, 3)): "nested tuple key"},
    (1, "a", None),
    {"t": (1, (2, (3,))), "empty_tuple": (), "empty_list": [], "empty_dict": {}},
    [[1, [2, [3, [4]]]], [], [[]]],
    [(1, 2), [3, (4, [5])]],
    {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "list": [float("nan"), 1.0]},
    {"bytes": b"\x00\xff\x10binary", "bytearray_as_bytes": b"", "in_list": [b"a", b"b"]},
    {"unicode": "h\u00e9llo \u2603 \U0001f600", "quote": 'he said "hi"\n\\'},
    {"size": torch.Size([2, 3])},
])
def test_plain_round_trip(obj: Any, tmp_path: Path) -> None:
    out = round_trip(obj, tmp_path)
    if isinstance(obj, dict) and "size" in obj:
        # torch.Size is stored as a tuple; it still compares equal to the Size
        assert out["size"] == obj["size"] and isinstance(out["size"], tuple)
        return
    assert_same(obj, out)


def test_optimizer_like_state_round_trips(tmp_path: Path) -> None:
    """int-keyed state, tuple betas, tensor steps: the shape of a real AdamW state_dict."""
    obj = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 3)},
                  1: {"step": torch.tensor(3.0), "exp_avg": torch.randn(3)}},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "foreach": None,
                          "params": [0, 1]}],
    }
    assert_same(obj, round_trip(obj, tmp_path, "optimizer"))


def test_bytearray_decodes_as_bytes(tmp_path: Path) -> None:
    assert round_trip({"b": bytearray(b"xyz")}, tmp_path) == {"b": b"xyz"}


def test_non_finite_floats_never_reach_json_as_literals() -> None:
    encoded = Encoder("x").encode({"a": float("nan"), "b": [float("inf")], "c": (float("-inf"),)})
    text = json.dumps(encoded, allow_nan=False)  # raises ValueError if a NaN/inf slipped through
    assert "NaN" not in text and "Infinity" not in text


# --------------------------------------------------------------------------- reserved tag keys

@pytest.mark.parametrize("tag", ["__tensor__", "__tuple__", "__dict__", "__float__", "__bytes__",
                                 "__numpy__", "__dtype__", "__device__"])
def test_user_dicts_with_reserved_keys_are_not_mistaken_for_tags(tag: str, tmp_path: Path) -> None:
    payloads = {
        "__tensor__": "model.weight", "__tuple__": [1, 2], "__dict__": [["a", 1]], "__float__": "nan",
        "__bytes__": "AAAA", "__numpy__": {"dtype": "<f4", "shape": [], "scalar": True, "data": "AAAAAA=="},
        "__dtype__": "float32", "__device__": "cpu",
    }
    obj = {"single": {tag: payloads[tag]}, "with_others": {tag: payloads[tag], "other": 1},
           "nested": [{tag: {tag: payloads[tag]}}]}
    assert_same(obj, round_trip(obj, tmp_path))


def test_reserved_key_holding_a_tensor(tmp_path: Path) -> None:
    t = torch.arange(3.0)
    obj = {"__tensor__": t, "__tuple__": (t, 1)}
    assert_same(obj, round_trip(obj, tmp_path))


# --------------------------------------------------------------------------- numpy and torch types

@pytest.mark.parametrize("value", [
    np.arange(6, dtype=np.float32).reshape(2, 3),
    np.arange(6, dtype=np.int64).reshape(3, 2)[::2],          # non-contiguous
    np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)),
    np.array([1, 2, 3], dtype=">i4"),                         # big-endian stays big-endian
    np.array([True, False]),
    np.array([], dtype=np.float64),
    np.array(7, dtype=np.uint8),                              # 0-d array, not a scalar
    np.array([np.nan, np.inf, -0.0], dtype=np.float16),
    np.array(["ab", "c"]),
    np.random.RandomState(0).get_state()[1],                  # the uint32 MT state
])
def test_numpy_arrays_round_trip_with_dtype(value: np.ndarray, tmp_path: Path) -> None:
    out = round_trip({"a": value, "in_list": [value]}, tmp_path)
    assert_same({"a": value, "in_list": [value]}, out)


@pytest.mark.parametrize("value", [
    np.float32(1.5), np.float64(2.25), np.float64("nan"), np.float16(-0.0), np.int64(-3), np.int8(5),
    np.uint64(2 ** 64 - 1), np.bool_(True), np.complex64(1 + 2j), np.datetime64("2020-01-02"),
])
def test_numpy_scalars_round_trip_with_dtype(value: np.generic, tmp_path: Path) -> None:
    out = round_trip({"v": value, "t": (value,)}, tmp_path)
    assert_same({"v": value, "t": (value,)}, out)


def test_numpy_rng_state_round_trips(tmp_path: Path) -> None:
    rs = np.random.RandomState(123)
    rs.standard_normal()  # leaves a cached gaussian in the state
    state = rs.get_state()
    out = round_trip({"numpy": state}, tmp_path)["numpy"]
    fresh = np.random.RandomState(0)
    fresh.set_state(out)
    assert fresh.standard_normal(5).tolist() == rs.standard_normal(5).tolist()


@pytest.mark.parametrize("value", [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.bool,
                                   torch.complex64, torch.float8_e4m3fn])
def test_torch_dtypes_round_trip(value: torch.dtype, tmp_path: Path) -> None:
    out = round_trip({"dtype": value, "list": [value]}, tmp_path)
    assert out["dtype"] is value and out["list"][0] is value


@pytest.mark.parametrize("value", [torch.device("cpu"), torch.device("cuda:1"), torch.device("meta"),
                                   torch.device("cuda")])
def test_torch_devices_round_trip(value: torch.device, tmp_path: Path) -> None:
    out = round_trip({"device": value}, tmp_path)["device"]
    assert isinstance(out, torch.device) and out == value


# --------------------------------------------------------------------------- tensor naming

def test_dotted_key_and_nested_key_tensors_both_survive(tmp_path: Path) -> None:
    t1, t2 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0, 5.0])
    obj = {"a.b": t1, "a": {"b": t2}}
    enc = Encoder("x")
    enc.encode(obj)
    assert len(enc.tensors) == 2  # two distinct names, neither overwritten
    out = round_trip(obj, tmp_path)
    assert_same(obj, out)


def test_int_key_and_string_key_with_same_text_both_survive(tmp_path: Path) -> None:
    obj = {0: torch.zeros(2), "0": torch.ones(3), "x": [torch.full((1,), 7.0)], "x.0": torch.full((2,), 8.0)}
    assert_same(obj, round_trip(obj, tmp_path))


def test_names_that_look_like_collision_suffixes(tmp_path: Path) -> None:
    obj = {"a.b": torch.tensor([1]), "a": {"b": torch.tensor([2])}, "a.b#1": torch.tensor([3]),
           "a.b#1#1": torch.tensor([4])}
    assert_same(obj, round_trip(obj, tmp_path))


def test_bare_tensor_and_tensor_in_tuple(tmp_path: Path) -> None:
    assert_same(torch.arange(4), round_trip(torch.arange(4), tmp_path))
    obj = (torch.arange(2), [torch.arange(3)])
    assert_same(obj, round_trip(obj, tmp_path))


def test_same_tensor_twice_is_stored_for_both_references(tmp_path: Path) -> None:
    t = torch.randn(3)
    out = round_trip({"w": t, "tied": t}, tmp_path)
    assert torch.equal(out["w"], t) and torch.equal(out["tied"], t)


def test_safetensors_metadata_key_is_not_a_tensor_name(tmp_path: Path) -> None:
    """safetensors reserves '__metadata__' in its header; a state key of that name must still work."""
    obj = {"__metadata__": torch.ones(2), "w": torch.zeros(1), "n": {"__metadata__": torch.arange(3)}}
    assert_same(obj, round_trip(obj, tmp_path))


def test_odd_characters_in_tensor_names(tmp_path: Path) -> None:
    obj = {'q"uote': torch.ones(1), "new\nline": torch.ones(2), "sn\u2603w": torch.ones(3), "": torch.ones(4),
           "sp ace": {"back\\slash": torch.ones(5)}}
    assert_same(obj, round_trip(obj, tmp_path))


# --------------------------------------------------------------------------- tensor files

def _tensor_cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    nan_payload = torch.tensor([float("nan"), -0.0, float("inf"), float("-inf"), 1e-45], dtype=torch.float32)
    return {
        "f32": base,
        "f64": base.double(),
        "bf16": base.bfloat16(),
        "f16": base.half(),
        "i8": torch.randint(-128, 127, (5, 3), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (7,), generator=g, dtype=torch.uint8),
        "i16": torch.randint(-1000, 1000, (3,), generator=g, dtype=torch.int16),
        "i32": torch.randint(-2 ** 31, 2 ** 31 - 1, (3,), generator=g, dtype=torch.int32),
        "i64": torch.tensor([-(2 ** 63), 2 ** 63 - 1, 0]),
        "bool": torch.tensor([[True, False, True], [False, False, True]]),
        "f8": base.to(torch.float8_e4m3fn),
        "f8b": base.to(torch.float8_e5m2),
        "scalar": torch.tensor(3.5),
        "scalar_int": torch.tensor(7, dtype=torch.int64),
        "empty": torch.empty(0, 3),
        "empty_1d": torch.empty(0, dtype=torch.bfloat16),
        "transposed": base.t(),
        "strided": base[:, ::2],
        "offset_view": base.reshape(-1)[5:11],
        "expanded": torch.arange(3.0).expand(4, 3),
        "special_floats": nan_payload,
        "requires_grad": torch.nn.Parameter(torch.randn(2, 2, generator=g)),
        "big_dims": torch.zeros(1, 1, 1, 1, 2),
    }


def test_write_read_tensors_bit_exact(tmp_path: Path) -> None:
    cases = _tensor_cases()
    assert not cases["transposed"].is_contiguous() and not cases["strided"].is_contiguous()
    path = tmp_path / "t.safetensors"
    record = write_tensors(path, cases)
    assert record.size == path.stat().st_size
    back = read_tensors(path)
    assert set(back) == set(cases)
    for name, t in cases.items():
        got = back[name]
        assert got.dtype == t.dtype, name
        assert tuple(got.shape) == tuple(t.shape), name
        assert raw_bytes(got) == raw_bytes(t), name


def test_tensor_file_is_plain_safetensors(tmp_path: Path) -> None:
    """Any safetensors reader sees the same tensors (header layout, alignment, offsets)."""
    cases = _tensor_cases()
    path = tmp_path / "t.safetensors"
    write_tensors(path, cases)
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert (8 + header_len) % 8 == 0
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(cases)
        for name in f.keys():
            assert raw_bytes(f.get_tensor(name)) == raw_bytes(cases[name]), name


def test_record_hash_matches_file(tmp_path: Path) -> None:
    from conftest import reference_hash

    path = tmp_path / "t.safetensors"
    record = write_tensors(path, {"a": torch.randn(100, 100), "b": torch.arange(10)})
    assert record.hash.startswith("blake3:")
    assert record.hash == reference_hash(path.read_bytes(), record.hash)
    assert record.size == path.stat().st_size


def test_write_tensors_refuses_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        write_tensors(path, {"a": torch.ones(1)})
    assert path.read_bytes() == b"old"


def test_unsupported_tensor_dtype_is_a_clear_type_error(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"'z'.*complex64"):
        write_tensors(tmp_path / "c.safetensors", {"ok": torch.ones(1), "z": torch.ones(2, dtype=torch.complex64)})


def test_all_dtypes_through_the_codec(tmp_path: Path) -> None:
    obj = {"layer": _tensor_cases(), "list": [torch.tensor(1.0), (torch.zeros(0),)]}
    out = round_trip(obj, tmp_path)
    for name, t in obj["layer"].items():
        got = out["layer"][name]
        assert got.dtype == t.dtype and tuple(got.shape) == tuple(t.shape), name
        assert raw_bytes(got) == raw_bytes(t), name
    assert isinstance(out["list"][1], tuple) and out["list"][1][0].shape == (0,)


# --------------------------------------------------------------------------- refused values

class Custom:
    pass


@pytest.mark.parametrize("obj, path", [
    ({"y": [object()]}, "state['x']['y'][0]"),
    ({"y": {"z": (1, lambda: 0)}}, "state['x']['y']['z'][1]"),
    ({"y": {1, 2}}, "state['x']['y']"),
    ({"y": 1 + 2j}, "state['x']['y']"),
    ({"y": [0, 1, Custom()]}, "state['x']['y'][2]"),
    ({3: {"k": Ellipsis}}, "state['x'][3]['k']"),
    ({"y": np.array([object(), 1], dtype=object)}, "state['x']['y']"),
    ({"y": [np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")])]}, "state['x']['y'][0]"),
])
def test_unsupported_values_raise_type_error_naming_the_path(obj: Any, path: str) -> None:
    with pytest.raises(TypeError) as info:
        Encoder("x").encode(obj)
    assert path in str(info.value)
    assert "pickle" in str(info.value)


def test_unsupported_type_named_in_error() -> None:
    with pytest.raises(TypeError, match=r"Custom"):
        Encoder("cfg").encode({"obj": Custom()})


def test_error_names_the_entry() -> None:
    with pytest.raises(TypeError, match=r"state\['my_entry'\]\['fn'\]"):
        Encoder("my_entry").encode({"fn": print})
