import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def zoo_cache() -> pathlib.Path:
    """Exported zoo models are cached between runs in a git-ignored folder."""
    path = pathlib.Path(os.environ.get("LEAN_ONNX_ZOO_CACHE", ROOT / ".cache" / "zoo"))
    path.mkdir(parents=True, exist_ok=True)
    return path
