"""The environment for a pytest session that a test starts (the benchmark report, run_gpu.sh).

Under ``make test`` the tests run in pytest-xdist workers, whose PYTEST_XDIST_* variables a child
inherits; pytest-benchmark then believes the child runs under xdist and disables itself, so the
child's ``--benchmark-only`` run refuses to start. The child is its own session: drop them.
"""

import os


def own_session_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}
    env.update(overrides)
    return env
