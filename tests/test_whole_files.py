"""dsv3.whole_files: a file is replaced whole or not at all, keeping what a user set on
it (its permissions; a symbolic link to it)."""
import os
import stat
import threading

import pytest

from dsv3.whole_files import write_text_whole, write_whole


def test_a_replaced_file_keeps_its_permissions(tmp_path):
    """Before: a private 0600 file came back 0644 from the temporary file's mode."""
    path = tmp_path / "secret.json"
    path.write_text("old")
    os.chmod(path, 0o600)
    write_text_whole(path, "new")
    assert path.read_text() == "new"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.json"]  # no .tmp left


def test_a_symbolic_link_keeps_pointing_at_the_file_it_names(tmp_path):
    """Before: the link was replaced by a plain file, and its target kept the old text."""
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_text_whole(link, "new")
    assert link.is_symlink() and target.read_text() == "new"


def test_a_new_file_is_written_whole(tmp_path):
    path = tmp_path / "new.json"
    write_text_whole(path, "text")
    assert path.read_text() == "text"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.json"]


def test_a_users_file_named_like_the_temporary_one_is_left_alone(tmp_path):
    """Before: the temporary file was path + ".tmp", so a file of that name was
    overwritten, then deleted."""
    (tmp_path / "notes.txt.tmp").write_text("mine")
    write_text_whole(tmp_path / "notes.txt", "new")
    assert (tmp_path / "notes.txt.tmp").read_text() == "mine"
    assert (tmp_path / "notes.txt").read_text() == "new"


def test_concurrent_writers_each_write_whole(tmp_path):
    """Two writers of one file (two ranks, two commands) shared one temporary file: one
    replaced the other's half-written file, or found its temporary file gone."""
    path = tmp_path / "shared.txt"
    started, errors = threading.Barrier(2), []

    def writer(text: str) -> None:
        def write(f):
            f.write(text[:1000])
            started.wait(timeout=10)  # both temporary files open at once
            f.write(text[1000:])
        try:
            write_whole(path, write, "w")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    texts = ["a" * 5000, "b" * 5000]
    threads = [threading.Thread(target=writer, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert path.read_text() in texts
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "kept.txt"
    path.write_text("old")

    def fail(f):
        f.write("half")
        raise RuntimeError("cut short")
    with pytest.raises(RuntimeError, match="cut short"):
        write_whole(path, fail, "w")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.txt"]
