"""dsv3/torch_files.py: a torch.save file that is garbage or cut short is a ValueError
naming it (the CLIs print it as one error line), where torch.load's own messages named
no file, or advised on serialization formats."""
import pytest
import torch

from dsv3 import torch_files


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "state.pt"
    torch.save({"step": 3, "weights": torch.randn(64, 64)}, path)
    return path


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("damage", ["garbage", "cut_short", "empty"])
def test_damaged_file_is_named(saved, damage, mmap):
    data = saved.read_bytes()
    saved.write_bytes({"garbage": b"garbage\n", "cut_short": data[:len(data) // 2],
                       "empty": b""}[damage])
    with pytest.raises(ValueError, match=rf"^{saved} is not a readable checkpoint file \(cut short"):
        torch_files.load(saved, map_location="cpu", weights_only=False, mmap=mmap)


def test_a_good_file_loads_and_a_missing_one_stays_not_found(saved, tmp_path):
    state = torch_files.load(saved, map_location="cpu", weights_only=True)
    assert state["step"] == 3 and state["weights"].shape == (64, 64)
    with pytest.raises(FileNotFoundError):
        torch_files.load(tmp_path / "nope.pt", weights_only=True)


def test_eval_on_a_damaged_model_file_is_one_error_line(tmp_path, capsys):
    from dsv3.eval.cli import main as eval_main
    from test_eval_support import save_checkpoint, tiny_model, train_tokenizer

    save_checkpoint(tmp_path / "ckpt", tiny_model(), train_tokenizer())
    weights = tmp_path / "ckpt" / "model.pt"
    weights.write_bytes(weights.read_bytes()[:100])
    assert eval_main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "o"),
                      "--tasks", "ppl", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"error: {weights} is not a readable model weights file" in err
    assert err.count("\n") <= 2  # the embedded-split warning, then the error


def test_a_directory_is_not_called_a_damaged_file(tmp_path):
    """Before: "not a readable checkpoint file (cut short or overwritten?)"."""
    with pytest.raises(IsADirectoryError):
        torch_files.load(tmp_path)
