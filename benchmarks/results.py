"""Appending a measured table to benchmarks/RESULTS.md with what makes it readable
later: title, UTC date, commit (``-dirty`` when the tree differs), the command and
the machine."""
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


def command_line(module: str, argv: list[str] | None = None) -> str:
    """The command that ran ``module`` with the options actually given: ``argv`` as
    passed to its main(), else this process's own arguments."""
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", "-m", module, *args])


def append_text(section: str) -> None:
    """Append a section that already carries its heading, date, commit and machine."""
    with RESULTS_MD.open("a") as results:
        results.write("\n" + section)
    print(f"appended to {RESULTS_MD}")


def append_section(title: str, command: str, body: str) -> None:
    from benchmarks.run import git_commit, machine
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    m = machine()
    # The vector ISA too: the VMs differ (AVX-512 or AVX2 only), and the kernels' loops
    # are built per ISA, so a figure means little without it.
    append_text(f"## {title}, {now} · commit {git_commit()}\n\n`{command}` on {m['cpu']} "
                f"(CPU capability {m['cpu_capability']}), {m['cores']} cores, "
                f"torch {m['torch']}.\n\n{body}")
