"""TensorBundle checkpoints: TF-written fixtures read bit-exactly, TF's bytes reproduced on write,
clear one-line errors on damaged files, and write -> read round trips.

Expected values come from TensorFlow (tests/fixtures/{tiny,full,dtypes}, written by
tools/make_fixtures.py and tools/make_dtype_fixture.py), never from npgpt2.
"""
import hashlib
import json
import os
import shutil
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npgpt2.checkpoint import (
    latest_checkpoint,
    list_variables,
    read_checkpoint,
    write_checkpoint,
    write_checkpoint_state,
)
from npgpt2.checkpoint.crc32c import masked_crc32c
from npgpt2.errors import Npgpt2Error

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TINY = os.path.join(FIXTURES, "tiny")
FULL = os.path.join(FIXTURES, "full")
DTYPES = os.path.join(FIXTURES, "dtypes")
DATA = ".data-00000-of-00001"


def _need(*paths):
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        pytest.skip(f"fixture not present yet: {missing[0]} (made by tools/make_fixtures.py)")


def _bits_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.fixture(scope="module")
def tiny_values():
    _need(os.path.join(FIXTURES, "tiny_values.npz"), os.path.join(TINY, "model.ckpt.index"))
    with np.load(os.path.join(FIXTURES, "tiny_values.npz")) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def dtype_values():
    with np.load(os.path.join(DTYPES, "values.npz")) as z:
        return {k: z[k] for k in z.files}


def _copy_tiny(tmp_path):
    dst = tmp_path / "tiny"
    shutil.copytree(TINY, dst)
    return str(dst / "model.ckpt")


def _layout(values):
    """{name: (offset, nbytes)} in the data file: tf.train.Saver stores tensors back to back in
    sorted-name order (what TF wrote for the fixtures), so this needs no index parsing."""
    out, offset = {}, 0
    for name in sorted(values, key=lambda s: s.encode("utf-8")):
        out[name] = (offset, values[name].nbytes)
        offset += values[name].nbytes
    return out


def _varint(buf, pos):
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def _one_line_error(excinfo, *parts):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for part in parts:
        assert part in msg, (part, msg)
    return msg


# ---- reading TF-written checkpoints ----------------------------------------------------------

@pytest.mark.parametrize("mmap", [False, True])
def test_tiny_fixture_bit_equal_to_values_fed_to_tensorflow(tiny_values, mmap):
    prefix = latest_checkpoint(TINY)
    assert prefix == os.path.join(TINY, "model.ckpt")
    got = read_checkpoint(prefix, mmap=mmap)
    assert sorted(got) == sorted(tiny_values)
    for name, want in tiny_values.items():
        assert _bits_equal(got[name], want), name
        assert got[name].flags.writeable == (not mmap)


@pytest.mark.parametrize("mmap", [False, True])
def test_full_fixture_matches_sha256(mmap):
    _need(os.path.join(FIXTURES, "full_sha256.json"), os.path.join(FULL, "model.ckpt.index"))
    with open(os.path.join(FIXTURES, "full_sha256.json")) as f:
        expected = json.load(f)
    got = read_checkpoint(latest_checkpoint(FULL), mmap=mmap)
    assert sorted(got) == sorted(expected)
    for name, digest in expected.items():
        arr = got[name]
        assert arr.dtype == np.float32
        assert hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest() == digest, name
    assert got["model/wte"].shape == (50257, 8)


@pytest.mark.parametrize("mmap", [False, True])
def test_dtypes_fixture_bit_equal(dtype_values, mmap):
    got = read_checkpoint(os.path.join(DTYPES, "model.ckpt"), mmap=mmap)
    assert sorted(got) == sorted(dtype_values)
    for name, want in dtype_values.items():
        assert _bits_equal(got[name], want), name
    kinds = {got[n].dtype for n in got}
    assert kinds == {np.dtype(t) for t in ("f4", "f2", "f8", "i4", "i8", "?")}
    assert got["i32/scalar"].shape == () and got["empty/i64"].shape == (3, 0, 2)


