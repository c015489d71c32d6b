"""Bad input to nanoseek.load and `nanoseek info`: clear ValueError/FileNotFoundError naming the file and
the problem (the CLI prints one line and exits 2), never a bare KeyError or a deep torch traceback."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import nanoseek
from nanoseek.cli import main as cli_main
from nanoseek.model.config import from_name
from nanoseek.model.deepseek_v3 import DeepseekV3ForCausalLM
from nanoseek.weights.hf_folder import save_pretrained


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    torch.manual_seed(0)
    save_pretrained(DeepseekV3ForCausalLM(from_name("test-tiny")), folder)
    return folder


def copy_folder(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_good_folder_loads(good_folder):
    model = nanoseek.load(good_folder)
    torch.manual_seed(0)  # the model the fixture saved
    saved = DeepseekV3ForCausalLM(from_name("test-tiny")).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(model(ids), saved(ids))


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        nanoseek.load(tmp_path / "nope")


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        nanoseek.load(tmp_path)


def test_unknown_model_type(tmp_path, good_folder):
    folder = copy_folder(good_folder, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "bert"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unsupported model_type 'bert'.*supported: .*deepseek_v3"):
        nanoseek.load(folder)


def test_invalid_config_values(tmp_path, good_folder):
    folder = copy_folder(good_folder, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["n_group"] = 3
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json.*n_group=3"):
        nanoseek.load(folder)


def test_missing_tensor(tmp_path, good_folder):
    folder = copy_folder(good_folder, tmp_path / "m")
    from safetensors.torch import load_file

    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.self_attn.kv_b_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.kv_b_proj.weight.*missing"):
        nanoseek.load(folder)


def test_misshaped_tensor(tmp_path, good_folder):
    folder = copy_folder(good_folder, tmp_path / "m")
    from safetensors.torch import load_file

    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(7, 64)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"up_proj.weight.*shape \(7, 64\).*expects \(128, 64\)"):
        nanoseek.load(folder)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(tmp_path, good_folder, damage):
    folder = copy_folder(good_folder, tmp_path / "m")
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 10)
    with pytest.raises(ValueError, match=r"model.safetensors.*(corrupt|could not be read)"):
        nanoseek.load(folder)


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    code = cli_main(["info", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "no such file" in err and "Traceback" not in err


def test_cli_info_on_good_model(good_folder, capsys):
    assert cli_main(["info", str(good_folder)]) == 0
    assert "deepseek_v3" in capsys.readouterr().out


def test_forward_rejects_bad_token_ids(good_folder):
    model = nanoseek.load(good_folder)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[1, 999]]))
