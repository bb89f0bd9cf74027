"""The numpy safetensors reader/writer against hand-built bytes and the reference library."""
import json
import struct

import ml_dtypes
import numpy as np
import pytest

from llmjax.convert.safetensors_io import SafetensorsError, read_header, write_safetensors


def _hand_built(path, entries: dict, data: bytes, metadata=None):
    """A safetensors file assembled byte by byte, independent of write_safetensors."""
    header = dict(entries, **({"__metadata__": metadata} if metadata else {}))
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def test_reader_parses_hand_built_file(tmp_path):
    a = np.array([[1.5, -2.0, 3.25], [0.0, 7.0, -0.5]], "<f4")
    b = np.array([1.0, -3.5], ml_dtypes.bfloat16)
    path = _hand_built(tmp_path / "x.safetensors",
                       {"b": {"dtype": "BF16", "shape": [2], "data_offsets": [24, 28]},
                        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}},
                       a.tobytes() + b.tobytes(), metadata={"format": "pt"})
    records, metadata = read_header(path)
    assert metadata == {"format": "pt"} and sorted(records) == ["a", "b"]
    assert records["a"].shape == (2, 3) and records["b"].dtype == "BF16"
    np.testing.assert_array_equal(records["a"].load(), a)
    got = records["b"].load()
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.astype(np.float32), b.astype(np.float32))


def test_writer_round_trips_every_dtype_and_odd_shapes(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "bf16": rng.standard_normal((2, 3, 4)).astype(ml_dtypes.bfloat16),
        "f16": rng.standard_normal(7).astype(np.float16),
        "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "bool": np.array([True, False, True]),
        "scalar": np.array(3.0, np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "transposed": rng.standard_normal((4, 6)).astype(np.float32).T,  # not C-contiguous
    }
    path = tmp_path / "x.safetensors"
    write_safetensors(path, tensors, {"format": "pt"})
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert n % 8 == 0  # data starts 8-byte aligned
    records, metadata = read_header(path)
    assert metadata == {"format": "pt"} and set(records) == set(tensors)
    for name, want in tensors.items():
        got = records[name].load()
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert got.tobytes() == np.ascontiguousarray(want).tobytes(), name


def test_matches_the_safetensors_library(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(1)
    tensors = {"w": rng.standard_normal((4, 3)).astype(np.float32),
               "h": rng.standard_normal(5).astype(np.float16),
               "s": np.array(2.5, np.float32)}
    write_safetensors(tmp_path / "ours.safetensors", tensors, {"format": "pt"})
    theirs = st.load_file(tmp_path / "ours.safetensors")
    st.save_file(tensors, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    records, metadata = read_header(tmp_path / "theirs.safetensors")
    assert metadata == {"format": "pt"}
    for name, want in tensors.items():
        for got in (theirs[name], records[name].load()):
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("case, match", [
    ("short", "too short"),
    ("header_too_long", "header length"),
    ("bad_json", "not valid JSON"),
    ("past_end", r"byte range \[0, 400\)"),
    ("wrong_size", r"shape \[2, 3\], F32"),
])
def test_corrupt_files_are_rejected(tmp_path, case, match):
    path = tmp_path / "x.safetensors"
    if case == "short":
        path.write_bytes(b"\x01\x02")
    elif case == "header_too_long":
        path.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    elif case == "bad_json":
        path.write_bytes(struct.pack("<Q", 5) + b"{oops")
    else:
        end = 400 if case == "past_end" else 20
        _hand_built(path, {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, end]}}, bytes(24))
    with pytest.raises(SafetensorsError, match=match):
        read_header(path)


def test_unknown_dtype_fails_on_load_with_the_tensor_name(tmp_path):
    path = _hand_built(tmp_path / "x.safetensors",
                       {"q.weight": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}, bytes(4))
    records, _ = read_header(path)  # the header alone is fine
    with pytest.raises(SafetensorsError, match="'q.weight'.*dtype F8_E4M3"):
        records["q.weight"].load()
