"""Which devices a command may run on, checked before any work: a ``--device`` this
machine lacks would otherwise surface as torch's error partway through (after a
checkpoint loaded, or a training stage ran), naming neither the option nor what is
there. Used by ``dsv3 train`` and by both entry points of the evaluation."""


def usable_devices() -> list[str]:
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return devices


def check_device(name: str | None) -> None:
    """``--device``: one this machine has (cpu, cpu:0, cuda, cuda:N: the trainer's
    timing and memory readings know no other); ``None`` (not given) is left to the
    command's default."""
    if name is None:
        return
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:  # not a device string torch parses ("tpu")
        device = None
    if device is None or not _usable(device):
        raise ValueError(f"--device {name!r} is not available on this machine; "
                         f"available: {', '.join(usable_devices())}")


def _usable(device) -> bool:
    import torch

    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    return False
