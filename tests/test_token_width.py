"""The master's prompts in 2 bytes a token (issue "reliability" §3): uint16 ids when the model's vocabulary fits,
checked before narrowing (an id that does not fit is reported as it was, never wrapped); the resume key, dedup and
the chunks' int32 tokens the same as with int32 prompts; a 2-D input holds no offsets."""
import time

import h5py
import numpy as np
import pytest

from gpt2job.cluster.scheduler import Scheduler
from gpt2job.files import prompts as P
from gpt2job.files import read_ahead, read_input
from gpt2job.files.dedup import group_identical
from gpt2job.files.prompt_checks import validate
from gpt2job.files.prompts import PromptSet
from gpt2job.files.read_input import read_prompts


def write(path, rows=None, grid=None, dtype=np.int32):
    with h5py.File(path, "w") as f:
        if grid is not None:
            f.create_dataset("prompt_tokens", data=np.asarray(grid, dtype))
        else:
            ds = f.create_dataset("prompt_tokens", (len(rows),), dtype=h5py.vlen_dtype(np.dtype(dtype)))
            for i, r in enumerate(rows):
                ds[i] = np.asarray(r, dtype)


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(P, "BLOCK_ROWS", 4)      # several blocks: a bad id after uint16 blocks widens them


@pytest.mark.parametrize("kind", ["vlen", "grid", "grid64"])
def test_uint16_when_every_id_fits_and_the_same_fingerprint(tmp_path, small_blocks, kind):
    rng = np.random.default_rng(0)
    grid = rng.integers(0, 50257, (11, 16))
    path = tmp_path / "in.h5"
    if kind == "vlen":
        write(path, rows=[r[:1 + i % 16] for i, r in enumerate(grid)])
    else:
        write(path, grid=grid, dtype=np.int64 if kind == "grid64" else np.int32)
    wide, narrow = read_prompts(str(path), None), read_prompts(str(path), None, 50257)
    assert wide.tokens.dtype == np.int32 and narrow.tokens.dtype == np.uint16
    assert (wide.tokens == narrow.tokens).all() and (wide.lengths == narrow.lengths).all()
    assert wide.fingerprint() == narrow.fingerprint() == PromptSet(wide.offsets, wide.tokens, "x").fingerprint()
    assert read_prompts(str(path), None, 70000).tokens.dtype == np.int32        # a vocabulary too large for uint16
    if kind != "vlen":
        assert narrow._offsets is None and narrow.width == 16 and len(narrow) == 11
        assert (narrow.offsets == np.arange(12) * 16).all()


@pytest.mark.parametrize("kind", ["vlen", "grid"])
def test_an_id_that_does_not_fit_is_reported_not_wrapped(tmp_path, small_blocks, kind):
    grid = np.ones((10, 4), np.int64)
    grid[6, 2], grid[8, 0] = 65536 + 7, -1            # uint16 would make them 7 and 65535
    path = tmp_path / "in.h5"
    write(path, rows=list(grid) if kind == "vlen" else None, grid=None if kind == "vlen" else grid)
    p = read_prompts(str(path), None, 1000)
    assert p.tokens.dtype == np.int32 and p.tokens[6 * 4 + 2] == 65536 + 7 and p.tokens[8 * 4] == -1
    val = validate(p, 128, 1000, 4)
    assert np.flatnonzero(val.invalid).tolist() == [6, 8]
    assert "outside 0..999 (rows 6, 8)" in val.message()
    big = read_prompts(str(path), None, 50257)       # 65543 >= 50257 too
    assert big.fingerprint() == read_prompts(str(path), None).fingerprint()