def test_list_variables_reads_only_the_index(dtype_values, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(DTYPES, dst)
    os.remove(dst / ("model.ckpt" + DATA))
    listed = list_variables(str(dst / "model.ckpt"))
    assert listed == {k: (v.shape, v.dtype) for k, v in dtype_values.items()}


def test_mmap_arrays_are_readonly_views_of_the_file(tiny_values):
    got = read_checkpoint(os.path.join(TINY, "model.ckpt"), mmap=True)
    wte = got["model/wte"]
    assert type(wte) is np.ndarray and not wte.flags.owndata and not wte.flags.writeable
    base = wte
    while not isinstance(base, np.memmap) and base.base is not None:
        base = base.base
    assert isinstance(base, np.memmap) and base.filename == os.path.abspath(
        os.path.join(TINY, "model.ckpt" + DATA))
    with pytest.raises(ValueError):
        wte[0, 0] = 1.0


def test_unsupported_dtype_fixture():
    with pytest.raises(Npgpt2Error) as e:
        read_checkpoint(os.path.join(DTYPES, "strings.ckpt"))
    _one_line_error(e, os.path.join(DTYPES, "strings.ckpt.index"), "'text'", "DT_STRING",
                    "unsupported dtype")


def test_partitioned_variable_fixture():
    with pytest.raises(Npgpt2Error) as e:
        read_checkpoint(os.path.join(DTYPES, "partitioned.ckpt"))
    _one_line_error(e, "partitioned.ckpt.index", "'part/w'", "partitioned variable")


# ---- writing: the bytes TensorFlow writes ----------------------------------------------------

def _same_file(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def test_write_reproduces_tensorflows_tiny_checkpoint_bytes(tiny_values, tmp_path):
    prefix = str(tmp_path / "model.ckpt")
    write_checkpoint(prefix, tiny_values)
    assert _same_file(prefix + ".index", os.path.join(TINY, "model.ckpt.index"))
    assert _same_file(prefix + DATA, os.path.join(TINY, "model.ckpt" + DATA))
    assert sorted(os.listdir(tmp_path)) == ["model.ckpt" + DATA, "model.ckpt.index"]


def test_write_reproduces_tensorflows_full_checkpoint_bytes(tmp_path):
    _need(os.path.join(FULL, "model.ckpt.index"))
    values = read_checkpoint(os.path.join(FULL, "model.ckpt"))  # verified against TF's crc32c
    prefix = str(tmp_path / "model.ckpt")
    write_checkpoint(prefix, values)
    assert _same_file(prefix + ".index", os.path.join(FULL, "model.ckpt.index"))
    assert _same_file(prefix + DATA, os.path.join(FULL, "model.ckpt" + DATA))


def test_state_file_matches_tensorflows(tmp_path):
    _need(os.path.join(TINY, "checkpoint"))
    write_checkpoint_state(str(tmp_path), "model.ckpt")
    assert _same_file(tmp_path / "checkpoint", os.path.join(TINY, "checkpoint"))


# ---- damaged files ---------------------------------------------------------------------------

def test_flipped_data_byte_names_the_tensor(tiny_values, tmp_path):
    prefix = _copy_tiny(tmp_path)
    name = "model/h1/mlp/c_fc/w"
    offset, nbytes = _layout(tiny_values)[name]
    with open(prefix + DATA, "r+b") as f:
        f.seek(offset + nbytes // 2)
        b = f.read(1)
        f.seek(offset + nbytes // 2)
        f.write(bytes([b[0] ^ 0x10]))
    for mmap in (False, True):
        with pytest.raises(Npgpt2Error) as e:
            read_checkpoint(prefix, mmap=mmap)
        _one_line_error(e, prefix + DATA, f"tensor '{name}'", "crc32c")
    # Without verification the damage is returned as is: exactly one element differs.
    got = read_checkpoint(prefix, verify=False)
    diff = got[name] != tiny_values[name]
    assert diff.sum() == 1
    assert all(_bits_equal(got[k], v) for k, v in tiny_values.items() if k != name)


def test_truncated_data_file(tiny_values, tmp_path):
    prefix = _copy_tiny(tmp_path)
    layout = _layout(tiny_values)
    total = sum(n for _, n in layout.values())
    assert os.path.getsize(prefix + DATA) == total
    cut = total // 2
    first_cut = min((o, k) for k, (o, n) in layout.items() if o + n > cut)[1]
    with open(prefix + DATA, "r+b") as f:
        f.truncate(cut)
    for mmap in (False, True):
        with pytest.raises(Npgpt2Error) as e:
            read_checkpoint(prefix, mmap=mmap, verify=False)
        _one_line_error(e, prefix + DATA, "truncated", f"'{first_cut}'")


def test_bad_magic(tmp_path):
    _need(TINY)
    prefix = _copy_tiny(tmp_path)
    with open(prefix + ".index", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x00")
    with pytest.raises(Npgpt2Error) as e:
        read_checkpoint(prefix)
    _one_line_error(e, prefix + ".index", "bad magic")


def test_truncated_index(tmp_path):
    _need(TINY)
    prefix = _copy_tiny(tmp_path)
    with open(prefix + ".index", "r+b") as f:
        f.truncate(20)
    with pytest.raises(Npgpt2Error) as e:
        read_checkpoint(prefix)
    _one_line_error(e, prefix + ".index", "truncated")
    with open(os.path.join(TINY, "model.ckpt.index"), "rb") as f:
        data = f.read()
    with open(prefix + ".index", "wb") as f:
        f.write(data[200:])  # head cut off, footer intact: its handles point past the end
    with pytest.raises(Npgpt2Error) as e:
        read_checkpoint(prefix)
    _one_line_error(e, prefix + ".index", "truncated or corrupt")


def _data_block_trailer(index_bytes):
    """Offset of the first data block's type byte: the footer's metaindex handle points just
    past the (single) data block's 5-byte trailer."""
    footer = len(index_bytes) - 48
    metaindex_offset, _ = _varint(index_bytes, footer)
    return metaindex_offset - 5


def test_compressed_block_is_refused(tmp_path):
    _need(TINY)
    prefix = _copy_tiny(tmp_path)
    with open(prefix + ".index", "rb") as f:
        data = bytearray(f.read())
    t = _data_block_trailer(data)
    assert data[t] == 0
    data[t] = 1  # snappy, with a correct checksum as a real compressed block would have
    data[t + 1:t + 5] = struct.pack("<I", masked_crc32c(bytes(data[:t + 1])))
    with open(prefix + ".index", "wb") as f:
        f.write(data)
    with pytest.raises(Npgpt2Error) as e:
        read_checkpoint(prefix)
    _one_line_error(e, prefix + ".index", "compressed", "not supported")


def test_corrupt_index_block_fails_its_checksum(tmp_path):
    _need(TINY)
    prefix = _copy_tiny(tmp_path)
    with open(prefix + ".index", "r+b") as f:
        f.seek(30)
        b = f.read(1)
        f.seek(30)
        f.write(bytes([b[0] ^ 0x01]))
    with pytest.raises(Npgpt2Error) as e:
        read_checkpoint(prefix)
    _one_line_error(e, prefix + ".index", "crc32c")


def test_missing_files(tmp_path):
    _need(TINY)
    prefix = _copy_tiny(tmp_path)
    os.remove(prefix + DATA)
    with pytest.raises(Npgpt2Error) as e:
        read_checkpoint(prefix)
    _one_line_error(e, prefix + DATA, "not found")
    os.remove(prefix + ".index")
    with pytest.raises(Npgpt2Error) as e:
        read_checkpoint(prefix)
    _one_line_error(e, prefix + ".index", "not found")


# ---- write -> read round trips ---------------------------------------------------------------

DTYPE_CHOICES = [np.float32, np.float16, np.float64, np.int32, np.int64, np.bool_]


@st.composite
def tensor_dicts(draw):
    names = draw(st.lists(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1,
                                  max_size=12), min_size=1, max_size=6, unique=True))
    out = {}
    for name in names:
        dtype = np.dtype(draw(st.sampled_from(DTYPE_CHOICES)))
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
        raw = draw(st.binary(min_size=int(np.prod(shape)) * dtype.itemsize,
                             max_size=int(np.prod(shape)) * dtype.itemsize))
        arr = np.frombuffer(raw, dtype=np.uint8).copy()
        if dtype == np.bool_:
            arr &= 1  # numpy bools are 0/1 bytes
        out[name] = arr.view(dtype).reshape(shape)
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tensors=tensor_dicts())
def test_roundtrip_property(tmp_path, tensors):
    prefix = str(tmp_path / "rt" / "model-7")
    write_checkpoint(prefix, tensors)
    for mmap in (False, True):
        got = read_checkpoint(prefix, mmap=mmap)
        assert sorted(got) == sorted(tensors)
        for name, want in tensors.items():
            assert _bits_equal(got[name], want), name


def test_roundtrip_awkward_inputs(tmp_path):
    rng = np.random.default_rng(3)
    base = rng.standard_normal((4, 6)).astype(np.float32)
    tensors = {
        "transposed": base.T,  # not C-contiguous
        "big_endian": base.astype(">f4"),
        "scalar": np.float64(2.5),
        "python_int_list": np.array([1, 2, 3], dtype=np.int64),
        "empty": np.zeros((0, 2, 0), np.float16),
    }
    prefix = str(tmp_path / "m")
    write_checkpoint(prefix, tensors)
    got = read_checkpoint(prefix)
    assert np.array_equal(got["transposed"], base.T) and got["transposed"].flags.c_contiguous
    assert got["big_endian"].dtype == np.dtype("<f4") and np.array_equal(got["big_endian"], base)
    assert got["scalar"].shape == () and got["scalar"] == 2.5
    assert got["empty"].shape == (0, 2, 0) and got["empty"].dtype == np.float16
    assert list(got) == sorted(got)


@pytest.mark.parametrize("bad", [np.zeros(2, np.complex64), np.zeros(2, np.int16),
                                 np.array(["a"]), np.zeros(1, np.uint32)])
def test_write_refuses_unsupported_dtypes_and_writes_nothing(tmp_path, bad):
    with pytest.raises(Npgpt2Error) as e:
        write_checkpoint(str(tmp_path / "m"), {"ok": np.ones(2, np.float32), "bad": bad})
    _one_line_error(e, "'bad'", "unsupported dtype")
    assert os.listdir(tmp_path) == []


def test_write_refuses_empty_name(tmp_path):
    with pytest.raises(Npgpt2Error):
        write_checkpoint(str(tmp_path / "m"), {"": np.ones(2, np.float32)})


def test_many_tensors_span_several_index_blocks(tmp_path):
    tensors = {f"t{i:05d}/" + "w" * 120: np.full(i % 3, i, np.int32) for i in range(4000)}
    prefix = str(tmp_path / "many")
    write_checkpoint(prefix, tensors)
    assert os.path.getsize(prefix + ".index") > 2 * 262144  # TF's 256 KiB block size
    got = read_checkpoint(prefix)
    assert list(got) == sorted(tensors)
    assert all(_bits_equal(got[k], v) for k, v in tensors.items())


def test_big_endian_bundle(tmp_path):
    """A bundle whose header says BIG holds big-endian bytes; we return native-order values."""
    from npgpt2.checkpoint import proto, table
    x = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    prefix = str(tmp_path / "be")
    write_checkpoint(prefix, {"x": x.astype(">f4").view("<f4")})  # store the big-endian bytes
    with open(prefix + ".index", "rb") as f:
        items = table.read_table(f.read(), "be.index")
    items[0] = (b"", proto.encode_header(num_shards=1, endianness=1))
    with open(prefix + ".index", "wb") as f:
        f.write(table.build_table(items))
    got = read_checkpoint(prefix)["x"]
    assert got.dtype == np.float32 and np.array_equal(got, x)
    assert np.array_equal(read_checkpoint(prefix, mmap=True)["x"], x)


# ---- the `checkpoint` state file -------------------------------------------------------------

def _touch_checkpoint(folder, name):
    write_checkpoint(os.path.join(folder, name), {"v": np.ones(1, np.float32)})


def test_latest_follows_relative_and_absolute_paths(tmp_path):
    _touch_checkpoint(tmp_path, "model-1")
    _touch_checkpoint(tmp_path, "model-2")
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "model-1"\n'
                                         'all_model_checkpoint_paths: "model-1"\n')
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "model-1")
    (tmp_path / "checkpoint").write_text(f'model_checkpoint_path: "{tmp_path}/model-2"\n')
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "model-2")


