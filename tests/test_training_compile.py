"""train.py with ``compile`` on: DeepSpeed's engine.compile under ZeRO-3, two processes on CPU.

The backend is ``aot_eager`` (dynamo + AOT autograd, the same capture inductor gets, without code
generation, which would take minutes per rank on a 2-core machine); tests/test_compile.py checks the
inductor step itself.
"""

import math

from tests.test_training_deepspeed import config, dataset, events, launch, losses, pytestmark  # noqa: F401


def test_compiled_steps_train_under_zero3(dataset, tmp_path):  # noqa: F811
    out = tmp_path / "compiled"
    launch(config(dataset, out, epochs=1, max_steps=2, compile="default", compile_backend="aot_eager",
                  reconstruction_png=False), timeout=900)
    compiled = [{k: v for k, v in e.items() if k != "time"} for e in events(out, "compile")]
    assert compiled == [{"event": "compile", "mode": "default", "backend": "aot_eager", "compiled": True}]
    steps = losses(out)
    assert sorted(steps) == [1, 2] and all(math.isfinite(v) for v in steps.values())
    assert (out / "model_fp32.pt").exists()
