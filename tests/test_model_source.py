"""GGUF conversion into the cache: safe when two processes convert the same model at once."""

from __future__ import annotations

import json

import pytest
import transformers

from reconstruct.modelio import source as model_source


class _FakeSaved:
    """Stands in for a loaded model / tokenizer: ``save_pretrained`` writes one file."""

    def __init__(self, filename: str, on_save=None) -> None:
        self.filename, self.on_save, self.config = filename, on_save, object()

    def save_pretrained(self, folder) -> None:
        if self.on_save is not None:
            self.on_save()
        (folder / self.filename).write_text(json.dumps({"saved_by": "this process"}))


@pytest.fixture
def fake_loaders(monkeypatch):
    """Replace the transformers loaders; returns a dict whose ``on_save`` runs inside the model save."""
    hooks: dict = {"on_save": None}
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: _FakeSaved("config.json", hooks["on_save"]))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: _FakeSaved("tokenizer.json"))
    return hooks


def test_conversion_writes_the_target_and_leaves_no_partial_folder(tmp_path, fake_loaders):
    target = tmp_path / "cache" / "model"
    assert model_source.convert_gguf(tmp_path, "m.gguf", target) == target
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "tokenizer.json"]
    assert [p.name for p in target.parent.iterdir()] == ["model"]


def test_a_conversion_that_finishes_second_uses_the_first_ones_copy(tmp_path, fake_loaders):
    target = tmp_path / "cache" / "model"

    def another_process_finishes_first():
        target.mkdir(parents=True)
        (target / "config.json").write_text(json.dumps({"saved_by": "the other process"}))

    fake_loaders["on_save"] = another_process_finishes_first
    assert model_source.convert_gguf(tmp_path, "m.gguf", target) == target
    assert json.loads((target / "config.json").read_text()) == {"saved_by": "the other process"}
    assert [p.name for p in target.parent.iterdir()] == ["model"]  # our partial folder is gone