def test_latest_after_the_folder_moved():
    """TensorFlow's own state file names absolute paths in a folder that no longer exists."""
    with open(os.path.join(DTYPES, "checkpoint")) as f:
        assert f.readline().startswith('model_checkpoint_path: "/home/someone/old-place/')
    assert latest_checkpoint(DTYPES) == os.path.join(DTYPES, "model.ckpt")


def test_write_state_then_latest(tmp_path):
    for name in ["model-10", 'we"ird\\näme 1']:
        _touch_checkpoint(tmp_path, name)
    write_checkpoint_state(str(tmp_path), "model-10", ["model-5"])
    text = (tmp_path / "checkpoint").read_text()
    assert text == ('model_checkpoint_path: "model-10"\n'
                    'all_model_checkpoint_paths: "model-5"\n'
                    'all_model_checkpoint_paths: "model-10"\n')
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "model-10")
    write_checkpoint_state(str(tmp_path), 'we"ird\\näme 1', ["model-10", 'we"ird\\näme 1'])
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / 'we"ird\\näme 1')
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []


def test_latest_without_state_file(tmp_path):
    with pytest.raises(Npgpt2Error) as e:
        latest_checkpoint(str(tmp_path))
    _one_line_error(e, str(tmp_path), "no checkpoint")
    _touch_checkpoint(tmp_path, "only")
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "only")
    _touch_checkpoint(tmp_path, "other")
    with pytest.raises(Npgpt2Error) as e:
        latest_checkpoint(str(tmp_path))
    _one_line_error(e, "2 *.index files")


