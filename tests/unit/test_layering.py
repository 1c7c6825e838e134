"""DESIGN.md's layering rule: the Ray-free core imports neither Ray nor MLflow (it runs on the
GPU machine, which has neither), and importing the library has no side effects."""

import subprocess
import sys

RAY_FREE = [
    "pipeline.models",
    "pipeline.losses",
    "pipeline.data.transforms",
    "pipeline.data.torch_reader",
    "pipeline.engine",
    "pipeline.cuda_graph_step",
    "pipeline.metrics",
    "pipeline.checkpoint",
]


def test_ray_free_core_imports_neither_ray_nor_mlflow():
    code = (
        "import sys\n"
        f"for name in {RAY_FREE!r}: __import__(name)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
