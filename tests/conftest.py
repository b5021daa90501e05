"""Fixtures shared by several test files."""
import pytest


@pytest.fixture()
def offline_hub(tmp_path, monkeypatch):
    """huggingface_hub offline, with an empty cache folder of its own (returned); no $SD_CHECKPOINT."""
    import huggingface_hub.constants as constants
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))   # read once, at import
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("SD_CHECKPOINT", raising=False)
    return cache
