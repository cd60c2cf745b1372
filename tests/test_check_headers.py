"""csrc/check_headers.py (``make check-torch``) names every source that does not
compile against the headers it is given, and refuses a folder that holds none."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_checker():
    spec = importlib.util.spec_from_file_location("check_headers", ROOT / "csrc" / "check_headers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_folder_without_torch_headers_is_refused(tmp_path, capsys):
    assert load_checker().main([str(tmp_path)]) == 2
    assert "TORCH_INCLUDE_DIR" in capsys.readouterr().err


def test_every_source_that_fails_against_the_headers_is_named(tmp_path, capsys):
    # headers whose torch/extension.h stops every compile: each source must be reported
    (tmp_path / "torch").mkdir()
    for header in ("extension.h", "library.h"):
        (tmp_path / "torch" / header).write_text('#error "not this torch"\n')
    assert load_checker().main([str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    sources = sorted(str(p.relative_to(ROOT)) for p in
                     [*ROOT.glob("csrc/*.cpp"), *ROOT.glob("csrc/cpu/*.cpp")])
    failed = [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("FAILED ")]
    assert sources and set(sources) <= set(failed)  # and the .cu where nvcc is here
    assert "error" in err and f"{len(failed)} sources failed" in err
