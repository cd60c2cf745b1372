"""How the ``dsv3`` command reports what goes wrong (dsv3/user_errors.py): bad input as
one error line with status 2, a bug with its traceback, a Ctrl-C as one line with status
130; and what ``--version`` says for a bug report."""
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


def test_a_ctrl_c_no_command_caught_is_one_line_and_status_130(tmp_path, capsys, monkeypatch):
    """It was a KeyboardInterrupt traceback (dsv3 report, dsv3 eval, a second Ctrl-C in
    dsv3 train); 130 is what a shell reports for a command Ctrl-C ended."""
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(report_command, "_report", interrupted)
    assert main(["report", "--run", str(tmp_path)]) == 130
    assert capsys.readouterr().err == "dsv3 report: interrupted\n"


def test_output_into_a_pipe_closed_early_ends_quietly(tmp_path):
    """`dsv3 plan | head -1` ended in a BrokenPipeError traceback; 141 is what a shell
    reports for a command whose output pipe closed (128 + SIGPIPE)."""
    import os
    import subprocess
    import sys
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before the first line (head -1 after it)
    try:
        done = subprocess.run([sys.executable, "-m", "dsv3.cli", "plan"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (141, ""), done.stderr


def test_a_broken_pipe_that_is_not_stdout_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    """Only a closed stdout (`| head`) ends quietly: a socket or a worker's pipe that broke
    is a real failure, which the quiet 141 hid."""
    def socket_broke(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(report_command, "_report", socket_broke)
    with pytest.raises(BrokenPipeError):
        main(["report", "--run", str(tmp_path)])


def test_a_missing_optional_package_names_the_extra_that_brings_it(tmp_path, capsys,
                                                                   monkeypatch):
    def needs_matplotlib(args):
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")

    monkeypatch.setattr(report_command, "_report", needs_matplotlib)
    assert main(["report", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("dsv3 report: error: No module named 'matplotlib' (an optional package: "
                   "pip install 'dsv3[train]')")


def test_the_command_line_loads_on_the_core_dependencies_alone():
    """`dsv3 --help` with none of the optional packages importable (a plain
    `pip install dsv3`): every command's module loads them only when it runs."""
    import subprocess
    import sys

    from dsv3.cli import OPTIONAL_PACKAGES
    blocked = sorted(OPTIONAL_PACKAGES)
    code = ("import sys\n"
            f"class Block:\n"
            f"    def find_spec(self, name, path=None, target=None):\n"
            f"        if name.split('.')[0] in {blocked!r}:\n"
            f"            raise ModuleNotFoundError(name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "from dsv3.cli import main\n"
            "main(['--help'])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "train" in done.stdout and "eval" in done.stdout


def test_version_names_dsv3_torch_triton_and_the_cuda_kernels(capsys):
    import torch

    import dsv3
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"dsv3 {dsv3.__version__} (torch {torch.__version__}, triton ")
    assert line.endswith("CUDA kernels built)") or line.endswith("CUDA kernels not built)")


def test_version_tells_the_cuda_kernels_built_from_tritons_stand_ins():
    """Where the extension has no CUDA kernel for an op, the Triton backend registers a
    Python one: asked after that, every build looked CUDA-built. The flag is taken
    before; a process without triton (nothing registered) sees the build as it is."""
    import subprocess
    import sys

    import dsv3.ops
    probe = ("import sys; sys.modules['triton'] = None; import torch, dsv3.ops; "
             "print(torch._C._dispatch_has_kernel_for_dispatch_key('dsv3::expert_index', 'CUDA'))")
    built = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert built == str(dsv3.ops.CUDA_KERNELS_BUILT)


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self"), reason="needs /proc")
def test_an_output_directory_no_file_system_takes_is_named_before_any_work(tmp_path, capsys):
    """/proc passes the permission check for root, but takes no directory: before, the
    run failed once it wrote, as a bare "[Errno 2] No such file or directory"."""
    status = main(["train", "--out", "/proc/dsv3-run", "--data", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert status == 2
    assert "out_dir: cannot create /proc/dsv3-run: " in err


def test_checking_an_output_path_leaves_no_directory_behind(tmp_path):
    from dsv3.validate import output_path
    output_path("--out", str(tmp_path / "a" / "b" / "c"), directory=True)
    output_path("--out", str(tmp_path / "d" / "report.json"))
    assert list(tmp_path.iterdir()) == []