@pytest.mark.parametrize("kind", ["vlen", "grid", "bad id"])
def test_the_probe_hands_the_token_ids_back_and_the_master_reads_them_once(tmp_path, small_blocks, monkeypatch,
                                                                           kind):
    """The read-ahead probe (a child, for HDF5's loops on damaged files) read a token input, then the master read it
    again (0.97 of 1.97 s at 1M ragged rows): the child now reads it as the master would and hands the arrays back.
    The master's own read runs only where the child gave nothing: it fails, or the file changed since it read it."""
    rng = np.random.default_rng(1)
    grid = rng.integers(0, 50257, (11, 16))
    if kind == "bad id":
        grid[7, 3] = 65536 + 2
    path = str(tmp_path / "in.h5")
    write(path, rows=None if kind == "grid" else [r[:1 + i % 16] for i, r in enumerate(grid)],
          grid=grid if kind == "grid" else None)
    with h5py.File(path, "r") as f:
        want = P.read_token_dataset(path, f["prompt_tokens"], 50257)
    own = P.read_token_dataset
    reads, started = [], []
    monkeypatch.setattr(read_input, "read_token_dataset", lambda *a: reads.append(a) or own(*a))
    popen = read_ahead.subprocess.Popen
    monkeypatch.setattr(read_ahead.subprocess, "Popen", lambda args, **k: started.append(args) or popen(args, **k))
    got = read_prompts(path, None, 50257)
    assert reads == []   # the child's arrays, not a second read
    assert started[0][7] == "4"   # the child reads in the master's blocks as they are now (small_blocks)
    assert got.tokens.dtype == want.tokens.dtype == (np.int32 if kind == "bad id" else np.uint16)
    assert (got.tokens == want.tokens).all() and (got.lengths == want.lengths).all() and len(got) == 11
    assert got.fingerprint() == want.fingerprint() and got.source == "prompt_tokens"
    assert (got.grid_width, want.grid_width) == ((16, 16) if kind == "grid" else (None, None))
    monkeypatch.setattr(read_ahead, "CHILD", "import sys; sys.exit(1)")   # a child that gives nothing: the master
    assert read_prompts(path, None, 50257).fingerprint() == want.fingerprint() and len(reads) == 1   # reads


def test_a_child_past_its_deadline_is_a_damaged_file_and_a_slow_hand_back_is_read_again(tmp_path, monkeypatch):
    """The read-ahead's deadline (60 s + 30 s per GB of the file) is for the read, where HDF5 may loop: past it the
    job stops with one line and the child is killed. Its hand-back's write has its own deadline; past that the master
    reads the file itself (a slow temporary folder is not a damaged input)."""
    path = str(tmp_path / "in.h5")
    write(path, grid=np.ones((3, 4)))
    monkeypatch.setattr(read_ahead, "DEADLINE_S", 1)
    monkeypatch.setattr(read_ahead, "DEADLINE_S_PER_GB", 0)
    monkeypatch.setattr(read_ahead, "CHILD", "import time; time.sleep(60)")
    t = time.monotonic()
    with pytest.raises(P.UserError, match="did not finish within 1 s"):
        read_prompts(path, None, 50257)
    monkeypatch.setattr(read_ahead, "CHILD", "import time; print('read 1000', flush=True); time.sleep(60)")
    assert read_prompts(path, None, 50257).tokens.tolist() == [1] * 12
    assert time.monotonic() - t < 20   # (each child killed at its deadline, not waited for)


def test_a_token_input_s_mistake_is_named_by_the_master_s_own_read(tmp_path):
    """The child stops at a user's mistake with nothing handed back; the master's read names it as before."""
    with h5py.File(tmp_path / "in.h5", "w") as f:
        f.create_dataset("prompt_tokens", data=np.ones((3, 4), np.float32))
    with pytest.raises(P.UserError, match="must be integer token ids"):
        read_prompts(str(tmp_path / "in.h5"), None, 50257)


@pytest.mark.parametrize("width", [None, 16, 6, 0])
def test_dedup_and_chunks_agree_with_int32(width):
    rng = np.random.default_rng(width or 1)
    pool = [rng.integers(0, 50257, width if width is not None else rng.integers(1, 9)) for _ in range(40)]
    rows = [pool[i] for i in rng.integers(0, len(pool), 300)]
    wide = PromptSet.from_lists(rows, "t")
    if width is not None:
        narrow = PromptSet.grid(np.array(rows, np.uint16).reshape(len(rows), width), "t")
    else:
        narrow = PromptSet(wide.offsets, wide.tokens.astype(np.uint16), "t")
    assert narrow.tokens.dtype == np.uint16
    for sel, n in ((np.arange(300), 1), (np.sort(rng.choice(300, 200, replace=False)), 1), (np.arange(600), 2)):
        a, ca = group_identical(wide, sel, n)
        b, cb = group_identical(narrow, sel, n)
        assert a.tolist() == b.tolist() and ca.rows.tolist() == cb.rows.tolist() and ca.reps.tolist() == cb.reps.tolist()
    sa, sb = Scheduler(wide, np.arange(300), chunk_size=64), Scheduler(narrow, np.arange(300), chunk_size=64)
    for _ in range(5):
        x, y = sa._take(64, 1), sb._take(64, 1)
        assert y.tokens.dtype == np.int32 and (x.tokens == y.tokens).all() and (x.offsets == y.offsets).all()
        assert (x.rows == y.rows).all()
    if width:
        assert narrow._offsets is None      # nothing on these paths made a grid's offsets