def test_latest_errors(tmp_path):
    with pytest.raises(Npgpt2Error) as e:
        latest_checkpoint(str(tmp_path / "nope"))
    _one_line_error(e, "nope", "no such model folder")
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "gone"\n')
    with pytest.raises(Npgpt2Error) as e:
        latest_checkpoint(str(tmp_path))
    _one_line_error(e, str(tmp_path / "checkpoint"), "'gone'")
    (tmp_path / "checkpoint").write_text("garbage\n")
    with pytest.raises(Npgpt2Error) as e:
        latest_checkpoint(str(tmp_path))
    _one_line_error(e, str(tmp_path / "checkpoint"), "model_checkpoint_path")


def test_index_separator_keys_follow_leveldb():
    """Index keys between blocks: LevelDB's documented example and its successor rule."""
    from npgpt2.checkpoint.table import _short_successor, _shortest_separator
    assert _shortest_separator(b"the quick brown fox", b"the who") == b"the r"
    assert _shortest_separator(b"abc", b"abcd") == b"abc"  # a prefix: unchanged
    assert _shortest_separator(b"abc", b"abd") == b"abc"  # no room between c and d
    assert _short_successor(b"abc") == b"b"
    assert _short_successor(b"\xff\xffa") == b"\xff\xffb"
    assert _short_successor(b"\xff\xff") == b"\xff\xff"
