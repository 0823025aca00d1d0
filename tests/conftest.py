import os

import pytest

# Tests never reach a hub: online code paths are exercised on local data in the real schemas.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


@pytest.fixture(autouse=True)
def _every_build_accounts_for_its_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever a test builds (with any executor), its manifest must account for every source
    row: checked on the manifest each finished build returns."""
    import longdata.build
    from tests.builders import assert_rows_accounted

    finish = longdata.build.finish_build

    def checked(*args, **kwargs):
        result = finish(*args, **kwargs)
        assert_rows_accounted(result.manifest)
        return result

    monkeypatch.setattr(longdata.build, "finish_build", checked)


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    """The test machine's 2 cores are shared: one intra-op thread avoids spinning contention."""
    import torch

    torch.set_num_threads(1)
