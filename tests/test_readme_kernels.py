"""The README's kernel example runs as written (device picked at run time: CUDA where there is one, else
the CPU references), in a fresh interpreter with the user's default environment."""

import os
import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def kernel_example() -> str:
    text = README.read_text()
    section = text[text.index("## The kernels: `mae_kernels`"):]
    section = section[:section.index("\n## ", 1)]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_kernel_example_runs_as_written(tmp_path):
    code = kernel_example()
    assert 'dev = "cuda" if torch.cuda.is_available() else "cpu"' in code
    check = ("\nassert loss.dim() == 0 and torch.isfinite(loss) and token.grad.any() and pos.grad.any()"
             "\nassert out.shape == q.shape and dec_in.shape == (B, 800, C)\nprint('ok', dev)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MAE_KERNELS_BACKEND")}
    out = subprocess.run([sys.executable, "-c", code + check], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok ")
