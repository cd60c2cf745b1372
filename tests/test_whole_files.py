"""dsv3.whole_files: a file is replaced whole or not at all, keeping what a user set on
it (its permissions; a symbolic link to it)."""
import os
import stat

from dsv3.whole_files import write_text_whole


def test_a_replaced_file_keeps_its_permissions(tmp_path):
    """Before: a private 0600 file came back 0644 from the temporary file's mode."""
    path = tmp_path / "secret.json"
    path.write_text("old")
    os.chmod(path, 0o600)
    write_text_whole(path, "new")
    assert path.read_text() == "new"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not (tmp_path / "secret.json.tmp").exists()


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
