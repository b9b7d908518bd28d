"""The README's Python API block runs as written and does what its comments say."""
from __future__ import annotations

import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _api_block() -> str:
    text = README.read_text()
    section = text[text.index("## Python API"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the README's Python API section has no python block"
    return blocks[0]


def test_readme_python_api_block(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)                    # it writes digits-randsac/ where it runs
    namespace: dict = {}
    exec(compile(_api_block(), "README.md (Python API)", "exec"), namespace)
    losses, accuracy = namespace["losses"], namespace["accuracy"]
    assert len(losses) == 15 and losses[-1] < 0.75 * losses[0], losses   # it trains
    assert accuracy > 0.5                                                    # 10 classes: chance is 0.1
    assert "linear probe accuracy" in capsys.readouterr().out
    model, restored = namespace["model"], namespace["restored"]
    assert (tmp_path / "digits-randsac" / "config.json").exists()
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in model.state_dict().items())
    assert restored.pretrained_metadata["mean"] == list(namespace["train"].mean)
