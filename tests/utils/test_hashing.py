"""Content hashes: one file hash for all of llmforge, and a stat-keyed cache that never returns a stale one."""

from __future__ import annotations

import hashlib
import os

from llmforge.utils.hashing import HashCache, sha256_file, sha256_json, sha256_listing


def test_sha256_file_equals_hashlib_across_block_boundaries(tmp_path):
    # 1 MiB blocks: a file of exactly one block, one byte more, and an empty file.
    for size in (0, 1 << 20, (1 << 20) + 1):
        f = tmp_path / f"f{size}"
        data = os.urandom(size)
        f.write_bytes(data)
        assert sha256_file(f) == hashlib.sha256(data).hexdigest()
        assert sha256_file(str(f)) == sha256_file(f)


def test_sha256_json_ignores_key_order():
    assert sha256_json({"a": 1, "b": [1, 2]}) == sha256_json({"b": [1, 2], "a": 1})
    assert sha256_json({"a": 1}) != sha256_json({"a": 2})


def test_hash_cache_sees_same_size_rewrite_with_same_mtime(tmp_path):
    # An in-place rewrite within the file system's timestamp granularity (or by a tool that keeps mtime) keeps
    # size, mtime and inode; the cache must not return the old hash.
    f = tmp_path / "f.txt"
    f.write_text("aaaa")
    cache_file = tmp_path / "hashes.json"
    hc = HashCache(cache_file)
    h1 = hc.file(f)
    hc.save()
    st = f.stat()
    with open(f, "r+") as fh:  # same inode, same size
        fh.write("bbbb")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_ino == st.st_ino and f.stat().st_mtime_ns == st.st_mtime_ns
    assert HashCache(cache_file).file(f) != h1
    assert hc.file(f) != h1
    assert hc.file(f) == sha256_file(f)


def test_folder_hash_layout_is_pinned(tmp_path):
    # Stage fingerprints in users' runs/ folders hold these digests: the layout (sorted relative posix names,
    # NUL, file hash, newline; temporary names left out) must not change.
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_bytes(b"bee")
    (tmp_path / "d" / "sub" / "a.txt").write_bytes(b"ay")
    (tmp_path / "d" / ".b.txt.x1.tmp").write_bytes(b"half-written")
    (tmp_path / "d" / ".hidden").write_bytes(b"dot")
    want = hashlib.sha256()
    for rel, data in (("b.txt", b"bee"), ("sub/a.txt", b"ay")):
        want.update(rel.encode() + b"\0" + hashlib.sha256(data).hexdigest().encode() + b"\n")
    assert HashCache().path(tmp_path / "d", skip_hidden=True) == (want.hexdigest(), 5)
    listing = [
        ("b.txt", sha256_file(tmp_path / "d" / "b.txt")),
        ("sub/a.txt", sha256_file(tmp_path / "d" / "sub" / "a.txt")),
    ]
    assert sha256_listing(listing) == want.hexdigest()
    assert HashCache().path(tmp_path / "d")[0] != want.hexdigest()  # .hidden counts unless skipped
