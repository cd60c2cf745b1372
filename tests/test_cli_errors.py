"""How the ``dsv3`` command reports what goes wrong (dsv3/user_errors.py): bad input as
one error line with status 2, a bug with its traceback."""
import pytest

import dsv3.commands.report as report_command
from dsv3.cli import main


def test_an_unwritable_path_is_one_error_line(tmp_path, capsys, monkeypatch):
    """An OSError (a path the user gave that cannot be written or read) is bad input:
    one error line and status 2, like a missing file; not a traceback."""
    def unwritable(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "report.html"))

    monkeypatch.setattr(report_command, "_report", unwritable)
    status = main(["report", "--run", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.startswith("dsv3 report: error:"), err
    assert "Permission denied" in err and "report.html" in err and err.count("\n") == 0


def test_an_oserror_without_a_path_is_a_bug_with_its_traceback(tmp_path, monkeypatch):
    """Only an OSError about a path is the user's input: a timeout is not."""
    def times_out(args):
        raise TimeoutError("the lock was not released")

    monkeypatch.setattr(report_command, "_report", times_out)
    with pytest.raises(TimeoutError):
        main(["report", "--run", str(tmp_path)])
